#!/usr/bin/env python3
"""End-to-end latency: PUT to RGW -> visible in a published revision.

The three daemons run as real processes on the local stack (a RabbitMQ node
of its own, OpenBao, one-node Ceph RGW, the cvmfs_server test double), with
the DEFAULT publishing windows (quiet 2 s, maximum delay 30 s). One upload
at a time to a quiet repository, each waited for: the figure is the latency
a user sees, and with leading-edge publishing it is the floor plus the
daemons' own cost.

Prints p50 and p95 over N uploads (targets, issue 14: p50 <= 1.5 s, p95 <=
2.5 s), the floor measured in the same run (RGW's event delay, seen by a
queue of the benchmark's own bound next to the repository's, plus the
double's ``transaction`` and ``publish`` times from its call log) and the
figure measured through the daemons of the seed on a real CernVM-FS 2.12
gateway (cvmfs README §10: p50 3.24 s, max 3.74 s). The double's commands take the
real tool's time (``CVMFS_DOUBLE_REAL_TIMING=1``: publish about 0.5 s plus its
size, README §3), so that the figure predicts the real one; ``--fast-double``
measures the daemons alone. Figures only, no assertions. Leaves nothing
behind, also on failure, Ctrl-C or SIGTERM (daemons, mounts, services, broker
objects, temporary directory).

As root, like the tests (the double mounts overlays):

    .venv/bin/python bench/bench_e2e.py [--uploads 30] [--fast-double] [--broker plain|cluster|both]

``--broker both``: the same on a plain single node, then on the three-node
RabbitMQ cluster with TLS (RGW over amqps), and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from cvmfs_publisher.adapters import amqp  # noqa: E402
from cvmfs_publisher.adapters.rgw import RGW  # noqa: E402
from devstack.common import p95, sigterm_as_interrupt, wait_for  # noqa: E402
from devstack.stack import DOMAIN, LocalServices, local_services, unique_label  # noqa: E402
from tests.cvmfs_server_double import calls, published_tree  # noqa: E402

DAEMONS = ("publisher_consumer", "repo_consumers", "repo_sync")


def watch_events(cfg, label: str, events: dict[str, float], stop: threading.Event) -> None:
    """A queue of our own next to the repository's: when each S3 event reached the broker."""
    conn = amqp.connect(cfg.amqp, "bench-events")
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, cfg.amqp.notification_exchange, routing_key=label)

    def on_message(ch, method, props, body) -> None:
        for rec in json.loads(body).get("Records", []):
            events[rec["s3"]["object"]["key"]] = time.time()
    ch.basic_consume(q, on_message, auto_ack=True)
    events["ready"] = time.time()
    while not stop.is_set():
        conn.process_data_events(time_limit=0.05)
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=30)
    parser.add_argument("--fast-double", action="store_true",
                        help="the double without the real tool's timings")
    parser.add_argument("--broker", choices=["plain", "cluster", "both"], default="plain",
                        help="a plain single node, the three-node TLS cluster, or both in one "
                             "run (then the ratio: the cost of TLS and the cluster)")
    args = parser.parse_args()
    kinds = ["plain", "cluster"] if args.broker == "both" else [args.broker]
    with sigterm_as_interrupt():
        results = {}
        for kind in kinds:
            print(f"== {kind} broker", flush=True)
            results[kind] = run(args.uploads, args.fast_double, cluster=kind == "cluster")
        if len(kinds) == 2:
            p, c = results["plain"], results["cluster"]
            print(f"TLS cluster / plain node: p50 {c['p50'] / p['p50']:.2f}, p95 "
                  f"{c['p95'] / p['p95']:.2f}, RGW event delay {c['event'] / p['event']:.2f} "
                  f"({c['event']:.3f} s vs {p['event']:.3f} s)")


