#!/usr/bin/env python3
"""B7: many repositories on one host (issue 14).

Starts a RabbitMQ node of its own (the machine's broker is left alone),
OpenBao, a one-node Ceph RGW and the cvmfs_server test double, provisions
``--count`` repositories through the real publisher-consumer daemon (keys
in Vault and buckets are prepared first, as an operator would), then runs
the consumers and the sync daemon as real processes with the production
defaults (retry delays, refresh interval, publishing windows) and prints:

- RabbitMQ memory, Erlang processes and queue count: before, after the
  provisioning, after the consumers subscribed (they declare what a
  repository needs for retries);
- the time to provision the repositories (``--provisioners`` daemons share
  the publisher queue; 1 is the production set-up);
- the consumers daemon's and the sync daemon's idle CPU (share of one core,
  targets < 2 %) and the consumers' RSS (target < 300 MiB); then the
  anti-entropy's share, which an idle window of a minute does not see (every
  repository reconciled every ``consumers.reconcile_interval``), from the CPU
  of its dry run on 50 repositories;
- the time from a new repository's ``created`` announcement to a consumer
  on its queue (target < 5 s);
- one hot repository receiving ``--hot`` uploads vs a quiet repository's
  single upload: the quiet upload's PUT -> published latency under that load
  minus its latency alone, p95 over ``--trials`` trials (target <= 1 s); and,
  as its reference, RGW's event delay for a quiet topic under the same load
  (a probe bucket, its events on a queue the daemons do not serve) and
  the same delay without it: the publisher's own share.

Figures only, no assertions. Leaves nothing behind, also on failure, Ctrl-C
or SIGTERM (daemons, mounts, services, their temporary directory), except
the logs of a failed run (the daemons', RabbitMQ's, Ceph's), copied to a
directory it names. As root, like the tests (the double mounts overlays):

    .venv/bin/python bench/bench_scale.py [--count 1000] [--provisioners 1]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from cvmfs_publisher.adapters import amqp  # noqa: E402
from cvmfs_publisher.adapters.rgw import RGW  # noqa: E402
from cvmfs_publisher.pipeline import reconcile  # noqa: E402
from devstack.ceph import Ceph  # noqa: E402
from devstack.common import descendants, idle_cpu, p95, sigterm_as_interrupt, wait_for  # noqa: E402
from devstack.rabbitmq import Broker  # noqa: E402
from devstack.stack import DOMAIN, LocalServices, local_services, unique_label  # noqa: E402
from tests.cvmfs_server_double import published_tree  # noqa: E402


def wait(check: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    wait_for(what, lambda: bool(check()), timeout, interval=interval)


def rss_mib(pid: int) -> str:
    """A daemon's memory: its RSS, and with processes of its own their PSS summed
    (shared pages counted once, split among the processes sharing them)."""
    def field(p: int, name: str, where: str) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/{where}").read_text().splitlines():
                if line.startswith(name):
                    return int(line.split()[1]) / 1024
        return 0.0
    helpers = descendants(pid)
    own = f"{field(pid, 'VmRSS:', 'status'):.0f} MiB"
    if not helpers:
        return own
    pss = sum(field(p, "Pss:", "smaps_rollup") for p in [pid, *helpers])
    return f"{own} (with its {len(helpers)} processes: PSS {pss:.0f} MiB)"


def broker_state(broker: Broker) -> str:
    """Memory, processes and queues of the node (its statistics come every 5 s)."""
    def node_stats() -> dict:
        return broker.api("GET", "/api/nodes")[0]  # type: ignore[index]
    wait(lambda: "mem_used" in node_stats(), 60, "RabbitMQ node statistics", 0.5)
    node = node_stats()
    queues = broker.api("GET", "/api/queues?columns=name,type")
    by_type: dict[str, int] = {}
    for q in queues:  # type: ignore[union-attr]
        by_type[q.get("type", "?")] = by_type.get(q.get("type", "?"), 0) + 1
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(by_type.items()))
    return (f"memory {node['mem_used'] / 2**20:.0f} MiB, {node['proc_used']} Erlang processes, "
            f"{len(queues)} queues ({kinds or 'none'})")  # type: ignore[arg-type]


def consumed_queues(broker: Broker) -> dict[str, int]:
    return {q["name"]: q.get("consumers", 0)
            for q in broker.api("GET", "/api/queues?columns=name,consumers", timeout=60)}  # type: ignore[union-attr]


class Announcements:
    """An exclusive queue on the control exchange: which repositories were created, when."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.created: dict[str, float] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _run(self) -> None:
        conn = amqp.connect(self.cfg.amqp, "bench-announcements")
        ch = conn.channel()
        ch.exchange_declare(self.cfg.amqp.control_exchange, exchange_type="topic", durable=True)
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, self.cfg.amqp.control_exchange, routing_key="repository.created.#")

        def on_message(ch, method, props, body) -> None:
            self.created[method.routing_key.rsplit(".", 1)[-1]] = time.monotonic()
        ch.basic_consume(q, on_message, auto_ack=True)
        self._ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.05)
        conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Probe:
    """RGW's event delay for a quiet topic, measured beside the quiet uploads.

    A bucket with a persistent topic exactly like a repository's (the same
    push endpoint, so the same AMQP connection of radosgw, and the same
    exchange), whose events go to a quorum queue like a repository's that
    the consumers do not serve: its name, ``bench_probe``, is no repository
    label, so their discovery skips it. This bench consumes it and notes
    when each object's event arrives. A probe object PUT next to each quiet
    upload tells how late RGW and the broker delivered an event of a quiet
    topic under the same load, so that the quiet upload's latency can be
    read without it. A second probe differs only in its push endpoint's host
    name, the broker's other loopback name (the same broker, vhost and
    exchange): radosgw keeps one AMQP connection per host, port and vhost,
    so it tells what a connection of its own changes for a quiet topic.
    """

    def __init__(self, cfg, rgw: RGW, queue: str = "bench_probe",
                 push_endpoint: str | None = None) -> None:
        """``push_endpoint``: another URL than the repositories' (for another connection)."""
        self.cfg, self.rgw, self.queue = cfg, rgw, queue
        self.bucket = unique_label("probe")
        self.put_at: dict[str, float] = {}
        self.arrived: dict[str, float] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(30)
        rgw.s3.create_bucket(Bucket=self.bucket)
        if push_endpoint is None:
            arn = rgw.create_topic(self.bucket, cfg.amqp.notification_exchange)
        else:
            attributes = {**rgw.topic_attributes(cfg.amqp.notification_exchange),
                          "push-endpoint": push_endpoint}
            arn = rgw.sns.create_topic(Name=self.bucket, Attributes=attributes)["TopicArn"]
        rgw.put_notification(self.bucket, arn, cfg.s3.prefix)

    def _run(self) -> None:
        conn = amqp.connect(self.cfg.amqp, "bench-probe")
        ch = conn.channel()
        exchange = self.cfg.amqp.notification_exchange
        ch.exchange_declare(exchange, exchange_type="topic", durable=True)  # as the daemons
        # a quorum queue like a repository's: its messages wait for the Raft log too
        ch.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(self.queue, exchange, routing_key=self.bucket)

        def on_message(ch, method, props, body) -> None:
            now = time.monotonic()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                for record in json.loads(body)["Records"]:
                    self.arrived.setdefault(record["s3"]["object"]["key"], now)
        ch.basic_consume(self.queue, on_message, auto_ack=True)
        self._ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.05)
        conn.close()

    def put(self, name: str) -> None:
        key = f"{self.cfg.s3.prefix}{name}"
        self.put_at[key] = time.monotonic()
        self.rgw.s3.put_object(Bucket=self.bucket, Key=key, Body=b"p")

    def delay(self, name: str, timeout: float = 300) -> float | None:
        """PUT -> event delivered, in s (None: not delivered within ``timeout``)."""
        key = f"{self.cfg.s3.prefix}{name}"
        deadline = time.monotonic() + timeout
        while key not in self.arrived and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.arrived[key] - self.put_at[key] if key in self.arrived else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def start(daemon: str, cfg_file: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", f"cvmfs_publisher.daemons.{daemon}",
                                 "--config", str(cfg_file)], env=env, stdout=out, stderr=out)


