"""The staging layout and its lock protocol (the consumers/sync contract)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from cvmfs_publisher.staging.area import Entry, Staging, entry_name, repositories


def put(st: Staging, path: str, body: bytes) -> Entry:
    tmp, fh = st.new_download()
    with fh:
        fh.write(body)
    return st.stage(Entry(path=path, op="put", object=st.commit_object(tmp), size=len(body)))


def test_latest_state_per_path_and_object_cleanup(tmp_path: Path) -> None:
    st = Staging(tmp_path, "r.infn.it").ensure()
    first = put(st, "a/b.txt", b"one")
    second = put(st, "a/b.txt", b"two")
    assert st.pending_count() == 1
    assert second.seq > first.seq and second.first_time == first.time
    assert not (st.objects / first.object).exists(), "replaced object not dropped"
    assert st.object_path(st.pending_get("a/b.txt")).read_bytes() == b"two"  # type: ignore[arg-type]
    assert repositories(tmp_path) == ["r.infn.it"]


def test_batch_is_isolated_from_later_changes(tmp_path: Path) -> None:
    st = Staging(tmp_path, "r.infn.it").ensure()
    put(st, "x", b"old")
    batch = st.take_batch()
    assert [e.path for e in batch] == ["x"] and st.pending_count() == 0
    newer = put(st, "x", b"new")  # arrives while the batch is being published
    assert st.take_batch() == batch, "an unfinished batch must be applied first"
    assert (st.objects / batch[0].object).exists()
    st.finish_batch()
    assert not st.has_batch()
    assert not (st.objects / batch[0].object).exists()
    assert (st.objects / newer.object).exists()
    assert [e.path for e in st.take_batch()] == ["x"]


def test_finishing_a_batch_holds_the_lock_for_its_rename_only(tmp_path: Path,
                                                               monkeypatch) -> None:
    """The unlinks of a published batch (seconds for thousands) run without the
    staging lock, which the consumers' installs wait for; a crash before they are
    done leaves no batch to replay, and the next publish completes the clean-up."""
    st = Staging(tmp_path, "r.infn.it").ensure()
    put(st, "a", b"a")
    put(st, "b", b"b")
    batch = st.take_batch()
    newer = put(st, "a", b"a2")  # pending while the batch is published
    other = Staging(tmp_path, "r.infn.it")  # another open file description: a consumer
    seen: list[bool] = []
    real = Staging._drop_done

    def dropping(self: Staging, done: Path) -> None:
        with other.locked(blocking=False) as got:
            seen.append(got)
        raise KeyboardInterrupt  # the sync daemon killed here
    monkeypatch.setattr(Staging, "_drop_done", dropping)
    try:
        st.finish_batch()
    except KeyboardInterrupt:
        pass
    assert seen == [True], "the staging lock was held while the batch was dropped"
    assert not st.has_batch() and st.take_batch() != batch  # never replayed
    st.stage(Entry(path="c", op="delete"))  # pending again after that take
    assert len(list(st.root.glob(".done-*"))) == 1
    monkeypatch.setattr(Staging, "_drop_done", real)
    assert st.drop_finished() == 1
    assert list(st.root.glob(".done-*")) == []
    assert sorted(os.listdir(st.objects)) == [newer.object]  # the batch's objects gone
    assert st.drop_finished() == 0


def test_manifest_writers_do_not_hold_back_installs(tmp_path: Path) -> None:
    """The manifest has a lock of its own: a publish folded into a large manifest
    (up to a second) does not stop a consumer's install into pending/."""
    st = Staging(tmp_path, "r.infn.it").ensure()
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with Staging(tmp_path, "r.infn.it").manifest_locked():
            holding.set()
            release.wait(10)
    t = threading.Thread(target=writer)
    t.start()
    try:
        assert holding.wait(10)
        with st.locked(blocking=False) as got:
            assert got, "the manifest's writer holds the staging lock"
        put(st, "x", b"x")
        assert st.pending_get("x") is not None
    finally:
        release.set()
        t.join(10)


