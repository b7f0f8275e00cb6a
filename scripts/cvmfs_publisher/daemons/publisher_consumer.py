"""publisher-consumer: provisions repositories announced on the publisher queue.

Consumes ``publisher_queue`` (durable quorum queue, prefetch 1, manual ack);
each message is a create or delete request (``messages.py``). Success is
acked; a transient failure goes to a delay queue and comes back later (the
messages behind it are not blocked); a permanent one, or the
``publisher.max_attempts``-th failure, is dead-lettered with its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ..adapters import amqp
from ..adapters.cvmfs import CvmfsServer
from ..adapters.rabbitmq_api import ManagementAPI
from ..adapters.rgw import RGW
from ..adapters.vault import VaultClient
from ..core import delivery, runtime
from ..core.config import Config
from ..core.errors import Permanent
from ..core.status import StatusDocument
from ..provisioning.messages import BadMessage, parse_request
from ..provisioning.provisioner import Provisioner

NAME = "publisher-consumer"
log = logging.getLogger(__name__)


class PublisherConsumer:
    """Wires the publisher queue to the :class:`Provisioner`."""

    def __init__(self, cfg: Config, status: StatusDocument,
                 provisioner: Provisioner | None = None) -> None:
        self.cfg = cfg
        self.status = status
        self.provisioner = provisioner or Provisioner(
            cfg, VaultClient(cfg.vault), RGW(cfg.s3, cfg.rgw), CvmfsServer(cfg.cvmfs),
            ManagementAPI(cfg.amqp),
        )
        self.consumer = amqp.ReconnectingConsumer(
            cfg.amqp, NAME, self._session, tick=self._tick,
            on_state=lambda up: self.status.set(broker_connected=up,
                                                **self.consumer.broker_state()),
        )
        self._conn: amqp.Connection | None = None

    def _session(self, conn: amqp.Connection) -> None:
        a = self.cfg.amqp
        self._conn = conn
        ch = conn.channel()
        ch.confirm_delivery()
        amqp.declare_common(ch, a)
        if not amqp.queue_exists(conn, a.publisher_queue):
            ch.queue_declare(a.publisher_queue, durable=True, arguments=amqp.work_queue_arguments(
                a, a.publisher_queue, single_active=False))
        amqp.declare_delay_queues(ch, a)
        for delay in a.retry_delays:  # the per-queue ones of earlier releases, once empty
            amqp.delete_if_empty(conn, amqp.legacy_retry_queue_name(a.publisher_queue, delay))
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(a.publisher_queue, self._on_message)
        log.info("consuming %s", a.publisher_queue)

    def _on_message(self, ch: amqp.Channel, method, props, body: bytes) -> None:
        d = amqp.delivery_from(self.cfg.amqp.publisher_queue, ch, method, props, body,
                               cfg=self.cfg.amqp, daemon=NAME)
        try:
            self.handle(ch, d)
            verdict = delivery.ok()
        except amqp.CONNECTION_ERRORS:
            raise  # nothing acked: the broker delivers it again
        except Exception as exc:
            verdict = delivery.verdict_for(exc, d.attempts, self.cfg.publisher.max_attempts,
                                           retry_transient_forever=False)
        delivery.apply(d, verdict)
        if verdict.action == delivery.DEAD:
            self.status.incr(verdict.repository or "-", "dead_lettered")
        self.status.flush(force=True)

    def handle(self, ch: amqp.Channel, d: amqp.Delivery) -> None:
        """Provision or deprovision; raises Transient / Permanent on failure."""
        try:
            req = parse_request(d.body, self.cfg.cvmfs.domain, self.cfg.publisher.max_message_bytes)
        except BadMessage as exc:
            raise Permanent(f"bad publisher message: {exc}") from None
        t0 = time.monotonic()
        assert self._conn is not None
        try:
            if req.action == "create":
                changed = self.provisioner.create(req, self._conn, ch)
            else:
                changed = self.provisioner.delete(req, self._conn, ch)
        except Exception as exc:
            if not getattr(exc, "repository", ""):
                try:
                    exc.repository = req.repository  # type: ignore[attr-defined]
                except AttributeError:
                    pass
            self.status.repo(req.repository, last_result="failed",
                             last_error=str(exc)[:300])
            self.status.incr(req.repository, "errors")
            raise
        took = time.monotonic() - t0
        outcome = ("provisioned" if req.action == "create" else "deprovisioned") \
            if changed else "unchanged"
        log.info("repository=%s user=%s type=%s action=%s outcome=%s steps=%s took=%.2fs",
                 req.repository, req.user, req.kind, req.action, outcome,
                 ",".join(changed) or "-", took)
        if req.action == "delete":
            self.status.drop_repo(req.repository)
        else:
            self.status.repo(req.repository, last_result="ok", last_error="",
                             last_event=time.time())

    def _tick(self) -> None:
        self.status.flush()

    def run(self) -> None:
        self.status.flush(force=True)
        self.consumer.run()
        self.status.set(healthy=False)
        self.status.flush(force=True)


def main(argv: Sequence[str] | None = None) -> int:
    rt = runtime.start(NAME, "Provision CVMFS repositories from the publisher queue", argv)
    daemon = PublisherConsumer(rt.cfg, rt.status)
    daemon.consumer.install_signal_handlers()
    daemon.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