def run(uploads: int, fast_double: bool, cluster: bool = False) -> dict[str, float]:
    """One run on a plain single node, or (``cluster``) on the three-node TLS cluster."""
    procs: list[subprocess.Popen] = []
    events: dict[str, float] = {}
    stop_events = threading.Event()
    with local_services("bench-e2e-", cluster=cluster) as services:
        try:
            return measure(services, uploads, fast_double, procs, events, stop_events)
        finally:
            stop_events.set()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def measure(services: LocalServices, uploads: int, fast_double: bool,
            procs: list[subprocess.Popen], events: dict[str, float],
            stop_events: threading.Event) -> dict[str, float]:
    """Start the three daemons, provision one repository, time its uploads."""
    bao, double, stack = services.bao, services.double, services.stack
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
    wait_for("provisioning", (Path(cfg.cvmfs.repositories_dir) / repo).is_dir, 60, interval=0.02)
    def consumed() -> bool:
        declared = amqp.passive_declare(conn, label)  # None until provisioning declared it
        return declared is not None and declared.consumer_count > 0
    wait_for("consumers", consumed, 30, interval=0.02)
    conn.close()
    watcher = threading.Thread(target=watch_events, args=(cfg, label, events, stop_events),
                               daemon=True)
    watcher.start()
    wait_for("the event watcher", lambda: "ready" in events, 30, interval=0.02)
    tree = Path(published_tree(double.root, repo))
    t0 = time.monotonic()
    rgw.s3.put_object(Bucket=label, Key="cvmfs/bench/first.txt", Body=b"first")
    wait_for("the first upload", (tree / "bench" / "first.txt").exists, 180, interval=0.02)
    print(f"first upload of the new repository published after "
          f"{time.monotonic() - t0:.1f} s (the new topic's warm-up; not in the figures)")
    time.sleep(2.5)  # quiet again before the first measured upload
    since = time.time()  # the double's calls from here on are the measured uploads'
    latencies, event_delays = [], []
    for i in range(uploads):
        name = f"file-{i:04d}.txt"
        t0 = time.time()
        rgw.s3.put_object(Bucket=label, Key=f"cvmfs/bench/{name}", Body=b"x" * 1024)
        wait_for(name, lambda n=name: (tree / "bench" / n).exists(), 120, interval=0.02)
        latencies.append(time.time() - t0)
        wait_for(f"the event of {name}", lambda n=name: f"cvmfs/bench/{n}" in events, 30,
                 interval=0.02)
        event_delays.append(events[f"cvmfs/bench/{name}"] - t0)
        time.sleep(2.5)  # quiet again (longer than the quiet window): a user's next upload
    latencies.sort()
    timing = "fast double" if fast_double else "double with the real tool's timings"
    print(f"{len(latencies)} uploads, each to a quiet repository, PUT -> published "
          f"revision (default windows: quiet 2 s, max delay 30 s; {timing}):")
    print(f"  p50 {statistics.median(latencies):.2f} s (target <= 1.5 s), "
          f"p95 {p95(latencies):.2f} s (target <= 2.5 s), min {latencies[0]:.2f} s, "
          f"max {latencies[-1]:.2f} s")
    measured = [x for x in calls(double.root) if x["start"] >= since and x.get("end")]
    took = {c: [x["end"] - x["start"] for x in measured if x["command"] == c]
            for c in ("transaction", "publish")}
    floor = (statistics.median(event_delays) + statistics.median(took["transaction"])
             + statistics.median(took["publish"]))
    print(f"  floor, same run: RGW event {statistics.median(event_delays):.2f} s + "
          f"transaction {statistics.median(took['transaction']):.2f} s + publish "
          f"{statistics.median(took['publish']):.2f} s = {floor:.2f} s (medians); p50 is "
          f"{statistics.median(latencies) / floor:.2f} x the floor; "
          f"{len(took['publish'])} publishes for {len(latencies)} uploads")
    print("  reference, the seed's daemons on a real CernVM-FS 2.12 gateway: p50 3.24 s, "
          "max 3.74 s (10 uploads)")
    return {"p50": statistics.median(latencies), "p95": p95(latencies),
            "event": statistics.median(event_delays)}


if __name__ == "__main__":
    main()
