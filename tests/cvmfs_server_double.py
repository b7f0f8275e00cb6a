#!/usr/bin/env python3
"""Test double of ``cvmfs_server`` (CernVM-FS 2.12), the only fake of the test suite.

Why it exists: the daemons drive ``cvmfs_server`` as a subprocess with argument
lists and decide what to do from its exit codes, from a few messages and from
lock files in the spool directory. ``cvmfs_server`` cannot be installed on the
development machines, so this executable reproduces what the real tool was
observed to do (``../shared/cvmfs/README.md``): exit codes, the exact text on the
right stream, lock files and their modes, revisions, and read-only
``/cvmfs/<repo>`` outside a transaction. It also records every call and every
published revision so that tests can assert what the daemons did.

Usage: exactly like ``cvmfs_server``, with ``CVMFS_DOUBLE_ROOT=<dir>`` set. The
real paths are mapped under that root::

    <root>/etc/cvmfs/repositories.d/<repo>/{server.conf,client.conf}
    <root>/etc/cvmfs/keys/
    <root>/var/spool/cvmfs/<repo>/      spool (in_transaction.lock, session_token,
                                        is_publishing.lock, rdonly/, scratch/current/,
                                        ofs_workdir/, tmp/ ...)
    <root>/cvmfs/<repo>                 the union mount point
    <root>/srv/cvmfs/<repo>             local backend storage (local mode only)
    <root>/double/                      what the double records (see below)

Messages name the mapped paths (``<root>/cvmfs/<repo>`` where the real tool says
``/cvmfs/<repo>``); ``server.conf`` holds the mapped ``CVMFS_UNION_DIR`` and
``CVMFS_SPOOL_DIR`` but ``CVMFS_STRATUM0`` / ``CVMFS_UPSTREAM_STORAGE`` exactly as
given to ``mkfs -w`` / ``-u``.

Mount design (preferred, needs CAP_SYS_ADMIN): the published tree is the plain
directory ``<spool>/rdonly`` (the real tool has a read-only FUSE client there) and
``<root>/cvmfs/<repo>`` is a kernel overlay (lowerdir=rdonly,
upperdir=scratch/current, workdir=ofs_workdir), mounted read-only outside a
transaction and remounted read-write by ``transaction``, as the real tool does
(the read-only flag is set per mount, not per superblock: a superblock remount
syncs the whole upper file system, slow on a shared disk; writes fail with EROFS
all the same and /proc/mounts says ``ro``). Below the overlay the mount point is
bind-mounted read-only onto itself, so that it stays EROFS while ``publish`` has
the overlay unmounted. ``publish`` walks only the upper directory (its cost grows
with the change, not with the repository), moves its entries into ``rdonly``
(whiteouts = character devices 0:0 delete, directories with
``trusted.overlay.opaque=y`` replace), empties the upper directory and mounts the
overlay read-only again. A root on tmpfs makes large ingests several times faster
than on a slow disk. One root is either mounted or plain: do not mix
``CVMFS_DOUBLE_NO_MOUNT`` settings on the same root.

Gateway repositories: what was published belongs to the stratum 0 behind the
gateway, so ``rmfs`` keeps it (``<root>/double/<repo>/upstream`` and the
revisions) and a later ``mkfs`` of the same name mounts it again and continues the
revision numbers, as a real publisher would see. ``rmfs`` of a local repository
deletes its storage: its records move to ``<root>/double/removed/``.

Fallback (no mount permission, or ``CVMFS_DOUBLE_NO_MOUNT=1``): the union is a
plain directory that holds the full tree. ``publish`` copies the differences
between union and ``rdonly`` (a full walk), ``abort`` copies them back. Writes
outside a transaction cannot fail with EROFS there; instead a fingerprint of the
tree is recorded after every publish/abort and compared by the next
``transaction``: a mismatch is logged in ``violations.log`` (with the paths) and
the union is reset to the published tree, as if the write had failed. Entries
whose ctime predates the open transaction are reported by ``publish`` too.

Recording under ``<root>/double/``:

- ``calls.jsonl``: one JSON object per finished invocation: ``argv`` (arguments
  after the program name), ``prog``, ``command``, ``repo``, ``cwd``, ``pid``,
  ``nice`` (the process's niceness), ``rc``, ``start``, ``end`` (epoch
  seconds), ``stdout``, ``stderr``. A running (or
  killed) invocation is in ``running/<pid>-<ns>.json`` until it ends; ``calls()``
  returns those with ``rc`` None.
- ``<repo>/revisions/<n>.json``: ``repository``, ``revision``, ``tag``,
  ``description``, ``time`` (ISO UTC), ``timestamp``, ``command``
  (``mkfs``/``publish``/``ingest``), ``added``, ``changed``, ``deleted``: sorted
  repository-relative POSIX paths without leading slash (a deleted directory is
  listed with everything below it; a path replaced in one revision is
  ``changed``). ``<repo>/tags.txt`` indexes the tags in use.
- ``violations.log``: one line per misuse detected (writes outside a transaction
  in fallback mode, tar members escaping the base directory, unknown options).

Fault injection: ``<root>/double/faults.json`` (locked through ``faults.lock``,
replaced atomically) maps a command to a list of entries,
e.g. ``{"publish": [{"rc": 1, "stdout": "...", "stderr": "..."}],
"transaction": [{"rc": 16}], "abort": [{"rc": 5}], "ingest": [{"delay": 2}]}``.
Keys of an entry: ``rc`` (fail with it), ``stdout``/``stderr`` (text printed
instead of the default messages for that failure), ``delay`` (seconds to sleep at
the failure point; alone it only slows the command down), ``repo`` (only a call
for that repository consumes it). An entry is consumed (under an flock) at the
point where the real tool would hit that failure, i.e. after the checks that come
first (``transaction``: after "already open", at the lease acquisition, once per
retry attempt; ``publish``/``ingest``: after the changes were processed, in the
window where ``is_publishing.lock`` is held; ``abort``: after "not in a
transaction"). The state left is the one of a real failure: a failed publish keeps
the transaction (overlay back to read-write), a failed abort keeps it too, a failed
ingest aborts its own transaction, a failed mkfs leaves
``repositories.d/<repo>`` behind. ``ingest`` opens its transaction through the
same code as ``transaction`` and therefore consumes ``transaction`` entries too.
``CVMFS_DOUBLE_PUBLISH_DELAY=<s>`` slows every publish and ingest down in the
same window (after ``is_publishing.lock`` is taken and the overlay is read-only,
before the commit), so that tests can SIGKILL it there. That window runs in a
forked child, as the real upload runs in ``cvmfs_swissknife sync``, a child of the
``cvmfs_server`` script: it holds the flock, outlives a caller killed alone, and
dies of SIGPIPE on its next line when nobody reads its output any more, leaving
the transaction open (README §10). Meanwhile ``abort`` answers 22 with
``Could not acquire lock <spool>/is_publishing.lock``.
``CVMFS_DOUBLE_REAL_TIMING=1`` makes commands take the real tool's time
(README §3: publish about 0.5 s plus its size, transaction 0.05 s, abort 0.2 s),
for benchmarks; off by default.

Gateway leases: a table under ``<root>/double/gateway/`` (it survives ``rmfs`` and
``mkfs``, as the gateway's own does). ``transaction`` takes ``<repo>/`` (or the
sub-path), ``publish`` and ``abort`` release it; ``rmfs`` only deletes the
session token, so the lease stays held for ``CVMFS_DOUBLE_LEASE_SECONDS``
(default 7,200, the gateway's ``max_lease_time``) and every ``transaction`` of a
repository created again under that name answers 16 ``lease path busy`` until it
expires or ``drop_lease`` (the admin's ``DELETE /api/v1/leases-by-path``) removes it.

Helpers for tests (import ``tests.cvmfs_server_double``): ``published_tree``,
``revisions``, ``current_revision``, ``calls``, ``inject_fault``,
``clear_faults``, ``leases``, ``drop_lease``, ``kill_during_publish``, ``violations``,
``unmount_all``,
``in_transaction``,
``union_dir``, ``spool_dir``, ``double_env``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import errno
import fcntl
import getopt
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ENV_ROOT = "CVMFS_DOUBLE_ROOT"
ENV_PUBLISH_DELAY = "CVMFS_DOUBLE_PUBLISH_DELAY"
ENV_NO_MOUNT = "CVMFS_DOUBLE_NO_MOUNT"
ENV_BACKOFF_SCALE = "CVMFS_DOUBLE_BACKOFF_SCALE"
ENV_LEASE_SECONDS = "CVMFS_DOUBLE_LEASE_SECONDS"
ENV_REAL_TIMING = "CVMFS_DOUBLE_REAL_TIMING"

#: The gateway's ``max_lease_time`` (README §9): a leaked lease blocks this long.
DEFAULT_LEASE_SECONDS = 7200.0

#: The executable itself, for fixtures that configure ``cvmfs.server_command``.
DOUBLE_PATH = Path(__file__).resolve()

CREATOR_VERSION = "143"
COMMANDS = ("mkfs", "transaction", "publish", "abort", "rmfs", "ingest", "list", "mount")

_MS_RDONLY = 1
_MS_NODEV = 4
_MS_REMOUNT = 32
_MS_BIND = 4096
_MNT_DETACH = 2
_OPAQUE_XATTR = "trusted.overlay.opaque"
#: The shape of the C++ tool's ``Stacktrace:`` block (README §10: 11 address lines).
_STACKTRACE = "Stacktrace:\n" + "\n".join(
    f"/usr/bin/cvmfs_publish(+0x{0x4a2f0 + 0x1d3 * i:x}) [0x{0x5581c0a4a2f0 + 0x1d3 * i:x}]"
    for i in range(11)
)
_OVERLAY_XATTR_PREFIX = "trusted.overlay."


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Repo:
    """The mapped real paths of one repository, so every command agrees on them."""

    root: Path
    name: str

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc/cvmfs/repositories.d" / self.name

    @property
    def server_conf(self) -> Path:
        return self.conf_dir / "server.conf"

    @property
    def client_conf(self) -> Path:
        return self.conf_dir / "client.conf"

    @property
    def keys_dir(self) -> Path:
        return self.root / "etc/cvmfs/keys"

    @property
    def spool(self) -> Path:
        return self.root / "var/spool/cvmfs" / self.name

    @property
    def lower(self) -> Path:
        """The published tree (the real tool's read-only FUSE mount point)."""
        return self.spool / "rdonly"

    @property
    def upper(self) -> Path:
        return self.spool / "scratch/current"

    @property
    def workdir(self) -> Path:
        return self.spool / "ofs_workdir"

    @property
    def tmp(self) -> Path:
        return self.spool / "tmp"

    @property
    def txn_lock(self) -> Path:
        return self.spool / "in_transaction.lock"

    @property
    def pub_lock(self) -> Path:
        return self.spool / "is_publishing.lock"

    @property
    def token(self) -> Path:
        return self.spool / "session_token"

    @property
    def union(self) -> Path:
        return self.root / "cvmfs" / self.name

    @property
    def storage(self) -> Path:
        return self.root / "srv/cvmfs" / self.name

    @property
    def record(self) -> Path:
        return self.root / "double" / self.name

    @property
    def revisions_dir(self) -> Path:
        return self.record / "revisions"

    @property
    def lease_file(self) -> Path:
        return self.record / "lease_path"

    @property
    def plain_state(self) -> Path:
        """Fallback mode: 'ro'/'rw' stands for the overlay mount state."""
        return self.record / "union_state"

    @property
    def fingerprint_file(self) -> Path:
        return self.record / "fingerprint"

    @property
    def upstream_tree(self) -> Path:
        """Gateway mode: what the stratum 0 keeps serving after ``rmfs``."""
        return self.record / "upstream"


def _double_dir(root: Path) -> Path:
    return root / "double"


# --------------------------------------------------------------------------- output


class Exit(Exception):
    """Ends a command with an exit code, after its messages were printed."""

    def __init__(self, rc: int) -> None:
        super().__init__(rc)
        self.rc = rc


class Console:
    """Writes through to stdout/stderr at once (a killed publish must have shown
    its progress lines) and keeps a copy for ``calls.jsonl``."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.err: list[str] = []

    def stdout(self, text: str = "", end: str = "\n") -> None:
        self._write(sys.stdout, self.out, text + end)

    def stderr(self, text: str = "", end: str = "\n") -> None:
        self._write(sys.stderr, self.err, text + end)

    def raw(self, stdout: str | None, stderr: str | None) -> None:
        """Prints injected text verbatim, adding the final newline if missing."""
        if stdout:
            self.stdout(stdout, end="" if stdout.endswith("\n") else "\n")
        if stderr:
            self.stderr(stderr, end="" if stderr.endswith("\n") else "\n")

    @staticmethod
    def _write(stream: IO[str] | None, copy: list[str], text: str) -> None:
        copy.append(text)
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()


@dataclass
class Context:
    root: Path
    console: Console
    repo_name: str | None = None

    def out(self, text: str = "", end: str = "\n") -> None:
        self.console.stdout(text, end)

    def err(self, text: str = "", end: str = "\n") -> None:
        self.console.stderr(text, end)


# --------------------------------------------------------------------------- small utils


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _append_line(path: Path, line: str) -> None:
    """Appends one line under an flock: concurrent daemons call the double."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()


def _violation(root: Path, repo: str | None, message: str) -> None:
    _append_line(_double_dir(root) / "violations.log", f"{_now_iso()} {repo or '-'} {message}")


def _load_conf(path: Path) -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#") or "=" not in text:
            continue
        key, value = text.split("=", 1)
        conf[key.strip()] = value.strip().strip('"')
    return conf


def _is_gateway(conf: dict[str, str]) -> bool:
    return conf.get("CVMFS_UPSTREAM_STORAGE", "").startswith("gw,")


def _upstream_type(conf: dict[str, str]) -> str:
    return conf.get("CVMFS_UPSTREAM_STORAGE", "local").split(",", 1)[0] or "local"


def _owner_ids(conf: dict[str, str]) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(conf.get("CVMFS_USER", "root"))
    except KeyError:
        return 0, 0
    return pw.pw_uid, pw.pw_gid


def _rm(path: Path) -> None:
    """Removes a file, symlink or tree without following symlinks."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _empty_dir(path: Path) -> None:
    if not path.is_dir():
        return
    with os.scandir(path) as it:
        for entry in it:
            _rm(Path(entry.path))


def _rel_join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _subtree(path: Path, rel: str) -> list[str]:
    """``rel`` and, for a directory, every path below it (what a deletion removes)."""
    out = [rel]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(path):
            base = os.path.relpath(dirpath, path)
            prefix = rel if base == "." else f"{rel}/{base}"
            out.extend(f"{prefix}/{n}" for n in dirnames + filenames)
    return out


def _strip_overlay_xattrs(path: str) -> None:
    """Copied-up files carry trusted.overlay.* xattrs: they must not reach the
    lower tree, where the next overlay would interpret them."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if name.startswith(_OVERLAY_XATTR_PREFIX):
            with contextlib.suppress(OSError):
                os.removexattr(path, name, follow_symlinks=False)


def _copy_meta(src_st: os.stat_result, dst: str) -> None:
    with contextlib.suppress(OSError):
        os.chown(dst, src_st.st_uid, src_st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(src_st.st_mode):
        os.chmod(dst, stat.S_IMODE(src_st.st_mode))
    with contextlib.suppress(OSError, NotImplementedError):
        os.utime(dst, ns=(src_st.st_atime_ns, src_st.st_mtime_ns), follow_symlinks=False)


def _meta_differs(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode)
        or stat.S_IMODE(a.st_mode) != stat.S_IMODE(b.st_mode)
        or a.st_uid != b.st_uid
        or a.st_gid != b.st_gid
    )


# --------------------------------------------------------------------------- kernel mounts


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC  # loaded lazily: the helpers must import without libc set up
    if _LIBC is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _LIBC = lib
    return _LIBC


def _sys_mount(source: str, target: Path, fstype: str | None, flags: int, data: str) -> None:
    """mount(2) directly: faster than the mount binary and no /etc/mtab side effects."""
    rc = _libc().mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _sys_umount(target: Path) -> None:
    """Unmounts the top mount at ``target``; lazily when it is busy (open fds, cwd)."""
    lib = _libc()
    if lib.umount2(os.fsencode(target), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EBUSY,) and lib.umount2(os.fsencode(target), _MNT_DETACH) == 0:
        return
    err = ctypes.get_errno() or err
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


@dataclass
class MountEntry:
    mount_id: int
    parent_id: int
    mount_point: str
    options: list[str]
    fstype: str
    super_options: list[str]


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _mountinfo() -> list[MountEntry]:
    entries: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 6 or len(rfields) < 3:
                continue
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    mount_point=_unescape(fields[4]),
                    options=fields[5].split(","),
                    fstype=rfields[0],
                    super_options=rfields[2].split(","),
                )
            )
    return entries


