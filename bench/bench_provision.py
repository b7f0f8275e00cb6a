#!/usr/bin/env python3
"""Provisioning benchmark: 20 repositories through publisher-consumer on the local stack.

Starts a RabbitMQ node, OpenBao and a one-node Ceph RGW of its own
(devstack), the cvmfs_server test double, and the real daemon in a thread.
Each repository: keys in Vault, a bucket; then its CSV message is sent and
the time until the ``created`` announcement is measured.

Prints the median and p95 time per repository (target: under 2 s each,
the double's mkfs included). Figures only, no assertions. Leaves nothing
behind, also on failure, Ctrl-C or SIGTERM: the double's mounts (a bind
mount and an overlay per repository), the services, the temporary
directory are removed at the end.

As root, like the tests (the double mounts overlays):

    .venv/bin/python bench/bench_provision.py [--count 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from cvmfs_publisher.adapters.rgw import RGW  # noqa: E402
from devstack.common import p95, sigterm_as_interrupt  # noqa: E402
from devstack.stack import DOMAIN, local_services, unique_label  # noqa: E402
from tests.provision.helpers import Amqp, running  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    with sigterm_as_interrupt(), local_services("bench-provision-") as services:
        cfg = services.stack.config()
        rgw = RGW(cfg.s3, cfg.rgw)
        labels = [unique_label("bench-") for _ in range(args.count)]
        for label in labels:
            services.bao.put_keys(f"subj/cvmfs_keys/{label}.{DOMAIN}", {
                "publicKey": "pub", "certificateKey": "crt", "gatewayKey": "gw"})
            rgw.s3.create_bucket(Bucket=label)
        amqp = Amqp(cfg)
        times = []
        with running(cfg, services.broker):
            for label in labels:
                t0 = time.monotonic()
                amqp.send(f"alice,subj,{label}.{DOMAIN},P")
                amqp.wait_announcement("created", f"{label}.{DOMAIN}", timeout=60)
                times.append(time.monotonic() - t0)
        amqp.close()
        times.sort()
        print(f"provisioned {len(times)} repositories")
        print(f"per repository: median {statistics.median(times):.3f} s, p95 {p95(times):.3f} s, "
              f"max {times[-1]:.3f} s (target < 2 s)")

if __name__ == "__main__":
    main()
