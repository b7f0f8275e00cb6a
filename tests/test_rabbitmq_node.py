"""The devstack's own RabbitMQ node: private ports, hermetic restarts, nothing left behind."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pika
import pytest

from devstack.common import port_open
from devstack.rabbitmq import Broker, RabbitNode


def _declare(broker: Broker, queue: str) -> int:
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        broker.host, broker.port, credentials=pika.PlainCredentials(broker.user,
                                                                    broker.password)))
    try:
        return conn.channel().queue_declare(queue, durable=True).method.message_count
    finally:
        conn.close()


def listen_addresses(port: int) -> set[str]:
    """Addresses a TCP socket listens on for ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state != "0A" or int(hexport, 16) != port:
                continue
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def test_own_node_restarts_and_leaves_nothing(tmp_path: Path) -> None:
    node = RabbitNode(tmp_path / "node")
    try:
        node.start()
        broker = node.broker()
        ports = [node.amqp_port, node.management_port, node.dist_port, node.epmd_port]
        assert 5672 not in ports and 4369 not in ports and 15672 not in ports
        overview = broker.api("GET", "/api/overview")
        assert overview["node"] == node.name  # type: ignore[index]
        listeners = {(x["protocol"], x["port"]) for x in overview["listeners"]}  # type: ignore[index]
        assert {("amqp", node.amqp_port), ("http", node.management_port),
                ("clustering", node.dist_port)} <= listeners
        for port in ports:
            assert listen_addresses(port) <= {"127.0.0.1", "::1"}, port
        _declare(broker, "durable-probe")
        broker.stop_app()
        assert not port_open(node.amqp_port)
        broker.start_app()
        assert _declare(broker, "durable-probe") == 0  # the durable queue survived
    finally:
        node.stop()
    assert not (tmp_path / "node").exists()
    for port in ports:
        assert not port_open(port), f"port {port} still open after stop"


def test_a_broker_not_ours_is_never_restarted() -> None:
    with pytest.raises(RuntimeError, match="not a node the devstack started"):
        Broker().restart_app()