def keep_logs(work: Path) -> Path:
    """Copy a failed run's logs out of ``work`` (which is removed) into a new directory."""
    kept = Path(tempfile.mkdtemp(prefix="bench-scale-logs-"))
    for out in work.glob("*.out"):  # the daemons' stdout and stderr
        shutil.copy2(out, kept)
    for name, logs in (("daemons", work / "log"), ("rabbitmq", work / "rabbitmq" / "log"),
                       ("ceph", work / "ceph" / "log")):
        if logs.is_dir():
            shutil.copytree(logs, kept / name, symlinks=True, dirs_exist_ok=True)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--provisioners", type=int, default=1)
    parser.add_argument("--hot", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the logs of a successful run too (to trace its outliers)")
    args = parser.parse_args()
    with sigterm_as_interrupt():  # the clean-up in run's finally runs on SIGTERM too
        run(args)


def run(args: argparse.Namespace) -> None:
    with local_services("bench-scale-") as services:
        procs: dict[str, subprocess.Popen] = {}
        announcements: list[Announcements | Probe] = []
        try:
            measure(services, args, procs, announcements)
            if args.keep_logs:
                print(f"logs kept in {keep_logs(services.workdir)}", flush=True)
        except BaseException:
            print(f"failed: logs kept in {keep_logs(services.workdir)}", file=sys.stderr)
            raise
        finally:
            for ann in announcements:
                ann.close()
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def measure(services: LocalServices, args: argparse.Namespace,
            procs: dict[str, subprocess.Popen], announcements: list[Announcements]) -> None:
    """Provision ``args.count`` repositories, start the daemons, take the figures."""
    work, double, node, bao, ceph = (services.workdir, services.double, services.node,
                                     services.bao, services.ceph)
    broker, stack = services.broker, services.stack
    stack.raw["log"]["level"] = "INFO"
    del stack.raw["amqp"]["retry_delays"]  # production defaults from here on
    stack.raw["sync"] = {}
    stack.raw["status"]["interval"] = 5.0
    cfg_file = stack.write()
    cfg = stack.config()
    env = stack.subprocess_env()
    rgw = RGW(cfg.s3, cfg.rgw)
    print(f"RabbitMQ {node.name}: before: {broker_state(broker)}", flush=True)

    labels = [unique_label("s") for _ in range(args.count + 1)]
    labels, newcomer = labels[:-1], labels[-1]

    def prepare(label: str) -> None:
        bao.put_keys(f"subj/cvmfs_keys/{label}.{DOMAIN}", {
            "publicKey": "p", "certificateKey": "c", "gatewayKey": "g"})
        rgw.s3.create_bucket(Bucket=label)
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(prepare, [*labels, newcomer]))
    print(f"keys and buckets for {args.count + 1} repositories: "
          f"{time.monotonic() - t0:.1f} s (outside the daemons)", flush=True)

    ann = Announcements(cfg)
    announcements.append(ann)
    probe = Probe(cfg, rgw)  # long before the trials: a new topic's first events come late
    announcements.append(probe)
    # radosgw 16.2 keys its AMQP connections by host, port and vhost as written:
    # the broker's other loopback name is another connection to the same broker
    parts = urllib.parse.urlsplit(rgw.push_endpoint())
    cred, at, where = parts.netloc.rpartition("@")
    where = where.replace(str(parts.hostname), "localhost" if parts.hostname == "127.0.0.1"
                          else "127.0.0.1", 1)
    other = Probe(cfg, rgw, "bench_probe_other",
                  urllib.parse.urlunsplit(parts._replace(netloc=cred + at + where)))
    announcements.append(other)
    for i in range(args.provisioners):
        procs[f"publisher_consumer-{i}"] = start("publisher_consumer", cfg_file, env,
                                                 work / f"publisher-{i}.out")
    conn = amqp.connect(cfg.amqp, "bench")
    ch = conn.channel()
    ch.confirm_delivery()
    wait(lambda: consumed_queues(broker).get(cfg.amqp.publisher_queue, 0)
         >= args.provisioners, 60, "publisher-consumer", 0.2)
    t0 = time.monotonic()
    for label in labels:
        amqp.publish_confirmed(ch, "", cfg.amqp.publisher_queue,
                               f"a,subj,{label}.{DOMAIN},P".encode())
    conn.close()  # a blocking connection left idle would miss its heartbeats
    wait(lambda: all(label in ann.created for label in labels), 7200,
         "every repository provisioned", 0.5)
    took = max(ann.created.values()) - t0
    print(f"provisioned {args.count} repositories with {args.provisioners} "
          f"publisher-consumer(s): {took:.1f} s, {took / args.count * 1000:.0f} ms each "
          f"(the double's mkfs included)", flush=True)
    print(f"RabbitMQ after provisioning: {broker_state(broker)}", flush=True)

    t0 = time.monotonic()
    procs["repo_consumers"] = start("repo_consumers", cfg_file, env, work / "consumers.out")
    procs["repo_sync"] = start("repo_sync", cfg_file, env, work / "sync.out")
    def all_consumed() -> bool:  # one listing per look: 1,000 queues take a while
        consumers = consumed_queues(broker)
        return all(consumers.get(label, 0) > 0 for label in labels)
    wait(all_consumed, 900, "a consumer on every repository queue", 1.0)
    print(f"consumers subscribed to {args.count} queues in {time.monotonic() - t0:.1f} s",
          flush=True)
    consumers_log = work / "log" / "cvmfs-repo-consumers.log"

    def reconciled() -> bool:  # each repository's first anti-entropy, on becoming active
        with consumers_log.open(errors="replace") as fh:
            return sum("step=anti-entropy" in line for line in fh) >= args.count
    wait(reconciled, 900, "the first anti-entropy of every repository", 1.0)
    print(f"first anti-entropy of every repository done {time.monotonic() - t0:.1f} s after "
          f"the daemons started", flush=True)
    time.sleep(10)  # the rest of the start-up work (recovery scan, first listing) is over
    print(f"RabbitMQ with the consumers running: {broker_state(broker)}", flush=True)
    cpu = idle_cpu({"repo_consumers": procs["repo_consumers"].pid,
                    "repo_sync": procs["repo_sync"].pid}, args.idle_seconds)
    print(f"idle over {args.idle_seconds:.0f} s: consumers {cpu['repo_consumers'] * 100:.2f} % "
          f"of a core (target < 2 %), RSS {rss_mib(procs['repo_consumers'].pid)} "
          f"(target < 300 MiB); sync {cpu['repo_sync'] * 100:.2f} % of a core "
          f"(target < 2 %), RSS {rss_mib(procs['repo_sync'].pid)}", flush=True)
    # What a minute's idle window does not see: every repository is reconciled with its
    # bucket every consumers.reconcile_interval (+-10 %), spread over that interval. Its
    # CPU, from the same code run here (a dry run: the daemon owns the staging).
    sample = labels[:50]

    def dry_runs(s3: object) -> float:
        c0 = time.process_time()
        for label in sample:
            reconcile.reconcile(cfg, f"{label}.{DOMAIN}", dry_run=True, s3=s3,
                                grace=cfg.consumers.reconcile_grace)
        return (time.process_time() - c0) / len(sample)

    per, boto = dry_runs(rgw), dry_runs(rgw.s3)  # the daemon's adapter; boto3's paginator
    every = cfg.consumers.reconcile_interval
    share = per * args.count / every
    print(f"anti-entropy: {per * 1000:.1f} ms of CPU per repository (its dry run, from the "
          f"bench; {boto * 1000:.1f} ms listing with boto3), {share * 100:.2f} % of a core for "
          f"{args.count} repositories every {every:.0f} s; consumers idle with it: "
          f"{(cpu['repo_consumers'] + share) * 100:.2f} % (target < 2 %)", flush=True)

    conn = amqp.connect(cfg.amqp, "bench")
    ch = conn.channel()
    ch.confirm_delivery()
    t0 = time.monotonic()
    amqp.publish_confirmed(ch, "", cfg.amqp.publisher_queue,
                           f"a,subj,{newcomer}.{DOMAIN},P".encode())
    wait(lambda: newcomer in ann.created, 120, "the new repository provisioned")
    created = ann.created[newcomer]

    def newcomer_consumed() -> bool:
        declared = amqp.passive_declare(conn, newcomer)  # None until it is declared
        return declared is not None and declared.consumer_count > 0
    wait(newcomer_consumed, 120, "a consumer on the new repository's queue")
    print(f"new repository: consumed {time.monotonic() - created:.2f} s after its "
          f"'created' announcement (target < 5 s; {created - t0:.2f} s to provision it)",
          flush=True)
    conn.close()

    hot_vs_quiet(rgw, ceph, double.root, labels[0], labels[1:1 + args.trials], args.hot,
                 work / "log", probe, other)
    pushing = [c for c in broker.api("GET", "/api/connections")  # type: ignore[union-attr]
               if (c.get("client_properties") or {}).get("product") == "rabbitmq-c"]
    print(f"radosgw's AMQP connections to the broker: {len(pushing)} (the repositories' "
          "push endpoint and the other probe's)", flush=True)
    # the download processes exist once there was something to download
    print(f"consumers after the hot/quiet phase: RSS {rss_mib(procs['repo_consumers'].pid)} "
          "(target < 300 MiB)", flush=True)


