"""Helpers for provisioning tests: run publisher-consumer in a thread, talk AMQP."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from cvmfs_publisher import config, logs
from cvmfs_publisher.config import Config
from cvmfs_publisher.daemons.publisher_consumer import PublisherConsumer
from cvmfs_publisher.devstack.rabbitmq import Broker
from cvmfs_publisher.status import StatusDocument


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0,
               interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def running(cfg: Config, broker: Broker, daemon: PublisherConsumer | None = None
            ) -> Iterator[PublisherConsumer]:
    """publisher-consumer in a thread, consuming before the block starts."""
    logs.setup("publisher-consumer", cfg.log.dir, "DEBUG", stdout=False,
               secrets=config.secret_values(cfg))
    status = StatusDocument(Path(cfg.status.dir) / "publisher-consumer.json",
                            "publisher-consumer", 0.1)
    d = daemon or PublisherConsumer(cfg, status)
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        wait_until("publisher-consumer consuming", lambda: consumers(broker,
                   cfg.amqp.publisher_queue) >= 1)
        yield d
    finally:
        d.consumer.stop()
        t.join(timeout=30)
        assert not t.is_alive(), "publisher-consumer did not stop"


def consumers(broker: Broker, queue: str) -> int:
    """Consumer count from a passive declare (the management API lags by seconds)."""
    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            broker.host, broker.port, credentials=pika.PlainCredentials(broker.user,
                                                                        broker.password)))
    except pika.exceptions.AMQPError:
        return 0
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


class Amqp:
    """A test-side connection: publish requests, watch announcements and queues."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.conn = pika.BlockingConnection(pika.ConnectionParameters(
            cfg.amqp.host, cfg.amqp.port, credentials=pika.PlainCredentials(
                cfg.amqp.user, cfg.amqp.password.get())))  # type: ignore[union-attr]
        self.ch = self.conn.channel()
        self.ch.exchange_declare(cfg.amqp.control_exchange, "topic", durable=True)
        self.announcements = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.announcements, cfg.amqp.control_exchange, "#")

    def send(self, body: bytes | str) -> None:
        if isinstance(body, str):
            body = body.encode()
        self.ch.basic_publish("", self.cfg.amqp.publisher_queue, body,
                              pika.BasicProperties(delivery_mode=2))

    def get(self, queue: str) -> tuple[Any, bytes] | None:
        method, props, body = self.ch.basic_get(queue, auto_ack=True)
        if method is None:
            return None
        return props, body

    def consume(self, queue: str, timeout: float) -> list[bytes]:
        """Consume (not basic.get: refused on single-active-consumer quorum queues)."""
        got: list[bytes] = []
        tag = self.ch.basic_consume(queue, lambda ch, m, p, body: (
            got.append(body), ch.basic_ack(m.delivery_tag)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not got:
            self.conn.process_data_events(time_limit=0.1)
        self.conn.process_data_events(time_limit=0.5)
        self.ch.basic_cancel(tag)
        return got

    def wait_announcement(self, event: str, repository: str, timeout: float = 30.0
                          ) -> dict[str, str]:
        def check() -> dict[str, str] | None:
            got = self.get(self.announcements)
            if got:
                doc = json.loads(got[1])
                if doc["event"] == event and doc["repository"] == repository:
                    return doc
            return None
        return wait_until(f"{event} announcement for {repository}", check, timeout, 0.05)

    def dead_letters(self, n: int, timeout: float = 30.0) -> list[tuple[Any, bytes]]:
        got: list[tuple[Any, bytes]] = []

        def check() -> bool:
            m = self.get(self.cfg.amqp.dead_letter_queue)
            if m:
                got.append(m)
            return len(got) >= n
        wait_until(f"{n} dead-lettered messages", check, timeout, 0.05)
        return got

    def queue_depth(self, queue: str) -> int:
        return self.ch.queue_declare(queue, passive=True).method.message_count

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ch.queue_delete(self.announcements)
        with contextlib.suppress(Exception):
            self.conn.close()


def cleanup_amqp(cfg: Config, broker: Broker, labels: list[str]) -> None:
    """Delete what a test declared on the shared broker."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        cfg.amqp.host, cfg.amqp.port, credentials=pika.PlainCredentials(
            cfg.amqp.user, cfg.amqp.password.get())))  # type: ignore[union-attr]
    ch = conn.channel()
    a = cfg.amqp
    queues = [a.publisher_queue, a.dead_letter_queue, *labels]
    queues += [f"{q}.retry.{d}s" for q in (a.publisher_queue, *labels) for d in a.retry_delays]
    for q in queues:
        ch.queue_delete(q)
    for ex in (a.control_exchange, a.dead_letter_exchange):
        ch.exchange_delete(ex)
    conn.close()
    for label in labels:
        with contextlib.suppress(Exception):
            broker.api("DELETE", f"/api/policies/%2F/cvmfs-repo-{label}")
