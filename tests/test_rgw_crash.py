"""The suite tells a radosgw crash from a failure of the code under test.

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
