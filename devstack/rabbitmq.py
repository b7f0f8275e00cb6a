"""RabbitMQ: use the machine's broker on 127.0.0.1:5672, or start Debian's.

The management plugin is enabled (the consumers list repository queues
through its HTTP API).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import pika

from .common import port_open, wait_for

AMQP_PORT = 5672
MGMT_PORT = 15672


@dataclass
class Broker:
    host: str = "127.0.0.1"
    port: int = AMQP_PORT
    user: str = "guest"
    password: str = "guest"  # noqa: S105 - RabbitMQ's loopback-only default
    management_url: str = f"http://127.0.0.1:{MGMT_PORT}"

    def api(self, method: str, path: str, body: object = None, timeout: float = 10.0) -> object:
        """Call the management API (tests use it to inspect queues, kill connections)."""
        data = json.dumps(body).encode() if body is not None else None
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(self.management_url + path, data=data, method=method,  # noqa: S310
                                     headers={"Authorization": f"Basic {token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else None


def _env() -> dict[str, str]:
    return {**os.environ, "RABBITMQ_NODENAME": "rabbit@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}


def _ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, check=check,
                          timeout=120)


def ensure_broker(timeout: float = 90.0) -> Broker:
    """Return the running broker (starting one if none answers) with management enabled."""
    if not port_open(AMQP_PORT):
        subprocess.run(["rabbitmq-server", "-detached"], env=_env(), check=True, timeout=60)
        wait_for("rabbitmq", lambda: _ctl("-q", "await_startup", check=False).returncode == 0,
                 timeout, interval=0.5)
    if not port_open(MGMT_PORT):
        subprocess.run(["rabbitmq-plugins", "enable", "rabbitmq_management"], check=True,
                       capture_output=True, timeout=120)
        wait_for("rabbitmq management", lambda: port_open(MGMT_PORT), timeout)
    broker = Broker()
    wait_for("rabbitmq management API", lambda: _api_ok(broker), timeout)
    return broker


def _api_ok(b: Broker) -> bool:
    try:
        b.api("GET", "/api/overview")
        return True
    except OSError:
        return False


def restart_app() -> None:
    """Stop and start the broker application (a broker restart, as clients see it)."""
    _ctl("stop_app")
    time.sleep(0.5)
    _ctl("start_app")
    _ctl("-q", "await_startup")


def close_connections(broker: Broker, name_prefix: str) -> int:
    """Force-close connections whose client-provided name starts with ``name_prefix``."""
    n = 0
    for c in broker.api("GET", "/api/connections") or []:  # type: ignore[union-attr]
        cname = (c.get("client_properties") or {}).get("connection_name", "")
        if cname.startswith(name_prefix):
            broker.api("DELETE", "/api/connections/" + urllib.parse.quote(c["name"], safe=""))
            n += 1
    return n


def cleanup_amqp(cfg: Any, broker: Broker, labels: list[str]) -> None:
    """Delete the queues, exchanges and policies a test or the demo left on the broker."""
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
