"""The manifest (what was published, from which object) and the fencing of ended terms.

Unit level, on a real file system: the sync daemon's and the consumers'
sides of both protocols. The end-to-end sequences (two hosts, a failover)
are in tests/sync/test_failover.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import threading
from pathlib import Path

import pytest

from cvmfs_publisher.staging import fencing, manifest
from cvmfs_publisher.staging.area import Entry, Staging

REPO = "r.infn.it"


def put(st: Staging, path: str, body: bytes, **kw: object) -> Entry:
    tmp, fh = st.new_download()
    with fh:
        fh.write(body)
    return st.stage(Entry(path=path, op="put", object=st.commit_object(tmp), size=len(body),
                          **kw))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_batch_folding(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    m = manifest.Manifest(REPO, 3)
    m.apply([Entry("a/x", "put", size=3, etag="e1", modified=10.0, key="cvmfs/a/x"),
             Entry("a/l", "symlink", target="x", size=1, etag="e2", key="cvmfs/a/l"),
             Entry("sw/t", "ingest", etag="e3", size=9, key="cvmfs/sw/t.tar")])
    manifest.save(st.root, m)
    back = manifest.load(st.root, REPO)
    assert back is not None and back.revision == 3
    assert back.entries == m.entries
    assert back.entries["a/l"].target == "x" and back.entries["sw/t"].type == manifest.TARBALL
    # a deleted directory takes its subtree; a put replaces a record
    back.apply([Entry("a", "delete"), Entry("b", "put", etag="e4", size=1)])
    assert set(back.entries) == {"sw/t", "b"}
    back.apply([Entry("sw/t", "ingest-delete")])
    assert set(back.entries) == {"b"}


def test_folding_a_batch_replaces_and_removes_subtrees_as_published() -> None:
    """What a publish does to the tree, on random batches: a path's record replaced,
    a directory deleted or replaced by a file or symlink loses its subtree. Checked
    against the plain definition (every record scanned for each entry), which cost
    1.2 s of the sync daemon's CPU for 1,000 entries onto 19,000 paths."""
    def plain(records: dict[str, manifest.Record], batch: list[Entry]) -> None:
        for e in batch:
            records.pop(e.path, None)
            for p in [p for p in records if p.startswith(e.path + "/")]:
                del records[p]
            rec = manifest.record_of(e)
            if rec is not None:
                records[e.path] = rec

    rnd = random.Random(14)
    names = ["a", "b", "a/b", "a/c", "a/b/c", "a/b/c/d", "b/a", "c/d", "d"]
    for _ in range(500):
        m, expected = manifest.Manifest(REPO, 1), {}
        for _ in range(3):
            batch = []
            for _ in range(rnd.randint(1, 8)):
                path = rnd.choice(names) + ("/x" if rnd.random() < 0.3 else "")
                op = rnd.choice(["put", "delete", "symlink", "ingest", "ingest-delete"])
                batch.append(Entry(path, op, object="o" if op == "put" else "", size=1,
                                   target="t" if op == "symlink" else "", key=f"cvmfs/{path}"))
            m.apply(batch)
            plain(expected, batch)
            assert m.entries == expected


def test_manifest_trusted_only_for_the_published_revision(tmp_path: Path) -> None:
    m = manifest.Manifest(REPO, 7)
    assert m.trusted(7)
    assert not m.trusted(8), "another host (or a crash) published since"
    assert not m.trusted(None), "an unreadable revision proves nothing"


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 99, "entries": {}}',
                                     b'{"format": 1, "repository": "other.infn.it", '
                                     b'"revision": 1, "entries": {}}',
                                     b'{"format": 1, "repository": "r.infn.it", '
                                     b'"revision": 1, "entries": {"a": ["file", "x"]}}'])
def test_unreadable_manifest_is_no_manifest(tmp_path: Path, content: bytes,
                                            caplog: pytest.LogCaptureFixture) -> None:
    st = Staging(tmp_path, REPO).ensure()
    manifest.path_of(st.root).write_bytes(content)
    assert manifest.load(st.root, REPO) is None
    assert "outcome=unreadable" in caplog.text and "rebuilds it" in caplog.text


