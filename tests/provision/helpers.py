"""Helpers for provisioning tests: run publisher-consumer in a thread, talk AMQP."""

# cleanup_amqp is re-exported: tests and benchmarks import it from here

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

from cvmfs_publisher.adapters.rgw import RGW
from cvmfs_publisher.core import config, logs
from cvmfs_publisher.core.config import Config
from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.daemons.publisher_consumer import PublisherConsumer
from devstack.rabbitmq import Broker, cleanup_amqp
from tests.conftest import DOMAIN, Stack, secrets_in_use, unique_label


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


KEYS = {
    "publicKey": "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0B\n-----END PUBLIC KEY-----\n",
    "certificateKey": "-----BEGIN CERTIFICATE-----\nMIIC+zCCAeOgAwIB\n-----END CERTIFICATE-----\n",
    "gatewayKey": "plain_text gwkey1 GATEWAYSECRET-0123456789abcdef\n",
    "masterKey": "-----BEGIN PRIVATE KEY-----\nMASTERKEY-DO-NOT-LEAK\n-----END PRIVATE KEY-----\n",
}


class Scenario:
    """One repository under test, with its labels and clean-up."""

    def __init__(self, stack: Stack, broker: Broker, openbao, ceph,
                 kind: str = "personal", warm_topics: Any = None, **overrides: dict) -> None:
        """``warm_topics`` (tests.conftest.WarmTopics): a label whose topic RGW took up."""
        self.stack = stack
        self.broker = broker
        self.kind = kind
        self.cfg = stack.config(**overrides)
        self.rgw = RGW(self.cfg.s3, self.cfg.rgw)
        self.label = (warm_topics.label(self.rgw, self.cfg.amqp.notification_exchange, "repo-")
                      if warm_topics is not None else unique_label("repo-"))
        self.repo = f"{self.label}.{DOMAIN}"
        self.subject = "0f1e2d3c-" + unique_label("s")
        self.keys = dict(KEYS, gatewayKey=f"plain_text gwkey1 {unique_label('GWSECRET')}\n")
        if kind == "personal":
            self.vault_path = f"{self.subject}/cvmfs_keys/{self.repo}"
        else:
            self.vault_path = f"groups/{self.label}/cvmfs_keys/{self.repo}"
        openbao.put_keys(self.vault_path, self.keys)
        self.rgw.s3.create_bucket(Bucket=self.label)
        self.amqp = Amqp(self.cfg)

    @property
    def csv(self) -> str:
        return f"alice,{self.subject},{self.repo},{'P' if self.kind == 'personal' else 'G'}"

    def json(self, action: str = "create") -> str:
        return json.dumps({"action": action, "user": "alice", "subject": self.subject,
                           "repository": self.repo, "type": self.kind})

    @property
    def keys_dir(self) -> Path:
        return Path(self.cfg.cvmfs.keys_dir)

    @property
    def double_root(self) -> Path:
        return Path(self.cfg.cvmfs.repositories_dir).parents[2]

    def calls(self, command: str) -> list[dict]:
        path = self.double_root / "double" / "calls.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            call = json.loads(line)
            if call["argv"][0:1] == [command]:
                out.append(call)
        return out

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in Path(self.cfg.log.dir).glob("*"))

    def assert_no_secrets(self) -> None:
        text = self.log_text()
        status = "".join(p.read_text() for p in Path(self.cfg.status.dir).glob("*.json"))
        for secret in [*secrets_in_use(self.stack), self.keys["gatewayKey"].split()[-1],
                       "MASTERKEY-DO-NOT-LEAK"]:
            assert secret not in text, "a secret leaked into the logs"
            assert secret not in status, "a secret leaked into the status document"

    def close(self) -> None:
        self.amqp.close()
        try:
            self.rgw.delete_notification(self.label)
            self.rgw.delete_topic(self.label)
            for obj in self.rgw.s3.list_objects_v2(Bucket=self.label).get("Contents", []):
                self.rgw.s3.delete_object(Bucket=self.label, Key=obj["Key"])
            self.rgw.s3.delete_bucket(Bucket=self.label)
        except Exception:  # the test may have removed them already
            pass
        cleanup_amqp(self.cfg, self.broker, [self.label])


def assert_provisioned(s: Scenario, broker: Broker) -> None:
    # keys: .pub/.crt 0444, .gw 0400, masterKey nowhere, directory private
    for ext, mode in (("pub", 0o444), ("crt", 0o444), ("gw", 0o400)):
        p = s.keys_dir / f"{s.repo}.{ext}"
        assert p.stat().st_mode & 0o777 == mode, f"{p} mode"
    assert (s.keys_dir / f"{s.repo}.gw").read_text() == s.keys["gatewayKey"]
    assert (s.keys_dir / f"{s.repo}.pub").read_text() == s.keys["publicKey"]
    assert s.keys_dir.stat().st_mode & 0o777 == 0o700
    assert not list(s.keys_dir.glob(".*")), "temporary key directory left behind"
    for path in s.double_root.rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert b"MASTERKEY-DO-NOT-LEAK" not in path.read_bytes(), f"masterKey in {path}"
    # gateway-mode mkfs with the contract's arguments
    mkfs = s.calls("mkfs")
    assert mkfs, "mkfs was not called"
    assert mkfs[-1]["argv"] == [
        "mkfs", "-w", f"http://stratum0.test/cvmfs/{s.repo}",
        "-u", f"gw,/srv/cvmfs/{s.repo}/data/txn,http://gateway.test:4929/api/v1",
        "-k", str(s.keys_dir), "-o", "root", s.repo]
    assert (Path(s.cfg.cvmfs.repositories_dir) / s.repo).is_dir()
    # RGW topic: attributes as DESIGN §2
    arn = s.rgw.find_topic(s.label)
    assert arn
    attrs = s.rgw.get_topic_attributes(arn)
    endpoint = json.loads(attrs["EndPoint"]) if attrs.get("EndPoint", "").startswith("{") \
        else attrs
    assert f"amqp://{broker.host}:{broker.port}" in json.dumps(endpoint)
    assert "notification" in json.dumps(attrs)
    assert "broker" in json.dumps(attrs)
    # bucket notification on cvmfs/ for created and removed events
    confs = s.rgw.get_notifications(s.label)
    assert len(confs) == 1
    assert confs[0]["TopicArn"] == arn
    assert set(confs[0]["Events"]) == {"s3:ObjectCreated:*", "s3:ObjectRemoved:*"}
    rules = confs[0]["Filter"]["Key"]["FilterRules"]
    assert {"Name": "prefix", "Value": "cvmfs/"} in rules
    # the repository's quorum queue, bound with routing key = label
    q = broker.api("GET", f"/api/queues/%2F/{s.label}")
    args = q["arguments"]  # type: ignore[index]
    assert args["x-queue-type"] == "quorum"
    assert args["x-single-active-consumer"] is True
    assert args["x-delivery-limit"] == s.cfg.amqp.delivery_limit
    assert args["x-dead-letter-exchange"] == s.cfg.amqp.dead_letter_exchange
    bindings = broker.api("GET", "/api/exchanges/%2F/notification/bindings/source")
    assert {(b["destination"], b["routing_key"]) for b in bindings  # type: ignore[union-attr]
            if b["destination"] == s.label} == {(s.label, s.label)}


