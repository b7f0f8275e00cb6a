"""The uploader's receipt in the bucket, and ``cvmfs-publisher status REPO --key``, on real RGW.

Real uploads to the session's Ceph RGW, real events through RabbitMQ, the
consumers daemon (which writes the receipt) and the sync daemon (which feeds
it through staging) running on the cvmfs_server double. Production receipt
settings (a write at most every 5 s per repository).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_publisher.adapters.rgw import RGW
from cvmfs_publisher.core.config import Config
from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.daemons.repo_sync import NAME as SYNC
from cvmfs_publisher.operations import cli
from cvmfs_publisher.pipeline.receipt_upload import DENIED_RETRY, ReceiptWriter
from cvmfs_publisher.publishing.scheduler import RepoSync
from cvmfs_publisher.staging.area import Entry, Staging
from tests.conftest import Stack
from tests.consumers.support import Env, Repo, dead_letters, put_state, running, wait_until
from tests.cvmfs_server_double import current_revision, inject_fault
from tests.sync.conftest import tarball

#: What the real tool says when the tar stream is not a tar (cvmfs README §5).
INGEST_FAILURE = ("Impossible to open the archive: Unrecognized archive format\n"
                  "Swissknife Ingest: Initialization of the synchronisation engine failed\n"
                  "Synchronization failed\n\nExecuted Command:\ncvmfs_swissknife ingest -t -\n")
RECEIPT = "cvmfs-publisher/status.json"


@contextlib.contextmanager
def syncing(cfg: Config) -> Iterator[RepoSync]:
    """cvmfs-repo-sync in a thread on the same configuration (the double's root)."""
    status = StatusDocument(Path(cfg.status.dir) / f"{SYNC}.json", SYNC, 0.1)
    daemon = RepoSync(cfg, status)
    thread = threading.Thread(target=daemon.run, name="repo-sync", daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "cvmfs-repo-sync did not stop"


def receipt(env: Env, r: Repo) -> dict[str, Any] | None:
    try:
        body = env.s3.get_object(Bucket=r.label, Key=RECEIPT)["Body"].read()
    except env.s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def status_cli(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = cli.main(["--config", str(stack.write("cli.yaml")), "status", *args])
    return rc, capsys.readouterr().out


def test_receipt_and_status_key_follow_an_upload(env: Env, stack: Stack,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    r = env.provision()
    root = Path(env.cfg.cvmfs.repositories_dir).parents[2]
    # Failing for longer than a receipt interval (the backoff doubles from 0.2 s to 2 s):
    # a failure shorter than that is coalesced away, only its last error remains.
    for _ in range(8):
        inject_fault(root, "ingest", rc=1, stderr=INGEST_FAILURE, repo=r.repository)
    with running(env.cfg, r.label), syncing(env.cfg):
        env.put(r, "cvmfs/bin/hello.sh", b"#!/bin/sh\necho hi\n")
        env.put(r, "cvmfs/../../etc/passwd", b"hostile")
        env.put(r, "cvmfs/pkg/tool-1.0.tar", tarball({"bin/tool": b"#!/bin/sh\necho tool\n"}))
        failing = wait_until("the receipt shows the failed ingest", lambda: (
            (d := receipt(env, r)) and d["last_error"] and d["last_error"]["failing"] and d), 60)
        done = wait_until("the receipt shows everything published", lambda: (
            (d := receipt(env, r)) and {x["key"] for x in d["recent"]} >= {
                "cvmfs/bin/hello.sh", "cvmfs/pkg/tool-1.0.tar"}
            and d["rejected"] and not d["pending"]["count"] and d), 90)
        rev = current_revision(root, r.repository)
        rc_pub, out_pub = status_cli(stack, capsys, r.repository, "--key", "cvmfs/bin/hello.sh")
        rc_rej, out_rej = status_cli(stack, capsys, r.repository, "--key",
                                     "cvmfs/../../etc/passwd")
        rc_repo, out_repo = status_cli(stack, capsys, r.repository)
    assert "Impossible to open the archive: Unrecognized archive format" in \
        failing["last_error"]["message"]
    assert failing["pending"]["count"] >= 1
    # The accepted upload, with its revision; the repository's own revision.
    assert done["repository"] == r.repository
    assert done["published"]["revision"] == rev
    hello = next(x for x in done["recent"] if x["key"] == "cvmfs/bin/hello.sh")
    assert hello["path"] == "bin/hello.sh" and hello["change"] == "published"
    assert 1 < hello["revision"] <= rev
    assert next(x for x in done["recent"] if x["key"] == "cvmfs/pkg/tool-1.0.tar")[
        "revision"] == rev
    # The hostile key, with the reason; the ingest failure stays as the last error.
    (bad,) = done["rejected"]
    assert bad["key"] == "cvmfs/../../etc/passwd" and "'..' path component" in bad["reason"]
    assert bad["by"] == "cvmfs-repo-consumers"
    assert done["last_error"]["failing"] is False
    assert "Unrecognized archive format" in done["last_error"]["message"]
    # Writing the receipt raised no event: no line of the consumers' (DEBUG) log names it.
    assert RECEIPT not in env.log_text()
    # The operator's view.
    assert rc_pub == 0 and f"published in revision {hello['revision']} at" in out_pub
    assert "in sync" in out_pub
    assert rc_rej == 1 and "rejected at" in out_rej and "'..' path component" in out_rej
    assert rc_repo == 0 and f"revision {rev} at" in out_repo
    assert f"s3://{r.label}/{RECEIPT}: ok, written" in out_repo
    assert "cvmfs/../../etc/passwd" in out_repo

    # Staged: the consumers run, the sync daemon does not.
    with running(env.cfg, r.label):
        env.put(r, "cvmfs/later.txt", b"later\n")
        env.wait_staged(r, {"later.txt": put_state(b"later\n")})
        rc_st, out_st = status_cli(stack, capsys, r.repository, "--key", "cvmfs/later.txt")
    assert rc_st == 1 and "cvmfs/later.txt: staged (put of later.txt" in out_st
    # Unknown, and changed in S3 after the publish: no daemon has seen these events yet.
    env.put(r, "cvmfs/unseen.txt", b"unseen\n")
    env.put(r, "cvmfs/bin/hello.sh", b"#!/bin/sh\necho changed\n")
    rc_un, out_un = status_cli(stack, capsys, r.repository, "--key", "cvmfs/unseen.txt")
    rc_ch, out_ch = status_cli(stack, capsys, r.repository, "--key", "cvmfs/bin/hello.sh")
    etag_unseen = env.s3.head_object(Bucket=r.label, Key="cvmfs/unseen.txt")["ETag"].strip('"')
    assert rc_un == 1 and "unknown to the publisher" in out_un
    assert f"S3 holds ETag {etag_unseen}" in out_un and "reconcile" in out_un
    assert rc_ch == 1 and f"published in revision {hello['revision']}" in out_ch
    assert "S3 holds a different object" in out_ch


class CountingRGW(RGW):
    """The real S3 adapter, counting the receipt writes it is asked for (a spy, no fake)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.receipt_writes = 0

    def put_object(self, bucket: str, key: str, body: bytes, content_type: str,
                   repository: str = "") -> None:
        if key == RECEIPT:
            self.receipt_writes += 1
        super().put_object(bucket, key, body, content_type, repository)


def test_a_denied_receipt_is_reported_once_and_nothing_else_breaks(
        env: Env, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    r = env.provision()
    env.s3.put_bucket_policy(Bucket=r.label, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": {"AWS": ["*"]}, "Action": "s3:PutObject",
                       "Resource": [f"arn:aws:s3:::{r.label}/{RECEIPT}"]}]}))
    spy = CountingRGW(env.cfg.s3, env.cfg.rgw)
    try:
        with running(env.cfg, r.label, rgw=spy):
            env.put(r, "cvmfs/a.txt", b"a\n")
            env.put(r, "cvmfs/../x", b"hostile")
            env.wait_staged(r, {"a.txt": put_state(b"a\n")})
            wait_until("the refusal in the status document", lambda: str(
                env.status().get("repositories", {}).get(r.repository, {}).get("receipt", "")
            ).startswith("refused"), 30)
            wait_until("the hostile key dead-lettered", lambda: dead_letters(env.cfg), 30)
            # Several intervals with new changes and a new rejection: still one write tried.
            time.sleep(3 * env.cfg.receipts.interval)
            env.put(r, "cvmfs/b.txt", b"b\n")
            env.wait_staged(r, {"a.txt": put_state(b"a\n"), "b.txt": put_state(b"b\n")})
            time.sleep(2 * env.cfg.receipts.interval)
            rc, out = status_cli(stack, capsys, r.repository)
        refused = [x for x in env.log_text().splitlines()
                   if "step=receipt outcome=refused" in x]
        assert spy.receipt_writes == 1
        assert len(refused) == 1
        assert f"repository={r.repository}" in refused[0] and "AccessDenied" in refused[0]
        assert "s3:PutObject" in refused[0]  # what to do
        assert receipt(env, r) is None
        assert "refused: RGW refused PutObject" in out
        assert rc == 1  # changes are pending (no sync daemon here)
    finally:
        env.s3.delete_bucket_policy(Bucket=r.label)


def test_the_receipt_key_is_configurable_and_the_receipt_can_be_switched_off(
        env: Env, stack: Stack) -> None:
    r = env.provision()
    custom = stack.config(receipts={"key": "feedback/publisher.json"})
    with running(custom, r.label) as daemon:
        env.put(r, "cvmfs/../x", b"hostile")
        wait_until("the receipt at the configured key", lambda: env.s3.list_objects_v2(
            Bucket=r.label, Prefix="feedback/").get("KeyCount"), 30)
        assert daemon.receipts is not None
    doc = json.loads(env.s3.get_object(Bucket=r.label, Key="feedback/publisher.json")[
        "Body"].read())
    assert [x["key"] for x in doc["rejected"]] == ["cvmfs/../x"]
    env.s3.delete_object(Bucket=r.label, Key="feedback/publisher.json")
    off = stack.config(receipts={"enabled": False})
    with running(off, r.label) as daemon:
        assert daemon.receipts is None
        env.put(r, "cvmfs/y.txt", b"y\n")
        env.wait_staged(r, {"y.txt": put_state(b"y\n")})
        time.sleep(2 * off.receipts.interval)  # time enough for a write that must not come
    assert env.s3.list_objects_v2(Bucket=r.label, Prefix="feedback/").get("KeyCount") == 0
    assert receipt(env, r) is None


def test_writes_are_coalesced_and_a_refusal_is_not_retried_in_a_loop(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """The writer driven tick by tick (a fake clock: no timing asserted), real RGW."""
    r = env.provision()
    Staging(env.cfg.cvmfs.staging_dir, r.repository).ensure()
    status = StatusDocument(Path(env.cfg.status.dir) / "w.json", "cvmfs-repo-consumers", 0)
    status.repo(r.repository)  # served: the event source made its entry
    spy = CountingRGW(env.cfg.s3, env.cfg.rgw)
    writer = ReceiptWriter(env.cfg, status, spy, lambda: [r.repository])
    interval, t0 = env.cfg.receipts.interval, 1_000_000.0
    assert writer.tick(t0) == []  # nothing happened yet: nothing to tell
    for i in range(3):
        writer.rejected(r.repository, f'"cvmfs/bad/../{i}"', f"reason {i}")
    assert writer.tick(t0 + 1) == [r.repository]
    assert [x["key"] for x in receipt(env, r)["rejected"]] == [
        "cvmfs/bad/../2", "cvmfs/bad/../1", "cvmfs/bad/../0"]
    writer.rejected(r.repository, '"cvmfs/bad/../3"', "reason 3")
    assert writer.tick(t0 + 2) == []  # within the interval: coalesced
    assert writer.tick(t0 + 1 + interval) == [r.repository]
    assert receipt(env, r)["rejected"][0]["key"] == "cvmfs/bad/../3"
    assert writer.tick(t0 + 1 + 3 * interval) == []  # nothing changed, nothing pending
    assert spy.receipt_writes == 2

    env.s3.put_bucket_policy(Bucket=r.label, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": {"AWS": ["*"]}, "Action": "s3:PutObject",
                       "Resource": [f"arn:aws:s3:::{r.label}/{RECEIPT}"]}]}))
    try:
        t1 = t0 + 100
        writer.rejected(r.repository, '"cvmfs/bad/../4"', "reason 4")
        with caplog.at_level(logging.INFO, logger="cvmfs_publisher.pipeline.receipt_upload"):
            assert writer.tick(t1) == []
            for k in range(1, 20):  # new rejections, many rounds: no new attempt
                writer.rejected(r.repository, f'"cvmfs/bad/../x{k}"', "again")
                assert writer.tick(t1 + k * interval) == []
            assert spy.receipt_writes == 3
            assert writer.tick(t1 + DENIED_RETRY + 1) == []  # one quiet retry, still refused
            assert spy.receipt_writes == 4
            refused = [m for m in caplog.messages if "outcome=refused" in m]
            assert len(refused) == 1 and "AccessDenied" in refused[0]
            assert status.snapshot()["repositories"][r.repository]["receipt"].startswith(
                "refused: RGW refused PutObject")
            env.s3.delete_bucket_policy(Bucket=r.label)
            assert writer.tick(t1 + 2 * DENIED_RETRY + 2) == [r.repository]
            assert any("outcome=written-again" in m for m in caplog.messages)
        assert receipt(env, r)["rejected"][0]["key"] == "cvmfs/bad/../x19"
        assert status.snapshot()["repositories"][r.repository]["receipt"] == "ok"
    finally:
        with contextlib.suppress(Exception):
            env.s3.delete_bucket_policy(Bucket=r.label)


def test_status_key_without_boto3_shows_the_state_and_says_why_s3_is_not_compared(
        tmp_path: Path) -> None:
    """The sync-publisher image has no boto3 (each image holds what its daemon imports):
    ``status REPO --key`` still answers there from staging, and says why it compares
    nothing with S3. boto3 is blocked in the child's import system to be that image."""
    pw = tmp_path / "pw"
    pw.write_text("x")
    staging = tmp_path / "staging"
    cfg = tmp_path / "publisher.yaml"
    cfg.write_text(f"cvmfs:\n  staging_dir: {staging}\n"
                   f"s3:\n  endpoint_url: http://127.0.0.1:2\n  access_key_file: {pw}\n"
                   f"  secret_key_file: {pw}\n")
    repo = "alice-personalrepo.infn.it"
    st = Staging(str(staging), repo)
    st.ensure()
    st.stage(Entry("gone.txt", "delete", key="cvmfs/gone.txt"))
    code = ("import sys; sys.modules['boto3'] = sys.modules['botocore'] = None; "
            "from cvmfs_publisher.operations.cli import main; "
            f"sys.exit(main(['--config', {str(cfg)!r}, 'status', {repo!r}, "
            "'--key', 'cvmfs/gone.txt', '--json']))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "scripts")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=False, cwd="/")
    assert res.returncode == 1, res.stdout + res.stderr  # not in sync: S3 not compared
    view = json.loads(res.stdout)
    assert view["state"] == "staged", view
    assert "no S3 client in this image (boto3 is not installed)" in view["s3_error"]
    assert "cvmfs-repo-consumers container" in view["s3_error"]


def test_only_repositories_whose_staging_changed_are_looked_at(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify says whose staging changed: idle repositories cost no look (each look is a
    few stats; with 1,000 repositories every second, the consumers' largest idle cost)."""
    from cvmfs_publisher.staging import receipts
    from cvmfs_publisher.staging.watch import PendingWatch

    quiet, busy = env.provision(), env.provision()
    stagings = {r.repository: Staging(env.cfg.cvmfs.staging_dir, r.repository).ensure()
                for r in (quiet, busy)}
    status = StatusDocument(Path(env.cfg.status.dir) / "w.json", "cvmfs-repo-consumers", 0)
    spy = CountingRGW(env.cfg.s3, env.cfg.rgw)
    writer = ReceiptWriter(env.cfg, status, spy, lambda: [quiet.repository, busy.repository])
    looked: list[str] = []
    real = receipts.version
    monkeypatch.setattr(receipts, "version",
                        lambda root, repo: looked.append(repo) or real(root, repo))
    watch = PendingWatch(env.cfg.cvmfs.staging_dir)
    try:
        t0 = 1_000_000.0
        assert writer.tick(t0, changed=set(), watch=watch) == []
        assert set(looked) == set(stagings), "a repository never looked at was skipped"
        looked.clear()
        assert writer.tick(t0 + 1, changed=set(), watch=watch) == [] and looked == []
        st = stagings[busy.repository]
        tmp, fh = st.new_download()
        with fh:
            fh.write(b"x\n")
        st.stage(Entry(path="x.txt", op="put", object=st.commit_object(tmp), size=2,
                       key="cvmfs/x.txt"))
        changed = watch.wait(10)
        assert changed == {busy.repository}
        assert writer.tick(t0 + 2, changed=changed, watch=watch) == [busy.repository]
        assert set(looked) == {busy.repository}  # (_write reads the version again)
        assert receipt(env, busy)["pending"]["count"] == 1
        # still pending: looked at again once the interval has passed, without an event
        looked.clear()
        interval = env.cfg.receipts.interval
        assert writer.tick(t0 + 3 + interval, changed=set(), watch=watch) == [busy.repository]
        assert set(looked) == {busy.repository}
        # without inotify's word (None), every repository is looked at
        looked.clear()
        assert writer.tick(t0 + 4 + 2 * interval, changed=None, watch=watch) == [busy.repository]
        assert set(looked) == set(stagings)
    finally:
        watch.close()
    assert spy.receipt_writes == 3 and receipt(env, quiet) is None
