"""Durable writes: the one place that knows what survives a crash.

A rename is atomic (a reader sees the old file or the new one), but only a
file fsync before it and a directory fsync after it make the new state
survive a power loss: without the first the new name may point at empty
blocks, without the second the rename itself may be lost. Every writer of
state that must survive (staging entries and objects, keys, status
documents) goes through these functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import uuid
from pathlib import Path
from typing import Any

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def _fsync(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable."""
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file written by someone else (a finished download), not following links."""
    _fsync(path, os.O_NOFOLLOW)


@functools.cache
def _syncfs() -> Any:
    """libc's syncfs(2), or None where there is none (not Linux, no glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = getattr(ctypes.CDLL(name, use_errno=True), "syncfs", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def syncfs(path: str | os.PathLike[str]) -> bool:
    """Make everything written on the file system of directory ``path`` durable, at once.

    Why: one syncfs(2) does for every file and directory entry written there
    what one fsync per file and per directory does, in one journal commit:
    the group commit of staging (:mod:`cvmfs_publisher.staging.group_commit`)
    pays it once for many changes. It also flushes what other writers left
    dirty on that file system, so its cost follows the volume's dirty data.
    Returns False (nothing done) where syncfs is not available: the caller
    then fsyncs each file and directory. Raises OSError when it fails.
    """
    fn = _syncfs()
    if fn is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
    finally:
        os.close(fd)
    return True


def write_new(path: str | os.PathLike[str], data: bytes, mode: int = 0o600,
              sync: bool = True) -> None:
    """Create ``path`` (it must not exist, and is never a followed link), write, fsync.

    No rename here: the caller renames it into place when its protocol says
    so (staging does it under its lock). ``sync=False`` leaves the fsync to
    the caller (a :func:`syncfs` for a whole group of files).
    """
    fd = os.open(path, _NEW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: str | os.PathLike[str], data: bytes, mode: int = 0o644,
            sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data``: atomically, and durably unless ``sync_dir`` is False.

    The temporary file is created beside ``path`` (a rename never crosses a
    file system) and removed on any failure. ``sync_dir=False`` skips the
    directory fsync, for documents that are rewritten every few seconds
    anyway (a lost rename there costs nothing).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write_new(tmp, data, 0o600)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(target.parent)
