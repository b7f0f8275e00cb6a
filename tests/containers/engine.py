"""A Docker daemon of the container tests' own, and the commands that drive it.

Why our own ``dockerd`` and not the machine's: the tests must not depend on
(or disturb) a daemon someone else configured, and the machine's network
rules are not ours: this one runs with ``--bridge=none --iptables=false
--ip6tables=false`` (containers use the host network only) and keeps its
socket, data and state under :data:`CACHE_DIR`, so that the base image, the
images and the build cache survive from one run to the next on one machine.
At the end the daemon and every container it ran are stopped; the images
stay.

Also here: the local Debian 12 base image (``container/make-base-image.sh``,
from the host's own Debian mirror), the three images
(``container/build-images.sh``, with the host's pip index and CA bundle as
build secrets) and ``docker-compose`` on the production compose file plus the
tests' override.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.common import wait_for

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
OVERRIDE_FILE = Path(__file__).with_name("docker-compose.test.yml")

#: Socket, data root and exec root of the tests' Docker daemon (kept between runs).
CACHE_DIR = Path(os.environ.get("CVMFS_PUBLISHER_DOCKER_CACHE",
                                "/var/cache/cvmfs-publisher/docker"))
#: Debian's docker.io client and daemon (a docker CLI elsewhere on PATH may be another one).
DOCKER = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
DOCKER_COMPOSE = "/usr/bin/docker-compose"
#: The local base, tagged by its recipe: a changed make-base-image.sh makes a new one.
BASE_IMAGE = "cvmfs-publisher-base:bookworm-" + hashlib.sha256(
    (REPO / "container/make-base-image.sh").read_bytes()).hexdigest()[:12]
#: The tag of the images the tests build (never the operators' default "local").
TAG = "test"
SERVICES = ("publisher-consumer", "cvmfs-repo-consumers", "sync-publisher")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def missing_tools() -> list[str]:
    """The Debian packages (.ci/apt-packages.containers) this machine lacks."""
    tools = {DOCKERD: "docker.io", DOCKER: "docker.io", DOCKER_COMPOSE: "docker-compose",
             "/usr/sbin/debootstrap": "debootstrap"}
    return sorted({pkg for path, pkg in tools.items() if not Path(path).exists()})


def debian_mirror() -> str:
    """The host's own Debian mirror (its apt sources), for debootstrap."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        # deb822 "URIs: <url>" and one-line "deb <url> bookworm main"
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text,
                                 flags=re.MULTILINE):
            url = match.group(1)
            if url.startswith(("http://", "https://")) and "security" not in url:
                return url.rstrip("/")
    raise RuntimeError("no Debian mirror in /etc/apt/sources.list*: debootstrap needs one")


def pip_build_config(workdir: Path) -> Path:
    """A pip.conf for the image builds: this host's package index, trusted through its CA.

    Read from the host's own pip configuration (``pip config list``: files and
    ``PIP_*`` variables) at run time, so that no index host is written down
    anywhere. Only http(s) indexes are kept: a ``file://`` index or
    ``find-links`` directory of the host is not inside the build.
    """
    res = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True,
                         text=True, timeout=60, check=False)
    settings: dict[str, str] = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.rpartition(".")[2]
        settings[name] = value.strip().strip("'\"")
    lines = ["[global]", "cert = /run/secrets/ca.crt"]
    for name in ("index-url", "extra-index-url"):
        urls = [u for u in settings.get(name, "").split() if u.startswith(("http://", "https://"))]
        if urls:
            lines.append(f"{name} = {' '.join(urls)}")
    path = workdir / "pip.conf"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


