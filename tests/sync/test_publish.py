"""Applying a batch: what reaches the published tree, and nothing else.

Every test runs the real publisher against the cvmfs_server double (overlay
mounts: a write outside a transaction fails with EROFS, as on the real
machine); the fixture fails the test if the double saw any misuse or a
transaction was left open.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cvmfs_publisher.adapters.cvmfs import CvmfsServer
from cvmfs_publisher.publishing.batch import BatchPublisher
from cvmfs_publisher.publishing.cvmfs_backend import CvmfsBackend
from cvmfs_publisher.publishing.plan import Phase, plan
from cvmfs_publisher.publishing.tree import Tree
from cvmfs_publisher.staging.area import Entry
from tests.cvmfs_server_double import union_dir

from .conftest import REPO, SyncEnv, files_of, tarball


def test_files_nested_paths_modes_symlinks_in_one_publish(env: SyncEnv) -> None:
    env.put("README", b"hello\n")
    env.put("tools/bin/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    env.put("a/b/c/d/e/deep.txt", b"deep")
    env.put("setuid", b"x", mode=0o4777)  # never published with setuid / world-writable
    env.symlink("latest", "tools/bin/run.sh")
    env.symlink("abs", "/etc/passwd")  # data: never resolved

    out = env.publisher().publish(REPO)

    assert out is not None and out.publishes == 1 and out.written == 4 and out.symlinks == 2
    assert files_of(env.published()) == {
        "README": ("f", 0o644, b"hello\n"),
        "tools/bin/run.sh": ("f", 0o755, b"#!/bin/sh\necho hi\n"),
        "a/b/c/d/e/deep.txt": ("f", 0o644, b"deep"),
        "setuid": ("f", 0o755, b"x"),
        "latest": ("l", "tools/bin/run.sh"),
        "abs": ("l", "/etc/passwd"),
    }
    assert env.published()["a/b/c"] == ("d",)
    assert len(env.revisions()) == 1  # the repository was created by mkfs from the keys
    assert [c["command"] for c in env.calls()] == ["mkfs", "transaction", "publish"]
    assert env.clean()


def test_deletions_and_empty_parents(env: SyncEnv) -> None:
    for p in ("keep/a", "gone/x/1", "gone/x/2", "dir/sub/f", "dir/other"):
        env.put(p, p.encode())
    env.publisher().publish(REPO)
    env.delete("gone/x/1")
    env.delete("gone/x/2")
    env.delete("dir/sub")  # a whole directory (e.g. reconcile)
    env.delete("never/existed")

    out = env.publisher().publish(REPO)

    assert out is not None and out.deleted == 3
    assert set(files_of(env.published())) == {"keep/a", "dir/other"}
    assert "gone" not in env.published()  # emptied parents go too: S3 has no empty dirs
    assert env.revisions()[-1]["deleted"] == sorted(["dir/sub", "dir/sub/f", "gone", "gone/x",
                                                     "gone/x/1", "gone/x/2"])


def test_only_the_batch_paths_are_touched(env: SyncEnv) -> None:
    for i in range(50):
        env.put(f"many/f{i}", b"%d" % i)
    env.publisher().publish(REPO)
    env.put("many/f7", b"seven")

    out = env.publisher().publish(REPO)

    assert out is not None and out.touched == 1
    rev = env.revisions()[-1]
    assert (rev["added"], rev["changed"], rev["deleted"]) == ([], ["many/f7"], [])


def test_a_change_published_already_is_not_written_again(env: SyncEnv) -> None:
    """An event delivered again (a lost broker connection) restages a published key
    next to a new one: only the new one is written, no path published twice."""
    env.put("tools/run.sh", b"#!/bin/sh\n", mode=0o755)
    env.delete("never-there.txt")
    env.publisher().publish(REPO)
    env.put("tools/run.sh", b"#!/bin/sh\n", mode=0o755)  # the redelivered event
    env.delete("never-there.txt")
    env.put("new.txt", b"new")

    out = env.publisher().publish(REPO)

    assert out is not None and out.unchanged == 2 and out.touched == 1
    rev = env.revisions()[-1]
    assert (rev["added"], rev["changed"], rev["deleted"]) == (["new.txt"], [], [])


def test_replacements_file_dir_symlink(env: SyncEnv) -> None:
    env.put("x", b"file")
    env.put("d/inner", b"i")
    env.symlink("l", "somewhere")
    env.publisher().publish(REPO)
    env.put("x/now/a/dir", b"under")  # a file where a directory is needed: replaced
    env.put("d", b"now a file")  # a directory replaced by a file
    env.put("l", b"no longer a link")

    env.publisher().publish(REPO)

    assert files_of(env.published()) == {
        "x/now/a/dir": ("f", 0o644, b"under"),
        "d": ("f", 0o644, b"now a file"),
        "l": ("f", 0o644, b"no longer a link"),
    }


def test_symlinks_in_the_repository_are_never_followed(env: SyncEnv, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    env.symlink("evil", str(outside))
    env.symlink("evil2", str(outside))
    env.publisher().publish(REPO)

    env.put("evil/victim", b"pwned")  # a symlink where a directory is needed: replaced
    env.delete("evil2/victim")  # deleting through a symlink: nothing there to delete
    out = env.publisher().publish(REPO)

    assert (outside / "victim").read_text() == "untouched"
    assert sorted(os.listdir(outside)) == ["victim"]
    assert env.published()["evil"] == ("d",)
    assert env.published()["evil/victim"] == ("f", 0o644, b"pwned")
    assert env.published()["evil2"] == ("l", str(outside))
    assert out is not None and out.deleted == 0


def test_same_path_staged_twice_keeps_the_latest(env: SyncEnv) -> None:
    env.put("f", b"one")
    env.put("f", b"two")
    env.delete("g")
    env.put("g", b"back")
    env.publisher().publish(REPO)
    assert files_of(env.published()) == {"f": ("f", 0o644, b"two"), "g": ("f", 0o644, b"back")}
    assert env.clean()  # the replaced object was dropped too


def test_a_bulk_publish_runs_nicer(env: SyncEnv) -> None:
    """A publish of many entries or bytes yields the CPU to the small ones (sync.bulk_*)."""
    base = os.nice(0)
    for i in range(3):
        env.put(f"small/{i}", b"x")
    env.publisher(sync={"bulk_entries": 3}).publish(REPO)  # not more than 3: not bulk
    for i in range(4):
        env.put(f"many/{i}", b"x")
    env.publisher(sync={"bulk_entries": 3, "bulk_nice": 7}).publish(REPO)
    env.put("big", b"x" * 2048)
    env.publisher(sync={"bulk_bytes": 1024}).publish(REPO)
    for i in range(4):
        env.put(f"off/{i}", b"x")
    env.publisher(sync={"bulk_entries": 3, "bulk_nice": 0}).publish(REPO)

    assert [c["nice"] for c in env.calls("publish")] == [
        base, min(19, base + 7), min(19, base + 10), base]
    assert {c["nice"] for c in env.calls("transaction")} == {base}  # only the publish
    assert len(env.revisions()) == 4 and env.clean()


def test_nothing_pending_publishes_nothing(env: SyncEnv) -> None:
    assert env.publisher().publish(REPO) is None
    env.put("f", b"x")
    env.publisher().publish(REPO)
    env.put("f", b"x")  # the same content again (a duplicate event)
    env.delete("absent")

    out = env.publisher().publish(REPO)

    assert out is not None and out.publishes == 0 and out.unchanged == 2
    assert len(env.revisions()) == 1  # never an empty publish
    assert env.clean()


def test_unsafe_entry_is_skipped_not_blocking(env: SyncEnv) -> None:
    env.put("ok", b"fine")
    st = env.staging()
    st.stage(Entry("../escape", "put", object="nope"))
    st.stage(Entry("missing-object", "put", object="0" * 32))

    out = env.publisher().publish(REPO)

    assert out is not None and out.skipped == 2 and out.written == 1
    assert files_of(env.published()) == {"ok": ("f", 0o644, b"fine")}
    assert env.clean()


@pytest.mark.parametrize("gz", [False, True, "bz2", "xz"],
                         ids=["tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_tarball_ingest_replace_and_delete(env: SyncEnv, gz: bool | str) -> None:
    env.put("plain", b"p")
    env.ingest("pkg", tarball({"bin/tool": b"v1", "./lib/x.so": b"so", "ln": "bin/tool"},
                              gz=gz), gz=gz)

    out = env.publisher().publish(REPO)

    assert out is not None and out.ingested == 1
    tree = env.published()
    assert tree["software/pkg/bin/tool"][2] == b"v1"
    assert tree["software/pkg/lib/x.so"][2] == b"so"
    assert tree["software/pkg/ln"] == ("l", "bin/tool")
    assert tree["plain"][2] == b"p"
    # software/ did not exist: created in the transaction (gateway: the parent of
    # --base_dir must exist), then the ingest, outside any transaction.
    assert [r["command"] for r in env.revisions()] == ["publish", "ingest"]
    ingest = [c for c in env.calls("ingest")]
    assert ingest[0]["argv"] == ["ingest", "-t", "-", "-b", "software/pkg", REPO]

    env.ingest("pkg", tarball({"bin/tool": b"v2"}, gz=gz), gz=gz)
    env.publisher().publish(REPO)
    assert {p for p in files_of(env.published()) if p.startswith("software/")} == {
        "software/pkg/bin/tool"}  # replaced: ingest -d, then ingest -t
    assert env.published()["software/pkg/bin/tool"][2] == b"v2"
    assert [c["argv"][1:3] for c in env.calls("ingest")][-2:] == [
        ["-d", "software/pkg"], ["-t", "-"]]

    env.ingest_delete("pkg")
    env.publisher().publish(REPO)
    assert "software/pkg" not in env.published()
    assert env.clean()


def test_tarball_keeps_order_with_files_of_the_same_paths(env: SyncEnv) -> None:
    env.put("software/a/readme", b"before")  # staged first: the ingest replaces it
    env.ingest("a", tarball({"f": b"A"}))
    env.ingest("b", tarball({"f": b"B"}))
    env.put("software/b/readme", b"after")  # staged after: stays next to the tarball
    env.put("elsewhere", b"e")

    env.publisher().publish(REPO)

    files = files_of(env.published())
    assert "software/a/readme" not in files
    assert files["software/b/readme"][2] == b"after"
    assert files["software/a/f"][2] == b"A" and files["software/b/f"][2] == b"B"
    assert files["elsewhere"][2] == b"e"
    # files, ingest -d software/a (it held readme), ingest a, ingest b, the later file
    assert [r["command"] for r in env.revisions()] == [
        "publish", "ingest", "ingest", "ingest", "publish"]


def test_bad_tarballs_are_refused(env: SyncEnv) -> None:
    env.ingest("garbage", b"this is not a tarball at all" * 100, gz=True)
    evil = tarball({"../../escape": b"x"})
    env.ingest("evil", evil)
    env.put("fine", b"ok")

    out = env.publisher().publish(REPO)

    assert out is not None and out.skipped == 2
    assert files_of(env.published()) == {"fine": ("f", 0o644, b"ok")}
    assert not env.calls("ingest")
    assert env.clean()


def test_phase_plan() -> None:
    def e(seq: int, path: str, op: str = "put") -> Entry:
        return Entry(path, op, seq=seq)

    def kinds(phases: list[Phase]) -> list[tuple[str, list[str], list[str]]]:
        return [(p.kind, [x.path for x in p.entries], p.parents) for p in phases]

    # Files only: one transaction, in staging order.
    assert kinds(plan([e(2, "b"), e(1, "a")], lambda p: True)) == [("txn", ["a", "b"], [])]
    # An ingest whose parent exists needs no transaction.
    assert kinds(plan([e(1, "software/x", "ingest")], lambda p: True)) == [
        ("ingest", ["software/x"], [])]
    # ... and one creating it when it does not.
    assert kinds(plan([e(1, "software/x", "ingest")], lambda p: False)) == [
        ("txn", [], ["software"]), ("ingest", ["software/x"], [])]
    # A file inside the ingest directory staged later goes after the ingest; an
    # unrelated later file joins the first transaction.
    assert kinds(plan([e(1, "software/x", "ingest"), e(2, "software/x/f"), e(3, "zz")],
                      lambda p: True)) == [
        ("ingest", ["software/x"], []), ("txn", ["software/x/f", "zz"], [])]
    # Deleting the parent before the ingest: the directory is created again after it.
    assert kinds(plan([e(1, "software", "delete"), e(2, "software/x", "ingest")],
                      lambda p: True)) == [
        ("txn", ["software"], ["software"]), ("ingest", ["software/x"], [])]


def test_tree_refuses_to_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    with Tree(root) as tree:
        assert tree.lstat("link/x") is None
        assert not tree.delete("link/x")
        assert not tree.is_dir("link")
        tree.makedirs("link/y")
    assert (root / "link").is_dir() and not (root / "link").is_symlink()
    assert os.listdir(tmp_path / "outside") == []


def test_write_outside_a_transaction_is_refused(env: SyncEnv) -> None:
    """The double's guard is real: a sanity check of the test set-up itself."""
    env.put("f", b"x")
    env.publisher().publish(REPO)
    with pytest.raises(OSError) as exc:
        (union_dir(env.root, REPO) / "g").write_text("x")
    assert exc.value.errno == 30  # EROFS


class RecordingBackend:
    """The cvmfs_server backend, with every protocol call the driver makes recorded.

    Not a mock: every call goes to the real backend (the test double behind
    it); the record shows that the driver uses the protocol only, recovers
    once per batch and opens the published tree once per revision.
    """

    def __init__(self, inner: CvmfsBackend) -> None:
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)
        return call


def test_the_driver_sees_only_the_publish_backend(env: SyncEnv) -> None:
    cfg = env.config()
    backend = RecordingBackend(CvmfsBackend(CvmfsServer(cfg.cvmfs)))
    pub = BatchPublisher(cfg, backend=backend)
    env.put("a", b"1")
    env.ingest("pkg", tarball({"f": b"x"}))
    env.put("b", b"2")

    out = pub.publish(REPO)

    assert out is not None and (out.written, out.ingested) == (2, 1)
    assert env.published()["software/pkg/f"][2] == b"x"
    assert backend.calls.count("in_transaction") == 1, backend.calls  # one recovery
    # the published tree: once for the plan and the first phase, once after each revision
    assert backend.calls.count("reader") == 2, backend.calls
    assert [c for c in backend.calls if c in ("transaction", "publish", "ingest_tar")] == [
        "transaction", "publish", "ingest_tar"]
