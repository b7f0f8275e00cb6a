"""The sync daemon's half of the receipt: revisions, published keys, refusals, failures.

Driven through the daemon (inline, fake clock) on the cvmfs_server double;
the receipt document is the one the consumers upload
(:func:`cvmfs_publisher.staging.receipts.build`).
"""

from __future__ import annotations

import subprocess

from cvmfs_publisher.adapters.cvmfs import CvmfsServer
from cvmfs_publisher.operations.receipt_view import format_key
from cvmfs_publisher.publishing.cvmfs_backend import CvmfsBackend
from cvmfs_publisher.staging import manifest, receipts
from cvmfs_publisher.staging.area import Staging
from tests.cvmfs_server_double import current_revision, inject_fault, published_tree, spool_dir
from tests.sync.conftest import REPO, SyncEnv, tarball

#: What the real tool says when the tar stream is not a tar (cvmfs README §5).
INGEST_FAILURE = ("Impossible to open the archive: Unrecognized archive format\n"
                  "Swissknife Ingest: Initialization of the synchronisation engine failed\n"
                  "Synchronization failed\n\nExecuted Command:\ncvmfs_swissknife ingest -t -\n")


def _tick_published(env: SyncEnv, daemon, later: float = 10.0) -> None:
    env.clock[0] += later
    daemon.tick()


def test_published_key_carries_the_revision_the_tool_reports(env: SyncEnv) -> None:
    daemon = env.daemon()
    daemon.tick()  # start-up recovery creates the repository
    env.put("bin/hello.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    env.delete("old.txt")
    _tick_published(env, daemon)
    rev = current_revision(env.root, REPO)
    # The backend reads what `attr -qg revision <spool>/rdonly` prints (cvmfs README §2).
    attr = subprocess.run(["attr", "-qg", "revision", str(spool_dir(env.root, REPO) / "rdonly")],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert CvmfsBackend(CvmfsServer(env.cfg.cvmfs)).revision(REPO) == rev == int(attr)
    doc = receipts.build(env.cfg.cvmfs.staging_dir, REPO, env.cfg.receipts)
    assert doc["repository"] == REPO
    assert doc["published"]["revision"] == rev and doc["published"]["time"]
    got = {r["key"]: (r["change"], r["revision"]) for r in doc["recent"]}
    assert got == {"cvmfs/bin/hello.sh": ("published", rev), "cvmfs/old.txt": ("deleted", rev)}
    assert doc["pending"] == {"count": 0, "oldest_age_seconds": None}
    assert doc["last_error"] is None and doc["rejected"] == []
    view = receipts.lookup(env.cfg.cvmfs.staging_dir, REPO, "cvmfs/bin/hello.sh",
                           "bin/hello.sh")
    assert view["state"] == "published" and view["revision"] == rev


def test_ingest_failure_shows_the_tools_message_until_it_is_published(env: SyncEnv) -> None:
    daemon = env.daemon()
    daemon.tick()
    inject_fault(env.root, "ingest", rc=1, stderr=INGEST_FAILURE, repo=REPO)
    env.ingest("pkg/tool-1.0", tarball({"bin/tool": b"#!/bin/sh\n"}))
    _tick_published(env, daemon)
    doc = receipts.build(env.cfg.cvmfs.staging_dir, REPO, env.cfg.receipts)
    err = doc["last_error"]
    assert err["failing"] is True
    assert "Impossible to open the archive: Unrecognized archive format" in err["message"]
    assert "step=ingest rc=1" in err["message"]
    assert "Executed Command" not in err["message"]
    assert doc["pending"]["count"] == 1 and doc["pending"]["oldest_age_seconds"] is not None
    view = receipts.lookup(env.cfg.cvmfs.staging_dir, REPO, "cvmfs/pkg/tool-1.0.tar",
                           "software/pkg/tool-1.0")
    assert view["state"] == "staged"
    # The fault is consumed: the retry (after the backoff) publishes it.
    _tick_published(env, daemon, later=60.0)
    doc = receipts.build(env.cfg.cvmfs.staging_dir, REPO, env.cfg.receipts)
    assert doc["last_error"]["failing"] is False  # kept, marked as recovered
    assert doc["recent"][0]["key"] == "cvmfs/pkg/tool-1.0.tar"
    assert doc["recent"][0]["revision"] == current_revision(env.root, REPO)
    assert doc["pending"]["count"] == 0


def test_a_tarball_that_is_no_tar_is_rejected_with_its_reason(env: SyncEnv) -> None:
    daemon = env.daemon()
    daemon.tick()
    env.ingest("pkg/broken", b"this is not a tar archive at all" * 40)
    env.put("fine.txt", b"fine\n")
    _tick_published(env, daemon)
    doc = receipts.build(env.cfg.cvmfs.staging_dir, REPO, env.cfg.receipts)
    (rej,) = doc["rejected"]
    assert rej["key"] == "cvmfs/pkg/broken.tar" and rej["by"] == "cvmfs-repo-sync"
    assert "tarball refused: not a readable tar archive" in rej["reason"]
    assert [r["key"] for r in doc["recent"]] == ["cvmfs/fine.txt"]
    view = receipts.lookup(env.cfg.cvmfs.staging_dir, REPO, "cvmfs/pkg/broken.tar",
                           "software/pkg/broken")
    assert view["state"] == "rejected" and "not a readable tar archive" in view["reason"]


def test_bounded_lists_keep_the_newest(env: SyncEnv) -> None:
    daemon = env.daemon(receipts={"recent": 3, "known_keys": 4})
    daemon.tick()
    for i in range(6):
        env.put(f"f{i}.txt", b"%d\n" % i)
        _tick_published(env, daemon)
        if i == 0:  # the manifest an active host keeps (walked as keep_manifest would;
            # each later publish continues it)
            manifest.ensure(Staging(env.cfg.cvmfs.staging_dir, REPO),
                            published_tree(env.root, REPO), current_revision(env.root, REPO))
    sync, _ = receipts.state(env.cfg.cvmfs.staging_dir, REPO)
    assert [r["key"] for r in sync["recent"]] == ["cvmfs/f5.txt", "cvmfs/f4.txt",
                                                  "cvmfs/f3.txt"]
    assert list(sync["known"]) == [f"cvmfs/f{i}.txt" for i in range(2, 6)]
    # f0 fell out of the receipt's list: the manifest still knows it was published
    view = receipts.lookup(env.cfg.cvmfs.staging_dir, REPO, "cvmfs/f0.txt", "f0.txt")
    assert view["state"] == "published" and view["from"] == "manifest", view
    assert view["revision"] == current_revision(env.root, REPO)
    assert view["etag"] and view["path"] == "f0.txt"
    assert "present in revision" in format_key({**view, "repository": REPO,
                                                "key": "cvmfs/f0.txt", "in_sync": True})
    unknown = receipts.lookup(env.cfg.cvmfs.staging_dir, REPO, "cvmfs/never.txt", "never.txt")
    assert unknown["state"] == "unknown"
