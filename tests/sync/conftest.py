"""Fixtures of the sync tests: a private cvmfs_server double root, staging helpers.

Changes are staged exactly as cvmfs-repo-consumers stages them (a download
committed into ``objects/``, then an entry), so the publisher reads the real
layout. The published result is read from the double's published tree.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cvmfs_publisher.core import config as config_mod
from cvmfs_publisher.core.config import Config
from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.daemons.repo_sync import NAME
from cvmfs_publisher.publishing.batch import BatchPublisher
from cvmfs_publisher.publishing.scheduler import RepoSync
from cvmfs_publisher.staging.area import Entry, Staging
from tests.conftest import DOUBLE, REPO_ROOT, CvmfsDouble, make_double
from tests.cvmfs_server_double import (
    calls,
    in_transaction,
    published_tree,
    revisions,
    unmount_all,
    violations,
)

REPO = "alice-personalrepo.infn.it"
OTHER = "bob-personalrepo.infn.it"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the double needs root (mounts)")

#: A wrapper for cvmfs_server that can SIGKILL its caller (the sync daemon) right
#: before or right after a command, once per marker file: the crash points of the
#: kill tests, hit exactly, without hooks in the daemon.
KILLING_WRAPPER = """#!{python}
import os, signal, subprocess, sys
root, double = {root!r}, {double!r}
cmd = sys.argv[1] if len(sys.argv) > 1 else ""
def marker(when):
    path = os.path.join(root, "kill-%s-%s" % (when, cmd))
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
if marker("before"):
    os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(1)
env = dict(os.environ, CVMFS_DOUBLE_ROOT=root)
rc = subprocess.call([sys.executable, double, *sys.argv[1:]], env=env)
if rc == 0 and marker("after"):
    os.kill(os.getppid(), signal.SIGKILL)
sys.exit(rc)
"""


def tarball(members: dict[str, bytes | str], gz: bool | str = False) -> bytes:
    """A tar archive: ``{name: content}``; a ``str`` value is a symlink target.

    ``gz``: False (plain), True (gzip), or ``"bz2"`` / ``"xz"``.
    """
    buf = io.BytesIO()
    mode = {False: "w", True: "w:gz", "bz2": "w:bz2", "xz": "w:xz"}[gz]
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, Any]:
    """``{path: ("f", mode, bytes) | ("l", target) | ("d",)}`` of a tree, no symlink followed."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d",)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), Path(full).read_bytes())
    out.pop("new_repository", None)
    return out


def files_of(tree: dict[str, Any]) -> dict[str, Any]:
    """Only files and symlinks (directories follow from them)."""
    return {k: v for k, v in tree.items() if v[0] != "d"}


