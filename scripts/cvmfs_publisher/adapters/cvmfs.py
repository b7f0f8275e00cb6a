"""``cvmfs_server`` as a Python API: argument lists, exit codes, state on disk.

Facts relied upon (observed on CernVM-FS 2.12, DESIGN §2, cvmfs README §1, §10):
- ``transaction``: 0 ok, 17 already open, 16 lease busy, 22 expired whitelist
  or layout mismatch (no retry can help: :class:`TransactionRefused`), 1
  anything else;
- ``abort -f``: 0 ok, 5 gateway unreachable (the repository stays in its
  transaction), 22 for two different things: "not in a transaction"
  (``Repository <repo> is not in a transaction``) and "a publish is still
  running" (``Could not acquire lock .../is_publishing.lock``). An exit code
  alone never decides a state: the message and the lock files do;
- ``publish``: 0 ok, 1 on any failure;
- "in a transaction" is decided by ``<spool>/<repo>/in_transaction.lock``,
  "a publish is running" by the flock on ``<spool>/<repo>/is_publishing.lock``,
  "exists" by ``<repositories.d>/<repo>``.

Commands never run through a shell; stdout and stderr are captured and put
in the exception (and so in the log line) when a command fails, cut before
the tool's ``Executed Command:`` and ``Stacktrace:`` trailers.

A ``cvmfs_server`` child never outlives the daemon that started it: it runs
in its own process group, which is killed on a timeout and at the daemon's
exit, and it gets SIGKILL when its parent dies (``PR_SET_PDEATHSIG``). Its own
children (``cvmfs_swissknife``) may still outlive a daemon killed alone: the
callers handle that through the lock files (see ``BatchPublisher.abort``).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import fcntl
import functools
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..core.config import CvmfsConfig

log = logging.getLogger(__name__)

EBUSY, EEXIST, EINVAL, EIO = 16, 17, 22, 5

#: Lines from which the tool's output is noise for an operator.
TRAILERS = ("Executed Command:", "Stacktrace:")


def tool_lines(text: str | None) -> list[str]:
    """The tool's message lines, stripped, without blank lines and trailers."""
    lines = []
    for raw in (text or "").splitlines():
        ln = raw.strip()
        if ln.startswith(TRAILERS):
            break
        if ln:
            lines.append(ln)
    return lines


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
    """``abort`` answered 22 *saying* "is not in a transaction", and
    ``in_transaction.lock`` is gone."""


class PublishInProgress(CvmfsError):
    """``abort`` answered 22 with ``Could not acquire lock .../is_publishing.lock``:
    a publish (perhaps one orphaned by a killed daemon) still runs. Wait for the
    lock (:meth:`CvmfsServer.wait_publish_lock`), then abort."""


class TransactionRefused(CvmfsError):
    """``transaction`` answered 22 (expired whitelist, layout mismatch): nothing
    changes until an operator acts, so retrying soon is pointless."""


class GatewayUnreachable(CvmfsError):
    """``abort -f`` answered 5: the repository is still in its transaction."""


class CommandTimeout(CvmfsError):
    """The command ran longer than ``cvmfs.command_timeout``."""


