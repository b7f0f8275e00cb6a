"""A passive declare's expected 404 stays out of the logs; other channel closes do not.

pika logs ``WARNING pika.channel: Received remote Channel.Close (404) ...``
before our code sees the exception; for ``amqp.passive_declare`` (does this
queue exist yet?) that miss is an answer, and operators must not read it as
an error on every start. Against the real broker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from cvmfs_publisher.adapters import amqp
from devstack.stack import unique_label


@pytest.fixture
def conn(broker) -> Iterator[pika.BlockingConnection]:
    c = pika.BlockingConnection(pika.ConnectionParameters(
        broker.host, broker.port, credentials=pika.PlainCredentials(broker.user,
                                                                    broker.password)))
    yield c
    if c.is_open:
        c.close()


def _pika_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pika.channel" and r.levelno >= logging.WARNING]


def test_missing_queue_is_none_and_not_logged(conn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    queue = unique_label("absent-")
    assert amqp.passive_declare(conn, queue) is None
    assert not amqp.queue_exists(conn, queue)
    assert _pika_warnings(caplog) == []
    assert conn.is_open  # only the throw-away channel was closed


def test_existing_queue_gives_its_counts(conn) -> None:
    queue = unique_label("present-")
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)
    try:
        declared = amqp.passive_declare(conn, queue)
        assert declared is not None and declared.message_count == 0
        assert declared.consumer_count == 0
    finally:
        ch.queue_delete(queue)


def test_other_channel_closes_are_still_logged(conn, caplog: pytest.LogCaptureFixture) -> None:
    """A 404 on a channel not in a passive_declare, and a 406, reach the logs."""
    caplog.set_level(logging.INFO)
    queue = unique_label("absent-")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        conn.channel().queue_declare(queue, passive=True)
    assert any("404" in m for m in _pika_warnings(caplog))
    caplog.clear()
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # other arguments: 406
            conn.channel().queue_declare(queue, durable=True)
        assert any("406" in m for m in _pika_warnings(caplog))
    finally:
        ch.queue_delete(queue)
