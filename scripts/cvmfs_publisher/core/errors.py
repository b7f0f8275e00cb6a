"""The two failure classes every message handler speaks.

A handler raises :class:`Transient` for anything that may work later
(service unreachable, 5xx, timeout, disk full): the message is retried
after a delay. It raises :class:`Permanent` for anything that never will
(malformed message, invalid name, keys absent, 403): the message is
dead-lettered at once with the reason. Any other exception is a bug and is
treated as transient, so that nothing is lost while it is fixed.
"""

from __future__ import annotations

import errno


class PublisherError(Exception):
    """Base class; ``repository`` lets log lines name the repository."""

    def __init__(self, message: str, repository: str = "") -> None:
        super().__init__(message)
        self.repository = repository


class Transient(PublisherError):
    """May succeed later: retry with backoff."""


class Permanent(PublisherError):
    """Will never succeed as is: dead-letter with the reason."""


#: Local errors that retrying cannot fix: an operator must act (permissions, a
#: read-only or wrong path), then replay the dead letter.
_PERMANENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTDIR,
    errno.EISDIR, errno.ELOOP, errno.EXDEV,
})


def from_os_error(exc: OSError, repository: str = "") -> PublisherError:
    """Classify a local error (disk, permissions, an HTTP client's socket) of one message.

    ``OSError`` is the base of disk-full and permission errors but also of
    ``requests`` exceptions: none of them means the broker connection is
    gone, so the message is retried (disk full, a network hiccup) or
    dead-lettered with the reason (permissions, read-only file system).
    """
    code = exc.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    where = f" on {exc.filename}" if getattr(exc, "filename", None) else ""
    detail = f"{exc.strerror or exc} ({name}){where}" if name else f"{type(exc).__name__}: {exc}"
    if code in _PERMANENT_ERRNOS:
        return Permanent(f"local error {detail}: fix it, then 'cvmfs-publisher dlq replay'",
                         repository)
    return Transient(f"local error {detail}", repository)
