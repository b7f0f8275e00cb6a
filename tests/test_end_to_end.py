"""End to end through the three daemons, each a real process on the local stack.

Provision by message on the publisher queue, upload to RGW, and see the
files in a published revision of the (test double's) repository.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_publisher.adapters.rgw import RGW
from tests.conftest import DOMAIN, Stack, unique_label
from tests.cvmfs_server_double import in_transaction, published_tree, revisions
from tests.provision.helpers import Amqp, cleanup_amqp, consumers, wait_until

DAEMONS = {
    "publisher-consumer": "cvmfs_publisher.daemons.publisher_consumer",
    "cvmfs-repo-consumers": "cvmfs_publisher.daemons.repo_consumers",
    "cvmfs-repo-sync": "cvmfs_publisher.daemons.repo_sync",
}


@pytest.fixture
def daemons(stack: Stack) -> Iterator[dict[str, subprocess.Popen]]:
    cfg_file = stack.write()
    env = stack.subprocess_env()
    procs = {name: subprocess.Popen([sys.executable, "-m", module, "--config", str(cfg_file)],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=open(stack.workdir / f"{name}.err", "wb"))
             for name, module in DAEMONS.items()}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _receipt(rgw: RGW, bucket: str) -> dict | None:
    try:
        return json.loads(rgw.s3.get_object(Bucket=bucket, Key="cvmfs-publisher/status.json")[
            "Body"].read())
    except rgw.s3.exceptions.NoSuchKey:
        return None


def _tarball(compress: Callable[[bytes], bytes] = gzip.compress) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        body = b"#!/bin/sh\necho tool\n"
        info = tarfile.TarInfo("bin/tool")
        info.size, info.mode = len(body), 0o755
        tar.addfile(info, io.BytesIO(body))
    return compress(buf.getvalue())


def test_upload_to_published_revision(stack: Stack, broker, openbao, daemons) -> None:
    cfg = stack.config()
    label = unique_label("e2e-")
    repo = f"{label}.{DOMAIN}"
    openbao.put_keys(f"subj/cvmfs_keys/{repo}", {
        "publicKey": "pub", "certificateKey": "crt", "gatewayKey": "plain_text k GWSECRETE2E"})
    rgw = RGW(cfg.s3, cfg.rgw)
    rgw.s3.create_bucket(Bucket=label)
    amqp = Amqp(cfg)
    root = Path(cfg.cvmfs.repositories_dir).parents[2]
    try:
        wait_until("publisher-consumer up", lambda: consumers(broker, cfg.amqp.publisher_queue))
        amqp.send(f"alice,subj,{repo},P")
        amqp.wait_announcement("created", repo)
        wait_until("repository queue consumed", lambda: consumers(broker, label), 15)
        rgw.s3.put_object(Bucket=label, Key="cvmfs/bin/hello.sh", Body=b"#!/bin/sh\necho hi\n")
        rgw.s3.put_object(Bucket=label, Key="cvmfs/doc/read me.txt", Body=b"text\n")
        rgw.s3.put_object(Bucket=label, Key="cvmfs/old.txt", Body=b"old\n")
        rgw.s3.put_object(Bucket=label, Key="cvmfs/pkg/tool-1.0.tar.gz", Body=_tarball())
        rgw.s3.put_object(Bucket=label, Key="cvmfs/pkg/tool-2.0.tar.xz",
                          Body=_tarball(lzma.compress))
        rgw.s3.put_object(Bucket=label, Key="cvmfs/pkg/tool-3.0.tar.bz2",
                          Body=_tarball(bz2.compress))
        tree = Path(published_tree(root, repo))
        wait_until("first publication", lambda: (tree / "old.txt").exists() and all(
            (tree / f"software/pkg/tool-{v}/bin/tool").exists() for v in ("1.0", "2.0", "3.0")),
            60)
        rgw.s3.delete_object(Bucket=label, Key="cvmfs/old.txt")
        wait_until("deletion published", lambda: not (tree / "old.txt").exists(), 60)
        assert (tree / "bin/hello.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
        assert (tree / "bin/hello.sh").stat().st_mode & 0o777 == 0o755
        assert (tree / "doc/read me.txt").stat().st_mode & 0o777 == 0o644
        revs = revisions(root, repo)
        published = {p for r in revs for p in r.get("added", []) + r.get("changed", [])}
        assert {"bin/hello.sh", "doc/read me.txt"} <= published
        # publish makes the tree visible, then removes its lock (as the real tool does):
        # the deletion can be seen an instant before the transaction is closed
        wait_until("transaction closed", lambda: not in_transaction(root, repo), 30)
        # The uploader's receipt: written by the consumers from what the sync daemon
        # recorded once its publish had returned (so no transaction is open any more).
        doc = wait_until("the receipt lists the deletion", lambda: (d := _receipt(rgw, label))
                         and any(x["key"] == "cvmfs/old.txt" and x["change"] == "deleted"
                                 for x in d["recent"]) and d, 30)
        hello = next(x for x in doc["recent"] if x["key"] == "cvmfs/bin/hello.sh")
        assert hello["revision"] in {r["revision"] for r in revs
                                     if "bin/hello.sh" in r.get("added", [])}
        assert doc["published"]["revision"] == revs[-1]["revision"]
        staging = Path(cfg.cvmfs.staging_dir) / repo
        wait_until("staging drained", lambda: not any((staging / "pending").iterdir()), 30)
        status = json.loads((Path(cfg.status.dir) / "cvmfs-repo-sync.json").read_text())
        assert status["repositories"][repo]["last_result"] == "ok"
        # clean shutdown: SIGTERM, exit 0, for all three
        for p in daemons.values():
            p.send_signal(signal.SIGTERM)
        for name, p in daemons.items():
            assert p.wait(timeout=60) == 0, f"{name} exited {p.returncode}"
        logs = "".join(f.read_text() for f in Path(cfg.log.dir).glob("*.log"))
        assert "GWSECRETE2E" not in logs
        for secret in stack.secrets():
            assert secret not in logs
    finally:
        for p in daemons.values():  # nothing may write to the bucket while it is emptied
            if p.poll() is None:
                p.kill()
                p.wait()
        amqp.close()
        for obj in rgw.s3.list_objects_v2(Bucket=label).get("Contents", []):
            rgw.s3.delete_object(Bucket=label, Key=obj["Key"])
        rgw.delete_notification(label)
        rgw.delete_topic(label)
        rgw.s3.delete_bucket(Bucket=label)
        cleanup_amqp(cfg, broker, [label])