def tool_message(exc: CvmfsError) -> str:
    """The tool's own words, on one line (stderr first, else stdout).

    The first line (usually the cause, e.g. the gateway's reply) and the last
    ones (the verdict); the ``Executed Command:`` and ``Stacktrace:`` trailers
    are only noise.
    """
    for text in (exc.stderr, exc.stdout):
        lines = tool_lines(text)
        if lines:
            picked = list(dict.fromkeys([lines[0], *lines[-3:]]))
            return " | ".join(picked)[:600]
    return "no output"


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(tool_lines(text)[-n:])


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

    def publish_lock(self, repo: str) -> Path:
        return self.spool(repo) / "is_publishing.lock"

    def wait_publish_lock(self, repo: str, timeout: float, poll: float = 0.2) -> bool:
        """Wait until nobody holds the flock on ``is_publishing.lock``; False on timeout.

        The file may exist without a holder (a killed publish): the flock, not
        the file, says whether a publish runs (cvmfs README §2). The lock is
        only probed (taken and released at once, never deleted), so the tool's
        own ``abort`` can take it right after.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.publish_lock(repo), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def installed(self, repo: str) -> list[str]:
        """What a complete publisher repository has and this one lacks.

        A failed ``mkfs`` leaves ``repositories.d/<repo>`` behind without some
        of these (cvmfs README §7); a repository in a transaction has them all.
        """
        missing = []
        if not (Path(self.cfg.repositories_dir) / repo / "server.conf").is_file():
            missing.append("server.conf")
        if not self.spool(repo).is_dir():
            missing.append("spool")
        if not self.installed_keys(repo):
            missing.append("keys")
        return missing

    def union(self, repo: str) -> Path:
        """``/cvmfs/<repo>``: writable only inside a transaction.

        It shows the open transaction's content too, even an unpublished one
        (cvmfs README §10): what was published is :meth:`published`.
        """
        return Path(self.cfg.mount_dir) / repo

    def published(self, repo: str) -> Path:
        """``<spool>/<repo>/rdonly``: the read-only layer, the published revision."""
        return self.spool(repo) / "rdonly"

    def installed_keys(self, repo: str) -> bool:
        """Are the publisher's keys in ``/etc/cvmfs/keys`` (next to repositories.d)?"""
        keys = Path(self.cfg.repositories_dir).parent / "keys"
        return all((keys / f"{repo}.{ext}").exists() for ext in ("pub", "crt", "gw"))

    # -- running -------------------------------------------------------------------------

    def run(self, step: str, repo: str, args: Sequence[str], stdin: IO[bytes] | None = None,
            check: bool = True, timeout: float | None = None, nice: int = 0) -> Result:
        """Run ``cvmfs_server <args>``; raise :class:`CvmfsError` (or a subclass) on failure.

        ``nice``: added to the command's niceness (a bulk publish, see
        ``sync.bulk_nice``); it holds for every process the tool starts.
        """
        argv = [self.command, *args]
        t0 = time.monotonic()
        env = None if self.env is None else {**os.environ, **self.env}
        limit = timeout or self.cfg.command_timeout
        try:
            proc = subprocess.Popen(
                argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                start_new_session=True,
                preexec_fn=functools.partial(_child_setup, os.getpid(), nice),  # noqa: PLW1509
            )
        except OSError as exc:
            raise CvmfsError(step, repo, -1, "", f"cannot run {self.command}: {exc.strerror}") \
                from None
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            log.error("repository=%s step=%s outcome=killed: cvmfs_server ran longer than "
                      "%.0fs (cvmfs.command_timeout), its process group was killed",
                      repo, step, limit)
            raise CommandTimeout(step, repo, -1, _decode(out), _decode(err)) from None
        except BaseException:
            _kill_group(proc.pid)  # an interrupted caller must not leave it running
            proc.wait()
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc.pid)
        res = Result(proc.returncode, _decode(out), _decode(err), time.monotonic() - t0)
        log.debug("cvmfs_server %s %s rc=%d in %.2fs", step, repo, res.rc, res.seconds)
        if check and res.rc != 0:
            raise self._error(step, repo, res)
        return res

    def _error(self, step: str, repo: str, res: Result) -> CvmfsError:
        cls: type[CvmfsError] = CvmfsError
        if step == "transaction" and res.rc in (EBUSY, EEXIST):
            cls = TransactionBusy
        elif step == "transaction" and res.rc == EINVAL:
            cls = TransactionRefused
        elif step == "abort" and res.rc == EINVAL:
            if "could not acquire lock" in res.stderr.lower():
                cls = PublishInProgress
            elif "is not in a transaction" in res.stderr and not self.in_transaction(repo):
                cls = NotInTransaction
        elif step == "abort" and res.rc == EIO:
            cls = GatewayUnreachable
        return cls(step, repo, res.rc, res.stdout, res.stderr)

    # -- commands ------------------------------------------------------------------------

    def create_repository(self, repo: str, keys_dir: str, leftovers: bool = True) -> bool:
        """mkfs (gateway mode) unless it exists; a failed mkfs' leftover is removed first.

        The one mkfs path (provisioning and the sync daemon both use it); True
        if the repository was created. ``leftovers=False`` (the sync daemon):
        an existing repository is left as it is; only the provisioner, which
        owns a repository's life cycle and sees its keys, judges a leftover
        (in the sync container a sound repository may look unhealthy to
        ``list``, and an rmfs there would destroy it). Never ``rmfs`` a repository in a
        transaction: rmfs drops the session token but not the gateway lease,
        and the repository created again would get 16 (lease busy) from every
        transaction for the lease's lifetime (cvmfs README §10). ``list`` calls
        such a repository ``in transaction - unhealthy`` after a crash; it is
        repaired by the sync daemon (abort -f, then the batch replayed), not
        recreated. A failed mkfs is recognised by what it did not create
        (server.conf, the spool, the keys), or, outside a transaction, by
        ``unhealthy`` (DESIGN §2). Raises :class:`CvmfsError`.
        """
        if self.exists(repo):
            if not leftovers:
                return False
            if self.in_transaction(repo):
                log.warning("repository=%s step=mkfs outcome=left-to-sync: in a transaction "
                            "(a crash's leftover): not recreated (rmfs would leak its "
                            "gateway lease); cvmfs-repo-sync repairs it with abort -f and "
                            "replays its batch", repo)
                return False
            missing = self.installed(repo)
            if not missing and self.healthy(repo):
                return False
            log.warning("repository=%s step=mkfs outcome=leftover: %s, removing it with "
                        "rmfs -f and creating it again", repo,
                        f"{', '.join(missing)} missing" if missing else
                        "unhealthy outside a transaction")
            self.rmfs(repo)
        log.info("repository=%s step=mkfs outcome=creating: keys from %s", repo, keys_dir)
        self.mkfs_gateway(repo, keys_dir)
        return True

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

    def publish(self, repo: str, message: str = "", nice: int = 0) -> Result:
        args = ["publish"]
        if message:
            args += ["-m", message]
        return self.run("publish", repo, [*args, repo], nice=nice)

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


