"""Retries through the shared delay queues, and the upgrade from per-queue retry queues.

One delay queue per configured delay serves every work queue (issue 14: a
thousand repositories used to cost four thousand retry queues). A retried
message comes back to the queue it came from, by its routing key; the
per-queue retry queues of earlier releases are deleted once empty, and the
messages still in them come back as before.
"""

from __future__ import annotations

import time
from typing import Any

import pika

from cvmfs_publisher.adapters import amqp
from tests.consumers.support import (
    Env,
    amqp_connection,
    drain,
    put_state,
    running,
    wait_until,
)


def queue_names(env: Env) -> set[str]:
    return set(env.mgmt.queue_depths())


def take_one(conn: pika.BlockingConnection, ch: Any, queue: str) -> tuple[Any, bytes]:
    """One message of a single-active-consumer queue (no basic.get on those), unacked."""
    got: list[tuple[Any, bytes]] = []
    ch.basic_qos(prefetch_count=1)
    tag = ch.basic_consume(queue, lambda c, m, p, body: got.append((m, body)))
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    ch.basic_cancel(tag)
    assert got, f"nothing in {queue}"
    return got[0]


def test_retries_of_two_queues_share_one_delay_queue_and_return_home(env: Env) -> None:
    a = env.cfg.amqp
    conn = amqp_connection(env.cfg)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        amqp.declare_common(ch, a)
        amqp.declare_delay_queues(ch, a)
        homes = [f"{a.retry_prefix}-home-{i}" for i in range(2)]
        for q in homes:
            ch.queue_declare(q, durable=True, arguments=amqp.work_queue_arguments(a, q, False))
            amqp.publish_confirmed(ch, "", q, f"body of {q}".encode())
        for q in homes:
            method, props, body = ch.basic_get(q)
            d = amqp.delivery_from(q, ch, method, props, body, cfg=a, daemon="test")
            assert d.retry_later("S3 unreachable") == a.retry_delays[0]
        names = queue_names(env)
        assert {amqp.delay_queue_name(a, d) for d in a.retry_delays} <= names
        assert not [n for n in names if ".retry." in n], "a per-queue retry queue was declared"
    finally:
        conn.close()
    for q in homes:
        got = drain(env.cfg, q, 1, timeout=a.retry_delays[0] + 10)
        assert got == [f"body of {q}".encode()], f"{q} got {got}"
    conn = amqp_connection(env.cfg)
    try:
        ch = conn.channel()
        for q in homes:
            ch.queue_delete(q)
    finally:
        conn.close()


def test_upgrade_deletes_empty_legacy_retry_queues_and_keeps_their_messages(env: Env) -> None:
    r = env.provision()
    data = b"retried before the upgrade\n"
    env.put(r, "cvmfs/old.txt", data)
    wait_until("the upload's event queued", lambda: (env.mgmt.queue(r.label) or {}).get(
        "messages", 0) >= 1, 20, 0.2)
    conn = amqp_connection(env.cfg)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        # what an earlier release declared for this queue
        def legacy(delay: int) -> str:
            name = amqp.legacy_retry_queue_name(r.label, delay)
            ch.queue_declare(name, durable=True, arguments={
                "x-message-ttl": delay * 1000, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": r.label})
            return name
        empty, holding = legacy(600), legacy(4)
        # a message an earlier release had sent for a retry: the upload's event, moved
        method, body = take_one(conn, ch, r.label)
        ch.basic_publish("", holding, body, pika.BasicProperties(delivery_mode=2),
                         mandatory=True)
        ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()
    cfg = env.stack.config(consumers={"refresh_interval": 1.0})
    with running(cfg, r.label):
        wait_until("the empty legacy queue deleted", lambda: empty not in queue_names(env),
                   20, 0.2)
        assert holding in queue_names(env) or env.staged(r), "deleted with a message in it"
        env.wait_staged(r, {"old.txt": put_state(data)}, timeout=30)
        wait_until("the drained legacy queue deleted", lambda: holding not in queue_names(env),
                   20, 0.2)
    assert "per-queue retry queue of an earlier release" in env.log_text()


def test_deprovision_removes_legacy_retry_queues(env: Env) -> None:
    r = env.provision()
    conn = amqp_connection(env.cfg)
    try:
        ch = conn.channel()
        for delay in env.cfg.amqp.retry_delays:
            ch.queue_declare(amqp.legacy_retry_queue_name(r.label, delay), durable=True)
    finally:
        conn.close()
    env.deprovision(r)
    assert [n for n in queue_names(env) if n.startswith(r.label)] == []


def test_delay_queues_are_quorum_and_replace_the_classic_ones(env: Env) -> None:
    """The classic delay queues of the release before are unbound, drained home, deleted.

    On a cluster a classic queue lives on one node (its retries die with it):
    the delay queues are quorum queues now. An existing classic one (same
    name as its exchange) gets no new retry once the quorum queue is bound;
    the retry still in it comes home after its TTL, and it is deleted once
    empty.
    """
    a = env.cfg.amqp
    short, long_ = a.retry_delays[0], a.retry_delays[-1]
    home = f"{a.retry_prefix}-home-upgrade"
    conn = amqp_connection(env.cfg)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(home, durable=True, arguments=amqp.work_queue_arguments(a, home, False))
        for delay in (short, long_):  # what the release before declared
            name = amqp.classic_delay_queue_name(a, delay)
            ch.exchange_declare(name, exchange_type="fanout", durable=True)
            ch.queue_declare(name, durable=True, arguments={
                "x-queue-type": "classic", "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": ""})
            ch.queue_bind(name, name)
        amqp.publish_confirmed(ch, amqp.delay_exchange_name(a, long_), home, b"in flight")
        amqp.declare_delay_queues(ch, a)
        names = queue_names(env)
        assert amqp.classic_delay_queue_name(a, short) not in names, "empty: deleted"
        for delay in a.retry_delays:
            q = env.mgmt.queue(amqp.delay_queue_name(a, delay)) or {}
            assert q.get("type") == "quorum", q
            assert q["arguments"]["x-dead-letter-strategy"] == "at-least-once"
        # the classic one that holds a retry is unbound: a new retry goes to quorum only
        amqp.publish_confirmed(ch, amqp.delay_exchange_name(a, long_), home, b"new retry")
        assert amqp.ready_count(conn, amqp.classic_delay_queue_name(a, long_)) == 1
    finally:
        conn.close()
    got = drain(env.cfg, home, 2, timeout=long_ + 10)
    assert sorted(got) == [b"in flight", b"new retry"], got
    conn = amqp_connection(env.cfg)
    try:
        assert amqp.retire_classic_delay_queue(conn, a, long_)
        assert amqp.classic_delay_queue_name(a, long_) not in queue_names(env)
        conn.channel().queue_delete(home)
    finally:
        conn.close()
