"""The two failure classes every message handler speaks.

A handler raises :class:`Transient` for anything that may work later
(service unreachable, 5xx, timeout, disk full): the message is retried
after a delay. It raises :class:`Permanent` for anything that never will
(malformed message, invalid name, keys absent, 403): the message is
dead-lettered at once with the reason. Any other exception is a bug and is
treated as transient, so that nothing is lost while it is fixed.
"""

from __future__ import annotations


class PublisherError(Exception):
    """Base class; ``repository`` lets log lines name the repository."""

    def __init__(self, message: str, repository: str = "") -> None:
        super().__init__(message)
        self.repository = repository


class Transient(PublisherError):
    """May succeed later: retry with backoff."""


class Permanent(PublisherError):
    """Will never succeed as is: dead-letter with the reason."""