# -- children ----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PRCTL = _LIBC.prctl  # resolved here: the child between fork and exec only calls it


def _child_setup(parent: int, nice: int) -> None:
    """In the child before exec: :func:`_die_with_parent`, then ``nice`` if any."""
    _die_with_parent(parent)
    if nice:
        os.nice(nice)  # one system call, like prctl: safe between fork and exec


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the thread that started it dies.

    Why here and not only ``killpg`` at exit: a daemon killed with SIGKILL
    (OOM killer, ``kill -9``, systemd's ``KillMode=process``) runs no exit code.
    ``preexec_fn`` is documented as unsafe with threads because the child may
    need a lock some other thread held at ``fork``; this one makes one system
    call through a function resolved at import, takes no lock and allocates
    nothing that is not protected by the GIL the child inherits. The signal
    follows the *thread*: callers run commands from a thread that waits for
    them (a publish worker), never from one that exits first.
    """
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: no signal would come
        os.kill(os.getpid(), signal.SIGKILL)


#: Process group ids (= pids: each child leads its own) of commands running now.
_CHILDREN: set[int] = set()
_CHILDREN_LOCK = threading.Lock()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # never expected: the group is ours
        log.error("cannot kill cvmfs_server process group %d: %s", pgid, exc)


def kill_children() -> int:
    """SIGKILL every ``cvmfs_server`` process group still running; how many.

    Called at the daemon's exit (after the publishes in hand were waited for,
    so normally none is left): a command must not go on changing a repository
    whose daemon is gone.
    """
    with _CHILDREN_LOCK:
        groups = list(_CHILDREN)
    for pgid in groups:
        log.warning("killing cvmfs_server process group %d at exit", pgid)
        _kill_group(pgid)
    return len(groups)


atexit.register(kill_children)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", "replace")
