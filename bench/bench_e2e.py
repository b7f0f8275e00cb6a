#!/usr/bin/env python3
"""End-to-end latency: PUT to RGW -> visible in a published revision.

The three daemons run as real processes on the local stack (machine's
RabbitMQ, OpenBao, one-node Ceph RGW, the cvmfs_server test double), with
the DEFAULT publishing windows (quiet 2 s, maximum delay 30 s). One upload
at a time, each waited for: the figure is the latency a user sees.

Prints p50 and p95 over N uploads (targets: p50 <= 3 s, p95 <= 6 s), next to
the figure measured through the same daemons on a real CernVM-FS 2.12 gateway
(cvmfs README §10: p50 3.24 s, max 3.74 s). The double's commands take the
real tool's time (``CVMFS_DOUBLE_REAL_TIMING=1``: publish about 0.5 s plus its
size, README §3), so that the figure predicts the real one; ``--fast-double``
measures the daemons alone. Figures only, no assertions. Leaves nothing
behind, also on failure, Ctrl-C or SIGTERM (daemons, mounts, services, broker
objects, temporary directory).

As root, like the tests (the double mounts overlays):

    .venv/bin/python bench/bench_e2e.py [--uploads 50] [--fast-double]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from cvmfs_publisher.adapters import amqp  # noqa: E402
from cvmfs_publisher.adapters.rgw import RGW  # noqa: E402
from devstack.ceph import Ceph  # noqa: E402
from devstack.common import sigterm_as_interrupt  # noqa: E402
from devstack.openbao import OpenBao  # noqa: E402
from devstack.rabbitmq import RabbitNode  # noqa: E402
from devstack.stack import (  # noqa: E402
    DOMAIN,
    build_stack,
    make_double,
    tear_down,
    unique_label,
)
from tests.cvmfs_server_double import published_tree  # noqa: E402

DAEMONS = ("publisher_consumer", "repo_consumers", "repo_sync")


def wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--fast-double", action="store_true",
                        help="the double without the real tool's timings")
    args = parser.parse_args()
    with sigterm_as_interrupt():
        run(args.uploads, args.fast_double)


def run(uploads: int, fast_double: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    double = make_double(work / "cvmfs-root")
    node = bao = ceph = None
    procs: list[subprocess.Popen] = []
    try:
        node = RabbitNode(work / "rabbitmq").start()
        broker = node.broker()
        bao = OpenBao(work / "openbao").start()
        ceph = Ceph(work / "ceph").start()
        stack = build_stack(work, broker, bao, ceph, double)
        stack.raw["log"]["level"] = "INFO"
        # the default windows, as users get them
        stack.raw["sync"] = {"quiet_seconds": 2.0, "max_delay_seconds": 30.0}
        cfg_file = stack.write()
        cfg = stack.config()
        env = stack.subprocess_env()
        if not fast_double:
            env["CVMFS_DOUBLE_REAL_TIMING"] = "1"
        for d in DAEMONS:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", f"cvmfs_publisher.daemons.{d}", "--config", str(cfg_file)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        label = unique_label("bench-")
        repo = f"{label}.{DOMAIN}"
        bao.put_keys(f"subj/cvmfs_keys/{repo}", {"publicKey": "p", "certificateKey": "c",
                                                 "gatewayKey": "g"})
        rgw = RGW(cfg.s3, cfg.rgw)
        rgw.s3.create_bucket(Bucket=label)
        time.sleep(2)
        conn = amqp.connect(cfg.amqp, "bench")
        ch = conn.channel()
        ch.confirm_delivery()
        amqp.publish_confirmed(ch, "", cfg.amqp.publisher_queue, f"a,subj,{repo},P".encode())
        wait((Path(cfg.cvmfs.repositories_dir) / repo).is_dir, 60, "provisioning")
        def consumed() -> bool:
            declared = amqp.passive_declare(conn, label)  # None until provisioning declared it
            return declared is not None and declared.consumer_count > 0
        wait(consumed, 30, "consumers")
        conn.close()
        tree = Path(published_tree(double.root, repo))
        t0 = time.monotonic()
        rgw.s3.put_object(Bucket=label, Key="cvmfs/bench/first.txt", Body=b"first")
        wait((tree / "bench" / "first.txt").exists, 180, "the first upload")
        print(f"first upload of the new repository published after "
              f"{time.monotonic() - t0:.1f} s (the new topic's warm-up; not in the figures)")
        latencies = []
        for i in range(uploads):
            name = f"file-{i:04d}.txt"
            t0 = time.monotonic()
            rgw.s3.put_object(Bucket=label, Key=f"cvmfs/bench/{name}", Body=b"x" * 1024)
            wait(lambda n=name: (tree / "bench" / n).exists(), 120, name)
            latencies.append(time.monotonic() - t0)
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, round(0.95 * len(latencies)) - 1)]
        timing = "fast double" if fast_double else "double with the real tool's timings"
        print(f"{len(latencies)} uploads, PUT -> published revision (quiet window 2 s, "
              f"{timing}):")
        print(f"  p50 {statistics.median(latencies):.2f} s (target <= 3 s), p95 {p95:.2f} s "
              f"(target <= 6 s), min {latencies[0]:.2f} s, max {latencies[-1]:.2f} s")
        print("  reference, real CernVM-FS 2.12 gateway: p50 3.24 s, max 3.74 s (10 uploads)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        tear_down(work, double.root, [ceph, bao, node])


if __name__ == "__main__":
    main()
