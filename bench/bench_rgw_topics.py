#!/usr/bin/env python3
"""What idle persistent topics cost RGW and its OSD: CPU with 0, 250, ... topics.

Why: at 1,000 repositories everything on a publisher host ran slower than
at 20 (bench_scale: a quiet upload alone, provisioning), with radosgw and
ceph-osd at about half a core each while no object changed. Ceph 16.2's
``rgw_notify.cc`` explains it: each persistent topic is a RADOS queue
object, and one notification worker thread per radosgw reads every queue it
owns, an idle one every 100 ms (``IDLE_TIMEOUT_USEC``, not configurable in
16.2), so N repositories cost about 10 N queue reads a second, whether or
not anything is uploaded. This bench measures that alone: one-node Ceph
(``devstack.ceph``) and a RabbitMQ node of its own, topics created as
provisioning creates them (persistent, ``amqp-ack-level=broker``, the
broker's credentials in the push endpoint), no bucket, no upload, no daemon.

For each ``--topics`` count (ascending): create topics up to it, wait
``--settle`` seconds (radosgw takes ownership of new queues every 30 s),
then the CPU of radosgw, ceph-osd and ceph-mon over ``--seconds`` seconds,
in % of one core. Figures only. Leaves nothing behind, also on failure,
Ctrl-C or SIGTERM. As root, like the tests::

    .venv/bin/python bench/bench_rgw_topics.py [--topics 0 250 1000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from cvmfs_publisher.adapters.rgw import RGW  # noqa: E402
from cvmfs_publisher.core import config  # noqa: E402
from devstack import ceph as ceph_mod  # noqa: E402
from devstack.common import idle_cpu, sigterm_as_interrupt  # noqa: E402
from devstack.rabbitmq import RabbitNode  # noqa: E402

#: radosgw looks for queues it does not own yet every 30 s (Q_LIST_UPDATE_MSEC)
SETTLE = 35.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, nargs="+", default=[0, 250, 1000])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=SETTLE)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rgw-topics-"))
    ceph = node = None
    results: dict[str, dict[str, float]] = {}
    try:
        with sigterm_as_interrupt():
            ceph = ceph_mod.Ceph(work / "ceph").start()
            node = RabbitNode(work / "rabbitmq").start()
            broker = node.broker()
            cfg = config.from_mapping({
                "s3": {"endpoint_url": ceph.endpoint},
                "rgw": {"push_endpoint": broker.push_url(), "push_user": broker.user,
                        "forwarded_https": True, "amqp_ack_level": "broker",
                        "persistent": True},
            }, env={"CVMFS_PUBLISHER_S3__ACCESS_KEY": ceph.access_key,
                    "CVMFS_PUBLISHER_S3__SECRET_KEY": ceph.secret_key,
                    "CVMFS_PUBLISHER_RGW__PUSH_PASSWORD": broker.password})
            rgw = RGW(cfg.s3, cfg.rgw, max_pool_connections=8)
            pids = {name: ceph.procs[key].pid
                    for name, key in (("radosgw", "rgw"), ("ceph-osd", "osd"),
                                      ("ceph-mon", "mon.a"))}
            made = 0
            for count in sorted(set(args.topics)):
                t0 = time.monotonic()
                # one at a time, as one publisher-consumer provisions: concurrent
                # CreateTopics race on RGW's one topics object (HTTP 500, docs/LIMITS.md)
                for n in range(made, count):
                    rgw.create_topic(f"topic-{n:05d}", "cvmfs")
                created = time.monotonic() - t0
                made = max(made, count)
                if count:
                    time.sleep(args.settle)
                cpu = idle_cpu(pids, args.seconds)
                if not ceph.rgw_alive():
                    raise SystemExit(f"radosgw died at {count} topics (its log: "
                                     f"{work / 'ceph' / 'log'})")
                results[str(count)] = {k: round(v * 100, 2) for k, v in cpu.items()}
                print(f"{count:5d} persistent topics (created in {created:.1f} s), idle "
                      f"over {args.seconds:.0f} s: radosgw {cpu['radosgw'] * 100:.1f} %, "
                      f"ceph-osd {cpu['ceph-osd'] * 100:.1f} %, ceph-mon "
                      f"{cpu['ceph-mon'] * 100:.1f} % of a core "
                      f"({os.cpu_count()} cores)", flush=True)
            print(json.dumps(results, indent=1))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if node is not None:
            node.stop()
        if ceph is not None:
            ceph.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
