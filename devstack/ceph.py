"""A throw-away one-node Ceph with RGW on loopback (Debian's ceph packages).

One monitor, one memstore OSD (data in RAM), one radosgw (beast) on
127.0.0.1; no cephx, no mgr, no systemd. About 2 s to an answering RGW.
Ported from the measured ``shared/ceph/start-ceph.sh``; the ports are free
ones so a second stack (a developer's demo) does not collide with tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig

from .common import free_port, kill_process, wait_for

PACKAGES = ["ceph-mon", "ceph-osd", "radosgw", "ceph-common"]

CONF = """[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
keyring = {dir}/keyring
mon data avail crit = 1
mon data avail warn = 2
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0

[mon]
mon data = {dir}/$name
mon cluster log file = {dir}/log/$cluster.$channel.log
paxos propose interval = 0.1

[osd]
osd data = {dir}/$name
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd crush initial weight = 1

[client.rgw]
ms mon client mode = crc
rgw frontends = beast endpoint=127.0.0.1:{rgw} tcp_nodelay=1
rgw data = {dir}/rgw
rgw trust forwarded https = true
"""


@dataclass
class Ceph:
    """A running cluster; ``endpoint`` is the RGW S3/SNS URL."""

    workdir: Path
    rgw_port: int = 0
    memstore_bytes: int = 4 << 30
    access_key: str = field(default_factory=lambda: "AK" + uuid.uuid4().hex[:18].upper())
    secret_key: str = field(default_factory=lambda: "SK" + uuid.uuid4().hex)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    #: fatal-signal reports in rgw.out when the running radosgw started
    rgw_reports_at_start: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    @property
    def conf(self) -> Path:
        return self.workdir / "ceph.conf"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def _run(self, *argv: str, timeout: float = 60) -> str:
        res = subprocess.run(list(argv), env=self._env(), capture_output=True, text=True,
                             timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed ({res.returncode}): "
                               f"{res.stderr.strip()[-500:]}")
        return res.stdout

    def _spawn(self, name: str, *argv: str) -> None:
        logf = open(self.workdir / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(list(argv), env=self._env(), stdout=logf,
                                            stderr=subprocess.STDOUT, cwd=self.workdir)
        logf.close()

    def start(self, timeout: float = 60.0) -> Ceph:
        missing = [b for b in ("ceph-mon", "ceph-osd", "radosgw", "monmaptool")
                   if not shutil.which(b)]
        if missing:
            raise RuntimeError(f"Ceph binaries missing ({', '.join(missing)}): "
                               f"apt-get install -y {' '.join(PACKAGES)}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        for d in ("run", "log", "mon.a", "osd.0", "rgw"):
            (self.workdir / d).mkdir(parents=True)
        self.rgw_port = self.rgw_port or free_port()
        mon1, mon2 = free_port(), free_port()
        fsid = str(uuid.uuid4())
        self.conf.write_text(CONF.format(fsid=fsid, mon1=mon1, mon2=mon2, dir=self.workdir,
                                         rgw=self.rgw_port, memstore_bytes=self.memstore_bytes))
        monmap = str(self.workdir / "monmap")
        self._run("monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]", monmap)
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self._spawn("mon.a", "ceph-mon", "-i", "a", "-f")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "osd", "new", osd_uuid, timeout=timeout).strip()
        self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._spawn("osd", "ceph-osd", "-i", osd_id, "-f")
        wait_for("ceph osd", lambda: f"osd.{osd_id} up" in self._run("ceph", "osd", "dump"),
                 timeout, self.workdir / "log" / "osd.out", interval=0.2)
        self.start_rgw(timeout)
        # RGW refuses a user's bucket beyond max-buckets (default 1,000) with TooManyBuckets
        # (HTTP 400, err_no -2020): bench_scale's 1,001 repositories, and the probe bucket of
        # wait_bucket_writes after a restart, need more (docs/LIMITS.md).
        self._run("radosgw-admin", "user", "create", "--uid=tester", "--display-name=Tester",
                  f"--access-key={self.access_key}", f"--secret-key={self.secret_key}",
                  "--max-buckets=10000")
        return self

    def start_rgw(self, timeout: float = 60.0) -> None:
        """Start radosgw; one still there after its crash report (hung) is killed first."""
        self.stop_rgw()
        self._fence_dead_rgw()
        self.rgw_reports_at_start = len(self.rgw_crashes())
        self._spawn("rgw", "radosgw", "-n", "client.rgw", "-f")
        wait_for("radosgw", self._rgw_answers, timeout, self.workdir / "log" / "rgw.out",
                 alive=self.rgw_alive)

    def _fence_dead_rgw(self) -> None:
        """Blocklist every radosgw instance still watching RGW's control objects.

        Called before a radosgw starts, so every watcher is a dead one (a crash,
        or :meth:`stop_rgw`). Without this the OSD keeps a dead instance's
        watches until they time out, and the new radosgw's bucket and topic
        writes hang on notifying it: measured, the first CreateBucket after a
        SIGKILL took 29 s, and in a suite run with four crashes metadata writes
        hung for minutes; blocklisted, it took 0.01 s.
        """
        dead: set[str] = set()
        for i in range(8):  # rgw_num_control_oids
            try:
                out = self._run("rados", "-p", "default.rgw.control", "listwatchers",
                                f"notify.{i}")
            except RuntimeError:  # the first start: no pool yet
                return
            dead.update(line.split()[0].split("=", 1)[1] for line in out.splitlines()
                        if line.startswith("watcher="))
        for addr in sorted(dead):
            with contextlib.suppress(Exception):
                self._run("ceph", "osd", "blocklist", "add", addr)

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1):  # noqa: S310
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def rgw_alive(self) -> bool:
        """radosgw runs and has not reported a fatal signal since it started.

        A report counts as dead even while the process is still there: after
        ``corrupted double-linked list`` (glibc's abort in ``notif-worker0``)
        radosgw's own fatal-signal handler was seen to hang on a lock of the
        corrupted heap, the process alive, its port accepting connections and
        never answering (a clean-clone CI run: every later RGW test timed out).
        """
        p = self.procs.get("rgw")
        return p is not None and p.poll() is None and \
            len(self.rgw_crashes()) <= self.rgw_reports_at_start

    def rgw_crashes(self) -> list[str]:
        """radosgw's fatal-signal reports so far, each with its thread (logs survive restarts).

        radosgw 16.2.15 segfaults now and then while it pushes notifications
        (thread ``msgr-worker-N``; shared/ceph/README.md items 7 and 11): a test
        that fails with a new report here failed because of RGW.
        """
        # stderr (rgw.out, appended across restarts) has one report per crash; the
        # log file repeats it in its dump of recent events
        try:
            lines = (self.workdir / "log" / "rgw.out").read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [" ".join(lines[i:i + 2]) for i, ln in enumerate(lines)
                if ln.startswith("*** Caught signal")]

    def wait_bucket_writes(self, timeout: float = 90.0) -> None:
        """Wait until a restarted radosgw creates buckets again.

        After a SIGKILL (:meth:`stop_rgw`, or a crash), radosgw hangs on
        bucket creation and deletion until the OSD drops the dead instance's
        watches (about 25 s); :meth:`start_rgw` blocklists it first, so this
        is a check that takes a moment. Waiting keeps later users (which create
        buckets) unaffected.
        """
        probe = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="default",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=BotoConfig(s3={"addressing_style": "path"}, read_timeout=2,
                              connect_timeout=2, retries={"max_attempts": 1},
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required"))
        name = "probe-" + uuid.uuid4().hex[:10]

        def bucket_created() -> bool:
            try:
                probe.create_bucket(Bucket=name)
            except botocore.exceptions.ClientError as exc:
                return exc.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou"
            except botocore.exceptions.BotoCoreError:
                return False
            return True
        wait_for("radosgw bucket writes", bucket_created, timeout, interval=1.0)
        with contextlib.suppress(Exception):
            probe.delete_bucket(Bucket=name)

    def stop_rgw(self) -> None:
        """Kill radosgw (SIGKILL: a crash, as far as clients can tell)."""
        p = self.procs.pop("rgw", None)
        if p is not None:
            kill_process(p, signal.SIGKILL)

    def stop(self) -> None:
        for name in ("rgw", "osd", "mon.a"):
            p = self.procs.pop(name, None)
            if p is not None:
                kill_process(p, signal.SIGKILL)
        time.sleep(0.1)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_ceph(workdir: Path, rgw_port: int = 0) -> Ceph:
    return Ceph(workdir, rgw_port=rgw_port).start()
