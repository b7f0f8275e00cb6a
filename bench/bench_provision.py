#!/usr/bin/env python3
"""Provisioning benchmark: 20 repositories through publisher-consumer on the local stack.

Starts OpenBao, a one-node Ceph RGW and a RabbitMQ node of its own
(cvmfs_publisher.devstack), the cvmfs_server test double, and the real daemon in a
thread. Each repository: keys in Vault, a bucket; then its CSV message is
sent and the time until the ``created`` announcement is measured.

Prints the median and p95 time per repository (target: under 2 s each,
the double's mkfs included). Figures only, no assertions.

    .venv/bin/python bench/bench_provision.py [--count 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from tests.provision.helpers import Amqp, running  # noqa: E402

from cvmfs_publisher.devstack.ceph import Ceph  # noqa: E402
from cvmfs_publisher.devstack.openbao import OpenBao  # noqa: E402
from cvmfs_publisher.devstack.rabbitmq import RabbitNode  # noqa: E402
from cvmfs_publisher.devstack.stack import DOMAIN, build_stack, make_double, unique_label  # noqa: E402
from cvmfs_publisher.rgw import RGW  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-provision-"))
    node = RabbitNode(work / "rabbitmq").start()
    broker = node.broker()
    bao = OpenBao(work / "openbao").start()
    ceph = Ceph(work / "ceph").start()
    try:
        double = make_double(work / "cvmfs-root")
        cfg = build_stack(work, broker, bao, ceph, double).config()
        rgw = RGW(cfg.s3, cfg.rgw)
        labels = [unique_label("bench-") for _ in range(args.count)]
        for label in labels:
            bao.put_keys(f"subj/cvmfs_keys/{label}.{DOMAIN}", {
                "publicKey": "pub", "certificateKey": "crt", "gatewayKey": "gw"})
            rgw.s3.create_bucket(Bucket=label)
        amqp = Amqp(cfg)
        times = []
        with running(cfg, broker):
            for label in labels:
                t0 = time.monotonic()
                amqp.send(f"alice,subj,{label}.{DOMAIN},P")
                amqp.wait_announcement("created", f"{label}.{DOMAIN}", timeout=60)
                times.append(time.monotonic() - t0)
        amqp.close()
        for label in labels:
            rgw.delete_notification(label)
            rgw.delete_topic(label)
            rgw.s3.delete_bucket(Bucket=label)
        times.sort()
        p95 = times[min(len(times) - 1, round(0.95 * len(times)) - 1)]
        print(f"provisioned {len(times)} repositories")
        print(f"per repository: median {statistics.median(times):.3f} s, p95 {p95:.3f} s, "
              f"max {times[-1]:.3f} s (target < 2 s)")
    finally:
        ceph.stop()
        bao.stop()
        node.stop()


if __name__ == "__main__":
    main()
