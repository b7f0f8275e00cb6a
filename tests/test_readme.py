"""What a newcomer types works: the README's quick start, run from a clean clone.

The clone is ``git clone`` of this checkout's HEAD (so only committed files
count, as for a newcomer). Its ``.venv`` is made here in seconds instead of
by ``pip install`` (which needs the network and a minute): a venv of the
same interpreter whose ``.pth`` puts the clone's ``scripts/`` first and this
checkout's installed dependencies after it, the console scripts of
``pyproject.toml`` written as pip writes them, the dependencies' own
executables (``bao``, ``ruff``, ...) linked, and the stamp with which
``tools/setup-dev.sh`` recognises an up-to-date ``.venv`` (the rest of the
set-up, the Debian packages and services, runs for real).

The commands run with a private ``TMPDIR``: the README's ``/tmp`` is the
machine's temporary directory, where the demo keeps its default work
directory and the CLI looks for a kept demo; concurrent test sessions must
not share them. ``/tmp/`` in a command is read as that directory.

The test command itself (``tools/setup-dev.sh && .venv/bin/python -m pytest``)
cannot run the whole suite from inside the suite: its set-up runs, and
pytest collects every test in the clone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_publisher.operations import cli

ROOT = Path(__file__).resolve().parents[1]
#: One quick-start command at most this long (the demo itself takes ~10-60 s).
COMMAND_TIMEOUT = 600


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def sh_blocks(section: str) -> list[list[str]]:
    """The commands of each of the section's ``sh`` blocks, in order (comments kept)."""
    return [[line for line in block.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
            for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def sh_lines(section: str) -> list[str]:
    return [line for block in sh_blocks(section) for line in block]


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A clean clone of HEAD with a ready ``.venv`` (see the module docstring)."""
    base = tmp_path_factory.mktemp("clone")
    repo = base / "cvmfs-publisher"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(repo)],
                   check=True, capture_output=True, timeout=120)
    venv = repo / ".venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                    "--without-pip", str(venv)], check=True, capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
    Path(purelib, "cvmfs_publisher_clone.pth").write_text(
        f"{repo / 'scripts'}\n{sysconfig.get_paths()['purelib']}\n")
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        exe = venv / "bin" / name
        exe.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\n"
                       f"sys.exit({func}())\n")
        exe.chmod(0o755)
    own = Path(sys.executable).parent  # this checkout's venv: the dependencies' executables
    for exe in own.iterdir():
        target = venv / "bin" / exe.name
        if exe.is_file() and not exe.name.startswith(("python", "activate", "Activate")) \
                and not target.exists():
            target.symlink_to(exe)
    digest = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".setup-dev.stamp").write_text(f"{repo} {digest}\n")
    yield repo
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tmpdir_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("tmpdir")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CVMFS_PUBLISHER_", "PYTHON", "VIRTUAL_ENV"))}
    env["TMPDIR"] = str(tmp)
    yield env
    shutil.rmtree(tmp, ignore_errors=True)


def run(clone: Path, command: str, env: dict[str, str], timeout: float = COMMAND_TIMEOUT,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_ci_runs_exactly_the_readme_line() -> None:
    lines = sh_lines(readme_section("Quick start"))
    test_line = next(line for line in lines if "pytest" in line)
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [_strip_comment(test_line)]


def test_quick_start_from_a_clean_clone(clone: Path, tmpdir_env: dict[str, str]) -> None:
    """Every quick-start command succeeds, and the demo leaves nothing behind."""
    tmp = Path(tmpdir_env["TMPDIR"])
    workdir = tmp / "cvmfs-publisher-demo"
    outputs: dict[str, str] = {}
    for block in sh_blocks(readme_section("Quick start")):
        sourced: list[str] = []  # ". FILE" lines: their variables hold for the block's rest
        for line in block:
            run_line(clone, line, tmp, tmpdir_env, sourced, outputs)
    check_demo_outputs(outputs, tmp, workdir)
    again = run(clone, "tools/demo.sh --stop", tmpdir_env)
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    assert "stopped" not in again.stdout


def run_line(clone: Path, line: str, tmp: Path, env: dict[str, str], sourced: list[str],
             outputs: dict[str, str]) -> None:
    """Run one README command (retried for a minute if it says "later"); it must succeed."""
    command = _strip_comment(line).replace("/tmp/", f"{tmp}/")
    if "pytest" in command:  # the suite cannot run itself; its set-up and collection can
        command = command.replace(".venv/bin/python -m pytest",
                                  ".venv/bin/python -m pytest --collect-only -q")
    script = "set -e\n" + "".join(f"{s}\n" for s in sourced) + command
    deadline = time.monotonic() + (60 if "later" in line else 0)
    while True:
        res = run(clone, script, env)
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert res.returncode == 0, (f"{command!r} exited {res.returncode}:\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    outputs[command] = res.stdout + res.stderr
    if command.startswith(". "):
        sourced.append(command)
    if command.startswith("tools/demo.sh --keep"):  # the daemons' logs, before --stop
        workdir = tmp / "cvmfs-publisher-demo"
        outputs["kept demo's logs"] = "".join(
            p.read_text(errors="replace") for p in sorted(workdir.glob("log/*.log")))


def check_demo_outputs(outputs: dict[str, str], tmp: Path, workdir: Path) -> None:
    demo = outputs["tools/demo.sh"]
    for step in ("provisioned in", "published in", "bin/hello.sh  mode 755",
                 "software/tools/demo-tool-1.0/bin/demo-tool", "deprovisioned",
                 "demo succeeded", "stopped everything"):
        assert step in demo, step
    kept = outputs["tools/demo.sh --keep"]
    assert "The stack keeps running" in kept and "demo.env" in kept
    status = outputs[".venv/bin/cvmfs-publisher status"]
    assert "using the running demo's configuration" in status
    assert "everything is published" in status
    logs = outputs["kept demo's logs"]
    assert "outcome=" in logs  # the daemons' own lines are there
    for text in (demo, kept, logs):
        assert "Channel.Close" not in text, "pika's passive-declare 404 reached the output"
    assert "stopped the demo stack" in outputs["tools/demo.sh --stop"]
    # nothing left behind
    assert not workdir.exists()
    assert str(tmp) not in Path("/proc/mounts").read_text()
    assert cli.DEMO_CONFIG_POINTER.name not in os.listdir(tmp)
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if str(workdir).encode() in _read(p)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _subcommands(parser: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of an argparse parser (``("dlq", "list")``, ...)."""
    import argparse

    out = [prefix]
    for action in getattr(parser, "_actions", []):
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _subcommands(sub, (*prefix, name))
    return out


def help_commands(clone: Path) -> list[str]:
    scripts = tomllib.loads((clone / "pyproject.toml").read_text())["project"]["scripts"]
    commands = [f".venv/bin/cvmfs-publisher {' '.join(p)} --help".replace("  ", " ")
                for p in _subcommands(cli.build_parser())]
    commands += [f".venv/bin/{name} --help" for name in scripts if name != "cvmfs-publisher"]
    commands += [f".venv/bin/python {p.relative_to(clone)} --help"
                 for p in sorted((clone / "scripts").glob("*.py"))]
    commands += [f".venv/bin/python {p.relative_to(clone)} --help"
                 for p in sorted((clone / "bench").glob("bench_*.py"))]
    commands += [".venv/bin/python -m cvmfs_publisher.operations.health --help",
                 "tools/demo.sh --help"]
    return commands


def test_every_command_has_help(clone: Path, tmpdir_env: dict[str, str]) -> None:
    """``--help`` of the CLI and each sub-command, the daemons, the launchers, the benchmarks."""
    commands = help_commands(clone)
    assert len(commands) >= 20
    for command in commands:
        res = run(clone, command, tmpdir_env, timeout=120)
        assert res.returncode == 0, f"{command}: exit {res.returncode}\n{res.stderr[-2000:]}"
        assert res.stdout.lower().startswith(("usage:", "one-command local demo")), command
        assert "``" not in res.stdout, f"{command}: reStructuredText in the help"
        assert "[setup-dev]" not in res.stdout, f"{command}: ran the set-up"
    for p in _subcommands(cli.build_parser())[1:]:
        res = run(clone, f".venv/bin/cvmfs-publisher {' '.join(p)} --help", tmpdir_env)
        # every option of every command is explained
        assert not re.search(r"^\s+--[\w-]+\s*$", res.stdout, flags=re.M), res.stdout


def test_benchmarks_are_documented_one_line_each() -> None:
    text = readme_section("Development")
    for bench in sorted((ROOT / "bench").glob("bench_*.py")):
        line = f".venv/bin/python bench/{bench.name}"
        assert text.count(line) == 1, bench.name
        doc = bench.read_text().split('"""')[1]
        assert line in doc and "sudo" not in doc and "PYTHONPATH" not in doc, bench.name