def test_sweep_removes_crash_leftovers_only(tmp_path: Path) -> None:
    st = Staging(tmp_path, "r.infn.it").ensure()
    live = put(st, "keep", b"k")
    tmp, fh = st.new_download()  # a download killed half-way
    fh.write(b"partial")
    fh.close()
    (st.objects / "orphan").write_bytes(b"x")  # committed object, entry never written
    assert st.sweep() == 2
    assert not tmp.exists() and not (st.objects / "orphan").exists()
    assert (st.objects / live.object).exists()


def test_corrupt_entry_is_quarantined(tmp_path: Path, caplog) -> None:
    st = Staging(tmp_path, "r.infn.it").ensure()
    put(st, "good", b"g")
    (st.pending / entry_name("bad")).write_text("{not json")
    assert [e.path for e in st.pending_entries()] == ["good"]
    assert len(list((st.root / "corrupt").iterdir())) == 1
    assert "corrupt-entry" in caplog.text


def test_concurrent_writers_and_batch_taker(tmp_path: Path) -> None:
    """Writers and a batch taker in parallel: every staged change is seen exactly once."""
    st = Staging(tmp_path, "r.infn.it").ensure()
    seen: list[str] = []
    done = threading.Event()

    def writer(n: int) -> None:
        for i in range(100):
            put(Staging(tmp_path, "r.infn.it"), f"w{n}/f{i}", b"%d" % i)

    def taker() -> None:
        while not done.is_set() or st.pending_count():
            batch = st.take_batch()
            seen.extend(e.path for e in batch)
            if batch:
                st.finish_batch()
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    t = threading.Thread(target=taker)
    t.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    t.join()
    assert sorted(seen) == sorted(f"w{n}/f{i}" for n in range(3) for i in range(100))
    assert os.listdir(st.objects) == []


def test_entries_are_json_documents(tmp_path: Path) -> None:
    st = Staging(tmp_path, "r.infn.it").ensure()
    st.stage(Entry(path="l", op="symlink", target="../x", mode=0o777))
    doc = json.loads((st.pending / entry_name("l")).read_text())
    assert doc["op"] == "symlink" and doc["target"] == "../x"


def test_pending_count_lists_only_a_changed_directory(tmp_path: Path, monkeypatch) -> None:
    """The count is cached on the directory's mtime, never trusted while that is fresh."""
    st = Staging(tmp_path, "r.infn.it").ensure()
    put(st, "a", b"1")
    assert st.pending_count() == 1
    put(st, "b", b"2")  # within the timestamp granularity of the count above
    assert st.pending_count() == 2, "a fresh mtime was trusted"
    old = os.stat(st.pending).st_mtime - 10
    os.utime(st.pending, (old, old))
    assert st.pending_count() == 2
    listings = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listings.append(p) or real(p))
    assert st.pending_count() == 2 and listings == [], "an unchanged directory listed again"
    put(st, "c", b"3")
    assert st.pending_count() == 3 and len(listings) == 1
    st.take_batch()
    assert st.pending_count() == 0


def test_receipt_waiting_summary_parses_each_entry_once(tmp_path: Path, monkeypatch) -> None:
    """pending/ and batch/ together; an entry already seen is not parsed again."""
    from cvmfs_publisher.staging import area, receipts

    st = Staging(tmp_path, "r.infn.it").ensure()
    first = put(st, "a", b"1")
    st.take_batch()  # "a" is being published
    put(st, "b", b"2")
    times = receipts.waiting_times(st)
    assert receipts.waiting(times) == (2, first.time)
    parsed = []
    real = area.Entry.from_dict
    monkeypatch.setattr(area.Entry, "from_dict",
                        classmethod(lambda cls, doc: parsed.append(doc) or real(doc)))
    put(st, "c", b"3")
    assert receipts.waiting(times) == (3, first.time)
    assert [d["path"] for d in parsed] == ["c"], "entries seen before were parsed again"
    st.finish_batch()
    assert receipts.waiting(times)[0] == 2
    assert receipts.waiting(receipts.waiting_times(st))[0] == 2