@dataclass
class Engine:
    """The tests' dockerd (started by :func:`start_engine`) and its CLI."""

    root: Path
    process: subprocess.Popen[bytes]
    log_file: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DOCKER_", "COMPOSE_"))}
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        env["DOCKER"] = DOCKER
        return env

    def docker(self, *args: str, timeout: float = 120, check: bool = True,
               input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env,
                             timeout=timeout, check=False, input=input_text)
        if check and res.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {res.returncode}: "
                               f"{res.stderr.strip()[-2000:]}")
        return res

    def inspect(self, what: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", what).stdout)[0]

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.inspect(name)["Size"])

    def ensure_base_image(self, workdir: Path) -> None:
        """The debootstrap base, made once per machine (then cached with the images)."""
        if self.has_image(BASE_IMAGE):
            self.timings["base image (cached)"] = 0.0
            return
        started = time.monotonic()
        run_logged([str(REPO / "container/make-base-image.sh"), BASE_IMAGE, debian_mirror(),
                    str(workdir)], workdir / "make-base-image.log", self.env, timeout=1200)
        self.timings["base image (debootstrap + import)"] = time.monotonic() - started

    def build_images(self, workdir: Path) -> float:
        """The three images, test variant, from the local base; seconds it took."""
        started = time.monotonic()
        run_logged([str(REPO / "container/build-images.sh"), "--base", BASE_IMAGE,
                    "--tag", TAG, "--cvmfs-server", "test-double",
                    "--pip-conf", str(pip_build_config(workdir)),
                    "--ca-cert", str(CA_BUNDLE), "--network", "host"],
                   workdir / "build-images.log", self.env, timeout=1800)
        took = time.monotonic() - started
        # What each rebuild leaves behind: the previous images of these tags
        # and the build cache beyond a bound (the cache directory lives on).
        self.docker("image", "prune", "--force", timeout=300, check=False)
        self.docker("builder", "prune", "--force", "--keep-storage", "4gb", timeout=300,
                    check=False)
        return took

    def stop(self) -> None:
        """Every container this daemon runs, then the daemon (images and cache stay)."""
        with contextlib.suppress(Exception):
            ids = self.docker("ps", "-aq").stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, timeout=300, check=False)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_logged(argv: Sequence[str], log_file: Path, env: dict[str, str], timeout: float) -> None:
    """Run a build step with its output in ``log_file``; its tail in the error."""
    with log_file.open("wb") as out:
        res = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env,
                             timeout=timeout, check=False)
    if res.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"{argv[0]} exited {res.returncode}:\n" + "\n".join(tail))


@contextlib.contextmanager
def start_engine(root: Path = CACHE_DIR, timeout: float = 60) -> Iterator[Engine]:
    """Our dockerd on ``root``, one test run at a time (a lock), stopped at the end."""
    for sub in ("data", "exec", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _stop_leftover(root)
        log_file = root / "run" / "dockerd.log"
        argv = [DOCKERD, "--bridge=none", "--iptables=false", "--ip6tables=false",
                "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                "--pidfile", str(root / "run" / "docker.pid"),
                "-H", f"unix://{root / 'run' / 'docker.sock'}"]
        with log_file.open("ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        engine = Engine(root, process, log_file)
        try:
            wait_for("dockerd", lambda: process.poll() is None and engine.docker(
                "version", check=False, timeout=10).returncode == 0, timeout, log_file)
            yield engine
        finally:
            engine.stop()


def _stop_leftover(root: Path) -> None:
    """A dockerd an interrupted run left on this cache directory (ours by its pid file)."""
    pidfile = root / "run" / "docker.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not cmdline or not cmdline[0].endswith(b"dockerd") or str(root).encode() not in b" ".join(
            cmdline):
        return
    os.kill(pid, signal.SIGTERM)
    wait_for("the previous run's dockerd to stop",
             lambda: not Path(f"/proc/{pid}").exists(), 60)


@dataclass
class Compose:
    """``docker-compose`` (Debian's 1.29) on the production file plus the tests' override."""

    engine: Engine
    project: str
    variables: dict[str, str]

    def run(self, *args: str, timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        env = {**self.engine.env, **self.variables, "COMPOSE_PROJECT_NAME": self.project}
        argv = [DOCKER_COMPOSE, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE),
                "-f", str(OVERRIDE_FILE), *args]
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                             check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} exited {res.returncode}: "
                               f"{res.stderr.strip()[-3000:]}")
        return res

    def container(self, service: str) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def health(self, service: str) -> str:
        state = self.engine.inspect(self.container(service))["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))

    def wait_healthy(self, services: Sequence[str] = SERVICES, timeout: float = 300) -> float:
        """Seconds until every service's HEALTHCHECK says healthy."""
        started = time.monotonic()
        wait_for(f"{', '.join(services)} healthy",
                 lambda: all(self.health(s) == "healthy" for s in services), timeout)
        return time.monotonic() - started

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service).stdout