def hot_vs_quiet(rgw: RGW, ceph: Ceph, root: Path, hot: str, quiet: list[str],
                 uploads: int, logs: Path, probe: Probe, other: Probe) -> None:
    """The quiet repositories' single uploads, alone and while ``hot`` takes a burst.

    radosgw 16.2 segfaults now and then while it pushes notifications
    (shared/ceph/README.md): a trial it interrupts is counted and run again
    on a restarted radosgw.
    """
    puts: dict[tuple[str, str], float] = {}  # (repository, name): wall-clock time of the PUT
    #: (repository, name): (PUT -> published, the probe's PUT -> event delivered or None)
    samples: dict[tuple[str, str], tuple[float, float | None]] = {}
    #: (repository, name): the other-connection probe's PUT -> event delivered or None
    others: dict[tuple[str, str], float | None] = {}

    def quiet_upload(label: str, name: str) -> float:
        tree = Path(published_tree(root, f"{label}.{DOMAIN}"))
        t0 = time.monotonic()
        probe.put(f"{label}-{name}")
        other.put(f"{label}-{name}")
        puts[(f"{label}.{DOMAIN}", name)] = time.time()
        rgw.s3.put_object(Bucket=label, Key=f"cvmfs/q/{name}", Body=b"q" * 1024)
        wait((tree / "q" / name).exists, 300, f"{label} {name} published")
        took = time.monotonic() - t0
        samples[(f"{label}.{DOMAIN}", name)] = (took, probe.delay(f"{label}-{name}"))
        others[(f"{label}.{DOMAIN}", name)] = other.delay(f"{label}-{name}", timeout=60)
        return took

    def trial(pool: ThreadPoolExecutor, n: str, label: str) -> float:
        futures = [pool.submit(rgw.s3.put_object, Bucket=hot,
                               Key=f"cvmfs/hot/{n}/{i:04d}", Body=b"h" * 1024)
                   for i in range(uploads)]
        try:
            # the quiet upload lands while the hot repository's queue holds a backlog
            wait(lambda: sum(f.done() for f in futures) >= uploads // 5, 300, "hot burst")
            return quiet_upload(label, f"loaded-{n}")
        finally:
            for f in futures:
                with contextlib.suppress(Exception):
                    f.result()

    crashes = 0

    def surviving(what: str, run: Callable[[str], float], labels: list[str]) -> float:
        """``run(suffix)``, run again on a restarted radosgw (new keys) if it crashed.

        Only once the ``labels`` repositories' events flow again: a restarted
        radosgw takes its persistent queues back 30-90 s later (shared/ceph),
        a delay of RGW's that is not what the trial measures."""
        nonlocal crashes
        while True:
            try:
                return run(f"-{crashes}")
            except Exception as exc:
                if ceph.rgw_alive() or crashes >= 5:
                    raise
                crashes += 1
                print(f"  radosgw crashed during {what} ({type(exc).__name__}); "
                      f"restarting it and running it again", flush=True)
                ceph.start_rgw()
                ceph.wait_bucket_writes()
                for label in labels:
                    quiet_upload(label, f"warm-up-{crashes}")
                time.sleep(3)  # past the quiet window again (sync.quiet_seconds 2 s)

    alone = [surviving(f"{label}'s upload alone", lambda suffix, label=label: quiet_upload(
        label, "alone" + suffix), [label]) for label in quiet]
    loaded: list[float] = []
    with ThreadPoolExecutor(16) as pool:
        for n, label in enumerate(quiet, 1):
            loaded.append(surviving(f"trial {n}", lambda suffix, n=n, label=label: trial(
                pool, f"{n}{suffix}", label), [hot, label]))
    base = statistics.median(alone)
    delays = [x - base for x in loaded]
    print(f"quiet upload, PUT -> published: alone p50 {base:.2f} s p95 {p95(alone):.2f} s; "
          f"during a {uploads}-upload burst on another repository p50 "
          f"{statistics.median(loaded):.2f} s p95 {p95(loaded):.2f} s; delay p95 "
          f"{p95(delays):.2f} s over {len(quiet)} trials (target <= 1 s; "
          f"{crashes} radosgw crashes)", flush=True)
    # Without RGW's push: each upload's latency less its probe's event delay.
    of = {kind: {k: (took, d) for k, (took, d) in samples.items()
                 if k[1].startswith(kind) and d is not None} for kind in ("alone", "loaded")}
    alone_net = [took - d for took, d in of["alone"].values()]
    if alone_net and of["loaded"]:
        base_net = statistics.median(alone_net)
        pushed = {kind: [d for _, d in of[kind].values()] for kind in ("alone", "loaded")}
        print(f"  RGW's event delay for a quiet topic (a probe bucket's PUT beside each quiet "
              f"upload): alone p50 {statistics.median(pushed['alone']):.2f} s p95 "
              f"{p95(pushed['alone']):.2f} s, during the burst p50 "
              f"{statistics.median(pushed['loaded']):.2f} s p95 {p95(pushed['loaded']):.2f} s; "
              f"the delay without it (the publisher's share): p95 "
              f"{p95([t - d - base_net for t, d in of['loaded'].values()]):.2f} s over "
              f"{len(of['loaded'])} trials (target <= 1 s)", flush=True)
    for kind in ("alone", "loaded"):
        got = [d for k, d in others.items() if k[1].startswith(kind) and d is not None]
        if got:
            print(f"  the same delay through a radosgw connection of its own (the other "
                  f"probe), {kind}: p50 {statistics.median(got):.2f} s p95 {p95(got):.2f} s "
                  f"({len(got)} of {sum(k[1].startswith(kind) for k in others)} delivered "
                  f"within 60 s)", flush=True)
    found_all = stages(logs, puts)  # the daemons' logs read once, for both kinds
    for kind in ("alone", "loaded"):
        found = {k: v for k, v in found_all.items() if k[1].startswith(kind)}
        if kind == "loaded":
            # trial by trial: do the outliers of the quiet event and of the two probes match?
            def fmt(x: float | None) -> str:
                return "n/a" if x is None else f"{x:.2f}"
            print("  loaded trials, PUT -> staged / twin probe / other probe (s): " + "; ".join(
                f"{k[1]} at {datetime.datetime.fromtimestamp(puts[k]):%H:%M:%S} "
                f"{fmt(found[k][0] if k in found else None)}/{fmt(samples[k][1])}/"
                f"{fmt(others.get(k))}" for k in samples if k[1].startswith(kind)),
                flush=True)
        if not found:
            continue
        staged, fetch, published = (list(x) for x in zip(*found.values(), strict=True))
        # the event in the consumers before its fetch: PUT -> staged less the fetch and
        # the probe's delivery (RGW's push and the broker's routing of a quiet topic)
        waited = [to_staged - f - samples[k][1] for k, (to_staged, f, _) in found.items()
                  if k in samples and samples[k][1] is not None]
        print(f"  {kind}: PUT -> staged (RGW event + consumers) p50 "
              f"{statistics.median(staged):.2f} s p95 {p95(staged):.2f} s, of which the fetch "
              f"p50 {statistics.median(fetch):.2f} s p95 {p95(fetch):.2f} s"
              + (f" and before it, beyond the probe's delivery, p50 "
                 f"{statistics.median(waited):.2f} s p95 {p95(waited):.2f} s" if waited else "")
              + f"; staged -> publish logged (sync) p50 {statistics.median(published):.2f} s "
              f"p95 {p95(published):.2f} s", flush=True)


def _log_time(line: str) -> float:
    """A daemon log line's time stamp (``logging``'s asctime, local time) as epoch."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def stages(logs: Path, puts: dict[tuple[str, str], float]
           ) -> dict[tuple[str, str], tuple[float, float, float]]:
    """Where each quiet upload's latency went, from the daemons' log lines.

    ``{(repository, name): (PUT -> the consumers' outcome=staged line, the
    fetch's took= on it, that line -> the next outcome=published line of the
    sync daemon for the repository)}``.
    """
    staged_at: dict[tuple[str, str], tuple[float, float]] = {}
    with (logs / "cvmfs-repo-consumers.log").open(errors="replace") as fh:
        for line in fh:
            m = re.search(r'repository=(\S+) key="cvmfs/q/([^"]+)" outcome=staged.* '
                          r'took=([\d.]+)s', line)
            if m and (m[1], m[2]) in puts:
                staged_at.setdefault((m[1], m[2]), (_log_time(line), float(m[3])))
    published_at: dict[str, list[float]] = {}
    with (logs / "cvmfs-repo-sync.log").open(errors="replace") as fh:
        for line in fh:
            m = re.search(r"repository=(\S+) step=publish outcome=published", line)
            if m:
                published_at.setdefault(m[1], []).append(_log_time(line))
    out = {}
    for key, (t_staged, fetch) in staged_at.items():
        done = [t for t in published_at.get(key[0], []) if t >= t_staged]
        if done:
            out[key] = (t_staged - puts[key], fetch, done[0] - t_staged)
    return out


if __name__ == "__main__":
    main()
