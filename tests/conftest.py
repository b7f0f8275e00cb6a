"""Shared fixtures: real services on loopback, started once per session.

Services come from ``cvmfs_publisher.devstack`` (the same code the local
demo uses): the machine's RabbitMQ (started if absent), an OpenBao dev
server, a one-node Ceph RGW. Only ``cvmfs_server`` is a test double
(``tests/cvmfs_server_double.py``).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cvmfs_publisher import config as config_mod
from cvmfs_publisher.devstack import ceph as ceph_mod
from cvmfs_publisher.devstack import openbao as bao_mod
from cvmfs_publisher.devstack import rabbitmq as rabbit_mod

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
DOUBLE = TESTS / "cvmfs_server_double.py"
DOMAIN = "infn.it"


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cvmfs-publisher-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def broker() -> rabbit_mod.Broker:
    return rabbit_mod.ensure_broker()


@pytest.fixture(scope="session")
def openbao(session_dir: Path) -> Iterator[bao_mod.OpenBao]:
    bao = bao_mod.OpenBao(session_dir / "openbao").start()
    yield bao
    bao.stop()


@pytest.fixture(scope="session")
def ceph(session_dir: Path) -> Iterator[ceph_mod.Ceph]:
    cluster = ceph_mod.Ceph(session_dir / "ceph").start()
    yield cluster
    cluster.stop()


def unique_label(prefix: str = "t") -> str:
    """A label (bucket, topic, queue) no other test or run uses."""
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
    """A wrapper executable that runs the double with its root set (like the real path)."""
    root.mkdir(parents=True, exist_ok=True)
    bindir = root / "bin"
    bindir.mkdir(exist_ok=True)
    cmd = bindir / "cvmfs_server"
    cmd.write_text(f'#!/bin/sh\nCVMFS_DOUBLE_ROOT="{root}" exec "{sys.executable}" '
                   f'"{DOUBLE}" "$@"\n')
    cmd.chmod(cmd.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    return CvmfsDouble(root, cmd)


@pytest.fixture
def cvmfs_double(tmp_path: Path) -> Iterator[CvmfsDouble]:
    double = make_double(tmp_path / "cvmfs-root")
    yield double
    try:
        from tests.cvmfs_server_double import unmount_all
    except ImportError:
        return
    unmount_all(double.root)


@dataclass
class Stack:
    """Everything a daemon under test needs: config mapping, env with secrets, files."""

    raw: dict[str, Any]
    env: dict[str, str]
    workdir: Path

    def config(self, **overrides: Any) -> config_mod.Config:
        raw = _merge(self.raw, overrides)
        return config_mod.from_mapping(raw, env=self.env)

    def write(self, name: str = "publisher.yaml", **overrides: Any) -> Path:
        """Write a YAML file (secrets as *_file entries) for a daemon subprocess."""
        path = self.workdir / name
        path.write_text(yaml.safe_dump(_merge(self.raw, overrides)))
        return path

    def subprocess_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CVMFS_PUBLISHER_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO_ROOT / "scripts") + os.pathsep + env.get("PYTHONPATH", "")
        return env


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.fixture
def stack(tmp_path: Path, broker: rabbit_mod.Broker, openbao: bao_mod.OpenBao,
          ceph: ceph_mod.Ceph, cvmfs_double: CvmfsDouble) -> Stack:
    """A configuration pointing at the session's real services and a fresh double root."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    values = {"amqp_password": broker.password, "role_id": openbao.role_id,
              "secret_id": openbao.secret_id, "s3_access": ceph.access_key,
              "s3_secret": ceph.secret_key}
    for name, value in values.items():
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)
    raw = {
        "log": {"dir": str(tmp_path / "log"), "level": "DEBUG", "stdout": False},
        "status": {"dir": str(tmp_path / "status"), "interval": 0.2},
        "amqp": {
            "host": broker.host, "port": broker.port, "user": broker.user,
            "password_file": str(secrets / "amqp_password"), "tls": False,
            "management_url": broker.management_url, "heartbeat": 10,
            "reconnect_initial": 0.2, "reconnect_max": 2.0,
            "publisher_queue": unique_label("pq-"),
            "control_exchange": unique_label("ctl-"),
            "dead_letter_exchange": unique_label("dlx-"),
            "dead_letter_queue": unique_label("dlq-"),
            "retry_delays": [1, 2],
        },
        "vault": {"url": openbao.url, "role_id_file": str(secrets / "role_id"),
                  "secret_id_file": str(secrets / "secret_id"), "timeout": 3.0},
        "s3": {"endpoint_url": ceph.endpoint, "access_key_file": str(secrets / "s3_access"),
               "secret_key_file": str(secrets / "s3_secret"), "max_attempts": 1,
               "connect_timeout": 2.0, "read_timeout": 10.0},
        "rgw": {"push_endpoint": f"amqp://{broker.host}:{broker.port}",
                "amqp_ack_level": "broker", "persistent": False, "verify_ssl": False},
        "cvmfs": {**cvmfs_double.paths(), "domain": DOMAIN,
                  "stratum0_url": "http://stratum0.test/cvmfs",
                  "gateway_url": "http://gateway.test:4929/api/v1",
                  "command_timeout": 60.0},
        "publisher": {"max_attempts": 3},
        "sync": {"quiet_seconds": 0.5, "max_delay_seconds": 5.0, "poll_interval": 0.1,
                 "backoff_initial": 0.2, "backoff_max": 2.0},
    }
    return Stack(raw, {}, tmp_path)


def secrets_in_use(stack: Stack) -> list[str]:
    """Every secret value the stack uses (for the log scan)."""
    out = []
    for section in stack.raw.values():
        for key, value in section.items():
            if key.endswith("_file") and isinstance(value, str) and "/secrets/" in value:
                out.append(Path(value).read_text())
    return out
