#!/usr/bin/env python3
"""cvmfs-repo-consumers benchmark: throughput against raw S3 GETs, and memory for 1 GiB.

Starts a one-node Ceph RGW and a RabbitMQ node of its own (cvmfs_publisher.
devstack; the machine's broker is left alone), with production defaults
(persistent RGW topics), in a private virtual host. For each ``--downloads`` value:

1. one repository topology (queue, topic, bucket notification: the library
   calls publisher-consumer's Provisioner makes, without Vault and mkfs);
2. ``--events`` objects of ``--size`` bytes uploaded, their real RGW events
   waiting in the repository queue;
3. the raw S3 GET rate over the same keys, with ``downloads`` threads and
   the daemon's own S3 client settings, with boto3's ``get_object`` and
   with the adapter's own GET (``RGW.get_object``, what the daemon's
   downloads use), each measured before and after step 4 (RGW's rate
   drifts): the reference is the faster client's mean;
4. the daemon (in a thread) drains the queue into staging: events per second
   from the first staged entry to the last, and its ratio to the raw GET rate
   (target >= 0.8). ``--fetch threads processes`` runs this with the fetches
   on the download threads and in download processes
   (``consumers.download_processes``, the default), one after the other;
5. the CPU each process used per GET (raw) and per event (the daemon): the
   client (the GET threads; the daemon with its download processes),
   radosgw, ceph-osd, ceph-mon, the broker. On a 2-core host where RGW
   shares the cores, the rates compare these sums.

``--repositories N`` spreads the events over N repositories (staging takes
a per-repository lock for each entry, so this shows how far the pipeline
scales once one repository's staging is not the limit).

``--broker cluster`` runs the same on a three-node RabbitMQ cluster with
TLS (devstack: a throw-away CA, verification on, RGW pushing over amqps);
``--broker both`` runs the plain single node first, then the TLS cluster,
in one run, and prints the ratio (the cost of TLS and the cluster).

Then the daemon as a subprocess stages one 1 GiB object: the peak RSS
(VmHWM) of each of its processes (the daemon, the fork server, the download
processes) before and after; the largest growth of one (target < 64 MiB).

Figures only, no assertions. Leaves nothing behind, also on failure, Ctrl-C
or SIGTERM (the RGW, the RabbitMQ node, their temporary directory),
except the Ceph logs of a failed run, in a directory it names. As root,
like the tests:

    .venv/bin/python bench/bench_consumers.py [--events 2000] [--downloads 4 8] [--nagle]
        [--broker plain|cluster|both]

The devstack RGW runs its beast frontend with ``tcp_nodelay=1``: without it
this radosgw's replies with a body wait ~40 ms for the client's delayed ACK
(Nagle), so every GET costs ~45 ms and both rates measure that latency
rather than the pipeline. ``--nagle`` removes it, to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pika
import yaml
from boto3.s3.transfer import TransferConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from cvmfs_publisher.adapters import amqp  # noqa: E402
from cvmfs_publisher.adapters.rgw import RGW  # noqa: E402
from cvmfs_publisher.core import config, logs  # noqa: E402
from cvmfs_publisher.core.status import StatusDocument  # noqa: E402
from cvmfs_publisher.daemons.repo_consumers import NAME, RepoConsumers  # noqa: E402
from cvmfs_publisher.staging.area import Staging  # noqa: E402
from devstack import ceph as ceph_mod  # noqa: E402
from devstack import tls  # noqa: E402
from devstack.common import cpu_seconds, descendants, sigterm_as_interrupt  # noqa: E402
from devstack.rabbitmq import Broker, RabbitCluster, RabbitNode  # noqa: E402
from tests.consumers.support import Pattern  # noqa: E402

DOMAIN = "infn.it"
MIB = 1 << 20


def label() -> str:
    return f"bench-{uuid.uuid4().hex[:10]}"


class Bench:
    """The stack: broker vhost, RGW, configuration."""

    def __init__(self, work: Path, broker: Broker, ceph: ceph_mod.Ceph, vhost: str) -> None:
        self.work, self.broker, self.ceph, self.vhost = work, broker, ceph, vhost
        #: the services' processes (each with its descendants), for the CPU figures
        self.services: dict[str, list[int]] = {
            "radosgw": [ceph.procs["rgw"].pid], "ceph-osd": [ceph.procs["osd"].pid],
            "ceph-mon": [ceph.procs["mon.a"].pid]}
        self.env = {"CVMFS_PUBLISHER_AMQP__PASSWORD": broker.password,
                    "CVMFS_PUBLISHER_S3__ACCESS_KEY": ceph.access_key,
                    "CVMFS_PUBLISHER_S3__SECRET_KEY": ceph.secret_key,
                    "CVMFS_PUBLISHER_RGW__PUSH_PASSWORD": broker.password}
        self.raw: dict[str, dict[str, Any]] = {
            "log": {"dir": str(work / "log"), "level": "INFO", "stdout": False},
            "status": {"dir": str(work / "status"), "interval": 1.0},
            "amqp": {"host": broker.host, "port": broker.port, "user": broker.user,
                     "tls": broker.tls, "ca_file": broker.ca_file, "hosts": broker.hosts,
                     "vhost": vhost, "management_url": broker.management_url,
                     "management_urls": broker.management_urls, "retry_delays": [1, 2]},
            "s3": {"endpoint_url": ceph.endpoint, "max_attempts": 1},
            # the node's random credentials in the push endpoint, as production (RGW takes
            # them over this plain-HTTP RGW only with X-Forwarded-Proto)
            "rgw": {"push_endpoint": broker.push_url(vhost), "push_user": broker.user,
                    "forwarded_https": True,
                    "amqp_ack_level": "broker", "persistent": True,
                    "verify_ssl": broker.tls, "ca_location": broker.ca_file},
            "cvmfs": {"staging_dir": str(work / "staging"), "domain": DOMAIN},
            "consumers": {"downloads": 4},
        }

    def config(self, **sections: dict[str, Any]) -> config.Config:
        raw = {k: dict(v) for k, v in self.raw.items()}
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return config.from_mapping(raw, env=self.env)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: each service, and ``client`` (this process and the rest of
        its descendants: the raw GET threads, or the daemon and its download processes)."""
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.services.items()}
        out["client"] = cpu_seconds(os.getpid()) - sum(out.values())
        return out

    def connection(self) -> pika.BlockingConnection:
        return amqp.connect(self.config().amqp, "bench")

    def provision(self, cfg: config.Config, rgw: RGW, name: str) -> None:
        """Queue, bucket, topic, notification: Provisioner.create's RabbitMQ and RGW steps."""
        conn = self.connection()
        try:
            ch = conn.channel()
            amqp.declare_common(ch, cfg.amqp)
            ch.queue_declare(name, durable=True, arguments=amqp.work_queue_arguments(
                cfg.amqp, name, single_active=True))
            ch.queue_bind(name, cfg.amqp.notification_exchange, routing_key=name)
        finally:
            conn.close()
        rgw.s3.create_bucket(Bucket=name)
        arn = rgw.create_topic(name, cfg.amqp.notification_exchange)
        rgw.put_notification(name, arn, cfg.s3.prefix)

    def depth(self, queue: str) -> int:
        conn = self.connection()
        try:
            return conn.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            conn.close()

    def teardown(self, rgw: RGW, name: str) -> None:
        with contextlib.suppress(Exception):
            rgw.delete_notification(name)
            rgw.delete_topic(name)
        paginator = rgw.s3.get_paginator("list_objects_v2")
        with ThreadPoolExecutor(16) as pool:
            for page in paginator.paginate(Bucket=name):
                keys = [o["Key"] for o in page.get("Contents", []) or []]
                list(pool.map(lambda k: rgw.s3.delete_object(Bucket=name, Key=k), keys))
        with contextlib.suppress(Exception):
            rgw.s3.delete_bucket(Bucket=name)


