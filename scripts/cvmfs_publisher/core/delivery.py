"""A delivery from a message source, and the one policy that settles it.

Every message a daemon consumes ends in exactly one of three ways: it is
acknowledged (its effect is durable), retried later (a delay, then it comes
back), or dead-lettered with the reason (an operator looks at it). Which one
is decided here, once, for every daemon and every source; how it is done
(a delay queue and a dead-letter exchange on RabbitMQ, a retry topic on
Kafka...) is the source adapter's business, behind :class:`Delivery`.

The policy (DESIGN §3):

- success: acknowledge;
- :class:`~cvmfs_publisher.core.errors.Permanent` (malformed message,
  unsafe key, 403...): dead-letter at once;
- :class:`~cvmfs_publisher.core.errors.Transient` (a service down, disk
  full): retry later, **forever** when the daemon says so (an outage must
  not turn accepted changes into dead letters), else until
  ``max_attempts``;
- a local ``OSError`` (disk, permissions, an HTTP client's socket) is the
  message's failure, classified by
  :func:`~cvmfs_publisher.core.errors.from_os_error` (permissions or a
  read-only path: permanent; disk full: transient);
- anything else is a bug: retried like a transient error, but always
  bounded by ``max_attempts`` so a poison message cannot loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from .errors import Permanent, PublisherError, from_os_error

log = logging.getLogger(__name__)

ACK, RETRY, DEAD = "ack", "retry", "dead"
DLQ_HINT = ("inspect with 'cvmfs-publisher dlq list', fix, then "
            "'cvmfs-publisher dlq replay'")


class Delivery(Protocol):
    """One received message: acknowledged, retried later or dead-lettered, once.

    The three methods are called by :func:`apply` only, on the thread the
    source settles on; each returns once the broker has the message's new
    place (a retry or dead-letter copy is confirmed before the original is
    acknowledged), and raises if it could not (the source then gives the
    message back: it is delivered again).
    """

    @property
    def source(self) -> str:
        """Where it came from (queue or topic name), for log lines."""
        ...

    @property
    def body(self) -> bytes: ...

    @property
    def attempts(self) -> int:
        """How many times it failed before."""
        ...

    def ack(self) -> None: ...

    def retry_later(self, reason: str) -> int:
        """Schedule the next attempt; returns the delay in seconds."""
        ...

    def dead_letter(self, reason: str, repository: str) -> None: ...


@dataclass(frozen=True)
class Verdict:
    """What to do with a delivery, and what the log line says about it."""

    action: str
    reason: str = ""
    repository: str = ""
    key: str = "-"


def ok(repository: str = "", key: str = "-") -> Verdict:
    return Verdict(ACK, "", repository, key)


def verdict_for(exc: BaseException, attempts: int, max_attempts: int, *,
                retry_transient_forever: bool, repository: str = "", key: str = "-") -> Verdict:
    """The policy of the module docstring for a failed delivery.

    ``attempts`` counts the earlier failures; ``repository`` is used when the
    exception does not name one. A bug (not a
    :class:`~cvmfs_publisher.core.errors.PublisherError`) is logged with its
    traceback here, once.
    """
    repo = getattr(exc, "repository", "") or repository
    if isinstance(exc, OSError):  # a local failure of this message, not of the broker
        exc = from_os_error(exc, repo)
    if isinstance(exc, Permanent):
        return Verdict(DEAD, str(exc), repo, key)
    bug = not isinstance(exc, PublisherError)
    reason = f"{type(exc).__name__}: {exc}" if bug else str(exc)
    if bug:
        log.error("repository=%s key=%s outcome=error (a bug: retried, bounded): %s",
                  repo or "-", key, reason, exc_info=exc)
    attempt = attempts + 1
    if (bug or not retry_transient_forever) and attempt >= max_attempts:
        return Verdict(DEAD, f"gave up after {attempt} attempts: {reason}", repo, key)
    return Verdict(RETRY, reason, repo, key)


def apply(delivery: Delivery, verdict: Verdict) -> None:
    """Settle ``delivery`` as ``verdict`` says, with one log line for a failure.

    Errors of the source (the copy or the ack failed) propagate: the caller
    gives the message back to its source.
    """
    repo = verdict.repository or "-"
    if verdict.action == ACK:
        delivery.ack()
    elif verdict.action == DEAD:
        delivery.dead_letter(verdict.reason, verdict.repository)
        log.error("repository=%s key=%s queue=%s outcome=dead-lettered reason=%s; %s",
                  repo, verdict.key, delivery.source, verdict.reason, DLQ_HINT)
    else:
        delay = delivery.retry_later(verdict.reason)
        log.warning("repository=%s key=%s queue=%s outcome=retry in=%ds attempt=%d reason=%s",
                    repo, verdict.key, delivery.source, delay, delivery.attempts + 1,
                    verdict.reason)
