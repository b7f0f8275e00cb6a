"""Seam 1, the event source: where the consumers get their S3 events from.

The consumers daemon sees its source only through :class:`EventSource` and
sees each message only as a :class:`~cvmfs_publisher.core.delivery.Delivery`;
the source sees the daemon only as a :class:`Consumer`. Today's source is
RabbitMQ (:mod:`cvmfs_publisher.adapters.amqp_source`: one quorum queue per
repository, found through the management API and the announcements). A
Kafka source would be one new adapter implementing :class:`EventSource`
(topic discovery, partitions, offset commits as ``ack``, a retry topic for
``retry_later``, a dead-letter topic); the daemon and the pipeline would
not change.

The contract:

- the source finds the repositories to serve (discovery) and calls
  :meth:`Consumer.open` before the first delivery of one (an exception
  there means "not now": the source tries again later, with backoff) and
  :meth:`Consumer.close` once it stops serving it;
- it hands each message to :meth:`Consumer.deliver` on its own thread; the
  consumer must not block there, and settles every delivery exactly once
  with :meth:`EventSource.settle`, from any thread, with a verdict of
  :func:`cvmfs_publisher.core.delivery.verdict_for` (the one policy); the
  source applies it where it can (:func:`cvmfs_publisher.core.delivery.apply`)
  and reports it with :meth:`Consumer.settled`; :meth:`EventSource.settle_many`
  hands over several at once;
- it tells the consumer when this process becomes, and stops being, the
  one that receives a repository's messages (:meth:`Consumer.active`: the
  active consumer of a single-active-consumer queue, the owner of a
  partition); only the active one reconciles and publishes;
- deliveries the consumer holds but has not started may become void (a
  lost connection: the source delivers them again):
  :meth:`Consumer.withdraw` drops them;
- :meth:`EventSource.request_stop` stops taking messages, withdraws what has
  not started, waits (bounded) while :meth:`Consumer.busy` and for the
  settlements in flight, then :meth:`EventSource.run` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..core.delivery import Delivery, Verdict


class Consumer(Protocol):
    """What an event source drives (the consumers daemon)."""

    def open(self, repository: str) -> None:
        """Get ready for ``repository``'s deliveries (raise: not now, retried later)."""

    def deliver(self, repository: str, delivery: Delivery) -> None:
        """Take one message of ``repository`` (source's thread; must not block)."""

    def active(self, repository: str, active: bool, reason: str) -> None:
        """This process became (or stopped being) the one served ``repository``'s
        messages (source's thread; must not block)."""

    def created(self, repository: str) -> None:
        """``repository`` was just provisioned (announced): its first events may come
        late (a new RGW topic), and objects uploaded before it raised none."""

    def withdraw(self, which: Callable[[Delivery], bool]) -> int:
        """Drop the deliveries not started for which ``which`` is true; how many."""

    def busy(self) -> bool:
        """Work is still running (a stop waits for it, bounded)."""

    def settled(self, verdict: Verdict) -> None:
        """``verdict`` was applied (for counters: errors, dead letters)."""

    def close(self, repository: str) -> None:
        """``repository`` is no longer served (deprovisioned)."""


class EventSource(Protocol):
    """Where the consumers' events come from (see the module docstring)."""

    def run(self, consumer: Consumer) -> None:
        """Serve ``consumer`` until :meth:`request_stop`; never raises for outages."""

    def request_stop(self) -> None:
        """Drain and stop (safe from a signal handler)."""

    def settle(self, delivery: Delivery, verdict: Verdict) -> None:
        """Apply ``verdict`` to ``delivery`` (any thread; exactly once per delivery)."""

    def settle_many(self, verdicts: list[tuple[Delivery, Verdict]]) -> None:
        """:meth:`settle` for each pair, handed over at once (a group commit's round):
        the source may acknowledge them together (RabbitMQ: one ``multiple`` ack
        per contiguous range of a channel)."""
