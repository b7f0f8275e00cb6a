"""The group commit: several staged changes made durable by one round of syncs.

On the real file system of the test's temporary directory; the syncs are
counted (and made to fail) by wrapping :func:`cvmfs_publisher.core.durable.syncfs`,
which still runs. The AMQP half (the round's acks sent together, only over
what was acknowledged) is at the end, on the suite's RabbitMQ node.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from cvmfs_publisher.adapters import amqp_source
from cvmfs_publisher.core import config, durable
from cvmfs_publisher.staging.area import Entry, Staging
from cvmfs_publisher.staging.group_commit import GroupCommit
from devstack.rabbitmq import Broker
from tests.consumers.support import wait_until


class Rounds:
    """``on_round``: every round's results, in order."""

    def __init__(self) -> None:
        self.rounds: list[list[tuple[Any, BaseException | None]]] = []

    def __call__(self, results: list[tuple[Any, BaseException | None]]) -> None:
        self.rounds.append(results)

    @property
    def tokens(self) -> list[Any]:
        return [t for r in self.rounds for t, _ in r]


class Syncs:
    """Wraps durable.syncfs: counts the calls, can hold the first one, can fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.fail: OSError | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.held = threading.Event()
        real = durable.syncfs

        def syncfs(path: str | os.PathLike[str]) -> bool:
            self.calls += 1
            self.held.set()
            assert self.hold.wait(10)
            if self.fail is not None:
                raise self.fail
            return real(path)
        monkeypatch.setattr(durable, "syncfs", syncfs)


@pytest.fixture
def st(tmp_path: Path) -> Staging:
    return Staging(tmp_path / "staging", "repo.infn.it").ensure()


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Syncs:
    return Syncs(monkeypatch)


def written(st: Staging, path: str, data: bytes) -> Entry:
    """What a download worker hands over: the object written unsynced, its entry."""
    tmp, fh = st.new_download()
    with fh:
        fh.write(data)
    return Entry(path, "put", object=st.commit_object(tmp, sync=False), size=len(data),
                 key=f"cvmfs/{path}", time=time.time())


def test_changes_submitted_during_a_round_are_committed_by_the_next_one(
        st: Staging, syncs: Syncs) -> None:
    rounds = Rounds()
    gc = GroupCommit(rounds).start()
    try:
        syncs.hold.clear()
        gc.submit(st, [written(st, "first", b"1")], "first")
        assert syncs.held.wait(10)
        for i in range(5):  # while the first round syncs
            gc.submit(st, [written(st, f"f{i}", b"x" * i)], i)
        assert gc.pending() == 6
        assert st.pending_count() == 0, "nothing visible before its data is durable"
        syncs.hold.set()
        wait_until("both rounds", lambda: len(rounds.tokens) == 6)
    finally:
        assert gc.close(10)
    assert [[t for t, _ in r] for r in rounds.rounds] == [["first"], [0, 1, 2, 3, 4]]
    assert all(err is None for r in rounds.rounds for _, err in r)
    assert syncs.calls == 4, "two syncs a round (data, then the renames), whatever its size"
    assert gc.pending() == 0 and gc.rounds == 2 and gc.committed == 6
    for i in range(5):
        entry = st.pending_get(f"f{i}")
        assert entry is not None and st.object_path(entry).read_bytes() == b"x" * i
    assert os.listdir(st.tmp) == []


def test_a_repository_whose_lock_is_held_does_not_hold_back_the_others(
        tmp_path: Path, st: Staging, syncs: Syncs) -> None:
    """The sync daemon holding a hot repository's staging lock (taking a batch): a
    quiet repository's change is installed and reported meanwhile, also when it comes
    after a round that held only the hot repository's changes; the hot ones are carried
    and installed, in submission order, once the lock is free."""
    quiet = Staging(tmp_path / "staging", "quiet.infn.it").ensure()
    rounds = Rounds()
    gc = GroupCommit(rounds)
    hold, holding = threading.Event(), threading.Event()

    def sync_daemon() -> None:
        with st.locked():  # flock: another open file description, as another process
            holding.set()
            hold.wait(30)
    t = threading.Thread(target=sync_daemon)
    t.start()
    assert holding.wait(10)
    try:
        gc.submit(st, [written(st, "hot-1", b"h")], "hot-1")
        gc.start()
        wait_until("the hot round done", lambda: syncs.calls >= 1)
        time.sleep(0.1)  # a few retries of the busy lock
        assert gc.pending() == 1 and rounds.rounds == []  # carried, not reported
        gc.submit(quiet, [written(quiet, "q", b"q")], "quiet")
        gc.submit(st, [written(st, "hot-2", b"h"), written(st, "hot-1", b"h2")], "hot-2")
        wait_until("the quiet change reported", lambda: rounds.tokens == ["quiet"])
        assert quiet.pending_get("q") is not None
        assert st.pending_count() == 0  # the hot ones wait
        with st.locked(blocking=False) as got:
            assert not got  # a busy lock is not taken
    finally:
        hold.set()
        t.join(10)
    wait_until("the hot changes reported", lambda: len(rounds.tokens) == 3)
    assert gc.close(10)
    assert rounds.tokens == ["quiet", "hot-1", "hot-2"]
    assert all(err is None for r in rounds.rounds for _, err in r)
    assert {e.path for e in st.pending_entries()} == {"hot-1", "hot-2"}
    first = st.pending_get("hot-1")
    assert first is not None and st.object_path(first).read_bytes() == b"h2"  # the later one
    assert os.listdir(st.tmp) == []
    assert sorted(os.listdir(st.objects)) == sorted(
        e.object for e in st.pending_entries())  # the replaced object dropped


def test_a_failed_sync_fails_every_change_of_its_round_and_leaves_nothing(
        st: Staging, syncs: Syncs) -> None:
    rounds = Rounds()
    gc = GroupCommit(rounds)
    syncs.fail = OSError(errno.EIO, "Input/output error")
    for i in range(3):
        gc.submit(st, [written(st, f"f{i}", b"data")], i)  # not started: close commits them
    assert gc.close()
    assert rounds.tokens == [0, 1, 2]
    assert all(isinstance(err, OSError) and err.errno == errno.EIO
               for _, err in rounds.rounds[0])
    assert st.pending_count() == 0
    assert os.listdir(st.objects) == [] and os.listdir(st.tmp) == []
    assert gc.committed == 0


def test_close_commits_the_open_group_before_it_returns(st: Staging, syncs: Syncs) -> None:
    rounds = Rounds()
    gc = GroupCommit(rounds).start()
    syncs.hold.clear()
    gc.submit(st, [written(st, "a", b"a")], "a")
    assert syncs.held.wait(10)
    gc.submit(st, [written(st, "b", b"b"), written(st, "c", b"c")], "bc")
    closing = threading.Thread(target=gc.close, args=(10,))
    closing.start()
    syncs.hold.set()
    closing.join(10)
    assert not closing.is_alive()
    assert rounds.tokens == ["a", "bc"]
    assert {e.path for e in st.pending_entries()} == {"a", "b", "c"}
    gc.submit(st, [written(st, "late", b"l")], "late")  # after close: committed at once
    assert rounds.tokens[-1] == "late" and st.pending_get("late") is not None


def test_one_path_twice_in_a_round_keeps_the_later_fetch_and_the_first_time(
        st: Staging, syncs: Syncs) -> None:
    rounds = Rounds()
    gc = GroupCommit(rounds)
    old = written(st, "p", b"old")
    new = written(st, "p", b"new")
    new.time = old.time + 1
    gc.submit(st, [old], "old")
    gc.submit(st, [new], "new")
    assert gc.close()
    entry = st.pending_get("p")
    assert entry is not None and st.object_path(entry).read_bytes() == b"new"
    assert entry.first_time == old.time, "the path waits since its first change"
    assert os.listdir(st.objects) == [entry.object], "the replaced object is dropped"


def test_a_vanished_staging_fails_its_change_only(tmp_path: Path, st: Staging,
                                                  syncs: Syncs) -> None:
    rounds = Rounds()
    gc = GroupCommit(rounds)
    other = Staging(tmp_path / "staging", "other.infn.it").ensure()
    gone = written(other, "x", b"x")
    os.rename(other.tmp, other.root / "tmp-gone")  # prepare cannot write there
    gc.submit(other, [gone], "other")
    gc.submit(st, [written(st, "y", b"y")], "mine")
    assert gc.close()
    (_, err_other), (_, err_mine) = rounds.rounds[0]
    assert isinstance(err_other, OSError) and err_mine is None
    assert st.pending_get("y") is not None and other.pending_count() == 0


def test_without_syncfs_every_file_and_directory_is_fsynced(
        st: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "syncfs", lambda path: False)
    synced: list[str] = []
    real_file, real_dir = durable.fsync_file, durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_file",
                        lambda p: (synced.append(Path(p).parent.name), real_file(p))[1])
    monkeypatch.setattr(durable, "fsync_dir",
                        lambda p: (synced.append(Path(p).name + "/"), real_dir(p))[1])
    rounds = Rounds()
    gc = GroupCommit(rounds)
    gc.submit(st, [written(st, "a", b"a"), written(st, "b", b"b")], "ab")
    assert gc.close()
    assert rounds.rounds == [[("ab", None)]]
    assert sorted(synced) == sorted(["tmp", "objects", "tmp", "objects", "objects/",
                                     "pending/"])


# ---------------------------------------------------------------------------- the acks


@pytest.fixture
def channel(broker: Broker, vhost: str) -> Iterator[tuple[Any, Any, str]]:
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        broker.host, broker.port, virtual_host=vhost,
        credentials=pika.PlainCredentials(broker.user, broker.password)))
    ch = conn.channel()
    queue = f"group-commit-{uuid.uuid4().hex[:8]}"
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        yield conn, ch, queue
    finally:
        if conn.is_open:
            conn.channel().queue_delete(queue)
            conn.close()


def deliveries(conn: Any, ch: Any, queue: str, n: int) -> list[amqp_source.QueueDelivery]:
    cfg = config.from_mapping({"amqp": {"host": "127.0.0.1"}}, env={})
    rq = amqp_source.RepoQueue(queue, "repo.infn.it", channel=ch)
    for i in range(n):
        ch.basic_publish("", queue, f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))
    got: list[amqp_source.QueueDelivery] = []

    def on_message(c: Any, method: Any, props: Any, body: bytes) -> None:
        rq.unacked.add(method.delivery_tag)
        got.append(amqp_source.QueueDelivery(queue, method, props, body, ch, lambda: ch,
                                             cfg.amqp, "test", {}, 0, rq))
    ch.basic_qos(prefetch_count=n)
    ch.basic_consume(queue, on_message)
    wait_until("deliveries", lambda: conn.process_data_events(0.05) or len(got) == n)
    return got


def ready_after_close(conn: Any, queue: str) -> list[bytes]:
    """Close the consuming channel (what was not acked goes back), read what is ready."""
    ch = conn.channel()
    out = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        method, _, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            if out:
                break
            time.sleep(0.1)
            continue
        out.append(body)
    return sorted(out)


def test_a_rounds_acks_go_out_together_and_cover_only_what_was_acked(
        channel: tuple[Any, Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    conn, ch, queue = channel
    got = deliveries(conn, ch, queue, 6)
    sent: list[tuple[int, bool]] = []
    real = ch.basic_ack
    monkeypatch.setattr(ch, "basic_ack", lambda tag, multiple=False: (
        sent.append((tag, multiple)), real(tag, multiple=multiple))[1])
    # the round acknowledges m0-m2 and m4; m3 (still downloading) and m5 are not
    amqp_source._ack_together([got[i] for i in (2, 0, 4, 1)])
    tags = [d.method.delivery_tag for d in got]
    assert sent == [(tags[2], True), (tags[4], False)], "one frame for m0-m2, m3 left out"
    assert got[0].rq is not None and got[0].rq.unacked == {tags[3], tags[5]}
    ch.close()
    assert ready_after_close(conn, queue) == [b"m3", b"m5"], "only the acked ones are gone"


def test_settle_many_applies_each_verdict_and_batches_the_acks(
        channel: tuple[Any, Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """On the connection thread: several deliveries, one multiple ack."""
    from cvmfs_publisher.core import delivery as settlement
    conn, ch, queue = channel
    got = deliveries(conn, ch, queue, 4)
    source = amqp_source.RepositoryQueues.__new__(amqp_source.RepositoryQueues)
    source._thread = threading.get_ident()
    source._generation = 0
    source._queues = {queue: got[0].rq}
    settled: list[str] = []
    source._target = type("T", (), {"settled": lambda self, v: settled.append(v.key)})()
    sent: list[tuple[int, bool]] = []
    real = ch.basic_ack
    monkeypatch.setattr(ch, "basic_ack", lambda tag, multiple=False: (
        sent.append((tag, multiple)), real(tag, multiple=multiple))[1])
    source.settle_many([(d, settlement.ok("repo.infn.it", f"k{i}"))
                        for i, d in enumerate(got[:3])])
    assert settled == ["k0", "k1", "k2"]
    assert sent == [(got[2].method.delivery_tag, True)]
    ch.close()
    assert ready_after_close(conn, queue) == [b"m3"]

