"""Download processes (pipeline/download_processes.py) on the real RGW.

What crosses the process boundary (the staged result, each error class with
its repository), a worker that dies in the middle of a fetch, and the
workers' end with the daemon (close, and SIGKILL of the daemon: in
test_resilience.py). The daemon's own tests run with download processes
on (the production default), so every staging path of test_daemon.py goes
through them too.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_publisher.core.errors import Permanent, Transient
from cvmfs_publisher.pipeline import fetch, modes
from cvmfs_publisher.pipeline.download_processes import DownloadProcesses
from cvmfs_publisher.pipeline.object_keys import map_key
from cvmfs_publisher.staging.area import Entry, Staging
from tests.consumers.support import Env, wait_until

REPOSITORY_SUFFIX = ".infn.it"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def bucket(env: Env) -> Iterator[str]:
    name = f"dl-{uuid.uuid4().hex[:10]}"
    env.s3.create_bucket(Bucket=name)
    yield name
    env.empty_bucket(name)
    env.s3.delete_bucket(Bucket=name)


@pytest.fixture
def downloads(env: Env) -> Iterator[DownloadProcesses]:
    d = DownloadProcesses(env.cfg.s3, env.cfg.rgw, str(env.staging_dir))
    yield d
    d.close()


def target(key: str) -> Any:
    t = map_key(key)
    assert t is not None
    return t


def workers(d: DownloadProcesses) -> list[Any]:
    return [w.process for w in d._workers]  # the processes, for signals


def test_a_worker_stages_what_a_thread_stages(env: Env, bucket: str,
                                              downloads: DownloadProcesses) -> None:
    repository = bucket + REPOSITORY_SUFFIX
    st = Staging(env.staging_dir, repository).ensure()
    env.s3.put_object(Bucket=bucket, Key="cvmfs/bin/tool", Body=b"#!/bin/sh\n",
                      Metadata={"mode": "100755"})
    env.s3.put_object(Bucket=bucket, Key="cvmfs/current", Body=b"bin/tool",
                      Metadata={"mode": str(stat.S_IFLNK | 0o777)})
    for key in ("cvmfs/bin/tool", "cvmfs/current", "cvmfs/gone"):
        here: list[Entry] = []
        there: list[Entry] = []
        mine = fetch.fetch_key(env.rgw, st, bucket, target(key), repository, here)
        theirs = downloads.fetch(st, bucket, target(key), repository, there)
        assert [e.op for e in there] == [e.op for e in here] == [mine.entry.op]
        assert (theirs.source, theirs.entry.mode, theirs.entry.size, theirs.entry.etag,
                theirs.entry.target) == (mine.source, mine.entry.mode, mine.entry.size,
                                         mine.entry.etag, mine.entry.target)
        if mine.entry.object:  # written by the worker, unsynced, in objects/
            assert (st.objects / theirs.entry.object).read_bytes() == \
                (st.objects / mine.entry.object).read_bytes() == b"#!/bin/sh\n"
    assert [e.op for e in there] == ["delete"]
    assert len(workers(downloads)) == 1  # one per calling thread, reused
    assert list(st.tmp.iterdir()) == []  # nothing half-written left behind


def test_errors_come_back_with_their_class_and_repository(
        env: Env, bucket: str, downloads: DownloadProcesses) -> None:
    repository = bucket + REPOSITORY_SUFFIX
    st = Staging(env.staging_dir, repository).ensure()
    env.s3.put_object(Bucket=bucket, Key="cvmfs/evil", Body=b"a\x00b",
                      Metadata={"mode": str(stat.S_IFLNK | 0o777)})
    defer: list[Entry] = []
    with pytest.raises(modes.BadSymlinkTarget, match="NUL in symlink target") as bad:
        downloads.fetch(st, bucket, target("cvmfs/evil"), repository, defer)
    assert bad.value.repository == repository
    with pytest.raises(Permanent, match="NoSuchBucket"):
        downloads.fetch(st, "no-such-bucket-" + bucket, target("cvmfs/a"), repository, defer)
    assert defer == []
    assert len(workers(downloads)) == 1  # an error is an answer, not a dead worker


def test_a_worker_dying_mid_fetch_is_transient_and_replaced(
        env: Env, bucket: str, downloads: DownloadProcesses,
        caplog: pytest.LogCaptureFixture) -> None:
    repository = bucket + REPOSITORY_SUFFIX
    st = Staging(env.staging_dir, repository).ensure()
    env.s3.put_object(Bucket=bucket, Key="cvmfs/a", Body=b"a")
    downloads.fetch(st, bucket, target("cvmfs/a"), repository, [])
    (worker,) = workers(downloads)
    pid = worker.pid
    os.kill(pid, signal.SIGSTOP)  # it takes the next request and never answers...
    killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))  # ...then dies
    killer.start()
    with pytest.raises(Transient, match=r"download worker .* died") as died:
        downloads.fetch(st, bucket, target("cvmfs/a"), repository, [])
    killer.join()
    assert died.value.repository == repository
    assert workers(downloads) == []  # forgotten at once
    defer: list[Entry] = []
    downloads.fetch(st, bucket, target("cvmfs/a"), repository, defer)  # by a new worker
    assert [e.op for e in defer] == ["put"]
    assert [p.pid for p in workers(downloads)] != [pid]
    assert any("download worker" in r.getMessage() and "ended" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)


def test_close_ends_every_worker(env: Env, bucket: str) -> None:
    d = DownloadProcesses(env.cfg.s3, env.cfg.rgw, str(env.staging_dir))
    repository = bucket + REPOSITORY_SUFFIX
    st = Staging(env.staging_dir, repository).ensure()
    threads = [threading.Thread(target=d.fetch, args=(st, bucket, target(f"cvmfs/{i}"),
                                                        repository, []))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    pids = [p.pid for p in workers(d)]
    assert len(pids) == 3
    d.close()
    for pid in pids:
        wait_until(f"worker {pid} gone", lambda pid=pid: not _alive(pid), 10)
    with pytest.raises(Transient, match="stopping"):
        d.fetch(st, bucket, target("cvmfs/x"), repository, [])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_fork_server_loads_the_s3_models_once_for_every_worker() -> None:
    """What download_preload leaves in a process: the shared loader holds S3's models
    (a worker's client is made from them, not parsed again) and the heap is frozen
    (the collector does not copy the inherited pages into each worker)."""
    probe = (
        "import gc\n"
        "from cvmfs_publisher.adapters.rgw import shared_loader\n"
        "assert gc.get_freeze_count() == 0\n"
        "import cvmfs_publisher.pipeline.download_preload\n"
        "cached = [k for k in shared_loader()._cache if 's3' in repr(k)]\n"
        "print(gc.get_freeze_count() > 0, bool(cached))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SCRIPTS)}, timeout=60,
                         check=True)
    assert out.stdout.split() == ["True", "True"]