@dataclass
class SyncEnv:
    """A double root, a configuration pointing into it, and helpers."""

    double: CvmfsDouble
    raw: dict[str, Any]
    workdir: Path
    clock: list[float] = field(default_factory=lambda: [time.time()])
    envvars: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.double.root

    def config(self, **overrides: dict[str, Any]) -> Config:
        raw = {k: dict(v) for k, v in self.raw.items()}
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        return config_mod.from_mapping(raw, env=self.envvars)

    @property
    def cfg(self) -> Config:
        return self.config()

    def add_keys(self, repo: str) -> None:
        keys = Path(self.raw["cvmfs"]["keys_dir"])
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        for ext in ("pub", "crt", "gw"):
            (keys / f"{repo}.{ext}").write_text(f"test key {repo}.{ext}\n")

    # -- staging as the consumers do it ---------------------------------------------

    def staging(self, repo: str = REPO) -> Staging:
        return Staging(self.raw["cvmfs"]["staging_dir"], repo).ensure()

    def _object(self, st: Staging, data: bytes) -> str:
        tmp, fh = st.new_download()
        with fh:
            fh.write(data)
        return st.commit_object(tmp)

    def _stage(self, repo: str, entry: Entry, t: float | None) -> Entry:
        if t is not None:
            entry.time = t
        return self.staging(repo).stage(entry)

    def put(self, path: str, data: bytes, mode: int = 0o644, repo: str = REPO,
            t: float | None = None) -> Entry:
        st = self.staging(repo)
        oid = self._object(st, data)
        return self._stage(repo, Entry(path, "put", mode=mode, object=oid, size=len(data),
                                       key=f"cvmfs/{path}"), t)

    def symlink(self, path: str, target: str, repo: str = REPO, t: float | None = None) -> Entry:
        return self._stage(repo, Entry(path, "symlink", mode=0o777, target=target,
                                       key=f"cvmfs/{path}"), t)

    def delete(self, path: str, repo: str = REPO, t: float | None = None) -> Entry:
        return self._stage(repo, Entry(path, "delete", key=f"cvmfs/{path}"), t)

    def ingest(self, name: str, data: bytes, gz: bool | str = False, repo: str = REPO,
               t: float | None = None) -> Entry:
        """Stage a tarball as the consumers do (``gz`` as in :func:`tarball`)."""
        st = self.staging(repo)
        oid = self._object(st, data)
        compression, suffix = {False: ("none", ""), True: ("gzip", ".gz"),
                               "bz2": ("bzip2", ".bz2"), "xz": ("xz", ".xz")}[gz]
        return self._stage(repo, Entry(f"software/{name}", "ingest", object=oid,
                                       compression=compression,
                                       key=f"cvmfs/{name}.tar{suffix}"), t)

    def ingest_delete(self, name: str, repo: str = REPO, t: float | None = None) -> Entry:
        return self._stage(repo, Entry(f"software/{name}", "ingest-delete"), t)

    def clean(self, repo: str = REPO) -> bool:
        """Nothing left in staging: no batch, no pending entry, no object."""
        st = self.staging(repo)
        return (not st.has_batch() and st.pending_count() == 0
                and not any(st.objects.iterdir()))

    # -- the things under test ---------------------------------------------------------

    def publisher(self, **overrides: dict[str, Any]) -> BatchPublisher:
        return BatchPublisher(self.config(**overrides))

    def daemon(self, **overrides: dict[str, Any]) -> RepoSync:
        """The daemon, publishing inline and driven by :meth:`tick` with a fake clock."""
        cfg = self.config(**overrides)
        for repo in (REPO, OTHER):
            self.staging(repo)  # known from the first tick on (its start-up recovery)
        status = StatusDocument(Path(cfg.status.dir) / f"{NAME}.json", NAME, min_interval=0)
        return RepoSync(cfg, status, clock=lambda: self.clock[0], inline=True)

    def status(self) -> dict[str, Any]:
        return json.loads((Path(self.raw["status"]["dir"]) / f"{NAME}.json").read_text())

    # -- what the double saw -----------------------------------------------------------

    def published(self, repo: str = REPO) -> dict[str, Any]:
        return snapshot(published_tree(self.root, repo))

    def revisions(self, repo: str = REPO) -> list[dict[str, Any]]:
        return [r for r in revisions(self.root, repo) if r["command"] != "mkfs"]

    def calls(self, command: str | None = None) -> list[dict[str, Any]]:
        return [c for c in calls(self.root) if command is None or c["command"] == command]

    def in_transaction(self, repo: str = REPO) -> bool:
        return in_transaction(self.root, repo)

    # -- the daemon as a process -------------------------------------------------------

    def killing_wrapper(self) -> None:
        """Point cvmfs.server_command at a wrapper that honours kill-* markers."""
        path = self.root / "bin" / "cvmfs_server_killing"
        path.write_text(KILLING_WRAPPER.format(python=sys.executable, root=str(self.root),
                                               double=str(DOUBLE)))
        path.chmod(0o755)
        self.raw["cvmfs"]["server_command"] = str(path)

    def kill_marker(self, when: str, command: str) -> Path:
        path = self.root / f"kill-{when}-{command}"
        path.touch()
        return path

    def start(self, new_session: bool = False, **env: str) -> subprocess.Popen[bytes]:
        """cvmfs-repo-sync as a real process, with this configuration."""
        cfg_path = self.workdir / "publisher.yaml"
        cfg_path.write_text(yaml.safe_dump(self.raw))
        penv = {k: v for k, v in os.environ.items() if not k.startswith("CVMFS_PUBLISHER_")}
        penv["PYTHONPATH"] = str(REPO_ROOT / "scripts")
        penv.update(self.envvars)
        penv.update(env)
        log = open(self.workdir / "daemon.out", "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "cvmfs_publisher.daemons.repo_sync", "--config",
                 str(cfg_path)], env=penv, stdout=log, stderr=subprocess.STDOUT, cwd="/",
                start_new_session=new_session)
        finally:
            log.close()

    def log_text(self) -> str:
        try:
            return (Path(self.raw["log"]["dir"]) / f"{NAME}.log").read_text()
        except FileNotFoundError:
            return ""


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0,
               proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode} while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


def base_config(double: CvmfsDouble, workdir: Path) -> dict[str, Any]:
    return {
        "log": {"dir": str(workdir / "log"), "level": "DEBUG", "stdout": False},
        "status": {"dir": str(workdir / "status"), "interval": 0.1},
        "cvmfs": {**double.paths(), "domain": "infn.it",
                  "stratum0_url": "http://stratum0.test/cvmfs",
                  "gateway_url": "http://gateway.test:4929/api/v1", "command_timeout": 60.0},
        "sync": {"quiet_seconds": 2.0, "max_delay_seconds": 5.0, "poll_interval": 0.05,
                 "backoff_initial": 0.05, "backoff_max": 0.2, "transaction_retries": 3},
    }


@pytest.fixture
def env(tmp_path: Path) -> Iterator[SyncEnv]:
    """A fresh double root with keys for REPO and OTHER; checks the double saw no misuse."""
    double = make_double(tmp_path / "cvmfs-root")
    e = SyncEnv(double, base_config(double, tmp_path), tmp_path)
    for repo in (REPO, OTHER):
        e.add_keys(repo)
    try:
        yield e
        assert violations(double.root) == [], "the double detected misuse"
        for repo in (REPO, OTHER):
            assert not e.in_transaction(repo), f"{repo} left in a transaction"
    finally:
        unmount_all(double.root)