def _stack_at(path: Path, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts stacked on ``path``, bottom first."""
    target = str(path)
    here = [
        e for e in (entries if entries is not None else _mountinfo()) if e.mount_point == target
    ]
    if not here:
        return []
    ids = {e.mount_id for e in here}
    bottom = [e for e in here if e.parent_id not in ids]
    stack: list[MountEntry] = []
    current = bottom[0] if bottom else here[0]
    while current is not None and current not in stack:
        stack.append(current)
        current = next((e for e in here if e.parent_id == current.mount_id), None)
    return stack


_MODE_CACHE: dict[Path, str] = {}


def _mount_mode(root: Path) -> str:
    """'overlay' when this process may mount (probed once per root), else 'plain'."""
    if os.environ.get(ENV_NO_MOUNT, "") not in ("", "0"):
        return "plain"
    if root not in _MODE_CACHE:
        _MODE_CACHE[root] = _probe_mount_mode(root)
    return _MODE_CACHE[root]


def _probe_mount_mode(root: Path) -> str:
    marker = _double_dir(root) / "mount_mode"
    with contextlib.suppress(OSError):
        value = marker.read_text().strip()
        if value in ("overlay", "plain"):
            return value
    mode = "plain"
    probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=_ensure_dir(_double_dir(root))))
    try:
        for sub in ("l", "u", "w", "m"):
            (probe / sub).mkdir()
        opts = f"lowerdir={probe}/l,upperdir={probe}/u,workdir={probe}/w"
        try:
            _sys_mount("overlay", probe / "m", "overlay", _MS_RDONLY, opts)
        except OSError:
            pass
        else:
            _sys_umount(probe / "m")
            mode = "overlay"
    except OSError:
        mode = "plain"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    with contextlib.suppress(OSError):
        _atomic_write(marker, mode + "\n")
    return mode


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _overlay_opts(r: Repo, extras: bool = True) -> str:
    """Overlay options; the extras keep the upper dir simple to apply (no
    metacopy-only files, no redirects: renaming a published directory fails
    with EXDEV, as with the kernels the real publishers run)."""
    for p in (r.lower, r.upper, r.workdir):
        if any(c in str(p) for c in ",:\\"):
            raise OSError(errno.EINVAL, f"path unusable in overlay options: {p}")
    base = f"lowerdir={r.lower},upperdir={r.upper},workdir={r.workdir}"
    return base + (",redirect_dir=off,metacopy=off,index=off" if extras else "")


def union_state(r: Repo) -> str | None:
    """'ro' / 'rw' for a mounted union, None when it is not mounted."""
    if _mount_mode(r.root) == "plain":
        try:
            value = r.plain_state.read_text().strip()
        except OSError:
            return None
        return value if value in ("ro", "rw") and r.union.is_dir() else None
    stack = _stack_at(r.union)
    if not stack or stack[-1].fstype != "overlay":
        return None
    top = stack[-1]
    return "ro" if "ro" in top.options or "ro" in top.super_options else "rw"


def _union_mount(r: Repo) -> None:
    """Mounts the union read-only (over its read-only guard bind mount)."""
    if _mount_mode(r.root) == "plain":
        r.union.mkdir(parents=True, exist_ok=True)
        _atomic_write(r.plain_state, "ro\n")
        return
    r.union.mkdir(parents=True, exist_ok=True)
    stack = _stack_at(r.union)
    if stack and stack[-1].fstype == "overlay":
        return
    if not stack:
        # The guard: while publish has the overlay unmounted, the mount point
        # must stay EROFS, as /cvmfs/<repo> does on the real machine.
        _sys_mount(str(r.union), r.union, None, _MS_BIND, "")
        _sys_mount("", r.union, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, "")
    try:
        _sys_mount(f"overlay_{r.name}", r.union, "overlay", _MS_NODEV, _overlay_opts(r))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _sys_mount(f"overlay_{r.name}", r.union, "overlay", _MS_NODEV, _overlay_opts(r, False))
    # Read-only per mount, not per superblock: a superblock remount of an
    # overlay syncs the whole upper file system, which a shared CI disk makes
    # slow and unpredictable. Writes fail with EROFS all the same.
    _sys_mount("", r.union, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NODEV, "")


def _union_remount(r: Repo, rw: bool) -> None:
    if _mount_mode(r.root) == "plain":
        _atomic_write(r.plain_state, ("rw" if rw else "ro") + "\n")
        return
    _sys_mount("", r.union, None, _MS_REMOUNT | _MS_BIND | (0 if rw else _MS_RDONLY), "")


def _union_unmount(r: Repo) -> None:
    """Unmounts the overlay only; the read-only guard stays."""
    if _mount_mode(r.root) == "plain":
        with contextlib.suppress(FileNotFoundError):
            r.plain_state.unlink()
        return
    for _ in range(8):
        stack = _stack_at(r.union)
        if not stack or stack[-1].fstype != "overlay":
            return
        _sys_umount(r.union)


def _union_teardown(r: Repo) -> None:
    """Everything mounted on the union mount point goes (rmfs)."""
    if _mount_mode(r.root) == "plain":
        with contextlib.suppress(FileNotFoundError):
            r.plain_state.unlink()
        return
    for _ in range(16):
        if not _stack_at(r.union):
            return
        _sys_umount(r.union)


# --------------------------------------------------------------------------- locks


def _acquire_publish_lock(r: Repo) -> int | None:
    """Takes the flock on is_publishing.lock without waiting; None if someone holds it.

    A file nobody holds is stale (a killed publish): taking it over is what the
    real tool's probe does. The inode check closes the race with a holder that
    unlinks the file just before releasing it.
    """
    for _ in range(16):
        try:
            fd = os.open(r.pub_lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(r.pub_lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o644)
            return fd
        os.close(fd)
    return None


def _release_publish_lock(r: Repo, fd: int | None) -> None:
    """After a publish/abort, no *.lock is left (README §2)."""
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(r.pub_lock)
    os.close(fd)


def _publishing_held_by_other(r: Repo) -> bool:
    """The probe of the real tool: a stale lock file is deleted on the way."""
    if not r.pub_lock.exists():
        return False
    fd = _acquire_publish_lock(r)
    if fd is None:
        return True
    _release_publish_lock(r, fd)
    return False


# --------------------------------------------------------------------------- faults


def _faults_file(root: Path) -> Path:
    return _double_dir(root) / "faults.json"


@contextlib.contextmanager
def _faults_locked(root: Path) -> Iterator[dict[str, Any]]:
    """The fault queue (see :func:`_json_locked`)."""
    with _json_locked(_faults_file(root)) as data:
        yield data


@contextlib.contextmanager
def _json_locked(path: Path) -> Iterator[dict[str, Any]]:
    """A JSON document under an flock on a separate ``.lock`` file; rewritten by
    atomic replace, so that a reader without the lock never sees it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        data: dict[str, Any] = json.loads(text) if text.strip() else {}
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            _atomic_write(path, json.dumps(data, indent=2) + "\n")


def _pop_fault(ctx: Context, command: str, repo: str) -> dict[str, Any] | None:
    path = _faults_file(ctx.root)
    if not path.exists():
        return None
    found: dict[str, Any] | None = None
    with _faults_locked(ctx.root) as data:
        entries = data.get(command) or []
        for i, entry in enumerate(entries):
            if entry.get("repo") in (None, repo):
                found = entries.pop(i)
                break
    # Sleep only once the flock is released: other calls must not wait for it.
    delay = float((found or {}).get("delay") or 0)
    if delay > 0:
        time.sleep(delay)
    return found


# --------------------------------------------------------------------------- gateway leases


def _leases_file(root: Path) -> Path:
    """The gateway's lease table: outside every repository's directories, so it
    survives ``rmfs`` and ``mkfs`` as the real gateway's SQLite table does."""
    return _double_dir(root) / "gateway" / "leases.json"


def _lease_key(repo: str, sub: str) -> str:
    """``<repo>/`` for a whole-repository lease, ``<repo>/<sub>/`` below it."""
    return f"{repo}/{sub.strip('/')}/" if sub.strip("/") else f"{repo}/"


def _lease_seconds() -> float:
    return float(os.environ.get(ENV_LEASE_SECONDS, "") or DEFAULT_LEASE_SECONDS)


def _go_duration(seconds: float) -> str:
    """The gateway's ``Time remaining`` format (Go's time.Duration, e.g. 1h59m59.8s)."""
    hours, rest = divmod(max(seconds, 0.0), 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


def _lease_acquire(root: Path, key: str, token: str) -> float | None:
    """Takes the lease ``key`` for ``token``; the seconds left of an overlapping
    lease that another session holds (busy), or None when acquired."""
    now = time.time()
    with _json_locked(_leases_file(root)) as table:
        for held, lease in list(table.items()):
            if lease["expires"] <= now:
                del table[held]
            elif held.startswith(key) or key.startswith(held):
                return float(lease["expires"]) - now
        table[key] = {"token": token, "expires": now + _lease_seconds()}
    return None


def _lease_drop(root: Path, token: str) -> bool:
    """Releases the lease of session ``token``; False when the gateway does not know it."""
    now = time.time()
    with _json_locked(_leases_file(root)) as table:
        found = [k for k, v in table.items() if v["token"] == token and v["expires"] > now]
        for k in [k for k, v in table.items() if v["token"] == token or v["expires"] <= now]:
            del table[k]
    return bool(found)


def _fault_rc(entry: dict[str, Any] | None) -> int | None:
    if entry is None or entry.get("rc") in (None, 0):
        return None
    return int(entry["rc"])


# --------------------------------------------------------------------------- health check


def _check_mounts(
    ctx: Context,
    r: Repo,
    *,
    repair: str,
    variant: str = "cpp",
    quiet: bool = False,
    own_publish_lock: bool = False,
) -> bool:
    """The real health check: detects (and repairs) inconsistent mount states.

    ``repair``: 'none' (list), 'safe' (transaction/publish: refuses in a
    transaction or while publishing), 'always' (abort), 'force' (mount: repairs
    in a transaction too). ``variant`` picks the wording of the C++ tool or of the
    shell script. Returns True when healthy or repaired.
    """
    in_txn = r.txn_lock.exists()
    rdonly_broken = not (r.lower.is_dir() and r.upper.is_dir() and r.workdir.is_dir())
    state = union_state(r)
    union_broken = state is None
    union_locked = in_txn and state == "ro"
    union_writable = (not in_txn) and state == "rw"
    if not (rdonly_broken or union_broken or union_locked or union_writable):
        return True

    say = (lambda _text: None) if quiet else ctx.err
    if rdonly_broken:
        say(f"{r.lower} is not mounted properly")
    if union_broken:
        say(f"{r.union} is not mounted properly")
    if union_writable:
        say(f"{r.name} is not in a transaction but {r.union} is mounted read/write")
    if union_locked:
        say(f"{r.name} is in a transaction but {r.union} is not mounted read/write")

    if repair == "none":
        return False
    if repair == "safe":
        if not own_publish_lock and _publishing_held_by_other(r):
            indent = "    " if variant == "cpp" else "   "
            say(f"WARNING: The repository {r.name} is currently publishing and should not")
            say("be touched. If you are absolutely sure, that this is _not_ the case,")
            say("please run the following command and retry:")
            say("")
            say(f"{indent}rm -fR {r.pub_lock}")
            say("")
            return False
        if in_txn:
            shown = "$name" if variant == "cpp" else r.name
            say(f"Repository {r.name} is in a transaction and cannot be repaired.")
            say(f"--> Run `cvmfs_server abort {shown}` to revert and repair.")
            return False

    if rdonly_broken:
        say(f"Trying to mount {r.lower}... fail")
        return False
    if union_broken:
        _union_mount(r)
        say(f"Trying to mount {r.union}... success")
        union_locked = in_txn
    if union_locked:
        _union_remount(r, rw=True)
        say(f"Trying to remount {r.union} read/write... success")
    if union_writable and not union_broken:
        _union_remount(r, rw=False)
        say(f"Trying to remount {r.union} read-only... success")
    return True


# --------------------------------------------------------------------------- fd checks


def _open_fds_under(path: Path, writable_only: bool) -> list[tuple[int, str]]:
    """(pid, path) of file descriptors open under ``path`` in any process.

    The publish refusal of the real tool (count_wr_fds = lsof): files opened
    through the overlay show the union path in /proc/<pid>/fd.
    """
    prefix = str(path)
    found: list[tuple[int, str]] = []
    me = os.getpid()
    for pid_name in os.listdir("/proc"):
        if not pid_name.isdigit() or int(pid_name) == me:
            continue
        fd_dir = f"/proc/{pid_name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target != prefix and not target.startswith(prefix + "/"):
                continue
            if writable_only:
                try:
                    with open(f"/proc/{pid_name}/fdinfo/{fd}", encoding="ascii") as fh:
                        flags_line = next((ln for ln in fh if ln.startswith("flags:")), "flags:\t0")
                    flags = int(flags_line.split()[1], 8)
                except (OSError, ValueError, IndexError):
                    continue
                if flags & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
                    continue
            found.append((int(pid_name), target))
    return found


def _cwd_inside(path: Path) -> bool:
    try:
        cwd = os.getcwd()
    except OSError:
        return False
    return (cwd + "/").startswith(str(path) + "/")


# --------------------------------------------------------------------------- trees


@dataclass
class Changes:
    added: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)

    def normalise(self) -> None:
        """A path deleted and re-created in one revision is 'changed'."""
        both = self.added & self.deleted
        self.changed |= both
        self.added -= both
        self.deleted -= self.changed
        self.changed -= self.added

    def as_record(self) -> dict[str, list[str]]:
        self.normalise()
        return {
            "added": sorted(self.added),
            "changed": sorted(self.changed),
            "deleted": sorted(self.deleted),
        }


def _scope_of(rel: str, lease: str) -> str:
    """'apply', 'descend' (ancestor of the lease path) or 'skip' (outside the lease).

    The gateway silently drops what a sub-path transaction wrote outside its lease.
    """
    if not lease or rel == lease or rel.startswith(lease + "/"):
        return "apply"
    if lease.startswith(rel + "/"):
        return "descend"
    return "skip"


def _apply_upper(upper: Path, lower: Path, lease: str) -> Changes:
    """Applies an overlay upper dir to the lower dir; visits only the upper dir.

    Files are moved (rename), so the cost is one rename per changed entry
    whatever their size; below a directory that did not exist in the lower dir
    nothing is looked up there.
    """
    changes = Changes()
    upper_s, lower_s = str(upper), str(lower)

    def delete_lower(lo: str, rel: str) -> None:
        changes.deleted.update(_subtree(Path(lo), rel))
        _rm(Path(lo))

    def walk(rel_dir: str, fresh: bool) -> None:
        up_dir = f"{upper_s}/{rel_dir}" if rel_dir else upper_s
        with os.scandir(up_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            scope = _scope_of(rel, lease) if lease else "apply"
            if scope == "skip":
                continue
            st = entry.stat(follow_symlinks=False)
            lo = f"{lower_s}/{rel}"
            lo_st: os.stat_result | None = None
            if not fresh:
                with contextlib.suppress(FileNotFoundError):
                    lo_st = os.lstat(lo)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # whiteout
                if scope == "apply" and lo_st is not None:
                    delete_lower(lo, rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                if scope == "descend":
                    if lo_st is not None and stat.S_ISDIR(lo_st.st_mode):
                        walk(rel, False)
                    continue
                opaque = False
                if lo_st is not None:
                    with contextlib.suppress(OSError):
                        opaque = os.getxattr(entry.path, _OPAQUE_XATTR) == b"y"
                if lo_st is not None and (opaque or not stat.S_ISDIR(lo_st.st_mode)):
                    delete_lower(lo, rel)
                    lo_st = None
                if lo_st is None:
                    os.mkdir(lo)
                    changes.added.add(rel)
                elif _meta_differs(st, lo_st):
                    changes.changed.add(rel)
                walk(rel, lo_st is None)
                _copy_meta(st, lo)
                continue
            if scope == "descend":
                continue
            if lo_st is not None:
                if stat.S_ISDIR(lo_st.st_mode):
                    delete_lower(lo, rel)
                changes.changed.add(rel)
            else:
                changes.added.add(rel)
            os.replace(entry.path, lo)
            if lo_st is not None:  # only copy-ups carry trusted.overlay.origin
                _strip_overlay_xattrs(lo)

    walk("", False)
    return changes


def _count_entries(path: Path) -> int:
    count = 0
    for _dirpath, dirnames, filenames in os.walk(path):
        count += len(dirnames) + len(filenames)
    return count


def _copy_entry(src: str, st: os.stat_result, dst: Path) -> bool:
    """Copies one non-directory entry (fallback mode); False for unsupported types."""
    tmp = dst.with_name(f".{dst.name}.double-tmp")
    _rm(tmp)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, tmp, follow_symlinks=False)
    else:
        return False
    _copy_meta(st, str(tmp))
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return True


def _entry_differs(a: os.stat_result, b: os.stat_result, a_path: str, b_path: str) -> bool:
    if _meta_differs(a, b):
        return True
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(a_path) != os.readlink(b_path)
    if stat.S_ISREG(a.st_mode):
        return a.st_size != b.st_size or a.st_mtime_ns != b.st_mtime_ns
    return False


def _sync_tree(src: Path, dst: Path, lease: str = "") -> Changes:
    """Makes ``dst`` identical to ``src`` (fallback mode: a full walk of both)."""
    changes = Changes()

    def walk(rel_dir: str) -> None:
        s_dir = src / rel_dir if rel_dir else src
        d_dir = dst / rel_dir if rel_dir else dst
        with os.scandir(s_dir) as it:
            s_entries = {e.name: e for e in it}
        with os.scandir(d_dir) as it:
            d_entries = {e.name: e for e in it}
        for name in sorted(d_entries.keys() - s_entries.keys()):
            rel = _rel_join(rel_dir, name)
            if _scope_of(rel, lease) == "apply":
                changes.deleted.update(_subtree(d_dir / name, rel))
                _rm(d_dir / name)
        for name in sorted(s_entries):
            rel = _rel_join(rel_dir, name)
            scope = _scope_of(rel, lease)
            if scope == "skip":
                continue
            s_path = s_entries[name].path
            s_st = os.lstat(s_path)
            d_path = d_dir / name
            try:
                d_st: os.stat_result | None = os.lstat(d_path)
            except FileNotFoundError:
                d_st = None
            if stat.S_ISDIR(s_st.st_mode):
                if scope == "descend":
                    if d_st is not None and stat.S_ISDIR(d_st.st_mode):
                        walk(rel)
                    continue
                if d_st is not None and not stat.S_ISDIR(d_st.st_mode):
                    _rm(d_path)
                    changes.changed.add(rel)
                    d_st = None
                elif d_st is not None and _meta_differs(s_st, d_st):
                    changes.changed.add(rel)
                if d_st is None:
                    os.mkdir(d_path)
                    if rel not in changes.changed:
                        changes.added.add(rel)
                walk(rel)
                _copy_meta(s_st, str(d_path))
                continue
            if scope == "descend":
                continue
            if d_st is None:
                if _copy_entry(s_path, s_st, d_path):
                    changes.added.add(rel)
            elif stat.S_ISDIR(d_st.st_mode) or _entry_differs(s_st, d_st, s_path, str(d_path)):
                if stat.S_ISDIR(d_st.st_mode):
                    changes.deleted.update(_subtree(d_path, rel)[1:])
                if _copy_entry(s_path, s_st, d_path):
                    changes.changed.add(rel)

    walk("")
    return changes


def _fingerprint(path: Path) -> str:
    """Digest of a tree's names, types, modes, owners, sizes, mtimes and link targets."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, path)
            extra = ""
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                extra = f"{st.st_size}:{st.st_mtime_ns}"
            digest.update(
                f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0{extra}\n".encode(
                    errors="surrogateescape"
                )
            )
    return digest.hexdigest()


def _record_fingerprint(r: Repo) -> None:
    if _mount_mode(r.root) == "plain":
        _atomic_write(r.fingerprint_file, _fingerprint(r.union) + "\n")


def _diff_paths(a: Path, b: Path) -> list[str]:
    """Paths that differ between two trees (read-only; for violation reports)."""

    def listing(path: Path) -> dict[str, tuple[Any, ...]]:
        out: dict[str, tuple[Any, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                mtime = st.st_mtime_ns if stat.S_ISREG(st.st_mode) else 0
                out[os.path.relpath(full, path)] = (st.st_mode, st.st_uid, st.st_gid, size, mtime)
        return out

    la, lb = listing(a), listing(b)
    return sorted(k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k))


def _plain_check_outside_writes(ctx: Context, r: Repo) -> None:
    """Fallback mode: anything written to the union outside a transaction is a
    violation; the union is reset to the published tree as if the write had
    failed with EROFS."""
    if _mount_mode(r.root) != "plain" or not r.union.is_dir() or r.txn_lock.exists():
        return
    try:
        recorded = r.fingerprint_file.read_text().strip()
    except OSError:
        return
    if _fingerprint(r.union) == recorded:
        return
    paths = _diff_paths(r.lower, r.union)
    _violation(
        ctx.root,
        r.name,
        f"written outside a transaction under {r.union}: {', '.join(paths[:20])}"
        + (" ..." if len(paths) > 20 else ""),
    )
    _sync_tree(r.lower, r.union)
    _record_fingerprint(r)


# --------------------------------------------------------------------------- revisions


def _revision_numbers(r: Repo) -> list[int]:
    try:
        names = os.listdir(r.revisions_dir)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _tags(r: Repo) -> set[str]:
    """Tags in use, from an index kept next to the revisions (reading every
    revision would make publish slower with the history)."""
    try:
        return set((r.record / "tags.txt").read_text(encoding="utf-8").split())
    except FileNotFoundError:
        return set()


def _auto_tag(r: Repo) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    existing = _tags(r)
    tag = f"generic-{stamp}"
    number = 1
    while tag in existing:
        tag = f"generic_{number}-{stamp}"
        number += 1
    return tag


def _write_revision(
    r: Repo,
    conf: dict[str, str],
    *,
    command: str,
    tag: str | None,
    description: str | None,
    changes: dict[str, list[str]],
    revision: int | None = None,
) -> dict[str, Any]:
    numbers = _revision_numbers(r)
    number = revision if revision is not None else (numbers[-1] + 1 if numbers else 1)
    now = time.time()
    record: dict[str, Any] = {
        "repository": r.name,
        "revision": number,
        "tag": tag,
        "description": description,
        "time": _now_iso(),
        "timestamp": now,
        "command": command,
        **changes,
    }
    _atomic_write(r.revisions_dir / f"{number}.json", json.dumps(record, indent=1) + "\n")
    if tag:
        _append_line(r.record / "tags.txt", tag)
    root_hash = hashlib.sha256(f"{r.name}:{number}:{now}".encode()).hexdigest()[:40]
    with contextlib.suppress(OSError):
        os.setxattr(r.lower, "user.revision", str(number).encode())
        os.setxattr(r.lower, "user.root_hash", root_hash.encode())
    if command != "mkfs" or not _is_gateway(conf):  # gateway mkfs leaves it empty
        with contextlib.suppress(OSError):
            _atomic_write(r.spool / "client.local", f"CVMFS_ROOT_HASH={root_hash}\n")
    if not _is_gateway(conf) and r.storage.is_dir():
        manifest = (
            f"C{root_hash}\nD900\nN{r.name}\nS{number}\nT{int(now)}\n--\n"
            f"{hashlib.sha256(root_hash.encode()).hexdigest()[:40]}\n"
        )
        with contextlib.suppress(OSError):
            _atomic_write(r.storage / ".cvmfspublished", manifest)
    return record


# --------------------------------------------------------------------------- transactions


def _canonical(path: str) -> str:
    return "/".join(p for p in path.split("/") if p and p != ".")


def _try_open(ctx: Context, r: Repo, conf: dict[str, str], lease: str) -> tuple[int, str]:
    """One attempt of TransactionImpl: (rc, stderr message for the final failure)."""
    if r.txn_lock.exists():
        return errno.EEXIST, "CernVM-FS transaction error: another transaction is already open"
    gateway = _is_gateway(conf)
    if gateway:
        (r.spool / "ovl_work").mkdir(exist_ok=True)
    try:
        fd = os.open(r.txn_lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return errno.EEXIST, "CernVM-FS transaction error: another transaction is already open"
    os.fchmod(fd, 0o600)
    os.close(fd)

    def undo() -> None:
        for p in (r.txn_lock, r.token):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    fault = _pop_fault(ctx, "transaction", r.name)
    rc = _fault_rc(fault)
    if fault is not None and rc is not None:
        undo()
        defaults = {
            errno.EBUSY: (
                "Path busy. Time remaining = 1h59m59.808167894s",
                "CernVM-FS transaction error: lease path busy",
            ),
            errno.EEXIST: ("", "CernVM-FS transaction error: another transaction is already open"),
            # The gateway unreachable (README §10): the message, then the C++
            # tool's backtrace block of 11 addresses.
            1: (
                "",
                "Make lease acquire request failed: 7. Reply: \n"
                "(unexpected termination) cannot acquire lease\n"
                + _STACKTRACE,
            ),
            # README §1 [src] gives only the codes of these two; the wording is the double's.
            errno.EINVAL: (
                "",
                "CernVM-FS transaction error: repository whitelist is expired "
                "(or the repository layout does not match this version)",
            ),
            errno.EIO: ("", "CernVM-FS transaction error: cannot construct the publisher"),
        }
        out, err = defaults.get(rc, ("", f"CernVM-FS transaction error: injected failure {rc}"))
        out = fault.get("stdout", out)
        err = fault.get("stderr", err)
        ctx.console.raw(out, None)
        return rc, err
    token = base64.b32encode(os.urandom(32))
    if gateway:
        busy = _lease_acquire(ctx.root, _lease_key(r.name, lease), token.decode())
        if busy is not None:
            undo()
            ctx.out(f"Path busy. Time remaining = {_go_duration(busy)}")
            return errno.EBUSY, "CernVM-FS transaction error: lease path busy"
        ctx.out("Gateway reply: ok")
        fd = os.open(r.token, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        os.fchmod(fd, 0o600)
        os.write(fd, token)
        os.close(fd)
    if lease:
        parent = os.path.dirname("/" + lease)
        target = r.lower / parent.lstrip("/")
        problem = None
        if not os.path.lexists(target):
            problem = (errno.ENOENT, f"cannot open transaction on non-existing path {parent}")
        elif not target.is_dir() or target.is_symlink():
            problem = (
                errno.ENOTDIR,
                f"cannot open transaction on {parent}, which is not a directory",
            )
        if problem is not None:
            if gateway:
                _lease_drop(ctx.root, token.decode())
                ctx.out("Gateway reply: ok")
            undo()
            return problem[0], f"CernVM-FS transaction error: {problem[1]}"
    if gateway and lease:
        _atomic_write(r.lease_file, lease + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            r.lease_file.unlink()
    _union_remount(r, rw=True)
    return 0, ""


def _open_transaction(
    ctx: Context, r: Repo, conf: dict[str, str], lease: str, timeout: int | None
) -> int:
    """transaction: health check, then attempts with the real backoff (0.5 s .. 5 s)."""
    _real_pause(0.05)
    if not _check_mounts(ctx, r, repair="safe", variant="cpp"):
        ctx.err("(unexpected termination) cannot establish writable mountpoint")
        ctx.err(_STACKTRACE)
        return 1
    _plain_check_outside_writes(ctx, r)
    scale = float(os.environ.get(ENV_BACKOFF_SCALE, "1") or 1)
    start = time.monotonic()
    backoff = 0.5
    while True:
        rc, message = _try_open(ctx, r, conf, lease)
        retriable = rc in (errno.EEXIST, errno.EBUSY)
        if rc == 0 or not retriable or timeout is None or timeout < 0:
            break
        if timeout > 0 and time.monotonic() - start > timeout:
            break
        ctx.out("repository busy, retrying")
        time.sleep(backoff * scale)
        backoff = min(backoff * 2, 5.0)
    if rc != 0 and message:
        ctx.err(message)
    return rc


def _remount_lines(ctx: Context, r: Repo) -> None:
    ctx.out("CernVM-FS: running with suid support")
    ctx.out("CernVM-FS: loading Fuse module... done")
    ctx.out(f"CernVM-FS: mounted cvmfs on {r.lower}")


def _discard_transaction(ctx: Context, r: Repo, conf: dict[str, str]) -> None:
    """What a successful abort does to the state (also ingest's own abort -f)."""
    if _is_gateway(conf):
        token = ""
        with contextlib.suppress(OSError):
            token = r.token.read_text().strip()
        if _lease_drop(ctx.root, token):
            ctx.out("Gateway reply: ok")
        else:  # expired, or dropped by an admin on the gateway (README §1)
            ctx.out("Error from gateway: 'invalid lease'")
            ctx.err(
                "force abort, continue despite error while trying to drop lease, removing "
                "session token. Error: gateway doesn't recognize the lease or cannot drop it"
            )
    _check_mounts(ctx, r, repair="always")
    if _mount_mode(r.root) == "plain":
        _sync_tree(r.lower, r.union)
    else:
        _union_unmount(r)
    _reset_scratch(r, conf)
    _empty_dir(r.tmp)
    _union_mount(r)
    _remount_lines(ctx, r)
    for p in (r.txn_lock, r.token, r.lease_file):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    _record_fingerprint(r)


def _reset_scratch(r: Repo, conf: dict[str, str]) -> None:
    """An empty upper dir whose attributes are those of the published root (the
    overlay shows the upper root's attributes for /cvmfs/<repo>)."""
    _empty_dir(r.upper)
    r.upper.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(r.lower)
    except FileNotFoundError:
        uid, gid = _owner_ids(conf)
        os.chown(r.upper, uid, gid)
        return
    _copy_meta(st, str(r.upper))


# --------------------------------------------------------------------------- commit


def _commit(
    ctx: Context,
    r: Repo,
    conf: dict[str, str],
    *,
    kind: str,
    tag: str | None,
    description: str | None,
    lock_fd: int,
    revision: int | None = None,
    processing_printed: bool = False,
) -> int:
    """The publish proper (also the second half of ingest).

    Holds is_publishing.lock, remounts the union read-only, processes the
    changes, then (after the optional delay window in which a SIGKILL leaves the
    README §6 B state) applies them to the published tree and records a revision.
    """
    label = "Sync" if kind == "publish" else "Ingest"
    gateway = _is_gateway(conf)
    plain = _mount_mode(r.root) == "plain"
    _union_remount(r, rw=False)
    fd, _catalog = tempfile.mkstemp(prefix="catalog.", dir=r.tmp)
    os.close(fd)
    if not processing_printed:
        ctx.out(f"Swissknife {label}: Processing changes...")
    count = 0 if plain else _count_entries(r.upper)
    if count >= 100:
        ctx.out("." * (count // 100))
    ctx.out("Waiting for upload of files before committing...")
    delay = float(os.environ.get(ENV_PUBLISH_DELAY, "0") or 0)
    upload = delay + _real_seconds(kind, r, gateway, plain)
    if upload > 0:
        if not _swissknife(ctx, upload):
            # The upload child died (SIGPIPE once nobody reads its output, or a
            # kill): nothing committed, the state of README §6 B stays behind.
            ctx.err("Synchronization failed")
            return 1
    else:
        ctx.out("Committing file catalogs...")
    fault = _pop_fault(ctx, kind, r.name)
    rc = _fault_rc(fault)
    if fault is not None and rc is not None:
        return _commit_failed(ctx, r, conf, kind=kind, rc=rc, fault=fault, lock_fd=lock_fd)

    ctx.out(f"Swissknife {label}: Wait for all uploads to finish")
    lease = ""
    with contextlib.suppress(OSError):
        lease = _canonical(r.lease_file.read_text().strip())
    if plain:
        _plain_report_stale_writes(ctx, r)
        changes = _sync_tree(r.union, r.lower, lease)
        _sync_tree(r.lower, r.union)
    else:
        _union_unmount(r)
        changes = _apply_upper(r.upper, r.lower, lease)
        _reset_scratch(r, conf)
    _write_revision(
        r,
        conf,
        command=kind,
        tag=tag,
        description=description,
        changes=changes.as_record(),
        revision=revision,
    )
    ctx.out(f"Swissknife {label}: Exporting repository manifest")
    stats = r.spool / "stats.db"
    if not stats.exists():
        stats.touch(mode=0o644)
    ctx.out(f"Statistics stored at: {stats}")
    if gateway:
        ctx.out("Changes submitted to repository gateway")
    else:
        ctx.out(f"Tagging {r.name}")
        ctx.out("Flushing file system buffers")
        ctx.out("Signing new manifest")
        ctx.out("Remounting newly created repository revision")
    if gateway:
        with contextlib.suppress(OSError):
            _lease_drop(ctx.root, r.token.read_text().strip())
    _union_mount(r)
    for p in (r.txn_lock, r.token, r.lease_file):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    _empty_dir(r.tmp)
    _record_fingerprint(r)
    _release_publish_lock(r, lock_fd)
    return 0


def _commit_failed(
    ctx: Context,
    r: Repo,
    conf: dict[str, str],
    *,
    kind: str,
    rc: int,
    fault: dict[str, Any],
    lock_fd: int,
) -> int:
    """An injected commit failure, leaving the state the real failure leaves."""
    stats = r.spool / "stats.db"
    label = "Sync" if kind == "publish" else "Ingest"
    default_out = (
        f"Swissknife {label}: Wait for all uploads to finish\n"
        f"Swissknife {label}: Exporting repository manifest\nStatistics stored at: {stats}"
    )
    default_err = (
        'Lease end request - error reply: {"reason":"missing_reflog","status":"error"}\n'
        "SessionContext: could not commit session. Aborting.\n"
        f"[ERROR] Swissknife {label}: Failed to commit transaction.\n"
        "Synchronization failed\n\nExecuted Command:\n"
        f"cvmfs_swissknife {'sync' if kind == 'publish' else 'ingest'} -u {r.union} "
        f"-s {r.upper} -c {r.lower} -t {r.tmp}"
    )
    ctx.console.raw(fault.get("stdout", default_out), None)
    _empty_dir(r.tmp)
    if kind == "publish":
        # A failed publish stays in its transaction with the overlay read-write.
        _union_remount(r, rw=True)
        ctx.console.raw(None, fault.get("stderr", default_err))
    else:
        # ingest calls `abort -f` itself and then dies.
        _discard_transaction(ctx, r, conf)
        ctx.console.raw(None, fault.get("stderr", default_err))
    _release_publish_lock(r, lock_fd)
    return rc


def _swissknife(ctx: Context, seconds: float) -> bool:
    """The upload phase in a child process; True when it ended well.

    Why a child: the real ``cvmfs_server publish`` is a shell script whose
    ``cvmfs_swissknife sync`` child inherits the flock on is_publishing.lock
    and the output pipe. Killed alone, the caller leaves that child running
    (README §10): it goes on holding the lock, then dies of SIGPIPE on its next
    line once nobody reads the pipe, leaving the transaction open. The child
    here does the same: it sleeps through the upload, then prints the line
    that follows it (SIGPIPE at default disposition kills it there).
    """
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child ends with os._exit
        code = 1
        try:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            time.sleep(seconds)
            line = b"Committing file catalogs...\n"
            view = memoryview(line)
            while view:
                view = view[os.write(1, view):]
            code = 0
        finally:
            os._exit(code)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return False
        except InterruptedError:
            continue
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        ctx.console.out.append("Committing file catalogs...\n")  # printed by the child
        return True
    return False


def _real_seconds(kind: str, r: Repo, gateway: bool, plain: bool) -> float:
    """With ``CVMFS_DOUBLE_REAL_TIMING=1``: the real tool's publish time (README §3).

    Fitted to the measurements on these VMs: a constant part (0.48 s local,
    0.49 s gateway; ingest 0.4 s), plus per changed entry (1,000 files: 0.80 s
    local, 0.63 s gateway) and per MB (100 MB: 2.1 s local, 2.43 s gateway).
    Off by default so that the suite stays fast; benchmarks turn it on.
    """
    if os.environ.get(ENV_REAL_TIMING, "") in ("", "0"):
        return 0.0
    entries, size = (0, 0) if plain else _upper_stats(r.upper)
    base = 0.4 if kind == "ingest" else (0.49 if gateway else 0.48)
    per_entry = 0.00014 if gateway else 0.00033
    per_mb = 0.0194 if gateway else 0.0162
    return base + entries * per_entry + size / 1e6 * per_mb


def _real_pause(seconds: float) -> None:
    """The fixed cost of a command with ``CVMFS_DOUBLE_REAL_TIMING=1`` (README §3)."""
    if os.environ.get(ENV_REAL_TIMING, "") not in ("", "0"):
        time.sleep(seconds)


def _upper_stats(upper: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) in the overlay upper dir: the change."""
    count = size = 0
    for dirpath, dirnames, filenames in os.walk(upper):
        count += len(dirnames) + len(filenames)
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
    return count, size


def _plain_report_stale_writes(ctx: Context, r: Repo) -> None:
    """Fallback mode: changed entries older than the transaction were written
    outside it."""
    try:
        opened = os.stat(r.txn_lock).st_mtime_ns
    except FileNotFoundError:
        return
    stale = [
        p
        for p in _diff_paths(r.lower, r.union)
        if (r.union / p).exists() and os.lstat(r.union / p).st_ctime_ns < opened
    ]
    if stale:
        _violation(
            ctx.root,
            r.name,
            f"written outside a transaction under {r.union}: {', '.join(stale[:20])}",
        )


# --------------------------------------------------------------------------- commands


def _usage(ctx: Context, message: str) -> None:
    ctx.err(message)
    _violation(ctx.root, ctx.repo_name, f"usage error: {message}")
    raise Exit(1)


def _getopt(
    ctx: Context, command: str, args: list[str], short: str, long: list[str] | None = None
) -> tuple[dict[str, str], list[str]]:
    try:
        if long is not None:
            pairs, rest = getopt.gnu_getopt(args, short, long)
        else:
            pairs, rest = getopt.getopt(args, short)
    except getopt.GetoptError as exc:
        _usage(ctx, f"Command {command}: Unrecognized option: {exc.opt}")
        raise AssertionError("unreachable") from exc
    opts: dict[str, str] = {}
    for key, value in pairs:
        opts[key] = value
    return opts, rest


def _require_root(ctx: Context, message: str) -> None:
    if os.geteuid() != 0:
        ctx.err(message)
        raise Exit(1)


def _server_conf_or_exit(ctx: Context, r: Repo, style: str) -> dict[str, str]:
    if r.server_conf.is_file():
        return _load_conf(r.server_conf)
    if style == "cpp":
        ctx.err(
            "CernVM-FS error: Unable to find the configuration file `server.conf` "
            f"for the cvmfs publisher: {r.name}"
        )
    else:
        ctx.err(f"The repository {r.name} does not exist.")
    raise Exit(1)


def _check_write_permission(ctx: Context, conf: dict[str, str]) -> None:
    uid = os.geteuid()
    if uid != 0 and uid != _owner_ids(conf)[0]:
        ctx.err("Permission error: No write permission to repository")
        raise Exit(1)


def cmd_transaction(ctx: Context, args: list[str]) -> int:
    opts, rest = _getopt(
        ctx, "transaction", args, "t:T:", ["retry-timeout=", "template=", "template-from="]
    )
    if len(rest) != 1:
        _usage(ctx, "CernVM-FS error: transaction needs exactly one repository name")
    fqrn, _, sub = rest[0].partition("/")
    ctx.repo_name = fqrn
    r = Repo(ctx.root, fqrn)
    conf = _server_conf_or_exit(ctx, r, "cpp")
    _check_write_permission(ctx, conf)
    raw_timeout = opts.get("-t", opts.get("--retry-timeout"))
    timeout: int | None = None
    if raw_timeout is not None:
        try:
            timeout = int(raw_timeout)
        except ValueError:
            _usage(ctx, f"CernVM-FS error: invalid retry timeout {raw_timeout}")
    return _open_transaction(ctx, r, conf, _canonical(sub), timeout)


def cmd_publish(ctx: Context, args: list[str]) -> int:
    opts, rest = _getopt(ctx, "publish", args, "F:NXZ:pa:c:m:vn:fed")
    if "-N" in opts and "-X" in opts:
        _usage(ctx, "Command publish: -N and -X are mutually exclusive")
    if len(rest) != 1:
        _usage(ctx, "Command publish: please give exactly one repository name")
    name = rest[0].split("/", 1)[0]
    ctx.repo_name = name
    r = Repo(ctx.root, name)
    conf = _server_conf_or_exit(ctx, r, "shell")
    tag = opts.get("-a")
    if tag is not None:
        if " " in tag:
            ctx.err("Spaces are not allowed in tag names")
            return 1
        if tag in _tags(r):
            ctx.err(f"Tag name '{tag}' is already in use.")
            return 1
    if not r.spool.is_dir():  # a mkfs leftover: the health check says why
        _check_mounts(ctx, r, repair="safe", variant="shell", own_publish_lock=True)
        return 1
    lock_fd = _acquire_publish_lock(r)
    if lock_fd is None:
        ctx.err(f"Another publish process is active for {name}")
        return 1
    # Released by every path of _publish_locked; an exception dies like a crash
    # (the flock goes with the process, the file stays behind as a stale lock).
    return _publish_locked(ctx, r, conf, opts, tag, lock_fd)


def _publish_locked(
    ctx: Context,
    r: Repo,
    conf: dict[str, str],
    opts: dict[str, str],
    tag: str | None,
    lock_fd: int,
) -> int:
    def fail(rc: int = 1) -> int:
        _release_publish_lock(r, lock_fd)
        return rc

    if not _check_mounts(ctx, r, repair="safe", variant="shell", own_publish_lock=True):
        return fail()
    uid = os.geteuid()
    if uid not in (0, _owner_ids(conf)[0]):
        ctx.out(f"Permission denied: Repository {r.name} is owned by {conf.get('CVMFS_USER')}")
        return fail()
    if not r.txn_lock.exists():
        ctx.out(f"Repository {r.name} is not in a transaction")
        return fail()
    if _open_fds_under(r.union, writable_only=True):
        ctx.out(f"Open writable file descriptors on {r.name}")
        return fail()
    if _cwd_inside(r.union):
        ctx.out(f"Current working directory is in {r.union}.  Please release, e.g. by 'cd $HOME'.")
        return fail()
    revision: int | None = None
    if "-n" in opts:
        manual = opts["-n"]
        current = current_revision(r.root, r.name)
        if not manual.isdigit():
            ctx.out(f"Invalid revision number: {manual}")
            return fail()
        if int(manual) <= current:
            ctx.out(f"Current revision '{current}' is ahead of manual revision number '{manual}'.")
            return fail()
        revision = int(manual)
    if tag is None and conf.get("CVMFS_AUTO_TAG", "true") == "true":
        tag = _auto_tag(r)
        ctx.out(f"Using auto tag '{tag}'")
    return _commit(
        ctx,
        r,
        conf,
        kind="publish",
        tag=tag,
        description=opts.get("-m"),
        lock_fd=lock_fd,
        revision=revision,
    )


def _read_answer() -> str | None:
    """fgets(answer, 3, stdin): None at EOF (or without stdin), which the real
    tool takes as consent."""
    if sys.stdin is None:
        return None
    try:
        line = sys.stdin.readline()
    except (OSError, ValueError):
        return None
    return line or None


def cmd_abort(ctx: Context, args: list[str]) -> int:
    opts, rest = _getopt(ctx, "abort", args, "f", ["force"])
    force = "-f" in opts or "--force" in opts
    if len(rest) != 1:
        _usage(ctx, "CernVM-FS error: abort needs exactly one repository name")
    name = rest[0].split("/", 1)[0]
    ctx.repo_name = name
    r = Repo(ctx.root, name)
    conf = _server_conf_or_exit(ctx, r, "cpp")
    _check_write_permission(ctx, conf)
    if _cwd_inside(r.union):
        ctx.out(f"Current working directory is in {r.union}.  Please release, e.g. by 'cd $HOME'.")
        return 1
    if not force:
        ctx.out(
            "You are about to DISCARD ALL CHANGES OF THE CURRENT TRANSACTION "
            f"for {name}!  Are you sure (y/N)? ",
            end="",
        )
        answer = _read_answer()
        if answer is not None and answer[:1] not in ("y", "Y"):
            return errno.EINTR
    open_fds = _open_fds_under(r.union, writable_only=False)
    if open_fds:
        if force:
            ctx.out(
                f"WARNING: Open file descriptors on {r.union} (possible race!)\n"
                "The following lsof report might show the culprit:\n"
            )
        else:
            ctx.out(
                f"\nWARNING! There are open read-only file descriptors in {r.union}\n"
                "  --> This is potentially harmful and might cause problems later on.\n"
                "      We can anyway perform the requested operation, but this will most likely\n"
                f"      break other processes with open file descriptors on {r.union}!\n\n"
                "      The following lsof report might show the processes with open file handles\n"
            )
        for pid, path in open_fds:
            exe = ""
            with contextlib.suppress(OSError):
                exe = Path(f"/proc/{pid}/comm").read_text().strip()
            ctx.out(f"{exe} {pid} root {path}")
        if not force:
            ctx.out("\n      Do you want to proceed anyway? (y/N) ", end="")
            answer = _read_answer()
            if answer is not None and answer[:1] not in ("y", "Y"):
                return errno.EINTR
    if not r.spool.is_dir():
        ctx.err(f"Repository {name} is not in a transaction")
        return errno.EINVAL
    _real_pause(0.2)
    lock_fd = _acquire_publish_lock(r)
    if lock_fd is None:
        # README §10: while a publish (or its orphaned swissknife) holds the
        # flock, abort answers 22 like "not in a transaction", with this text.
        ctx.err(f"Could not acquire lock {r.pub_lock}")
        return errno.EINVAL
    try:
        if not r.txn_lock.exists():
            with contextlib.suppress(FileNotFoundError):
                r.token.unlink()
            ctx.err(f"Repository {name} is not in a transaction")
            return errno.EINVAL
        fault = _pop_fault(ctx, "abort", name)
        rc = _fault_rc(fault)
        if fault is not None and rc is not None:
            default_err = "Make lease drop request failed: 7. Reply: ''\ncannot drop lease"
            ctx.console.raw(fault.get("stdout"), fault.get("stderr", default_err))
            return rc
        _discard_transaction(ctx, r, conf)
        return 0
    finally:
        _release_publish_lock(r, lock_fd)


# ---- mkfs


_SERVER_CONF_TAIL = (
    ("CVMFS_USE_FILE_CHUNKING", "true"),
    ("CVMFS_MIN_CHUNK_SIZE", "4194304"),
    ("CVMFS_AVG_CHUNK_SIZE", "8388608"),
    ("CVMFS_MAX_CHUNK_SIZE", "16777216"),
    ("CVMFS_UNION_FS_TYPE", "overlayfs"),
    ("CVMFS_HASH_ALGORITHM", "sha1"),
    ("CVMFS_COMPRESSION_ALGORITHM", "default"),
    ("CVMFS_EXTERNAL_DATA", "false"),
    ("CVMFS_AUTO_TAG", "true"),
    ("CVMFS_AUTO_TAG_TIMESPAN", '""'),
    ("CVMFS_GARBAGE_COLLECTION", "false"),
    ("CVMFS_AUTO_REPAIR_MOUNTPOINT", "true"),
    ("CVMFS_AUTOCATALOGS", "false"),
    ("CVMFS_ASYNC_SCRATCH_CLEANUP", "true"),
    ("CVMFS_PRINT_STATISTICS", "false"),
    ("CVMFS_UPLOAD_STATS_DB", "false"),
    ("CVMFS_UPLOAD_STATS_PLOTS", "false"),
    ("CVMFS_IGNORE_XDIR_HARDLINKS", "true"),
)


def _write_configs(r: Repo, owner: str, stratum0: str, upstream: str) -> None:
    r.conf_dir.mkdir(parents=True, exist_ok=True)
    head = (
        ("CVMFS_CREATOR_VERSION", CREATOR_VERSION),
        ("CVMFS_REPOSITORY_NAME", r.name),
        ("CVMFS_REPOSITORY_TYPE", "stratum0"),
        ("CVMFS_USER", owner),
        ("CVMFS_UNION_DIR", str(r.union)),
        ("CVMFS_SPOOL_DIR", str(r.spool)),
        ("CVMFS_STRATUM0", stratum0),
        ("CVMFS_UPSTREAM_STORAGE", upstream),
    )
    lines = ["# Created by cvmfs_server."] + [f"{k}={v}" for k, v in head + _SERVER_CONF_TAIL]
    _atomic_write(r.server_conf, "\n".join(lines) + "\n")
    client = (
        ("CVMFS_CACHE_BASE", str(r.spool / "cache")),
        ("CVMFS_RELOAD_SOCKETS", str(r.spool / "cache")),
        ("CVMFS_QUOTA_LIMIT", "-1"),
        ("CVMFS_MOUNT_DIR", str(r.root / "cvmfs")),
        ("CVMFS_SERVER_URL", stratum0),
        ("CVMFS_HTTP_PROXY", "DIRECT"),
        ("CVMFS_PUBLIC_KEY", str(r.keys_dir / f"{r.name}.pub")),
        ("CVMFS_CHECK_PERMISSIONS", "yes"),
        ("CVMFS_IGNORE_SIGNATURE", "no"),
        ("CVMFS_AUTO_UPDATE", "no"),
        ("CVMFS_NFS_SOURCE", "no"),
        ("CVMFS_MAGIC_XATTRS_VISIBILITY", "rootonly"),
        ("CVMFS_FOLLOW_REDIRECTS", "yes"),
        ("CVMFS_SERVER_CACHE_MODE", "yes"),
        ("CVMFS_NFILES", "65536"),
        ("CVMFS_TALK_SOCKET", str(r.spool / "cvmfs_io")),
        ("CVMFS_TALK_OWNER", owner),
        ("CVMFS_USE_SSL_SYSTEM_CA", "true"),
    )
    _atomic_write(r.client_conf, "\n".join(f"{k}={v}" for k, v in client) + "\n")


def _key_names(name: str, gateway: bool) -> list[tuple[str, int]]:
    if gateway:
        return [(f"{name}.crt", 0o444), (f"{name}.pub", 0o444), (f"{name}.gw", 0o400)]
    return [(f"{name}.crt", 0o444), (f"{name}.pub", 0o444), (f"{name}.key", 0o400)]


def cmd_mkfs(ctx: Context, args: list[str]) -> int:
    opts, rest = _getopt(ctx, "mkfs", args, "Xw:u:o:mf:vgG:a:zs:k:pRV:Z:x:PA:")
    _require_root(ctx, "Only root can create a new repository")
    if len(rest) != 1:
        _usage(ctx, "Command mkfs: please give exactly one repository name")
    name = rest[0]
    ctx.repo_name = name
    r = Repo(ctx.root, name)
    if r.conf_dir.exists():
        ctx.err(f"The repository {name} already exists")
        return 1
    owner = opts.get("-o") or pwd.getpwuid(os.geteuid()).pw_name
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        ctx.err(f"No user {owner}")
        return 1
    stratum0 = opts.get("-w") or f"http://localhost/cvmfs/{name}"
    upstream = opts.get("-u") or f"local,{r.storage}/data/txn,{r.storage}"
    gateway = upstream.startswith("gw,")
    keydir = opts.get("-k")
    if keydir and Path(keydir).resolve() != r.keys_dir.resolve():
        clash = [n for n, _ in _key_names(name, gateway) if (r.keys_dir / n).exists()]
        if clash:
            ctx.err(f"Importing keys from '{keydir}' would overwrite keys in '{r.keys_dir}'")
            return 1

    fault = _pop_fault(ctx, "mkfs", name)
    ctx.out("Creating Configuration Files... done")
    _write_configs(r, owner, stratum0, upstream)
    if fault is not None and _fault_rc(fault) is not None:
        # The observed failure mode: configuration left behind, nothing else.
        ctx.console.raw(
            fault.get(
                "stdout", f"Importing CernVM-FS Master Key and Certificate from '{keydir}'... "
            ),
            fault.get("stderr", "fail!"),
        )
        return int(fault["rc"])
    r.keys_dir.mkdir(parents=True, exist_ok=True)
    if keydir:
        ctx.out(f"Importing CernVM-FS Master Key and Certificate from '{keydir}'... ", end="")
        for key_name, mode in _key_names(name, gateway):
            src = Path(keydir) / key_name
            if not src.is_file():
                ctx.err(f"cp: cannot stat '{src}': No such file or directory")
                ctx.err("fail!")
                return 1
            dst = r.keys_dir / key_name
            _rm(dst)
            shutil.copyfile(src, dst)
            os.chmod(dst, mode)
        if not gateway and (Path(keydir) / f"{name}.masterkey").is_file():
            dst = r.keys_dir / f"{name}.masterkey"
            _rm(dst)
            shutil.copyfile(Path(keydir) / f"{name}.masterkey", dst)
            os.chmod(dst, 0o400)
        ctx.out("done")
    else:
        ctx.out("Creating CernVM-FS Master Key and Self-Signed Certificate... done")
        generated = [*_key_names(name, False), (f"{name}.masterkey", 0o400)]
        for key_name, mode in generated:
            dst = r.keys_dir / key_name
            _rm(dst)
            dst.write_text(f"test double key {key_name} {os.urandom(8).hex()}\n")
            os.chmod(dst, mode)

    ctx.out("Creating CernVM-FS Server Infrastructure... done")
    conf = _load_conf(r.server_conf)
    _create_spool(r, pw.pw_uid, pw.pw_gid, gateway)
    if not gateway:
        ctx.out("Creating Backend Storage... done")
        _create_storage(r)
        ctx.out("Signing 30 day whitelist with master key... done")
    ctx.out("Creating Initial Repository... done")
    initial = True
    if gateway and r.upstream_tree.is_dir() and _revision_numbers(r):
        # The stratum 0 behind the gateway still serves the repository: a new
        # publisher sees its content and continues its revisions.
        r.lower.rmdir()
        os.replace(r.upstream_tree, r.lower)
        initial = False
    elif r.record.exists():
        shutil.rmtree(r.record)
    if initial:
        content = r.lower / "new_repository"
        content.write_text(f"New CernVM-FS repository for {name}\n")
        os.chown(content, pw.pw_uid, pw.pw_gid)
        os.chmod(content, 0o644)
    _reset_scratch(r, conf)
    ctx.out("Mounting CernVM-FS Storage... (overlayfs) done")
    if _mount_mode(r.root) == "plain":
        _sync_tree(r.lower, r.union)
    _union_mount(r)
    if initial:
        _write_revision(
            r,
            conf,
            command="mkfs",
            tag=None,
            description="New repository",
            changes={"added": ["new_repository"], "changed": [], "deleted": []},
        )
    _record_fingerprint(r)
    if not gateway:
        ctx.out("Allowing Replication of this Repository... done")
        ctx.out(f"Initial commit... New CernVM-FS repository for {name}")
    ctx.out("Updating global JSON information... done")
    ctx.out("")
    ctx.out("Before you can install anything, call `cvmfs_server transaction`")
    ctx.out("to enable write access on your repository. Then install your")
    ctx.out(f"software in /cvmfs/{name} as user {owner}.")
    ctx.out("Once you're happy, publish using `cvmfs_server publish`")
    ctx.out("For client configuration, have a look at 'cvmfs_server info'")
    ctx.out("")
    ctx.out("If you go for production, backup your CernVM-FS master key in /etc/cvmfs/keys/!")
    return 0


def _create_spool(r: Repo, uid: int, gid: int, gateway: bool) -> None:
    for sub in ("cache", "ofs_workdir", "rdonly", "scratch/current", "tmp"):
        (r.spool / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("rdonly", "scratch/current", "scratch", "tmp"):
        os.chown(r.spool / sub, uid, gid)
    os.chmod(r.lower, 0o755)  # noqa: S103 - the published root is world-readable
    client_local = r.spool / "client.local"
    if gateway:
        client_local.write_text("")
    else:
        (r.spool / "ovl_work").mkdir(exist_ok=True)
        (r.spool / "scratch/wastebin").mkdir(exist_ok=True)
        client_local.write_text(f"CVMFS_ROOT_HASH={os.urandom(20).hex()}\n")
        (r.spool / "reflog.chksum").write_text(os.urandom(20).hex())
        (r.spool / "stats.db").touch()
    r.union.mkdir(parents=True, exist_ok=True)


def _create_storage(r: Repo) -> None:
    data = r.storage / "data"
    (data / "txn").mkdir(parents=True, exist_ok=True)
    for i in range(256):
        (data / f"{i:02x}").mkdir(exist_ok=True)
    for name in (".cvmfspublished", ".cvmfswhitelist", ".cvmfsreflog", ".cvmfs_master_replica"):
        (r.storage / name).touch()


# ---- rmfs


def cmd_rmfs(ctx: Context, args: list[str]) -> int:
    opts, rest = _getopt(ctx, "rmfs", args, "fp")
    _require_root(ctx, "Only root can remove a repository")
    if len(rest) != 1:
        _usage(ctx, "Command rmfs: please give exactly one repository name")
    name = rest[0]
    ctx.repo_name = name
    r = Repo(ctx.root, name)
    if not r.conf_dir.is_dir():
        ctx.err(f"The repository {name} does not exist.")
        return 1
    preserve = "-p" in opts
    if "-f" not in opts:
        question = (
            f"You are about to WIPE OUT THE CERNVM-FS REPOSITORY {name} INCLUDING SIGNING KEYS!"
            if not preserve
            else f"You are about to REMOVE THE CERNVM-FS REPOSITORY INFRASTRUCTURE for {name}!"
        )
        if sys.stdin is not None and sys.stdin.isatty():
            ctx.err(f"{question}  Are you sure (y/N)? ", end="")
        answer = _read_answer() or ""
        if answer[:1] not in ("y", "Y"):
            return 0
    conf = _load_conf(r.server_conf) if r.server_conf.is_file() else {}
    fault = _pop_fault(ctx, "rmfs", name)
    if fault is not None and _fault_rc(fault) is not None:
        ctx.console.raw(
            fault.get("stdout", "Unmounting CernVM-FS Area... "), fault.get("stderr", "fail")
        )
        return int(fault["rc"])
    gateway = _is_gateway(conf)
    ctx.out("Unmounting CernVM-FS Area... ", end="")
    _union_teardown(r)
    ctx.out("done")
    ctx.out("Removing Spool Area... ", end="")
    if gateway and r.lower.is_dir():
        # What was published stays on the stratum 0 behind the gateway.
        _rm(r.upstream_tree)
        r.record.mkdir(parents=True, exist_ok=True)
        os.replace(r.lower, r.upstream_tree)
    _rm(r.spool)
    if _mount_mode(ctx.root) == "plain":
        _rm(r.union)
    elif not _stack_at(r.union):  # never rmtree through a mount that is still there
        with contextlib.suppress(OSError):
            r.union.rmdir()
    for p in (r.plain_state, r.fingerprint_file, r.lease_file):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    ctx.out("done")
    ctx.out("Removing Configuration... ", end="")
    _rm(r.conf_dir)
    ctx.out("done")
    if not preserve and _upstream_type(conf) == "local":
        ctx.out("Removing Repository Storage... ", end="")
        _rm(r.storage)
        ctx.out("done")
    if not preserve:
        ctx.out("Removing Keys and Certificate... ", end="")
        for suffix in ("masterkey", "pub", "key", "crt", "gw"):
            with contextlib.suppress(FileNotFoundError):
                (r.keys_dir / f"{name}.{suffix}").unlink()
        ctx.out("done")
    if not gateway and r.record.exists():
        # Local storage is gone: keep the history for assertions, out of the way
        # of a repository created again under the same name.
        graveyard = _double_dir(ctx.root) / "removed"
        graveyard.mkdir(parents=True, exist_ok=True)
        os.replace(r.record, graveyard / f"{name}.{time.time_ns()}")
    ctx.out("Updating global JSON information... done")
    ctx.out(f"CernVM-FS repository {name} wiped out!")
    return 0


# ---- list / mount


def _list_line(r: Repo) -> str:
    conf = _load_conf(r.server_conf) if r.server_conf.is_file() else {}
    rtype = conf.get("CVMFS_REPOSITORY_TYPE", "stratum0")
    txn = " - in transaction" if r.txn_lock.exists() else ""
    healthy = _check_mounts(Context(r.root, Console()), r, repair="none", quiet=True)
    health = "" if healthy else " - unhealthy"
    return f"{r.name} ({rtype} / {_upstream_type(conf)}{txn}{health})  "


def _repo_names(root: Path) -> list[str]:
    base = root / "etc/cvmfs/repositories.d"
    try:
        return sorted(p.name for p in base.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def cmd_list(ctx: Context, args: list[str]) -> int:
    if args:
        _usage(ctx, "Command list: takes no arguments")
    fault = _pop_fault(ctx, "list", "")
    if fault is not None and _fault_rc(fault) is not None:
        ctx.console.raw(fault.get("stdout"), fault.get("stderr"))
        return int(fault["rc"])
    for name in _repo_names(ctx.root):
        ctx.out(_list_line(Repo(ctx.root, name)))
    return 0


def cmd_mount(ctx: Context, args: list[str]) -> int:
    opts, rest = _getopt(ctx, "mount", args, "a")
    if "-a" in opts:
        names = _repo_names(ctx.root)
    else:
        if len(rest) != 1:
            _usage(ctx, "Command mount: please give one repository name or -a")
        names = [rest[0].split("/", 1)[0]]
        ctx.repo_name = names[0]
        if not Repo(ctx.root, names[0]).conf_dir.is_dir():
            ctx.err(f"The repository {names[0]} does not exist.")
            return 1
    rc = 0
    for name in names:
        r = Repo(ctx.root, name)
        fault = _pop_fault(ctx, "mount", name)
        if fault is not None and _fault_rc(fault) is not None:
            ctx.console.raw(fault.get("stdout"), fault.get("stderr", f"Failed to mount {name}"))
            rc = int(fault["rc"])
            continue
        if not _check_mounts(ctx, r, repair="force", quiet=True):
            ctx.err(f"Failed to mount {name}")
            rc = 1
    return rc


# ---- ingest


@dataclass
class IngestArgs:
    base_dir: str = ""
    tar_file: str = ""
    deletes: list[str] = field(default_factory=list)
    catalog: bool = False
    user: str = ""
    group: str = ""
    keep: bool = False
    name: str = ""


def _parse_ingest(args: list[str]) -> IngestArgs:
    """The script's hand-written loop: every argument but the last is looked at,
    option values are the next argument, the repository is the last argument."""
    parsed = IngestArgs()
    for i in range(len(args) - 1):
        opt, value = args[i], args[i + 1]
        if opt in ("-b", "--base_dir"):
            parsed.base_dir = re.sub("/+", "/", value)
        elif opt in ("-t", "--tar_file"):
            parsed.tar_file = value
        elif opt in ("-d", "--delete"):
            parsed.deletes.append(re.sub("/+", "/", value))
        elif opt in ("-c", "--catalog"):
            parsed.catalog = True
        elif opt in ("-u", "--user"):
            parsed.user = value
        elif opt in ("-g", "--group"):
            parsed.group = value
        elif opt in ("-k", "--keep-ownership"):
            parsed.keep = True
    if args:
        parsed.name = args[-1].split("/", 1)[0]
    return parsed


class IngestError(Exception):
    """A failure of the swissknife ingest step: stderr lines, then abort + die."""


def _die_after_abort(
    ctx: Context, r: Repo, conf: dict[str, str], lines: list[str], lock_fd: int | None = None
) -> int:
    _discard_transaction(ctx, r, conf)
    for line in lines:
        ctx.err(line)
    if lock_fd is not None:
        _release_publish_lock(r, lock_fd)
    return 1


def _ingest_command_line(r: Repo, a: IngestArgs) -> str:
    parts = [
        "cvmfs_swissknife ingest",
        f"-u {r.union} -c {r.lower} -t {r.tmp}",
        f"-o {r.tmp}/manifest -N {r.name}",
    ]
    if a.tar_file:
        parts.append(f"-T {a.tar_file}")
    if a.base_dir:
        parts.append(f"-B {a.base_dir}")
    if a.deletes:
        parts.append(f"-D {'///'.join(a.deletes)}")
    return " ".join(parts)


def cmd_ingest(ctx: Context, args: list[str]) -> int:
    a = _parse_ingest(args)
    ctx.repo_name = a.name or None
    if not a.name:
        ctx.err(
            "Please provide a repository name, as positional argument or via an absolute "
            "path on /cvmfs given to -b"
        )
        return 1
    if not a.tar_file and not a.base_dir and not a.deletes:
        ctx.err(
            "Please provide some parameters, use -t $TAR_FILE to provide the tar to extract "
            "-b $BASE_DIR to provide where to extract the tar and -d $TO_DELETE to provide "
            "what to delete from the repository"
        )
        return 1
    if not a.tar_file and a.base_dir:
        ctx.err(
            "Please provide the tarball to extract, use -t $TARBALL_PATH or --tar_file "
            "$TARBALL_PATH or don't provide the base directory to simply delete entities "
            "from the repository"
        )
        return 1
    if a.tar_file and not a.base_dir:
        ctx.err(
            "Please set the base directory where to extract the tarball, use -b $BASE_DIR "
            "or --base_dir $BASE_DIR or don't provide the base directory to simply delete "
            "entities from the repository"
        )
        return 1
    r = Repo(ctx.root, a.name)
    if not r.server_conf.is_file():
        ctx.err(f"/usr/bin/cvmfs_server: 2362: .: cannot open {r.server_conf}: No such file")
        return 2
    conf = _load_conf(r.server_conf)
    if (a.user or a.group) and a.keep:
        ctx.err(
            "You cannot provide both: either provide user (-u)/group (-g) or keep the "
            "ownership (-k) of the tarball"
        )
        return 1
    if not a.user and a.group:
        ctx.err(
            "If providing a group name, you also must provide a user (use -u) to set new "
            "owner of the ingest tarball"
        )
        return 1
    if a.group:
        try:
            grp.getgrnam(a.group)
        except KeyError:
            ctx.err("Group set but no valid group name given")
            return 1
    gateway = _is_gateway(conf)
    lease = ""
    if gateway:
        if len(a.deletes) > 1:
            ctx.err("Could not delete multiple paths using a gateway in a single transaction.")
            return 1
        if a.tar_file and a.deletes:
            ctx.err("Could not delete and add a file in the same transaction while using gateway.")
            return 1
        lease = _canonical(a.base_dir + (a.deletes[0] if a.deletes else ""))
    if _open_transaction(ctx, r, conf, lease, None) != 0:
        ctx.err("Impossible to start a transaction")
        return 1
    if _open_fds_under(r.union, writable_only=True):
        return _die_after_abort(ctx, r, conf, [f"Open writable file descriptors on {r.name}"])
    if _cwd_inside(r.union):
        return _die_after_abort(
            ctx,
            r,
            conf,
            [f"Current working directory is in {r.union}.  Please release, e.g. by 'cd $HOME'."],
        )
    tag = None
    if conf.get("CVMFS_AUTO_TAG", "true") == "true":
        tag = _auto_tag(r)
        ctx.out(f"Using auto tag '{tag}'")

    uid, gid = _owner_ids(conf)
    swallowed = False  # the script's `-u` without `-g` bug: nothing is ingested
    if a.user:
        try:
            pw = pwd.getpwnam(a.user)
        except KeyError:
            swallowed = True
        else:
            uid = pw.pw_uid
            if a.group:
                gid = grp.getgrnam(a.group).gr_gid
            else:
                swallowed = True
    owner = None if a.keep else (uid, gid)
    failed = ["Synchronization failed", "", "Executed Command:", _ingest_command_line(r, a)]

    source: IO[bytes] | None = None
    archive: tarfile.TarFile | None = None
    if a.tar_file and not swallowed:
        try:
            source = sys.stdin.buffer if a.tar_file == "-" else open(a.tar_file, "rb")
        except OSError:
            return _die_after_abort(
                ctx,
                r,
                conf,
                [
                    f"Impossible to open the archive: Failed to open '{a.tar_file}'",
                    "Swissknife Ingest: Initialization of the synchronisation engine failed",
                    *failed,
                ],
            )
        try:
            archive = tarfile.open(fileobj=source, mode="r|")
        except (tarfile.TarError, OSError, EOFError):
            return _die_after_abort(
                ctx,
                r,
                conf,
                [
                    "Impossible to open the archive: Unrecognized archive format",
                    "Swissknife Ingest: Initialization of the synchronisation engine failed",
                    *failed,
                ],
            )
    ctx.out("Swissknife Ingest: Processing changes...")
    base = _canonical(a.base_dir)
    if not swallowed and not gateway and a.tar_file:
        for d in a.deletes:
            target = _canonical(d)
            if base == target or base.startswith(target + "/"):
                return _die_after_abort(
                    ctx,
                    r,
                    conf,
                    [
                        "terminate called after throwing an instance of 'ECvmfsException'",
                        "  what():  PANIC: /cvmfs/cvmfs/catalog_mgr_rw.cc : 525",
                        f"catalog for file '/{base}/' cannot be found",
                        "Aborted",
                        *failed,
                    ],
                )
    try:
        if not swallowed:
            for d in a.deletes:
                parts = [p for p in _canonical(d).split("/") if p]
                if ".." in parts:
                    _violation(ctx.root, r.name, f"ingest -d outside the repository: {d}")
                    raise IngestError(f"'{d}' is outside the repository")
                path = r.union.joinpath(*parts)
                if not parts or not _real_dirs(r.union, parts[:-1]) or not os.path.lexists(path):
                    ctx.err(f"[WARNING] '{d}' cannot be deleted. Unrecognized file type.")
                    continue
                _rm(path)
            if archive is not None:
                _extract(ctx, r, archive, base, owner, a.catalog)
    except IngestError as exc:
        return _die_after_abort(ctx, r, conf, [*str(exc).splitlines(), *failed])
    finally:
        if archive is not None:
            with contextlib.suppress(Exception):
                archive.close()
        if source is not None and source is not sys.stdin.buffer:
            source.close()

    lock_fd = _acquire_publish_lock(r)
    if lock_fd is None:
        return _die_after_abort(ctx, r, conf, [f"Another publish process is active for {r.name}"])
    return _commit(
        ctx,
        r,
        conf,
        kind="ingest",
        tag=tag,
        description=None,
        lock_fd=lock_fd,
        processing_printed=True,
    )


def _member_parts(name: str) -> list[str] | None:
    """Repository-relative components of a tar member; None if it escapes."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return parts


def _real_dirs(base: Path, parts: list[str]) -> bool:
    """True when every existing component of ``base/parts`` is a real directory.

    A symlink on the way would make a write or a deletion land outside the
    repository (on the host!), which neither cvmfs nor this double may do.
    """
    current = base
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return True  # deeper components are missing too
        if not stat.S_ISDIR(st.st_mode):
            return False
    return True


def _ensure_dirs(path: Path, stop: Path, owner: tuple[int, int] | None) -> None:
    """mkdir -p below ``stop``; created directories get the ingest owner."""
    missing: list[Path] = []
    current = path
    while current != stop and not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for p in reversed(missing):
        os.mkdir(p, 0o755)
        os.chmod(p, 0o755)  # noqa: S103 - what cvmfs ingest creates
        uid, gid = owner if owner is not None else (65534, 65534)
        os.chown(p, uid, gid)


def _extract(
    ctx: Context,
    r: Repo,
    archive: tarfile.TarFile,
    base: str,
    owner: tuple[int, int] | None,
    catalog: bool,
) -> None:
    """Streams the tar into the union (the open transaction's upper dir).

    Directories already verified (real directories, not symlinks) are cached,
    so a member costs one create plus fd-based metadata calls.
    """
    base_parts = [p for p in base.split("/") if p]
    if ".." in base_parts or not _real_dirs(r.union, base_parts):
        _violation(ctx.root, r.name, f"ingest base directory leaves the repository: {base}")
        raise IngestError(f"base directory '{base}' is not a directory of the repository")
    base_path = r.union.joinpath(*base_parts)
    _ensure_dirs(base_path, r.union, owner)
    base_s = str(base_path)
    known_dirs: set[str] = {base_s}
    new_dir_ids = owner if owner is not None else (65534, 65534)
    dir_meta: list[tuple[str, float]] = []

    def escape(member: tarfile.TarInfo, what: str) -> IngestError:
        _violation(ctx.root, r.name, f"tar member {what}: {member.name}")
        return IngestError(f"tar member '{member.name}' escapes the base directory")

    def parent_of(member: tarfile.TarInfo, parts: list[str]) -> str:
        parent = base_s
        for part in parts[:-1]:
            parent = f"{parent}/{part}"
            if parent in known_dirs:
                continue
            try:
                st = os.lstat(parent)
            except FileNotFoundError:
                os.mkdir(parent, 0o755)
                os.chmod(parent, 0o755)  # noqa: S103 - what cvmfs ingest creates
                os.chown(parent, *new_dir_ids)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise escape(member, "written through a symlink or a file")
            known_dirs.add(parent)
        return parent

    def clear(target: str) -> None:
        """Removes what is at ``target``; a cached directory there is forgotten."""
        if target in known_dirs:
            prefix = target + "/"
            known_dirs.difference_update(
                [d for d in known_dirs if d == target or d.startswith(prefix)]
            )
        _rm(Path(target))

    create_flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        for member in archive:
            parts = _member_parts(member.name)
            if parts is None:
                raise escape(member, "escapes the base directory")
            if not parts:
                continue
            target = f"{parent_of(member, parts)}/{parts[-1]}"
            uid, gid = owner if owner is not None else (member.uid, member.gid)
            mode = member.mode & 0o7777
            if member.isdir():
                if target not in known_dirs:
                    try:
                        st = os.lstat(target)
                    except FileNotFoundError:
                        os.mkdir(target)
                    else:
                        if not stat.S_ISDIR(st.st_mode):
                            clear(target)
                            os.mkdir(target)
                    known_dirs.add(target)
                os.chown(target, uid, gid)
                os.chmod(target, mode)
                dir_meta.append((target, member.mtime))
                continue
            if member.issym():
                clear(target)
                os.symlink(member.linkname, target)
                os.chown(target, uid, gid, follow_symlinks=False)
                continue
            if member.islnk():
                link_parts = _member_parts(member.linkname)
                if not link_parts or not _real_dirs(base_path, link_parts[:-1]):
                    raise escape(member, "hard link escapes the base directory")
                source = base_path.joinpath(*link_parts)
                if not source.is_file() or source.is_symlink():
                    raise escape(member, "hard link escapes the base directory")
                clear(target)
                os.link(source, target, follow_symlinks=False)
                continue
            if not member.isreg():
                continue  # devices and fifos are not published
            try:
                fd = os.open(target, create_flags, 0o600)
            except FileExistsError:
                clear(target)
                fd = os.open(target, create_flags, 0o600)
            with os.fdopen(fd, "wb") as out:
                data = archive.extractfile(member)
                if data is not None:
                    shutil.copyfileobj(data, out, 1 << 20)
                out.flush()
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.utime(fd, (member.mtime, member.mtime))
    except (tarfile.TarError, EOFError) as exc:
        raise IngestError(f"Failed to read the archive: {exc}") from exc
    except OSError as exc:
        raise IngestError(f"Failed to ingest: {exc}") from exc
    for path, mtime in reversed(dir_meta):
        with contextlib.suppress(OSError):
            os.utime(path, (mtime, mtime))
    if catalog:
        marker = base_path / ".cvmfscatalog"
        marker.touch()
        os.chmod(marker, 0o664)
        uid, gid = owner if owner is not None else (0, 0)
        os.chown(marker, uid, gid)


# --------------------------------------------------------------------------- main


_HANDLERS = {
    "mkfs": cmd_mkfs,
    "transaction": cmd_transaction,
    "publish": cmd_publish,
    "abort": cmd_abort,
    "rmfs": cmd_rmfs,
    "ingest": cmd_ingest,
    "list": cmd_list,
    "mount": cmd_mount,
}


def _dispatch(ctx: Context, argv: list[str]) -> int:
    if not argv:
        _usage(ctx, "Usage: cvmfs_server <command> [options] <parameters>")
    command = argv[0]
    handler = _HANDLERS.get(command)
    if handler is None:
        _usage(
            ctx, f"cvmfs_server: unknown command '{command}' (test double: {', '.join(COMMANDS)})"
        )
        return 1
    return handler(ctx, argv[1:])


def main(argv: list[str] | None = None) -> int:
    """Runs one ``cvmfs_server`` invocation and records it in ``calls.jsonl``."""
    args = list(sys.argv[1:] if argv is None else argv)
    root_env = os.environ.get(ENV_ROOT, "")
    if not root_env:
        sys.stderr.write(
            f"cvmfs_server (test double): the environment variable {ENV_ROOT} must name "
            "the directory that stands for / (etc/cvmfs, var/spool/cvmfs, cvmfs, srv/cvmfs)\n"
        )
        return 1
    root = Path(root_env).absolute()
    # A shell script and C++ tools die of SIGPIPE when their reader is gone
    # (README §10); Python would ignore it and carry on.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ctx = Context(root, Console())
    started = time.time()
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    entry: dict[str, Any] = {
        "argv": args,
        "prog": sys.argv[0] if argv is None else str(DOUBLE_PATH),
        "command": args[0] if args else None,
        "repo": None,
        "cwd": cwd,
        "pid": os.getpid(),
        "nice": os.nice(0),
        "start": started,
    }
    running = _double_dir(root) / "running" / f"{os.getpid()}-{time.time_ns()}.json"
    with contextlib.suppress(OSError):
        _atomic_write(running, json.dumps(entry) + "\n")
    try:
        rc = _dispatch(ctx, args)
    except Exit as exc:
        rc = exc.rc
    except Exception as exc:  # the real tool dies with this prefix too
        ctx.err(f"(unexpected termination) {exc}")
        ctx.err("Stacktrace (test double):")
        for line in traceback.format_exc().rstrip().splitlines():
            ctx.err(line)
        rc = 1
    entry.update(
        {
            "repo": ctx.repo_name,
            "rc": rc,
            "end": time.time(),
            "stdout": "".join(ctx.console.out)[-20000:],
            "stderr": "".join(ctx.console.err)[-20000:],
        }
    )
    with contextlib.suppress(OSError):
        _append_line(_double_dir(root) / "calls.jsonl", json.dumps(entry))
    with contextlib.suppress(OSError):
        running.unlink()
    return rc


# --------------------------------------------------------------------------- helpers for tests


def published_tree(root: str | os.PathLike[str], repo: str) -> Path:
    """The published tree of ``repo`` (the overlay's lower directory, ``<spool>/rdonly``)."""
    return Repo(Path(root), repo).lower


def union_dir(root: str | os.PathLike[str], repo: str) -> Path:
    """``<root>/cvmfs/<repo>``: where the daemons write inside a transaction."""
    return Repo(Path(root), repo).union


def spool_dir(root: str | os.PathLike[str], repo: str) -> Path:
    """``<root>/var/spool/cvmfs/<repo>``: where the lock files are."""
    return Repo(Path(root), repo).spool


def revisions(root: str | os.PathLike[str], repo: str) -> list[dict[str, Any]]:
    """Every recorded revision of ``repo``, oldest first."""
    r = Repo(Path(root), repo)
    return [json.loads((r.revisions_dir / f"{n}.json").read_text()) for n in _revision_numbers(r)]


def current_revision(root: str | os.PathLike[str], repo: str) -> int:
    """The newest revision number of ``repo`` (0 when none was recorded)."""
    numbers = _revision_numbers(Repo(Path(root), repo))
    return numbers[-1] if numbers else 0


def calls(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every invocation, in start order; running or killed ones have ``rc`` None."""
    base = _double_dir(Path(root))
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError):
        for line in (base / "calls.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    finished = {(c["pid"], c["start"]) for c in out}
    with contextlib.suppress(FileNotFoundError):
        for path in (base / "running").iterdir():
            with contextlib.suppress(OSError, ValueError):
                entry = json.loads(path.read_text())
                if (entry["pid"], entry["start"]) not in finished:
                    entry.update({"rc": None, "end": None, "stdout": None, "stderr": None})
                    out.append(entry)
    return sorted(out, key=lambda c: c["start"])


def inject_fault(root: str | os.PathLike[str], command: str, **entry: Any) -> None:
    """Queues a failure for the next call of ``command`` (see the module doc)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    with _faults_locked(Path(root)) as data:
        data.setdefault(command, []).append(entry)


def leases(root: str | os.PathLike[str]) -> dict[str, float]:
    """The gateway's live leases: ``{lease path: seconds left}`` (as ``GET /leases``)."""
    now = time.time()
    try:
        table = json.loads(_leases_file(Path(root)).read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return {}
    return {k: v["expires"] - now for k, v in table.items() if v["expires"] > now}


def drop_lease(root: str | os.PathLike[str], path: str) -> bool:
    """The gateway admin's ``DELETE /api/v1/leases-by-path/<path>``; False if none."""
    with _json_locked(_leases_file(Path(root))) as table:
        return table.pop(path, None) is not None


def clear_faults(root: str | os.PathLike[str]) -> None:
    """Drops every queued fault."""
    with _faults_locked(Path(root)) as data:
        data.clear()


def violations(root: str | os.PathLike[str]) -> list[str]:
    """Lines of ``violations.log`` (misuse the double detected)."""
    try:
        text = (_double_dir(Path(root)) / "violations.log").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()]


def in_transaction(root: str | os.PathLike[str], repo: str) -> bool:
    """The daemons' rule: a transaction is open iff in_transaction.lock exists."""
    return Repo(Path(root), repo).txn_lock.exists()


def unmount_all(root: str | os.PathLike[str]) -> None:
    """Unmounts everything mounted below ``root`` (fixture teardown).

    Stop double processes of that root first: a publish still running would
    mount its overlay again when it finishes.
    """
    base = str(Path(root).absolute())
    for _ in range(32):
        points = [e.mount_point for e in _mountinfo() if e.mount_point.startswith(base + "/")]
        if not points:
            return
        for point in sorted(set(points), key=len, reverse=True):
            with contextlib.suppress(OSError):
                _libc().umount2(os.fsencode(point), _MNT_DETACH)


def kill_during_publish(root: str | os.PathLike[str], repo: str) -> None:
    """Leaves ``repo`` as a publish killed with its process group leaves it
    (README §6 B: in a transaction, overlay read-only, stale is_publishing.lock,
    ``list`` says ``in transaction - unhealthy``; gateway mode: lease held)."""
    import subprocess  # only the tests' helpers start processes

    env = double_env(root)
    subprocess.run([sys.executable, str(DOUBLE_PATH), "transaction", repo], env=env,
                   check=True, capture_output=True, cwd="/")
    proc = subprocess.Popen(
        [sys.executable, str(DOUBLE_PATH), "publish", repo], env={**env, ENV_PUBLISH_DELAY: "60"},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        cwd="/", start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b"Waiting for upload"):
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def double_env(root: str | os.PathLike[str], **extra: str) -> dict[str, str]:
    """The environment a daemon (or test) runs the double with."""
    env = dict(os.environ)
    env[ENV_ROOT] = str(Path(root).absolute())
    env.update(extra)
    return env


if __name__ == "__main__":
    sys.exit(main())
