"""Helpers of the cvmfs-repo-consumers tests: real RGW events into real RabbitMQ.

Each test session gets its own RabbitMQ virtual host (``conftest.vhost``): the
RGW topics push to ``amqp://127.0.0.1:5672/<vhost>``, so the ``notification``
exchange the daemon lists is ours alone, whatever else runs on the machine's
broker (RGW keeps one AMQP connection per push URL, so another vhost is also
another connection: no "exchange mismatch"). Repositories are provisioned by
the real :class:`cvmfs_publisher.provisioning.provisioner.Provisioner` (Vault keys in
OpenBao, ``mkfs`` on the cvmfs_server double, queue, bucket, topic,
notification, ``created`` announcement) and deprovisioned by it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from cvmfs_publisher.adapters import amqp
from cvmfs_publisher.adapters.cvmfs import CvmfsServer
from cvmfs_publisher.adapters.rabbitmq_api import ManagementAPI
from cvmfs_publisher.adapters.rgw import RGW
from cvmfs_publisher.adapters.vault import VaultClient
from cvmfs_publisher.core import config as config_mod
from cvmfs_publisher.core import logs
from cvmfs_publisher.core.config import Config
from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.daemons.repo_consumers import NAME, RepoConsumers
from cvmfs_publisher.provisioning.messages import ProvisionRequest
from cvmfs_publisher.provisioning.provisioner import Provisioner
from cvmfs_publisher.staging.area import Staging
from tests.conftest import DOMAIN, REPO_ROOT, Stack, unique_label

DATA = REPO_ROOT / "tests" / "data" / "events"
PUT_EVENT = DATA / "ceph-16.2.15-ObjectCreated-Put.json"
KEYS = {
    "publicKey": "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0B\n-----END PUBLIC KEY-----\n",
    "certificateKey": "-----BEGIN CERTIFICATE-----\nMIIC+zCCAeOgAwIB\n-----END CERTIFICATE-----\n",
    "gatewayKey": "plain_text gwkey1 GATEWAYSECRET-0123456789abcdef\n",
}


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- staging view


@dataclass(frozen=True)
class State:
    """The staged state of one path, comparable across runs."""

    op: str
    mode: int = 0
    digest: str = ""  # sha256 of the object (put/ingest) or of the target (symlink)
    target: str = ""
    compression: str = ""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def staged(staging_dir: str | Path, repo: str) -> dict[str, State]:
    """``{path: State}`` of every pending entry (objects hashed, never trusted blindly)."""
    st = Staging(staging_dir, repo)
    out: dict[str, State] = {}
    for e in st.pending_entries():
        if e.op in ("put", "ingest"):
            try:
                digest = file_sha(st.object_path(e))
            except FileNotFoundError:
                digest = "MISSING-OBJECT"
            out[e.path] = State(e.op, e.mode if e.op == "put" else 0, digest,
                                compression=e.compression if e.op == "ingest" else "")
        elif e.op == "symlink":
            out[e.path] = State("symlink", e.mode, target=e.target)
        else:
            out[e.path] = State(e.op)
    return out


def put_state(data: bytes, mode: int = 0o644) -> State:
    return State("put", mode, sha(data))


# --------------------------------------------------------------------------- AMQP


def amqp_connection(cfg: Config) -> pika.BlockingConnection:
    """The daemons' own connection (TLS and every node of a cluster, as configured)."""
    return amqp.connect(cfg.amqp, "tests")


