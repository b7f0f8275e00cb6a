"""The suite tells a radosgw crash, or one hung after its crash, from a project failure.

radosgw 16.2.15 segfaults now and then while it pushes notifications
(shared/ceph/README.md item 11). A real SIGSEGV, handled by radosgw's own
fatal-signal handler, stands for it here: it must be seen by
``Ceph.rgw_crashes`` (what ``tests/conftest.py`` uses to report a test that
failed meanwhile as "radosgw crashed"), and radosgw must come back with the
same data.
"""

from __future__ import annotations

import os
import signal

from cvmfs_publisher.adapters.rgw import RGW
from devstack.ceph import Ceph
from devstack.common import wait_for
from tests.conftest import Stack, unique_label


def test_a_radosgw_crash_is_recognised_and_radosgw_restarted(ceph: Ceph, stack: Stack) -> None:
    cfg = stack.config()
    s3 = RGW(cfg.s3, cfg.rgw).s3
    bucket = unique_label("crash-")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="kept", Body=b"kept")
    before = len(ceph.rgw_crashes())
    os.kill(ceph.procs["rgw"].pid, signal.SIGSEGV)
    wait_for("radosgw to die", lambda: not ceph.rgw_alive(), 30)
    wait_for("the crash report", lambda: len(ceph.rgw_crashes()) > before, 10)
    crashes = ceph.rgw_crashes()
    assert len(crashes) == before + 1
    assert "Segmentation fault" in crashes[-1]
    ceph.start_rgw()
    ceph.wait_bucket_writes()
    assert s3.get_object(Bucket=bucket, Key="kept")["Body"].read() == b"kept"
    s3.delete_object(Bucket=bucket, Key="kept")
    s3.delete_bucket(Bucket=bucket)


def test_a_radosgw_hung_after_its_crash_report_counts_as_dead_and_is_replaced(
        ceph: Ceph, stack: Stack) -> None:
    """Seen in a clean-clone CI run: glibc aborted radosgw ("corrupted double-linked
    list", thread notif-worker0), its fatal-signal handler hung on the corrupted heap,
    and the process stayed, its port accepting connections that were never answered.
    Stood for here by a stopped radosgw (SIGSTOP) and the report line its handler
    writes first: the suite must see it dead and start another on the same port."""
    cfg = stack.config()
    s3 = RGW(cfg.s3, cfg.rgw).s3
    bucket = unique_label("hung-")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="kept", Body=b"kept")
    hung = ceph.procs["rgw"]
    before = len(ceph.rgw_crashes())
    os.kill(hung.pid, signal.SIGSTOP)
    with (ceph.workdir / "log" / "rgw.out").open("a") as out:
        out.write("corrupted double-linked list (not small)\n*** Caught signal (Aborted) **\n"
                  " in thread 7f75eafe56c0 thread_name:notif-worker0\n")
    assert hung.poll() is None  # the process is still there ...
    assert not ceph.rgw_alive()  # ... and counts as crashed
    assert len(ceph.rgw_crashes()) == before + 1
    ceph.start_rgw()  # kills the hung one: the port is free for the new one
    ceph.wait_bucket_writes()
    assert hung.poll() is not None and ceph.procs["rgw"] is not hung and ceph.rgw_alive()
    assert s3.get_object(Bucket=bucket, Key="kept")["Body"].read() == b"kept"
    s3.delete_object(Bucket=bucket, Key="kept")
    s3.delete_bucket(Bucket=bucket)
