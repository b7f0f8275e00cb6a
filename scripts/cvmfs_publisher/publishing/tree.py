"""The fd-safe tree writer: a repository tree changed without following a symlink.

Paths come from users, and the published tree holds their symlinks: every
component is opened with ``O_NOFOLLOW`` relative to its parent's fd, so a
symlink in the repository (``evil -> /etc``) can never redirect a write, a
deletion or a comparison outside the root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20


class Tree:
    """A directory tree reached only through directory fds, never following a symlink.

    Why: paths come from users. Every component is opened with
    ``O_NOFOLLOW`` relative to its parent's fd, so a symlink in the
    repository (``evil -> /etc``) can never redirect a write, a deletion or
    a comparison outside ``root``; where a directory is needed and a symlink
    or a file is found, that entry is replaced by a directory (the newer
    change wins, as in the bucket).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.fd = os.open(self.root, DIR_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_dir(self, parts: list[str], create: bool) -> int | None:
        """fd of the directory ``parts`` (caller closes), or None when absent."""
        fd = os.dup(self.fd)
        try:
            for name in parts:
                try:
                    nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    if not create:
                        os.close(fd)
                        return None
                    if exc.errno != errno.ENOENT:
                        _remove_at(fd, name)  # a symlink or a file where a directory goes
                    os.mkdir(name, 0o755, dir_fd=fd)
                    nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def _parent(self, rel: str, create: bool) -> Iterator[tuple[int, str] | None]:
        """(fd of ``rel``'s parent, ``rel``'s name), or None when the parent is absent.

        The one place that opens a parent and closes it again, whatever happens.
        """
        parts = rel.split("/")
        pfd = self.open_dir(parts[:-1], create=create)
        if pfd is None:
            yield None
            return
        try:
            yield pfd, parts[-1]
        finally:
            os.close(pfd)

    def lstat(self, rel: str) -> os.stat_result | None:
        """lstat of ``rel`` (None when it, or a real directory on its way, is absent)."""
        with self._parent(rel, create=False) as at:
            if at is None:
                return None
            try:
                return os.stat(at[1], dir_fd=at[0], follow_symlinks=False)
            except FileNotFoundError:
                return None

    def is_dir(self, rel: str) -> bool:
        fd = self.open_dir(rel.split("/") if rel else [], create=False)
        if fd is None:
            return False
        os.close(fd)
        return True

    def readlink(self, rel: str) -> str | None:
        with self._parent(rel, create=False) as at:
            if at is None:
                return None
            try:
                return os.readlink(at[1], dir_fd=at[0])
            except OSError:
                return None

    def same_content(self, rel: str, src_fd: int) -> bool:
        """Does the regular file ``rel`` hold exactly the bytes of ``src_fd``?"""
        with self._parent(rel, create=False) as at:
            if at is None:
                return False
            try:
                fd = os.open(at[1], READ_FLAGS, dir_fd=at[0])
            except OSError:
                return False
        try:
            os.lseek(src_fd, 0, os.SEEK_SET)
            while True:
                a = os.read(fd, CHUNK)
                b = os.read(src_fd, CHUNK)
                if a != b:
                    return False
                if not a:
                    return True
        finally:
            os.close(fd)

    def write_file(self, rel: str, src_fd: int, mode: int) -> None:
        """Replace ``rel`` (whatever it is) with a regular file copied from ``src_fd``."""
        with self._parent(rel, create=True) as at:
            assert at is not None
            pfd, name = at
            _remove_at(pfd, name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                os.lseek(src_fd, 0, os.SEEK_SET)
                _copy_fd(src_fd, fd)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)

    def symlink(self, rel: str, target: str) -> None:
        """Replace ``rel`` with a symlink to ``target`` (data: never resolved)."""
        with self._parent(rel, create=True) as at:
            assert at is not None
            _remove_at(*at)
            os.symlink(target, at[1], dir_fd=at[0])

    def delete(self, rel: str) -> bool:
        """Remove ``rel`` (a directory with its content) and the parents it left empty."""
        with self._parent(rel, create=False) as at:
            removed = at is not None and _remove_at(*at)
        if removed:
            self._prune(rel.split("/")[:-1])
        return removed

    def _prune(self, dirs: list[str]) -> None:
        """rmdir the now-empty parents, deepest first (S3 has no empty directories)."""
        for depth in range(len(dirs), 0, -1):
            pfd = self.open_dir(dirs[:depth - 1], create=False)
            if pfd is None:
                return
            try:
                os.rmdir(dirs[depth - 1], dir_fd=pfd)
            except OSError:
                return
            finally:
                os.close(pfd)

    def makedirs(self, rel: str) -> None:
        fd = self.open_dir(rel.split("/"), create=True)
        if fd is not None:
            os.close(fd)


def _remove_at(dir_fd: int, name: str) -> bool:
    """Remove ``name`` in ``dir_fd``, whatever its type, never following a symlink."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: symlink-attack safe on Linux
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def _copy_fd(src: int, dst: int) -> None:
    """Kernel-side copy when possible (sendfile), plain read/write otherwise."""
    try:
        while os.sendfile(dst, src, None, 1 << 30) > 0:
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    while True:
        chunk = os.read(src, CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


def file_mode(mode: int) -> int:
    """Only 0755 or 0644 reach the repository (DESIGN §2), whatever was staged."""
    return 0o755 if mode & stat.S_IXUSR else 0o644