def wait(what: str, check: Any, timeout: float, interval: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


def throughput(b: Bench, events: int, size: int, downloads: int,
               repositories: int = 1, processes: bool = True) -> dict[str, float]:
    cfg = b.config(consumers={"downloads": downloads, "download_processes": processes})
    rgw = RGW(cfg.s3, cfg.rgw, max_pool_connections=64)
    names = [label() for _ in range(repositories)]
    for name in names:
        b.provision(cfg, rgw, name)
    try:
        body = os.urandom(size)
        keys = [(names[i % repositories], f"cvmfs/bench/{i:06d}.bin") for i in range(events)]
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda nk: rgw.s3.put_object(Bucket=nk[0], Key=nk[1], Body=body),
                          keys))
        # a new persistent topic delivers its first events ~30 s after its creation
        wait("events queued", lambda: sum(b.depth(n) for n in names) >= events, 240, 0.2)

        adapter = RGW(cfg.s3, cfg.rgw, max_pool_connections=max(10, downloads * 2))

        def read(answer: dict[str, Any]) -> bytes:
            with contextlib.closing(answer["Body"]) as body:
                return body.read()
        # The raw GETs with boto3's get_object, and with the adapter's own GET (the
        # one the daemon's downloads use): the reference is the faster of the two.
        gets = {"boto3": lambda nk: read(adapter.s3.get_object(Bucket=nk[0], Key=nk[1])),
                "adapter": lambda nk: read(adapter.get_object(nk[0], nk[1]))}

        cpu: dict[str, list[dict[str, float]]] = {}  # per GET or event, each run

        def per_event(before: dict[str, float], count: int) -> dict[str, float]:
            after = b.cpu()
            return {n: (after[n] - before[n]) * 1000 / count for n in after}

        def raw(how: str) -> float:
            c0 = b.cpu()
            t0 = time.monotonic()
            with ThreadPoolExecutor(downloads) as pool:
                list(pool.map(gets[how], keys))
            took = time.monotonic() - t0
            cpu.setdefault(how, []).append(per_event(c0, events))
            return events / took
        raw_before = {how: raw(how) for how in gets}

        logs.setup(NAME, cfg.log.dir, "INFO", stdout=False)
        status = StatusDocument(Path(cfg.status.dir) / f"{NAME}.json", NAME, 1.0)
        daemon = RepoConsumers(cfg, status)
        stagings = [Staging(cfg.cvmfs.staging_dir, f"{n}.{DOMAIN}") for n in names]

        def staged() -> int:
            return sum(st.pending_count() for st in stagings if st.pending.is_dir())

        def committed() -> int:
            # the group commit's own count: listing pending/ every few ms from this
            # thread took an eighth of the daemon's GIL (py-spy), slowing what it measures
            return daemon.stager.commits.committed
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        first = wait("first staged", lambda: committed() >= 1, 60, 0.005)
        c0, n0 = b.cpu(), committed()
        last = wait("all staged", lambda: committed() >= events, 600, 0.005)
        cpu["consumer"] = [per_event(c0, events - n0)]
        daemon.request_stop()
        thread.join(timeout=30)
        if staged() < events:
            raise SystemExit(f"only {staged()} of {events} changes are in staging")
        rate = (events - 1) / (last - first)
        # the same GETs again: this RGW's rate drifts by tens of percent within minutes
        # (its OSD compacting after the uploads), so the reference is the mean of both
        raw_after = {how: raw(how) for how in reversed(gets)}
        means = {how: (raw_before[how] + raw_after[how]) / 2 for how in gets}
        how = max(means, key=lambda k: means[k])
        return {"raw": means[how], "raw_client": how,
                "raw_before": raw_before[how], "raw_after": raw_after[how],
                "raw_boto3": means["boto3"], "raw_adapter": means["adapter"],
                "consumer": rate, "ratio": rate / means[how],
                "ratio_boto3": rate / means["boto3"],
                "cpu_ms": {k: {n: sum(r[n] for r in runs) / len(runs) for n in runs[0]}
                           for k, runs in cpu.items()}}
    finally:
        for name in names:
            b.teardown(rgw, name)


