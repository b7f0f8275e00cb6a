"""``cvmfs_server`` as a Python API: argument lists, exit codes, state on disk.

Facts relied upon (observed on CernVM-FS 2.12, DESIGN §2):
- ``transaction``: 0 ok, 17 already open, 16 lease busy, 1 anything else;
- ``abort -f``: 0 ok, 22 not in a transaction, 5 gateway unreachable
  (the repository stays in its transaction);
- ``publish``: 0 ok, 1 on any failure;
- "in a transaction" is decided by ``<spool>/<repo>/in_transaction.lock``,
  "exists" by ``<repositories.d>/<repo>``, never from error text.

Commands never run through a shell; stdout and stderr are captured and put
in the exception (and so in the log line) when a command fails.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .core.config import CvmfsConfig

log = logging.getLogger(__name__)

EBUSY, EEXIST, EINVAL, EIO = 16, 17, 22, 5


class CvmfsError(Exception):
    """A failed ``cvmfs_server`` call, with everything an operator needs."""

    def __init__(self, step: str, repository: str, rc: int, stdout: str, stderr: str) -> None:
        self.step, self.repository, self.rc = step, repository, rc
        self.stdout, self.stderr = stdout, stderr
        detail = _last_lines(stderr) or _last_lines(stdout) or "no output"
        super().__init__(f"cvmfs_server {step} {repository} exited {rc}: {detail}")


class TransactionBusy(CvmfsError):
    """16 (lease busy) or 17 (another transaction open): retry later."""


class NotInTransaction(CvmfsError):
    """``abort`` answered 22."""


class GatewayUnreachable(CvmfsError):
    """``abort -f`` answered 5: the repository is still in its transaction."""


class CommandTimeout(CvmfsError):
    """The command ran longer than ``cvmfs.command_timeout``."""


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float


class CvmfsServer:
    """Runs ``cvmfs_server`` with the configured path and reads its state files."""

    def __init__(self, cfg: CvmfsConfig, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.command = cfg.server_command
        self.env = env

    # -- state on disk -----------------------------------------------------------------

    def exists(self, repo: str) -> bool:
        return (Path(self.cfg.repositories_dir) / repo).is_dir()

    def spool(self, repo: str) -> Path:
        return Path(self.cfg.spool_dir) / repo

    def in_transaction(self, repo: str) -> bool:
        return (self.spool(repo) / "in_transaction.lock").exists()

    def union(self, repo: str) -> Path:
        """``/cvmfs/<repo>``: writable only inside a transaction."""
        return Path(self.cfg.mount_dir) / repo

    def installed_keys(self, repo: str) -> bool:
        """Are the publisher's keys in ``/etc/cvmfs/keys`` (next to repositories.d)?"""
        keys = Path(self.cfg.repositories_dir).parent / "keys"
        return all((keys / f"{repo}.{ext}").exists() for ext in ("pub", "crt", "gw"))

    # -- running -------------------------------------------------------------------------

    def run(self, step: str, repo: str, args: Sequence[str], stdin: IO[bytes] | None = None,
            check: bool = True, timeout: float | None = None) -> Result:
        """Run ``cvmfs_server <args>``; raise :class:`CvmfsError` (or a subclass) on failure."""
        argv = [self.command, *args]
        t0 = time.monotonic()
        env = None if self.env is None else {**os.environ, **self.env}
        try:
            proc = subprocess.run(
                argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                capture_output=True, timeout=timeout or self.cfg.command_timeout,
                check=False, env=env, cwd="/",
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(step, repo, -1, _decode(exc.stdout), _decode(exc.stderr)) from None
        except OSError as exc:
            raise CvmfsError(step, repo, -1, "", f"cannot run {self.command}: {exc.strerror}") \
                from None
        res = Result(proc.returncode, _decode(proc.stdout), _decode(proc.stderr),
                     time.monotonic() - t0)
        log.debug("cvmfs_server %s %s rc=%d in %.2fs", step, repo, res.rc, res.seconds)
        if check and res.rc != 0:
            raise self._error(step, repo, res)
        return res

    def _error(self, step: str, repo: str, res: Result) -> CvmfsError:
        cls: type[CvmfsError] = CvmfsError
        if step == "transaction" and res.rc in (EBUSY, EEXIST):
            cls = TransactionBusy
        elif step == "abort" and res.rc == EINVAL:
            cls = NotInTransaction
        elif step == "abort" and res.rc == EIO:
            cls = GatewayUnreachable
        return cls(step, repo, res.rc, res.stdout, res.stderr)

    # -- commands ------------------------------------------------------------------------

    def mkfs_gateway(self, repo: str, keydir: str) -> Result:
        """Create a gateway-mode publisher repository (DESIGN §2)."""
        stratum0 = f"{self.cfg.stratum0_url.rstrip('/')}/{repo}"
        upstream = f"gw,/srv/cvmfs/{repo}/data/txn,{self.cfg.gateway_url}"
        return self.run("mkfs", repo, ["mkfs", "-w", stratum0, "-u", upstream, "-k", keydir,
                                       "-o", self.cfg.owner, repo])

    def rmfs(self, repo: str) -> Result:
        return self.run("rmfs", repo, ["rmfs", "-f", repo])

    def transaction(self, repo: str) -> Result:
        return self.run("transaction", repo, ["transaction", repo])

    def publish(self, repo: str, message: str = "") -> Result:
        args = ["publish"]
        if message:
            args += ["-m", message]
        return self.run("publish", repo, [*args, repo])

    def abort(self, repo: str) -> Result:
        return self.run("abort", repo, ["abort", "-f", repo])

    def ingest_tar(self, repo: str, base_dir: str, tar_stream: IO[bytes]) -> Result:
        """Ingest an uncompressed tar from ``tar_stream`` into ``base_dir``."""
        return self.run("ingest", repo, ["ingest", "-t", "-", "-b", base_dir, repo],
                        stdin=tar_stream)

    def ingest_delete(self, repo: str, path: str) -> Result:
        return self.run("ingest", repo, ["ingest", "-d", path, repo])

    def list(self) -> dict[str, str]:
        """``{repo: status text}`` from ``cvmfs_server list``."""
        res = self.run("list", "-", ["list"])
        out = {}
        for line in res.stdout.splitlines():
            name, _, rest = line.strip().partition(" ")
            if name:
                out[name] = rest.strip()
        return out

    def healthy(self, repo: str) -> bool:
        """Exists, not 'unhealthy' in ``list``, and keys installed."""
        if not self.exists(repo):
            return False
        status = self.list().get(repo, "unhealthy")
        return "unhealthy" not in status and self.installed_keys(repo)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", "replace")