def queue_counts(cfg: Config, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) from a passive declare (the API lags by seconds)."""
    try:
        conn = amqp_connection(cfg)
    except pika.exceptions.AMQPError:
        return (-1, 0)
    try:
        m = conn.channel().queue_declare(queue, passive=True).method
        return m.message_count, m.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return (-1, 0)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def unacked(env: Env, queue: str) -> int:
    q = env.mgmt.queue(queue) or {}
    return int(q.get("messages_unacknowledged", 0) or 0)


def publish(cfg: Config, routing_key: str, bodies: list[bytes], exchange: str | None = None
            ) -> None:
    """Publish raw bodies as RGW does (persistent, to the notification exchange)."""
    conn = amqp_connection(cfg)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(exchange if exchange is not None else cfg.amqp.notification_exchange,
                             routing_key, body, pika.BasicProperties(delivery_mode=2),
                             mandatory=True)
    finally:
        conn.close()


def drain(cfg: Config, queue: str, expect: int, timeout: float = 30.0) -> list[bytes]:
    """Consume and ack ``expect`` messages of ``queue`` (test side), in order."""
    conn = amqp_connection(cfg)
    got: list[bytes] = []
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=100)
        ch.basic_consume(queue, lambda c, m, p, body: (got.append(body),
                                                       c.basic_ack(m.delivery_tag)))
        deadline = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
        conn.process_data_events(time_limit=0.3)  # anything beyond what we expected
    finally:
        conn.close()
    return got


def dead_letters(cfg: Config) -> list[tuple[dict[str, Any], bytes]]:
    """Everything in the dead-letter queue, (headers, body), removed from it."""
    conn = amqp_connection(cfg)
    out = []
    try:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(cfg.amqp.dead_letter_queue, auto_ack=True)
            if method is None:
                break
            out.append((dict(props.headers or {}), body))
    except pika.exceptions.ChannelClosedByBroker:
        pass
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    return out


def event_body(bucket: str, key: str, name: str = "ObjectCreated:Put") -> bytes:
    """A record shaped exactly like a captured RGW one, with our bucket and key."""
    doc = json.loads(PUT_EVENT.read_bytes())
    rec = doc["Records"][0]
    rec["eventName"] = name
    rec["s3"]["bucket"]["name"] = bucket
    rec["s3"]["object"]["key"] = key
    return json.dumps(doc, ensure_ascii=False).encode()


# --------------------------------------------------------------------------- the environment


@dataclass
class Repo:
    label: str
    repository: str
    subject: str


@dataclass
class Env:
    """One test's stack: configuration, RGW client, provisioned repositories."""

    stack: Stack
    cfg: Config
    openbao: Any
    rgw: RGW
    mgmt: ManagementAPI
    warm_topics: Any = None  # tests.conftest.WarmTopics: labels whose topic RGW took up
    repos: list[Repo] = field(default_factory=list)

    @property
    def staging_dir(self) -> Path:
        return Path(self.cfg.cvmfs.staging_dir)

    @property
    def s3(self) -> Any:
        return self.rgw.s3

    # -- repositories --------------------------------------------------------------

    def _provisioner(self, cfg: Config | None = None) -> Provisioner:
        cfg = cfg or self.cfg
        return Provisioner(cfg, VaultClient(cfg.vault), self.rgw, CvmfsServer(cfg.cvmfs),
                           self.mgmt)

    def provision(self, label: str | None = None, cfg: Config | None = None) -> Repo:
        """Provision for real (publisher-consumer's steps); announces ``created``.

        ``cfg`` (default: the test's) lets a test announce on another exchange.
        """
        cfg = cfg or self.cfg
        if label is None and self.warm_topics is not None:
            rgw = self.rgw if cfg is self.cfg else RGW(cfg.s3, cfg.rgw)
            label = self.warm_topics.label(rgw, cfg.amqp.notification_exchange, "rc-")
        label = label or unique_label("rc-")
        repo = Repo(label, f"{label}.{DOMAIN}", "0f1e2d3c-" + unique_label("s"))
        self.openbao.put_keys(f"{repo.subject}/cvmfs_keys/{repo.repository}", KEYS)
        if not self.rgw.bucket_exists(label):  # it may hold data already (a migration)
            self.rgw.s3.create_bucket(Bucket=label)
        self.repos.append(repo)
        conn = amqp_connection(self.cfg)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            amqp.declare_common(ch, cfg.amqp)  # as publisher-consumer's session does
            # Provisioner publishes the announcement with mandatory=True: without a
            # bound queue (no consumers daemon running yet) it is unroutable and
            # provisioning fails. A sink queue stands for "someone listens".
            sink = f"{cfg.amqp.control_exchange}.sink"
            ch.queue_declare(sink, arguments={"x-max-length": 100})
            ch.queue_bind(sink, cfg.amqp.control_exchange, routing_key="#")
            self._provisioner(cfg).create(self._request("create", repo), conn, ch)
        finally:
            conn.close()
        self.wait_topic_live(repo, cfg)
        return repo

    def wait_topic_live(self, repo: Repo, cfg: Config | None = None,
                        timeout: float = 90.0) -> float:
        """Wait until RGW delivers the new topic's events; returns the seconds waited.

        RGW 16.2 takes up a new persistent topic's queue at its next scan of the
        queue list, every 30 s (``Q_LIST_UPDATE_MSEC`` in rgw_notify.cc, not
        configurable in 16.2): until then events wait in RGW (delayed, not lost;
        shared/ceph/README.md item 12). Tests about the daemons, not about that
        delay, start once it is over. The probe goes through a second bucket
        notification (Id ``warm-up``, prefix ``warm-up/``) on the same topic, so
        it never reaches staging, and is seen on a queue of our own bound like
        the repository's; it is then removed, with its event in the repository
        queue.
        """
        cfg = cfg or self.cfg
        probe_rgw = RGW(cfg.s3, dataclasses.replace(cfg.rgw, notification_id="warm-up"))
        arn = probe_rgw.find_topic(repo.label)
        assert arn, f"no topic for {repo.label}"
        conn = amqp_connection(cfg)
        t0 = time.monotonic()
        try:
            ch = conn.channel()
            watch = ch.queue_declare("", exclusive=True).method.queue
            ch.queue_bind(watch, cfg.amqp.notification_exchange, routing_key=repo.label)
            probe_rgw.put_notification(repo.label, arn, "warm-up/")
            self.s3.put_object(Bucket=repo.label, Key="warm-up/probe", Body=b"probe")

            def delivered() -> bool:
                return ch.basic_get(watch, auto_ack=True)[0] is not None
            wait_until(f"RGW delivering the events of topic {repo.label}", delivered,
                       timeout, 0.2)
            waited = time.monotonic() - t0
            probe_rgw.delete_notification(repo.label)
            self.s3.delete_object(Bucket=repo.label, Key="warm-up/probe")
            ch.queue_purge(repo.label)  # the probe's event, if no daemon took it
        finally:
            conn.close()
        return waited

    def deprovision(self, repo: Repo) -> None:
        conn = amqp_connection(self.cfg)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            self._provisioner().delete(self._request("delete", repo), conn, ch)
        finally:
            conn.close()

    @staticmethod
    def _request(action: str, repo: Repo) -> ProvisionRequest:
        return ProvisionRequest(action, "alice", repo.subject, repo.repository, "personal")

    def cleanup(self) -> None:
        problems = []
        for repo in self.repos:
            try:
                self.deprovision(repo)
            except Exception as exc:  # e.g. RGW just restarted (it then hangs on this)
                problems.append(f"deprovision {repo.label}: {exc!r}")
                self.delete_queues(repo)
            try:
                self.empty_bucket(repo.label)
                self.s3.delete_bucket(Bucket=repo.label)
            except Exception as exc:
                problems.append(f"bucket {repo.label}: {exc!r}")
        if problems:
            print("cleanup problems:", *problems, sep="\n  ")

    def delete_queues(self, repo: Repo) -> None:
        """At least unbind the repository: later daemons of the session must not see it."""
        conn = amqp_connection(self.cfg)
        try:
            ch = conn.channel()
            ch.queue_delete(repo.label)
        finally:
            conn.close()

    def empty_bucket(self, bucket: str) -> None:
        """Single delete_object calls: DeleteObjects crashes this radosgw (README)."""
        paginator = self.s3.get_paginator("list_objects_v2")
        with ThreadPoolExecutor(16) as pool:
            for page in paginator.paginate(Bucket=bucket):
                keys = [obj["Key"] for obj in page.get("Contents", []) or []]
                list(pool.map(lambda k: self.s3.delete_object(Bucket=bucket, Key=k), keys))
        uploads = self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) or []
        for up in uploads:
            self.s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])

    # -- S3 ---------------------------------------------------------------------------

    def put(self, repo: Repo, key: str, data: bytes, **kw: Any) -> None:
        self.s3.put_object(Bucket=repo.label, Key=key, Body=data, **kw)

    def put_many(self, repo: Repo, items: dict[str, bytes], threads: int = 32) -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda kv: self.put(repo, kv[0], kv[1]), items.items()))

    def staged(self, repo: Repo, staging_dir: str | Path | None = None) -> dict[str, State]:
        return staged(staging_dir or self.staging_dir, repo.repository)

    def wait_staged(self, repo: Repo, expected: dict[str, State], timeout: float = 30.0,
                    staging_dir: str | Path | None = None, exact: bool = False
                    ) -> dict[str, State]:
        """Wait until every expected path is staged as expected (and nothing else if exact)."""
        last: dict[str, State] = {}

        def check() -> bool:
            nonlocal last
            last = self.staged(repo, staging_dir)
            ok = all(last.get(p) == s for p, s in expected.items())
            return ok and (not exact or set(last) == set(expected))
        try:
            wait_until("staged state", check, timeout, 0.1)
        except AssertionError:
            wrong = {p: (last.get(p), s) for p, s in expected.items() if last.get(p) != s}
            extra = sorted(set(last) - set(expected)) if exact else []
            raise AssertionError(f"staging differs: {len(wrong)} wrong/missing, e.g. "
                                 f"{list(wrong.items())[:3]}; extra {extra[:5]}") from None
        return last

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(Path(self.cfg.log.dir).glob(f"{NAME}.log*")))

    def status(self) -> dict[str, Any]:
        path = Path(self.cfg.status.dir) / f"{NAME}.json"
        return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- running the daemon