def test_record_publish_chains_revisions(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    manifest.save(st.root, manifest.Manifest(REPO, 4))
    manifest.record_publish(st, [Entry("f", "put", etag="e", size=1)], before=4, after=5)
    m = manifest.load(st.root, REPO)
    assert m is not None and m.revision == 5 and set(m.entries) == {"f"}
    # a publish of someone else (revision 6) in between: the manifest is no longer true
    manifest.record_publish(st, [Entry("g", "put", etag="e", size=1)], before=6, after=7)
    assert manifest.load(st.root, REPO) is None, "a broken chain must not be trusted"
    # without a manifest nothing partial is written (a reconcile rebuilds it whole)
    manifest.record_publish(st, [Entry("g", "put", etag="e", size=1)], before=7, after=8)
    assert not manifest.path_of(st.root).exists()


def test_manifest_write_is_atomic_file_replacement(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    manifest.save(st.root, manifest.Manifest(REPO, 1))
    inode = os.stat(manifest.path_of(st.root)).st_ino
    manifest.save(st.root, manifest.Manifest(REPO, 2))
    assert os.stat(manifest.path_of(st.root)).st_ino != inode, "replaced by rename"
    assert json.loads(manifest.path_of(st.root).read_bytes())["revision"] == 2
    assert not [p for p in st.root.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- fencing


def test_entries_carry_the_term_and_fence_sets_ended_terms_aside(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    term = fencing.Term(st)
    waiting = put(st, "early", b"0")  # staged before this host ever was active
    t1 = term.begin()
    assert fencing.live_term(st) == t1
    live = put(st, "k", b"v1")
    assert live.activation == t1
    assert fencing.fence(st) == 1, "only the entry of a term that was never live"
    assert [e.path for e in st.pending_entries()] == ["k"]
    assert [e.path for e in st.stale_entries()] == ["early"] and waiting.activation
    term.end()
    assert fencing.live_term(st) is None, "the lock goes with the term"
    assert fencing.fence(st) == 1
    assert st.pending_count() == 0 and st.take_batch() == []
    assert {e.path for e in st.stale_entries()} == {"early", "k"}
    # the staged objects of stale entries survive a sweep (they are checked later)
    st.sweep()
    assert all((st.objects / e.object).exists() for e in st.stale_entries())


def test_fence_on_a_batch_left_by_a_crash(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    term = fencing.Term(st)
    term.begin()
    put(st, "k", b"v1")
    assert [e.path for e in st.take_batch()] == ["k"]
    term.end()  # the host dies with the batch unpublished
    assert fencing.fence(st) == 1
    assert not st.has_batch(), "an emptied batch is gone, not replayed"


def test_operator_entries_are_not_fenced(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()  # no Term: the CLI's reconcile
    put(st, "k", b"v")
    assert fencing.fence(st) == 0 and st.pending_count() == 1


def test_new_term_rechecks_leftovers_then_forgets_them(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    term = fencing.Term(st)
    term.begin()
    old = put(st, "k", b"v1")
    put(st, "j", b"v1")
    term.end()
    fencing.fence(st)
    term.begin()
    todo = fencing.to_check(st)
    assert [e.path for e in todo] == ["k", "j"]
    fresh = put(st, "k", b"v2")  # what the consumer stages after asking S3 again
    fencing.checked(st, todo[0])
    assert not (st.objects / old.object).exists(), "the stale copy's object is dropped"
    assert st.pending_get("k").object == fresh.object  # type: ignore[union-attr]
    assert [e.path for e in fencing.to_check(st)] == ["j"]


def test_two_processes_cannot_hold_one_term(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fencing, "BEGIN_WAIT", 0.2)
    st = Staging(tmp_path, REPO).ensure()
    first, second = fencing.Term(st), fencing.Term(Staging(tmp_path, REPO))
    first.begin()
    with pytest.raises(fencing.FencingError, match="another process"):
        second.begin()
    first.end()
    second.begin()
    assert second.active


def test_the_sync_daemons_probe_never_stops_a_term_from_beginning(tmp_path: Path) -> None:
    """``live_term`` holds a shared lock for an instant, many times a second; a consumer
    becoming active at that instant must still begin its term (it waits)."""
    st = Staging(tmp_path, REPO).ensure()
    probe = os.open(st.root / fencing.ACTIVE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(probe, fcntl.LOCK_SH)  # the probe, caught at the worst moment
    threading.Timer(0.2, os.close, [probe]).start()
    term = fencing.Term(Staging(tmp_path, REPO))
    assert term.begin() and term.active
    assert fencing.live_term(st) == term.staging.term
    term.end()


def test_a_later_fetch_wins_over_an_earlier_one(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    late = put(st, "k", b"asked S3 later", time=200.0)
    early = put(st, "k", b"asked S3 earlier", time=100.0)
    assert early.object == late.object, "the pending entry stays the later fetch"
    assert len(os.listdir(st.objects)) == 1, "the loser's object is dropped"


def test_rebuild_from_the_published_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"hello\n")
    os.chmod(tree / "d" / "f", 0o755)  # noqa: S103 - an executable, as published
    os.symlink("f", tree / "d" / "l")
    (tree / "new_repository").write_bytes(b"")
    (tree / ".cvmfscatalog").write_bytes(b"")
    m, hashed = manifest.rebuild_from_tree(tree, REPO, 9)
    assert hashed == 1 and m.revision == 9
    assert set(m.entries) == {"d/f", "d/l"}
    f = m.entries["d/f"]
    assert (f.type, f.size, f.mode, f.etag) == ("file", 6, 0o755,
                                                "b1946ac92492d2347c6235b4d2611184")
    assert m.entries["d/l"].target == "f" and m.entries["d/l"].type == "symlink"


def test_ensure_rebuilds_once_then_trusts(tmp_path: Path) -> None:
    st = Staging(tmp_path / "staging", REPO).ensure()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"a")
    assert manifest.ensure(st, tree, None) == "unknown"
    assert manifest.ensure(st, tree, 3) == "rebuilt"
    assert manifest.ensure(st, tree, 3) == "trusted"
    assert manifest.ensure(st, tree, 4) == "rebuilt", "another revision was published"


def test_peek_revision_reads_the_header_only(tmp_path: Path) -> None:
    st = Staging(tmp_path, REPO).ensure()
    assert manifest.peek_revision(st.root) is None
    m = manifest.Manifest(REPO, 12)
    m.entries = {f"p{i}": manifest.Record("file", i) for i in range(1000)}
    manifest.save(st.root, m)
    assert manifest.peek_revision(st.root) == 12
    manifest.save(st.root, manifest.Manifest(REPO, None))
    assert manifest.peek_revision(st.root) is None
