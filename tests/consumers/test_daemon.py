"""cvmfs-repo-consumers end to end: real RGW events -> real RabbitMQ -> staging.

What S3 holds is the truth: every test uploads with real clients (boto3, s3fs,
rclone), lets RGW push its real events, and compares the staged entries with
what it uploaded.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import random
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from cvmfs_publisher.daemons.repo_consumers import NAME
from cvmfs_publisher.staging.area import Staging
from tests.consumers.support import (
    Env,
    Pattern,
    Process,
    State,
    dead_letters,
    drain,
    publish,
    put_state,
    queue_counts,
    running,
    sha,
    unacked,
    wait_until,
)

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(120)


def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_files_overwrites_names_deletes_copy_multipart_tarballs(env: Env) -> None:
    r = env.provision()
    bucket = r.label
    tar = make_tar({"pkg/bin/x": b"x"})
    targz = gzip.compress(make_tar({"pkg/y": b"y"}))
    tarbz2, tarxz = bz2.compress(tar), lzma.compress(tar)
    part1, part2 = os.urandom(5 << 20), b"the end"
    with running(env.cfg, r.label):
        env.put(r, "cvmfs/a.txt", b"v1")
        env.put(r, "cvmfs/a.txt", b"v2")
        env.put(r, "cvmfs/a.txt", b"version 3")
        env.put(r, "cvmfs/tools/bin/run.sh", b"#!/bin/sh\necho hi\n")  # no metadata: content
        env.put(r, "cvmfs/bin/tool", ELF)
        env.put(r, "cvmfs/deep/a/b/c/d/e/f.txt", b"deep")
        env.put(r, "cvmfs/dir with spaces/naïve ünïcödé 日本.txt", b"utf8")
        env.put(r, "cvmfs/odd+name%20=&;,.txt", b"odd")
        env.put(r, "cvmfs/old.txt", b"old")
        env.s3.delete_object(Bucket=bucket, Key="cvmfs/old.txt")
        env.s3.copy_object(Bucket=bucket, Key="cvmfs/copy.txt",
                           CopySource={"Bucket": bucket, "Key": "cvmfs/a.txt"})
        up = env.s3.create_multipart_upload(Bucket=bucket, Key="cvmfs/big.bin")
        parts = []
        for n, data in ((1, part1), (2, part2)):
            etag = env.s3.upload_part(Bucket=bucket, Key="cvmfs/big.bin", PartNumber=n,
                                      UploadId=up["UploadId"], Body=data)["ETag"]
            parts.append({"PartNumber": n, "ETag": etag})
        env.s3.complete_multipart_upload(Bucket=bucket, Key="cvmfs/big.bin",
                                         UploadId=up["UploadId"],
                                         MultipartUpload={"Parts": parts})
        env.put(r, "cvmfs/pkg.tar", tar)
        env.put(r, "cvmfs/sub/pkg2.tar.gz", targz)
        env.put(r, "cvmfs/pkg3.tgz", targz)
        env.put(r, "cvmfs/pkg4.tar.bz2", tarbz2)
        env.put(r, "cvmfs/pkg5.tar.xz", tarxz)
        env.put(r, "cvmfs/gone.tar", tar)
        env.s3.delete_object(Bucket=bucket, Key="cvmfs/gone.tar")
        env.put(r, "outside/ignored.txt", b"no event: outside the filter prefix")
        env.put(r, "cvmfs/emptydir/", b"")  # a directory marker: an event, ignored
        env.put(r, "cvmfs/s3cmd.sh", b"plain text", Metadata={
            "s3cmd-attrs": "atime:1/ctime:1/gid:0/gname:root/md5:x/mode:33261/mtime:1/uid:0"})
        env.put(r, "cvmfs/rclone-mode", b"plain text", Metadata={"mode": "100755"})
        env.put(r, "cvmfs/setuid", b"plain text", Metadata={"mode": str(0o104777)})
        env.put(r, "cvmfs/world-writable", b"plain text", Metadata={"mode": str(0o100666)})
        expected = {
            "a.txt": put_state(b"version 3"),
            "copy.txt": put_state(b"version 3"),
            "tools/bin/run.sh": put_state(b"#!/bin/sh\necho hi\n", 0o755),
            "bin/tool": put_state(ELF, 0o755),
            "deep/a/b/c/d/e/f.txt": put_state(b"deep"),
            "dir with spaces/naïve ünïcödé 日本.txt": put_state(b"utf8"),
            "odd+name%20=&;,.txt": put_state(b"odd"),
            "old.txt": State("delete"),
            "big.bin": put_state(part1 + part2),
            "software/pkg": State("ingest", digest=sha(tar), compression="none"),
            "software/sub/pkg2": State("ingest", digest=sha(targz), compression="gzip"),
            "software/pkg3": State("ingest", digest=sha(targz), compression="gzip"),
            "software/pkg4": State("ingest", digest=sha(tarbz2), compression="bzip2"),
            "software/pkg5": State("ingest", digest=sha(tarxz), compression="xz"),
            "software/gone": State("ingest-delete"),
            "s3cmd.sh": put_state(b"plain text", 0o755),
            "rclone-mode": put_state(b"plain text", 0o755),
            "setuid": put_state(b"plain text", 0o755),
            "world-writable": put_state(b"plain text", 0o644),
        }
        env.wait_staged(r, expected, exact=True)
        wait_until("queue drained", lambda: queue_counts(env.cfg, r.label)[0] == 0
                   and unacked(env, r.label) == 0, 20)

        def status_ok() -> bool:
            repo = env.status().get("repositories", {}).get(r.repository, {})
            return repo.get("pending") == len(expected) and repo.get("last_event", 0) > 0
        wait_until("status document", status_ok, 10)
    assert dead_letters(env.cfg) == []
    status = env.status()
    assert status["daemon"] == NAME and status["healthy"] is False  # stopped cleanly
    assert status["repositories"][r.repository]["dead_lettered"] == 0
    text = env.log_text()
    assert (f'repository={r.repository} key="cvmfs/dir with spaces/naïve ünïcödé 日本.txt" '
            "outcome=staged op=put") in text
    assert f'repository={r.repository} key="cvmfs/emptydir/" outcome=ignored' in text
    # Staging holds entries and objects, nothing shaped like the repository tree.
    root = env.staging_dir / r.repository
    # (.active: the consumer term; manifest.json and its writers' .manifest.lock: rebuilt
    # by the anti-entropy's reconcile when it ran before the stop.)
    names = {p.name for p in root.iterdir()}
    assert names - {"manifest.json", ".manifest.lock"} == {
        ".active", ".lock", "objects", "pending", "tmp"}
    assert list((root / "tmp").iterdir()) == []
    for p in root.rglob("*"):
        assert not p.is_symlink()


def _s3fs_mount(env: Env, bucket: str, mnt: Path, ceph: Any) -> None:
    passwd = env.stack.workdir / "s3fs.passwd"
    passwd.write_text(f"{ceph.access_key}:{ceph.secret_key}\n")
    passwd.chmod(0o600)
    mnt.mkdir()
    subprocess.run(["s3fs", bucket, str(mnt), "-o", f"passwd_file={passwd}", "-o",
                    f"url={ceph.endpoint}", "-o", "use_path_request_style"],
                   check=True, timeout=30, capture_output=True)
    wait_until("s3fs mounted", lambda: os.path.ismount(mnt), 15)


def _client_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "plain.txt").write_bytes(b"plain\n")
    (root / "plain.txt").chmod(0o640)
    (root / "link").symlink_to("bin/tool")


@pytest.mark.skipif(not shutil.which("s3fs") or not shutil.which("rclone")
                    or not os.path.exists("/dev/fuse"), reason="s3fs, rclone or /dev/fuse missing")
def test_modes_and_symlinks_from_s3fs_and_rclone(env: Env, ceph: Any, tmp_path: Path) -> None:
    r = env.provision()
    src = tmp_path / "tree"
    _client_tree(src)
    mnt = tmp_path / "mnt"
    with running(env.cfg, r.label):
        _s3fs_mount(env, r.label, mnt, ceph)
        try:
            (mnt / "cvmfs").mkdir()
            subprocess.run(["cp", "-a", f"{src}/.", str(mnt / "cvmfs" / "s3fs")], check=True,
                           timeout=60)
        finally:
            subprocess.run(["umount", str(mnt)], check=False, timeout=30)
        conf = tmp_path / "rclone.conf"
        conf.write_text(f"[rgw]\ntype = s3\nprovider = Ceph\naccess_key_id = {ceph.access_key}\n"
                        f"secret_access_key = {ceph.secret_key}\nendpoint = {ceph.endpoint}\n")
        rclone_env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        subprocess.run(["rclone", "--config", str(conf), "copy", "-M", "--links", str(src),
                        f"rgw:{r.label}/cvmfs/rclone"], check=True, timeout=60, env=rclone_env,
                       capture_output=True)
        env.wait_staged(r, {
            "s3fs/bin/tool": put_state(b"#!/bin/sh\necho tool\n", 0o755),
            "s3fs/plain.txt": put_state(b"plain\n", 0o644),
            "s3fs/link": State("symlink", 0o777, target="bin/tool"),
            "rclone/bin/tool": put_state(b"#!/bin/sh\necho tool\n", 0o755),
            "rclone/plain.txt": put_state(b"plain\n", 0o644),
            "rclone/link": State("symlink", 0o777, target="bin/tool"),
        }, exact=True)
    meta = env.s3.head_object(Bucket=r.label, Key="cvmfs/rclone/plain.txt")["Metadata"]
    assert meta.get("mode") == "100640"  # rclone's octal st_mode: what we decoded
    meta = env.s3.head_object(Bucket=r.label, Key="cvmfs/s3fs/plain.txt")["Metadata"]
    assert meta.get("mode") == str(0o100640)  # s3fs's decimal st_mode
    assert dead_letters(env.cfg) == []


def test_duplicates_and_reordering_give_the_same_staging(env: Env, tmp_path: Path) -> None:
    """Real events captured, replayed twice each in two shuffled orders: same final state."""
    r = env.provision()
    b = r.label
    tgz = gzip.compress(make_tar({"b": b"b"}), mtime=0)
    ops: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("put", "cvmfs/k1", b"k1 v1", {}), ("put", "cvmfs/k1", b"k1 v2", {}),
        ("put", "cvmfs/k2", b"k2", {}), ("delete", "cvmfs/k2", b"", {}),
        ("put", "cvmfs/k3", b"gone", {}), ("delete", "cvmfs/k3", b"", {}),
        ("put", "cvmfs/k3", b"k3 back", {}),
        ("put", "cvmfs/link", b"k1", {"mode": "41471"}),
        ("put", "cvmfs/link", b"now a file", {}),
        ("put", "cvmfs/link", b"k3", {"mode": "41471"}),
        ("put", "cvmfs/exe", b"#!/bin/sh\n", {}), ("put", "cvmfs/exe", b"data", {}),
        ("put", "cvmfs/t.tar", make_tar({"a": b"a"}), {}), ("delete", "cvmfs/t.tar", b"", {}),
        ("put", "cvmfs/u.tgz", tgz, {}),
        ("put", "cvmfs/dir/f", b"f", {}),
    ]
    for op, key, data, meta in ops:
        if op == "put":
            env.put(r, key, data, Metadata=meta)
        else:
            env.s3.delete_object(Bucket=b, Key=key)
    bodies = drain(env.cfg, b, len(ops))
    assert len(bodies) == len(ops), "one real event per S3 operation"
    # Several records in one message, as a producer may batch them.
    recs = [json.loads(x)["Records"][0] for x in bodies[:3]]
    bodies.append(json.dumps({"Records": recs}).encode())
    truth = {
        "k1": put_state(b"k1 v2"), "k2": State("delete"), "k3": put_state(b"k3 back"),
        "link": State("symlink", 0o777, target="k3"), "exe": put_state(b"data"),
        "software/t": State("ingest-delete"),
        "software/u": State("ingest", digest=sha(tgz), compression="gzip"),
        "dir/f": put_state(b"f"),
    }
    finals = []
    for seed in (1, 2):
        staging_dir = tmp_path / f"staging-{seed}"
        cfg = env.stack.config(cvmfs={"staging_dir": str(staging_dir)})
        replay = bodies * 2
        random.Random(seed).shuffle(replay)
        publish(cfg, b, replay)
        with running(cfg, b):
            finals.append(env.wait_staged(r, truth, staging_dir=staging_dir, exact=True))
            wait_until("replay consumed", lambda c=cfg: queue_counts(c, b)[0] == 0
                       and unacked(env, b) == 0, 20)
    assert finals[0] == finals[1] == truth
    assert dead_letters(env.cfg) == []


def test_new_repository_is_consumed_within_5s_and_a_deleted_one_dropped(env: Env) -> None:
    r1 = env.provision()
    cfg = env.stack.config(consumers={"refresh_interval": 600.0})  # only announcements help
    with running(cfg, r1.label) as daemon:
        r2 = env.provision()  # announces "created" on the control exchange
        t0 = time.monotonic()
        wait_until("consumer on the new queue", lambda: queue_counts(cfg, r2.label)[1] == 1, 5)
        env.put(r2, "cvmfs/new.txt", b"new")
        env.wait_staged(r2, {"new.txt": put_state(b"new")}, timeout=5)
        took = time.monotonic() - t0
        assert took < 5, f"new repository staged after {took:.1f}s"
        env.deprovision(r2)  # queue deleted, "deleted" announced
        wait_until("repository dropped", lambda: r2.repository not in env.status().get(
            "repositories", {}), 10)
        assert r2.label not in daemon.source.queues()
        env.put(r1, "cvmfs/still.txt", b"still")  # the others are not disturbed
        env.wait_staged(r1, {"still.txt": put_state(b"still")}, timeout=10)
    text = env.log_text()
    assert f"repository={r2.repository} queue={r2.label} outcome=announced-created" in text
    assert f"repository={r2.repository} queue={r2.label} outcome=dropped" in text


def test_periodic_listing_finds_a_queue_without_announcement(env: Env) -> None:
    """The broker is the registry: a queue bound to notification is found by listing."""
    r1 = env.provision()
    cfg = env.stack.config(consumers={"refresh_interval": 1.0})
    with running(cfg, r1.label):
        quiet = env.stack.config(amqp={"control_exchange": env.cfg.amqp.control_exchange
                                       + "-elsewhere"})
        r2 = env.provision(cfg=quiet)  # its announcement reaches nobody
        wait_until("consumer found by listing", lambda: queue_counts(cfg, r2.label)[1] == 1, 8)
        env.put(r2, "cvmfs/x", b"x")
        env.wait_staged(r2, {"x": put_state(b"x")}, timeout=10)


def test_a_busy_repository_does_not_delay_another(env: Env) -> None:
    """Round-robin across repositories, and one worker always left for the others."""
    busy, quiet = env.provision(), env.provision()
    backlog = {f"cvmfs/b/{i:03d}": f"busy {i}".encode() for i in range(300)}
    env.put_many(busy, backlog)  # waits in busy's queue until the daemon starts
    with running(env.cfg, busy.label, quiet.label):
        t0 = time.monotonic()
        env.put(quiet, "cvmfs/q", b"quiet")
        env.wait_staged(quiet, {"q": put_state(b"quiet")}, timeout=5)
        took = time.monotonic() - t0
        done = len(env.staged(busy))
        env.wait_staged(busy, {k[6:]: put_state(v) for k, v in backlog.items()}, timeout=60)
    print(f"quiet repository staged in {took:.2f}s with {300 - done} busy events waiting")
    assert done < 300, "the backlog was gone before the quiet event: nothing was measured"
    assert took < 2.0


def test_one_gib_object_is_streamed_in_constant_memory(env: Env) -> None:
    r = env.provision()
    proc = Process(env.stack, "big", {})
    proc.start()
    try:
        wait_until("consumer", lambda: queue_counts(env.cfg, r.label)[1] == 1, 20)
        env.put(r, "cvmfs/warm-up", b"warm")  # imports and connections, before the baseline
        env.wait_staged(r, {"warm-up": put_state(b"warm")})
        time.sleep(0.5)
        before = proc.memory()
        body = Pattern(1 << 30)
        env.s3.upload_fileobj(body, r.label, "cvmfs/big/one-gib.bin", Config=TransferConfig(
            multipart_chunksize=64 << 20, max_concurrency=4))
        digest = body.hash.hexdigest()
        env.wait_staged(r, {"big/one-gib.bin": State("put", 0o644, digest)}, timeout=120)
        after = proc.memory()
        growth = after["VmHWM"] - before["VmHWM"]
        print(f"1 GiB object: peak RSS {before['VmHWM'] >> 20} -> {after['VmHWM'] >> 20} MiB "
              f"(growth {growth / (1 << 20):.1f} MiB)")
        assert growth < 64 << 20, f"peak RSS grew by {growth >> 20} MiB"
        env.s3.delete_object(Bucket=r.label, Key="cvmfs/big/one-gib.bin")  # memstore: RAM
        env.wait_staged(r, {"big/one-gib.bin": State("delete")})
        objects = env.staging_dir / r.repository / "objects"
        assert all(p.stat().st_size < 1 << 20 for p in objects.iterdir()), "1 GiB object kept"
        assert proc.terminate() == 0
    finally:
        proc.stop()


def test_sigterm_exits_0_and_keeps_nothing_half_done(env: Env) -> None:
    r = env.provision()
    proc = Process(env.stack, "term", {}).start()
    try:
        wait_until("consumer", lambda: queue_counts(env.cfg, r.label)[1] == 1, 20)
        items = {f"cvmfs/t/{i}": f"term {i}".encode() for i in range(200)}
        env.put_many(r, items)
        wait_until("some staged", lambda: len(env.staged(r)) >= 20, 30)
        assert proc.terminate(timeout=15) == 0
        assert "stopped" in env.log_text()
        proc = Process(env.stack, "term2", {}).start()
        env.wait_staged(r, {k[6:]: put_state(v) for k, v in items.items()}, timeout=60)
        # the first process may have staged everything: make sure this one is up
        # (its signal handlers installed) before asking it to stop
        wait_until("second consumer", lambda: queue_counts(env.cfg, r.label)[1] == 1, 20)
        assert proc.terminate() == 0
    finally:
        proc.stop()
    for e in env.staged(r).values():
        assert e.digest != "MISSING-OBJECT"
    root = env.staging_dir / r.repository
    assert list((root / "tmp").iterdir()) == []
    entries = Staging(env.staging_dir, r.repository).pending_entries()
    referenced = {e.object for e in entries if e.object}
    assert {p.name for p in (root / "objects").iterdir()} == referenced, "orphan objects"
    for p in (root / "objects").iterdir():
        assert stat.S_ISREG(p.lstat().st_mode)
