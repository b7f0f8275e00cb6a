"""Linux inotify through ctypes: be told that a directory changed instead of looking.

Why: the sync daemon looked at every repository's staging directory twice a
second; with 1,000 repositories that is 4,000 system calls a second for
nothing. With a watch per directory the kernel says which ones changed, and
a quiet host costs nothing.

Only what the sync daemon needs: watches keyed by the caller's key, a wait
with a timeout that returns the keys whose directories had events, and a
wake-up pipe so that a stop request ends the wait at once. A queue overflow
(``IN_Q_OVERFLOW``: the kernel dropped events) is reported as "unknown", so
the caller looks at everything again. inotify works on local file systems
and on a volume shared between containers of one host, not on NFS
(docs/LIMITS.md): the caller keeps a slow periodic scan for that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
from collections.abc import Hashable

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: A directory's entries appeared, were replaced or went away.
CHILDREN = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CLOSE_WRITE

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


class InotifyUnavailable(OSError):
    """The kernel refused an inotify instance (no support, or max_user_instances reached)."""


class Inotify:
    """One inotify instance; watches map to the caller's keys."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyUnavailable(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._keys: dict[int, Hashable] = {}

    def add(self, path: str | os.PathLike[str], mask: int, key: Hashable) -> bool:
        """Watch directory ``path`` for ``mask``; False when it does not exist (now).

        Raises OSError for any other refusal (``ENOSPC``: max_user_watches reached).
        """
        wd = self._add(self.fd, os.fsencode(path), mask | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self._keys[wd] = key
        return True

    def watching(self, key: Hashable) -> bool:
        """Whether a watch with ``key`` is in place (its directory may have gone since)."""
        return key in self._keys.values()

    def wake(self) -> None:
        """End a :meth:`wait` in progress (safe from a signal handler)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already woken

    def wait(self, timeout: float) -> set[Hashable] | None:
        """Keys whose directories had events within ``timeout`` seconds (empty: none).

        None: events were lost (queue overflow); look at everything.
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(max(0.0, timeout) * 1000)}
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        return self._read() if self.fd in ready else set()

    def _read(self) -> set[Hashable] | None:
        keys: set[Hashable] = set()
        overflow = False
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                pos += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                    continue
                key = self._keys.get(wd)
                if mask & IN_IGNORED:  # the directory went away (or was renamed and removed)
                    self._keys.pop(wd, None)
                if key is not None:
                    keys.add(key)
        return None if overflow else keys

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError as exc:
                log.debug("closing inotify fd: %s", exc)
