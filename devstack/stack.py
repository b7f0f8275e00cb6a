"""A whole local stack's configuration: the one place that wires the services together.

The test fixtures, the benchmarks and the local demo all build their
configuration here, from the running services (``rabbitmq``, ``openbao``,
``ceph``) and a private root for the ``cvmfs_server`` test double.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvmfs_publisher.core import config as config_mod

REPO_ROOT = Path(__file__).resolve().parents[1]
DOUBLE = REPO_ROOT / "tests" / "cvmfs_server_double.py"
DOMAIN = "infn.it"


def unique_label(prefix: str = "t") -> str:
    """A label (bucket, topic, queue) no other test, demo or run uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class CvmfsDouble:
    """A private root for the cvmfs_server test double and the paths pointing into it."""

    root: Path
    command: Path

    def paths(self) -> dict[str, str]:
        return {
            "server_command": str(self.command),
            "repositories_dir": str(self.root / "etc/cvmfs/repositories.d"),
            "spool_dir": str(self.root / "var/spool/cvmfs"),
            "mount_dir": str(self.root / "cvmfs"),
            "keys_dir": str(self.root / "keys-shared"),
            "staging_dir": str(self.root / "data/cvmfs"),
        }


def make_double(root: Path) -> CvmfsDouble:
    """A ``cvmfs_server`` executable that runs the test double with its root set."""
    root.mkdir(parents=True, exist_ok=True)
    bindir = root / "bin"
    bindir.mkdir(exist_ok=True)
    cmd = bindir / "cvmfs_server"
    cmd.write_text(f'#!/bin/sh\nCVMFS_DOUBLE_ROOT="{root}" exec "{sys.executable}" '
                   f'"{DOUBLE}" "$@"\n')
    cmd.chmod(cmd.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    return CvmfsDouble(root, cmd)


@dataclass
class Stack:
    """Configuration of a local stack: a YAML mapping whose secrets live in files."""

    raw: dict[str, Any]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def config(self, **overrides: Any) -> config_mod.Config:
        return config_mod.from_mapping(merge(self.raw, overrides), env=self.env)

    def write(self, name: str = "publisher.yaml", **overrides: Any) -> Path:
        """Write a YAML file (secrets as *_file entries) for daemon subprocesses."""
        path = self.workdir / name
        path.write_text(yaml.safe_dump(merge(self.raw, overrides)))
        return path

    def subprocess_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CVMFS_PUBLISHER_")}
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT / "scripts"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
        return env

    def secrets(self) -> list[str]:
        """Every secret value in use (for scans of logs and status files)."""
        return [Path(v).read_text() for section in self.raw.values()
                for k, v in section.items() if k.endswith("_file") and "/secrets/" in str(v)]


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def build_stack(workdir: Path, broker: Any, bao: Any, ceph: Any, double: CvmfsDouble) -> Stack:
    """Configuration for daemons on these services; secrets written to 0600 files."""
    secrets = workdir / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    values = {"amqp_password": broker.password, "role_id": bao.role_id,
              "secret_id": bao.secret_id, "s3_access": ceph.access_key,
              "s3_secret": ceph.secret_key}
    for name, value in values.items():
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)
    raw = {
        "log": {"dir": str(workdir / "log"), "level": "DEBUG", "stdout": False},
        "status": {"dir": str(workdir / "status"), "interval": 0.2},
        "amqp": {
            "host": broker.host, "port": broker.port, "user": broker.user,
            "password_file": str(secrets / "amqp_password"),
            # TLS with verification (the default) on a TLS broker: never turned off
            "tls": broker.tls, "ca_file": broker.ca_file,
            "hosts": broker.hosts, "management_urls": broker.management_urls,
            "management_url": broker.management_url, "heartbeat": 10,
            "reconnect_initial": 0.2, "reconnect_max": 2.0,
            "publisher_queue": unique_label("pq-"),
            "control_exchange": unique_label("ctl-"),
            "dead_letter_exchange": unique_label("dlx-"),
            "dead_letter_queue": unique_label("dlq-"),
            "retry_prefix": unique_label("retry-"),
            "retry_delays": [1, 2],
        },
        "vault": {"url": bao.url, "role_id_file": str(secrets / "role_id"),
                  "secret_id_file": str(secrets / "secret_id"), "timeout": 3.0},
        "s3": {"endpoint_url": ceph.endpoint, "access_key_file": str(secrets / "s3_access"),
               "secret_key_file": str(secrets / "s3_secret"), "max_attempts": 1,
               "connect_timeout": 2.0, "read_timeout": 10.0},
        # RGW pushes to the broker as production does on the TLS cluster: amqps,
        # verified, with credentials (accepted over this plain-HTTP RGW only with
        # X-Forwarded-Proto, shared/ceph item 1). The single node's guest gets no
        # credentials in its topics: with them, radosgw 16.2.15 stopped answering
        # after its first crash in the suite (tests/provision/test_rgw_credentials
        # covers credentials there).
        # X-Forwarded-Proto always: once any topic holds credentials, RGW refuses
        # ListTopics without it (HTTP 403) for every client (shared/ceph item 1)
        "rgw": {"push_endpoint": broker.push_url(), "forwarded_https": True,
                **({"push_user": broker.user,
                    "push_password_file": str(secrets / "amqp_password")}
                   if broker.tls else {}),
                "amqp_ack_level": "broker", "persistent": True,
                "verify_ssl": broker.tls, "ca_location": broker.ca_file},
        "cvmfs": {**double.paths(), "domain": DOMAIN,
                  "stratum0_url": "http://stratum0.test/cvmfs",
                  "gateway_url": "http://gateway.test:4929/api/v1",
                  "command_timeout": 60.0},
        "publisher": {"max_attempts": 3},
        "sync": {"quiet_seconds": 0.5, "max_delay_seconds": 5.0, "poll_interval": 0.1,
                 "backoff_initial": 0.2, "backoff_max": 2.0},
    }
    return Stack(raw, workdir)