def vm(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def peaks(pid: int) -> dict[int, int]:
    """Peak RSS (VmHWM) of the daemon and each of its processes (fork server, downloads)."""
    out = {}
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            out[p] = vm(p)["VmHWM"]
    return out


def growth(before: dict[int, int], after: dict[int, int]) -> tuple[int, int]:
    """The largest peak-RSS growth of one process, and that process's peak after.

    A download process started after ``before`` grew from what the smallest
    one there had (they are all forks of one fork server)."""
    base = min(before.values())
    return max(((peak - before.get(p, base), peak) for p, peak in after.items()))


def one_gib(b: Bench, size: int) -> dict[str, float]:
    cfg = b.config()
    rgw = RGW(cfg.s3, cfg.rgw)
    name = label()
    b.provision(cfg, rgw, name)
    conf = b.work / "gib.yaml"
    conf.write_text(yaml.safe_dump(b.raw))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CVMFS_PUBLISHER_")},
           **b.env, "PYTHONPATH": str(ROOT / "scripts")}
    proc = subprocess.Popen([sys.executable, "-m", "cvmfs_publisher.daemons.repo_consumers",
                             "--config", str(conf)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    st = Staging(cfg.cvmfs.staging_dir, f"{name}.{DOMAIN}")
    try:
        rgw.s3.put_object(Bucket=name, Key="cvmfs/warm-up", Body=b"warm")
        wait("warm-up staged", lambda: st.pending.is_dir() and st.pending_count() >= 1, 60)
        time.sleep(0.5)
        before = peaks(proc.pid)
        body = Pattern(size)
        rgw.s3.upload_fileobj(body, name, "cvmfs/one-gib.bin", Config=TransferConfig(
            multipart_chunksize=64 * MIB, max_concurrency=4))
        t0 = time.monotonic()
        wait("1 GiB staged", lambda: st.pending_get("one-gib.bin") is not None, 600, 0.05)
        took = time.monotonic() - t0
        grew, peak = growth(before, peaks(proc.pid))
        entry = st.pending_get("one-gib.bin")
        assert entry is not None
        h = hashlib.sha256()
        with open(st.object_path(entry), "rb") as fh:
            while chunk := fh.read(8 * MIB):
                h.update(chunk)
        rgw.s3.delete_object(Bucket=name, Key="cvmfs/one-gib.bin")
        return {"before": (peak - grew) / MIB, "after": peak / MIB,
                "growth": grew / MIB, "seconds": took,
                "intact": float(h.hexdigest() == body.hash.hexdigest())}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        b.teardown(rgw, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--downloads", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repositories", type=int, default=1,
                        help="spread the events over this many repositories")
    parser.add_argument("--gib", type=float, default=1.0, help="big object size in GiB (0: skip)")
    parser.add_argument("--broker", choices=["plain", "cluster", "both"], default="plain",
                        help="a plain single node, the three-node TLS cluster, or both")
    parser.add_argument("--fetch", nargs="+", choices=["processes", "threads"],
                        default=["processes"],
                        help="where the daemon's fetches run (consumers.download_processes; "
                        "both: the comparison in one run)")
    parser.add_argument("--nagle", action="store_true",
                        help="start RGW without beast tcp_nodelay=1 (see the module docstring)")
    args = parser.parse_args()
    args.tcp_nodelay = not args.nagle
    if args.nagle:
        ceph_mod.CONF = ceph_mod.CONF.replace(" tcp_nodelay=1", "")
    work = Path(tempfile.mkdtemp(prefix="bench-consumers-"))
    vhost = label()
    quoted = urllib.parse.quote(vhost, safe="")
    ceph = None
    ok = False
    results: dict[str, Any] = {"rgw_tcp_nodelay": args.tcp_nodelay, "events": args.events,
                               "repositories": args.repositories,
                               "object_bytes": args.size, "cpus": os.cpu_count()}
    brokers: list[Any] = []
    kinds = ["plain", "cluster"] if args.broker == "both" else [args.broker]
    try:
        ceph = ceph_mod.Ceph(work / "ceph").start()
        b = None
        for kind in kinds:
            if kind == "plain":
                started: Any = RabbitNode(work / "rabbitmq").start()
            else:
                ca = tls.make_ca(work / "tls" / "ca")
                cert = tls.make_server_cert(work / "tls" / "server", ca, ("DNS:localhost",))
                started = RabbitCluster(work / "cluster", cert).start()
            brokers.append(started)
            broker = started.broker()
            broker.api("PUT", f"/api/vhosts/{quoted}", {})
            broker.api("PUT", f"/api/permissions/{quoted}/{broker.user}",
                       {"configure": ".*", "write": ".*", "read": ".*"})
            b = Bench(work, broker, ceph, vhost)
            nodes = started.nodes if kind == "cluster" else [started]
            b.services["broker"] = [p.pid for node in nodes for p in (node.proc, node.epmd)
                                    if p is not None]
            for downloads in args.downloads:
                for fetch in args.fetch:
                    r = throughput(b, args.events, args.size, downloads, args.repositories,
                                   processes=fetch == "processes")
                    name = f"{kind} downloads={downloads}" + \
                        ("" if fetch == "processes" else " fetch=threads")
                    results[name] = r
                    print(f"{kind} broker, downloads={downloads} fetch={fetch} "
                          f"repositories={args.repositories}: raw S3 GET {r['raw']:.0f}/s "
                          f"with the {r['raw_client']} GET (before {r['raw_before']:.0f}, "
                          f"after {r['raw_after']:.0f}; boto3 {r['raw_boto3']:.0f}/s, "
                          f"adapter {r['raw_adapter']:.0f}/s), consumer "
                          f"{r['consumer']:.0f} events/s, ratio {r['ratio']:.2f} "
                          f"(target >= 0.8; to boto3's rate {r['ratio_boto3']:.2f})",
                          flush=True)
                    print("  CPU per GET or event, ms: " + "; ".join(
                        f"{what}: " + ", ".join(f"{n} {v:.2f}" for n, v in ms.items())
                        + f", all {sum(ms.values()):.2f}"
                        for what, ms in r["cpu_ms"].items()), flush=True)
        if len(kinds) == 2:
            for downloads in args.downloads:
                plain = results[f"plain downloads={downloads}"]["consumer"]
                tls_cluster = results[f"cluster downloads={downloads}"]["consumer"]
                results[f"cluster/plain downloads={downloads}"] = tls_cluster / plain
                print(f"downloads={downloads}: TLS cluster / plain node = "
                      f"{tls_cluster / plain:.2f}", flush=True)
        assert b is not None
        if args.gib > 0:
            g = one_gib(b, int(args.gib * (1 << 30)))
            results["one_gib"] = g
            print(f"{args.gib:g} GiB object: staged in {g['seconds']:.1f}s, peak RSS of one "
                  f"process {g['before']:.0f} -> {g['after']:.0f} MiB, growth "
                  f"{g['growth']:.1f} MiB (target < 64 MiB), content "
                  f"{'intact' if g['intact'] else 'CORRUPT'}",
                  flush=True)
        print(json.dumps(results, indent=1))
        ok = True
    finally:
        if not ok and (work / "ceph" / "log").is_dir():
            kept = Path(tempfile.mkdtemp(prefix="bench-consumers-ceph-log-"))
            subprocess.run(["cp", "-a", str(work / "ceph" / "log"), str(kept)], check=False)
            print(f"failed: Ceph logs kept in {kept}", file=sys.stderr)
        if ceph is not None:
            ceph.stop()
        for started in brokers:
            started.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    with sigterm_as_interrupt():  # the clean-up in main's finally runs on SIGTERM too
        main()