@contextlib.contextmanager
def running(cfg: Config, *queues: str, rgw: RGW | None = None) -> Iterator[RepoConsumers]:
    """The daemon in a thread, consuming ``queues`` before the block starts."""
    logs.setup(NAME, cfg.log.dir, "DEBUG", stdout=False, secrets=config_mod.secret_values(cfg))
    status = StatusDocument(Path(cfg.status.dir) / f"{NAME}.json", NAME, 0.1)
    daemon = RepoConsumers(cfg, status, rgw=rgw)
    thread = threading.Thread(target=daemon.run, name="repo-consumers", daemon=True)
    thread.start()
    try:
        for q in queues:
            wait_until(f"consumer on {q}", lambda q=q: queue_counts(cfg, q)[1] >= 1, 20)
        yield daemon
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "cvmfs-repo-consumers did not stop"


class Process:
    """The daemon as a subprocess (for SIGKILL, SIGTERM and memory measurements)."""

    def __init__(self, stack: Stack, name: str, overrides: dict[str, dict[str, Any]],
                 module: str = "cvmfs_publisher.daemons.repo_consumers") -> None:
        self.module = module
        self.config = stack.write(f"{name}.yaml", **overrides)
        self.env = stack.subprocess_env()
        self.out = stack.workdir / f"{name}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config)],
                env=self.env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def memory(self) -> dict[str, int]:
        """VmRSS / VmHWM (peak RSS) in bytes, from /proc."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
        return out

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.terminate()
        if self.alive():
            self.kill()


def tree_snapshot(root: Path, exclude: list[Path]) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of everything under ``root`` except ``exclude``."""
    out = {}
    ex = [str(p) for p in exclude]
    for dirpath, dirnames, filenames in os.walk(root):
        if any(dirpath == e or dirpath.startswith(e + os.sep) for e in ex):
            dirnames[:] = []
            continue
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            if any(p == e for e in ex):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


class Pattern:
    """``size`` bytes of a repeated random block, hashed as they are read (no big buffer).

    An upload body for large-object tests and benchmarks: constant memory.
    """

    def __init__(self, size: int) -> None:
        self.size, self.pos = size, 0
        self.block = random.Random(7).randbytes(1 << 20)
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        left = self.size - self.pos
        n = left if size is None or size < 0 else min(size, left)
        parts = []
        while n > 0:
            off = self.pos % len(self.block)
            piece = self.block[off:off + n]
            parts.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        data = b"".join(parts)
        self.hash.update(data)
        return data