def unmount_double(root: Path) -> None:
    """Unmount everything the ``cvmfs_server`` test double mounted under ``root``."""
    if not root.exists():
        return
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.cvmfs_server_double import unmount_all  # noqa: PLC0415 - the double's own API
    unmount_all(root)


def tear_down(workdir: Path, double_root: Path, services: Sequence[Any] = (),
              cfg: config_mod.Config | None = None, broker: Any = None,
              labels: Iterable[str] = ()) -> None:
    """Remove what a local stack (the demo, a benchmark) left: nothing stays behind.

    In this order: the double's mounts (a bind mount and an overlay per
    repository), the objects on the shared broker (queues, exchanges,
    policies; skipped if the broker cannot be reached), the services
    (anything with ``stop()``: OpenBao, Ceph; their data lives in
    ``workdir``), then ``workdir`` itself. The daemons must be stopped first.
    """
    from .rabbitmq import cleanup_amqp  # noqa: PLC0415 - pika only when a broker is used

    unmount_double(double_root)
    if cfg is not None and broker is not None:
        with contextlib.suppress(Exception):  # a broker that is gone holds nothing of ours
            cleanup_amqp(cfg, broker, list(labels))
    for service in services:
        if service is not None:
            service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class LocalServices:
    """A benchmark's own services, all under ``workdir``, and the stack wired to them."""

    workdir: Path
    double: CvmfsDouble
    node: Any  # devstack.rabbitmq.RabbitNode
    bao: Any  # devstack.openbao.OpenBao
    ceph: Any  # devstack.ceph.Ceph
    stack: Stack

    @property
    def broker(self) -> Any:
        return self.node.broker()


@contextlib.contextmanager
def local_services(prefix: str, cluster: bool = False) -> Iterator[LocalServices]:
    """Start a RabbitMQ node (``cluster``: the three-node TLS cluster, verified against
    a throw-away CA), OpenBao and Ceph of our own; remove everything on exit.

    The benchmarks' one start-up: the clean-up runs on an error, on Ctrl-C
    and (under :func:`devstack.common.sigterm_as_interrupt`) on SIGTERM too,
    stopping whatever had started, so a failed start leaves nothing behind.
    The daemons a benchmark started must be stopped before the block ends.
    """
    from . import tls  # noqa: PLC0415 - the services only for the callers that run them
    from .ceph import Ceph  # noqa: PLC0415
    from .openbao import OpenBao  # noqa: PLC0415
    from .rabbitmq import RabbitCluster, RabbitNode  # noqa: PLC0415

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    double = make_double(workdir / "cvmfs-root")
    started: list[Any] = []
    try:
        if cluster:
            ca = tls.make_ca(workdir / "tls" / "ca")
            cert = tls.make_server_cert(workdir / "tls" / "server", ca, ("DNS:localhost",))
            node: Any = RabbitCluster(workdir / "cluster", cert).start()
        else:
            node = RabbitNode(workdir / "rabbitmq").start()
        started.append(node)
        bao = OpenBao(workdir / "openbao").start()
        started.append(bao)
        ceph = Ceph(workdir / "ceph").start()
        started.append(ceph)
        yield LocalServices(workdir, double, node, bao, ceph,
                            build_stack(workdir, node.broker(), bao, ceph, double))
    finally:  # topics, buckets and queues go with the services' directories
        tear_down(workdir, double.root, started[::-1])
