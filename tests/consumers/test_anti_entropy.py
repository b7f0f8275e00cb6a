"""Anti-entropy on the real RGW and RabbitMQ: events that never came are healed (DESIGN §3).

Objects whose events RGW never raised (uploaded before the bucket
notification existed, or while it was missing) are staged by the consumers
by themselves, by the repository queue's active consumer only, and by the
new active consumer after a failover. Production defaults: the first
reconcile leaves objects younger than ``consumers.reconcile_grace`` (30 s)
to their events and looks again after it, so these tests take about 40 s.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.parse
from pathlib import Path
from typing import Any

from cvmfs_publisher.adapters import amqp
from cvmfs_publisher.adapters.amqp_source import ACTIVITY_POLL
from devstack.rabbitmq import Broker
from tests.conftest import unique_label
from tests.consumers.support import (
    Env,
    Process,
    put_state,
    queue_counts,
    running,
    wait_until,
)

HEAL_TIMEOUT = 120.0


def items(prefix: str, n: int) -> dict[str, bytes]:
    return {f"cvmfs/{prefix}/{i:03d}.txt": f"{prefix} {i}\n".encode() for i in range(n)}


def expected(objs: dict[str, bytes]) -> dict[str, Any]:
    return {k.removeprefix("cvmfs/"): put_state(v) for k, v in objs.items()}


def test_data_uploaded_before_provisioning_is_staged_by_itself(env: Env) -> None:
    label = unique_label("ae-")
    before = items("migrated", 20)
    with running(env.cfg):
        env.s3.create_bucket(Bucket=label)
        for key, body in before.items():  # no notification yet: no event will ever come
            env.s3.put_object(Bucket=label, Key=key, Body=body)
        r = env.provision(label)  # announces 'created': the daemon subscribes at once
        env.wait_staged(r, expected(before), timeout=HEAL_TIMEOUT, exact=True)
        wait_until("status", lambda: env.status().get("repositories", {}).get(
            r.repository, {}).get("healed_total") == 20, 10, 0.2)
    status = env.status()["repositories"][r.repository]
    assert status["last_reconcile"] > 0 and status["reconcile_error"] == ""
    text = env.log_text()
    assert f"repository={r.repository} queue={r.label} outcome=active-consumer" in text
    assert f"repository={r.repository} step=anti-entropy" in text and "healed=20" in text


def host(d: Path) -> dict[str, dict[str, Any]]:
    return {"cvmfs": {"staging_dir": str(d / "staging")}, "log": {"dir": str(d / "log")},
            "status": {"dir": str(d / "status")}}


def log_of(d: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (d / "log").glob("*.log"))


def test_only_the_active_consumer_heals_and_the_next_one_after_failover(
        env: Env, tmp_path: Path) -> None:
    r = env.provision()
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    a = Process(env.stack, "host-a", host(host_a)).start()
    b = Process(env.stack, "host-b", host(host_b))
    try:
        wait_until("consumer a", lambda: queue_counts(env.cfg, r.label)[1] == 1, 20)
        wait_until("a active", lambda: f"queue={r.label} outcome=active-consumer"
                   in log_of(host_a), 30, 0.2)
        b.start()
        wait_until("consumer b", lambda: f"queue={r.label} outcome=consuming" in log_of(host_b),
                   20)
        # Two rounds of the management API poll: a waiting consumer must not take itself
        # for the active one (it would reconcile and stage what host a owns).
        time.sleep(2 * ACTIVITY_POLL + 1)
        assert "outcome=active-consumer" not in log_of(host_b)
        assert "step=anti-entropy" not in log_of(host_b)
        # Events lost: the notification is gone while these are uploaded.
        env.rgw.delete_notification(r.label)
        lost = items("lost", 12)
        env.put_many(r, lost)
        a.kill()  # b becomes the active consumer; no delivery tells it (the queue is empty)
        env.wait_staged(r, expected(lost), timeout=HEAL_TIMEOUT, exact=True,
                        staging_dir=host_b / "staging")
        text_b = log_of(host_b)
        assert "outcome=active-consumer detected_by=management API" in text_b
        assert "step=anti-entropy reason='active consumer'" in text_b and "healed=12" in text_b
        assert b.terminate() == 0
    finally:
        a.stop()
        b.stop()
    assert env.staged(r, host_a / "staging") == {}, "a never saw these events"


def close_daemon_connections(env: Env, broker: Broker) -> int:
    """Force-close the daemon's broker connections in this test's vhost only.

    A lost broker connection as the daemon sees it, without restarting the
    broker (the machine's RabbitMQ is shared: it is never restarted here).
    """
    n = 0
    for c in broker.api("GET", "/api/connections") or []:
        name = (c.get("client_properties") or {}).get("connection_name", "")
        if c.get("vhost") == env.cfg.amqp.vhost and name.startswith("cvmfs-repo-consumers"):
            broker.api("DELETE", "/api/connections/" + urllib.parse.quote(c["name"], safe=""))
            n += 1
    return n


def test_lost_events_and_a_lost_broker_connection_are_healed(env: Env,
                                                             broker: Broker) -> None:
    """300 uploads: the first 150 raise events; then RGW loses every event (the
    notification is gone) and the daemon loses its broker connection. Counts:
    delivered by RGW, healed by reconcile, lost (must be 0)."""
    r = env.provision()
    # This connection sits idle through minutes of waiting: without heartbeats, or
    # the broker closes it after two missed ones (a CI run had it reset). Its
    # queue is exclusive, so the daemon (which serves every queue bound to the
    # notification exchange) cannot consume it.
    conn = amqp.connect(dataclasses.replace(env.cfg.amqp, heartbeat=0), "tests")
    ch = conn.channel()
    observer = ch.queue_declare("", exclusive=True).method.queue  # counts RGW's events
    ch.queue_bind(observer, env.cfg.amqp.notification_exchange, routing_key=r.label)
    first, second = items("delivered", 150), items("lost", 150)
    try:
        with running(env.cfg, r.label):
            wait_until("active", lambda: "outcome=active-consumer" in env.log_text(), 30, 0.2)
            env.put_many(r, first)
            env.wait_staged(r, expected(first), timeout=HEAL_TIMEOUT)
            env.rgw.delete_notification(r.label)
            assert close_daemon_connections(env, broker) >= 1
            t_lost = time.monotonic()
            env.put_many(r, second)
            uploaded = time.monotonic()
            env.wait_staged(r, expected({**first, **second}), timeout=HEAL_TIMEOUT,
                            exact=True)
            healed_after = time.monotonic() - uploaded
            wait_until("status", lambda: env.status()["repositories"][r.repository].get(
                "healed_total", 0) >= 150, 10, 0.2)
        delivered = ch.queue_declare(observer, passive=True).method.message_count
    finally:
        conn.close()
    healed = env.status()["repositories"][r.repository]["healed_total"]
    staged = env.staged(r)
    lost = sum(1 for k, v in expected({**first, **second}).items() if staged.get(k) != v)
    print(f"\nheal figures: uploaded 300, delivered by RGW {delivered}, healed by reconcile "
          f"{healed}, lost {lost}; the lost half was staged {healed_after:.1f}s after its "
          f"last upload ({time.monotonic() - t_lost:.1f}s after the first)")
    assert delivered == 150 and healed == 150 and lost == 0
    assert "amqp connection lost" in env.log_text()
    assert "reason='active consumer again after a broker reconnection'" in env.log_text()
