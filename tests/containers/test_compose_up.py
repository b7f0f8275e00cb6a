"""``docker-compose up`` for real: the three images built and run as operators run them.

The tests' own dockerd (``engine.py``: host network only, images cached
under ``/var/cache/cvmfs-publisher/docker``) builds the three images from a
local Debian 12 base (debootstrap) with the ``cvmfs_server`` test double
(``CVMFS_SERVER=test-double``: CERN's repository is not reachable here), and
Debian's docker-compose 1.29 starts ``docker-compose.yml`` with
``tests/containers/docker-compose.test.yml`` against the suite's RabbitMQ,
OpenBao and Ceph RGW. The host is prepared the way README.md ("Production
deployment") tells operators to: a shared-propagation directory for the
spool and /cvmfs, the log directory for group 10001, one file per secret.

The checks run in file order on one deployment (module fixture): healthy,
provision, publish, restart each service, SIGKILL during a burst of uploads.
Figures (build times, image sizes, time to healthy, uploads published) are
printed, never asserted (``-s`` shows them; they are also in the report).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cvmfs_publisher.adapters.rgw import RGW
from devstack.stack import CvmfsDouble, Stack, build_stack
from devstack.zabbix import get_key, zabbix_port
from tests.conftest import DOMAIN, unique_label
from tests.cvmfs_server_double import in_transaction, published_tree, revisions, spool_dir
from tests.provision.helpers import Amqp, cleanup_amqp, consumers, wait_until

from .engine import BASE_IMAGE, SERVICES, TAG, Compose, Engine, missing_tools, start_engine

#: Slow, and the first test also carries the module's set-up (a cold build
#: of the base and the three images, then docker-compose up).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

#: The daemon each service runs (its status document, log file, agent keys).
DAEMON = {"publisher-consumer": "publisher-consumer",
          "cvmfs-repo-consumers": "cvmfs-repo-consumers",
          "sync-publisher": "cvmfs-repo-sync"}
#: Compose secrets and the configuration key each one fills (docker-compose.yml).
SECRETS = {"amqp_password": ("amqp", "password_file"),
           "vault_role_id": ("vault", "role_id_file"),
           "vault_secret_id": ("vault", "secret_id_file"),
           "s3_access_key": ("s3", "access_key_file"),
           "s3_secret_key": ("s3", "secret_key_file")}
#: The secrets the consumers (uid/gid 10001) must read (README: chgrp 10001, 0640).
CONSUMER_SECRETS = ("amqp_password", "s3_access_key", "s3_secret_key")
CONSUMERS_UID = 10001
BURST = 300
FIGURES: dict[str, str] = {}


def figure(name: str, value: str) -> None:
    """A measured figure: printed now, and again at the end of the module."""
    FIGURES[name] = value
    print(f"[containers] {name}: {value}")


@dataclass
class Deployment:
    """The running stack: compose, the host directories, the test-side configuration."""

    engine: Engine
    compose: Compose
    workdir: Path
    stack: Stack
    agent_ports: dict[str, int]
    repo: str = ""
    label: str = ""
    uploaded: list[str] = field(default_factory=list)

    @property
    def double_root(self) -> Path:
        """What the test double in the containers sees as ``/`` (spool, /cvmfs, records)."""
        return self.workdir / "root"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    def rgw(self) -> RGW:
        cfg = self.stack.config()
        return RGW(cfg.s3, cfg.rgw)

    def published(self) -> set[str]:
        tree = published_tree(self.double_root, self.repo)
        if not tree.is_dir():
            return set()
        return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}

    def last_logs(self, services: tuple[str, ...] = SERVICES, lines: int = 15) -> dict[str, str]:
        """The last log lines of each service's container (for a failure's message)."""
        out = {}
        for service in services:
            res = self.engine.docker("logs", "--tail", str(lines),
                                     self.compose.container(service), check=False)
            out[service] = res.stdout + res.stderr
        return out

    def upload(self, rgw: RGW, names: list[str]) -> None:
        for name in names:
            rgw.s3.put_object(Bucket=self.label, Key=f"cvmfs/{name}",
                              Body=f"{name}\n".encode())
            self.uploaded.append(name)

    def wait_published(self, names: list[str], timeout: float = 240) -> None:
        try:
            wait_until(f"{len(names)} uploads published in {self.repo}",
                       lambda: set(names) <= self.published(), timeout, interval=0.5)
        except AssertionError as exc:
            missing = sorted(set(names) - self.published())
            raise AssertionError(f"{exc}; missing {missing[:5]} ({len(missing)}); "
                                 f"logs: {self.last_logs()}") from None
        wait_until("no transaction left open",
                   lambda: not in_transaction(self.double_root, self.repo), 60, interval=0.5)


# --------------------------------------------------------------------------- the host


def prepare_host(workdir: Path, stack: Stack, broker: Any) -> dict[str, str]:
    """README step by step: directories, shared mounts, secrets, configuration.

    Returns the compose variables that point docker-compose.yml at them.
    """
    workdir.chmod(0o755)  # the consumers (uid 10001) traverse it to their config file
    # The spool and /cvmfs must be on a shared mount (rshared binds): here a
    # bind mount of the work directory made shared, not the machine's /.
    subprocess.run(["mount", "--bind", str(workdir), str(workdir)], check=True, timeout=30)
    subprocess.run(["mount", "--make-rshared", str(workdir)], check=True, timeout=30)
    root = workdir / "root"
    for d in ("var/spool/cvmfs", "cvmfs", "double"):
        (root / d).mkdir(parents=True, mode=0o755)
    logs = workdir / "log"
    logs.mkdir()
    os.chown(logs, 0, CONSUMERS_UID)
    logs.chmod(0o1775)

    secrets = workdir / "secrets"
    secrets.mkdir(mode=0o755)
    values = {}
    for name, (section, key) in SECRETS.items():
        values[name] = Path(stack.raw[section][key]).read_text()
    values["rgw_push_password"] = broker.password
    for name, value in values.items():
        path = secrets / name
        path.write_text(value)
        if name in CONSUMER_SECRETS:
            os.chown(path, 0, CONSUMERS_UID)
            path.chmod(0o640)
        else:
            path.chmod(0o600)

    # The shared YAML as the containers read it: production paths (the
    # defaults), secrets from /run/secrets, the suite's services on loopback.
    raw = {section: dict(values_) for section, values_ in stack.raw.items()}
    raw["log"] = {"stdout": True}
    raw["status"] = {}
    # RGW's notifications: production's persistent topic (RGW keeps the
    # events while the broker is away: a shared broker may restart during the
    # run), but amqp-ack-level none instead of production's broker: this
    # radosgw (16.2) segfaults within minutes while it pushes with broker acks
    # and ran steadily with none (../shared/ceph/README.md, item 11), and this
    # module needs it up for minutes. The broker-ack guarantee has its own tests.
    raw["rgw"] = {k: v for k, v in raw["rgw"].items() if k != "persistent"}
    raw["rgw"]["amqp_ack_level"] = "none"
    raw["cvmfs"] = {k: v for k, v in raw["cvmfs"].items()
                    if k not in CvmfsDouble(Path("/"), Path("/")).paths()}
    for name, (section, key) in SECRETS.items():
        raw[section][key] = f"/run/secrets/{name}"
    config_file = workdir / "publisher.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config_file.chmod(0o644)
    return {
        "CVMFS_PUBLISHER_HOST_SPOOL": str(root / "var/spool/cvmfs"),
        "CVMFS_PUBLISHER_HOST_MOUNTS": str(root / "cvmfs"),
        "CVMFS_PUBLISHER_HOST_LOGS": str(logs),
        "CVMFS_PUBLISHER_HOST_CONFIG": str(config_file),
        "CVMFS_PUBLISHER_HOST_SECRETS": str(secrets),
        "CVMFS_PUBLISHER_TAG": TAG,
        "TEST_DOUBLE_RECORDS": str(root / "double"),
    }


def release_host(workdir: Path) -> None:
    """Unmount what the containers mounted below the work directory, then the directory."""
    base = str(workdir)
    for _ in range(5):
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            points = [line.split()[4] for line in fh]
        below = sorted({p for p in points if p == base or p.startswith(base + "/")},
                       key=len, reverse=True)
        if not below:
            return
        for point in below:
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


# --------------------------------------------------------------------------- the deployment


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    if os.geteuid() != 0:
        pytest.skip("the container tests start their own dockerd: run them as root")
    missing = missing_tools()
    assert not missing, f"install {' '.join(missing)} (.ci/apt-packages.containers)"
    with start_engine() as eng:
        yield eng
    summary = "; ".join(f"{k}: {v}" for k, v in FIGURES.items())
    print(f"[containers] figures: {summary}")
    # Also next to the cache, for a CI run whose output does not show prints.
    (eng.root / "last-run-figures.txt").write_text(
        time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + summary + "\n")


@pytest.fixture(scope="module")
def host_dir() -> Iterator[Path]:
    """The work directory standing for the publisher host's directories.

    Removed whatever happens, after what the containers mounted below it.
    """
    workdir = Path(tempfile.mkdtemp(prefix="cvmfs-publisher-containers-", dir="/var/tmp"))
    try:
        yield workdir
    finally:
        release_host(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(engine: Engine, host_dir: Path, broker: Any, openbao: Any, ceph: Any
               ) -> Iterator[Deployment]:
    workdir = host_dir
    stack = build_stack(workdir / "host", broker, openbao, ceph,
                        CvmfsDouble(workdir / "unused", workdir / "unused"))
    # The default notification exchange, as every other test on this push-endpoint
    # URL uses: RGW binds one AMQP connection per URL to the first exchange it used
    # (shared/ceph/README.md item 3), so an exchange of our own would lose the later
    # tests' events. The broker is the session's own node, and this module's
    # repositories are gone before the next module starts: nothing to take over.
    engine.ensure_base_image(workdir)
    for what, seconds in engine.timings.items():
        figure(what, f"{seconds:.0f} s")
    figure("build of the three images", f"{engine.build_images(workdir):.0f} s")
    for service in SERVICES:
        figure(f"image size {service}",
               f"{engine.image_size(f'{service}:{TAG}') / 1e6:.0f} MB")
    figure("image size base", f"{engine.image_size(BASE_IMAGE) / 1e6:.0f} MB")

    ports = {s: zabbix_port() for s in SERVICES}
    variables = prepare_host(workdir, stack, broker)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    variables.update({"TEST_NOFILE": str(nofile),
                      "ZBX_AGENT_PORT_PUBLISHER_CONSUMER": str(ports["publisher-consumer"]),
                      "ZBX_AGENT_PORT_CONSUMERS": str(ports["cvmfs-repo-consumers"]),
                      "ZBX_AGENT_PORT_SYNC": str(ports["sync-publisher"])})
    compose = Compose(engine, unique_label("cvmfs-publisher-t"), variables)
    dep = Deployment(engine, compose, workdir, stack, ports)
    try:
        started = time.monotonic()
        compose.run("up", "-d", "--no-build")
        # Host network only: the daemon knows no network but its predefined ones.
        networks = set(engine.docker("network", "ls", "--format", "{{.Name}}").stdout.split())
        assert networks <= {"host", "none", "bridge"}, networks
        compose.wait_healthy()
        figure("time to healthy (docker-compose up)", f"{time.monotonic() - started:.0f} s")
        yield dep
    finally:
        for service in SERVICES:
            with contextlib.suppress(Exception):
                (workdir / f"{service}.docker.log").write_text(compose.logs(service))
        compose.run("down", "-v", "--timeout", "60", check=False)
        cfg = stack.config()
        with contextlib.suppress(Exception):
            cleanup_amqp(cfg, broker, [dep.label] if dep.label else [])


# --------------------------------------------------------------------------- the checks


def test_all_three_healthy_and_the_double_visible(deployment: Deployment) -> None:
    """HEALTHCHECKs pass; the test variant says what it is (label and a log line)."""
    compose, engine = deployment.compose, deployment.engine
    for service in SERVICES:
        assert compose.health(service) == "healthy", service
    for service in ("publisher-consumer", "sync-publisher"):
        labels = engine.inspect(f"{service}:{TAG}")["Config"]["Labels"]
        assert labels["org.cvmfs-publisher.cvmfs-server"] == "test-double"
        assert "TEST IMAGE: cvmfs_server is the project's test double" in compose.logs(service)
    assert "org.cvmfs-publisher.cvmfs-server" not in (
        engine.inspect(f"cvmfs-repo-consumers:{TAG}")["Config"]["Labels"])


def test_each_image_holds_only_what_its_daemon_imports(deployment: Deployment) -> None:
    """No hvac or pyzabbix in the consumers, no S3 or Vault client in sync, no double there."""
    expected = {"publisher-consumer": {"hvac": True, "boto3": True, "pyzabbix": False},
                "cvmfs-repo-consumers": {"hvac": False, "boto3": True, "pyzabbix": False},
                "sync-publisher": {"hvac": False, "boto3": False, "pyzabbix": False}}
    for service, modules in expected.items():
        container = deployment.compose.container(service)
        for module, present in modules.items():
            res = deployment.engine.docker("exec", container, "/opt/venv/bin/python3", "-c",
                                           f"import {module}", check=False)
            assert (res.returncode == 0) is present, (service, module, res.stderr)
        res = deployment.engine.docker("exec", container, "cvmfs-publisher", "--help",
                                       check=False)
        assert res.returncode == 0, (service, res.stderr)
    consumers_id = deployment.compose.container("cvmfs-repo-consumers")
    res = deployment.engine.docker("exec", consumers_id, "sh", "-c",
                                   "ls /usr/local/lib/cvmfs-publisher", check=False)
    assert "cvmfs_server_double" not in res.stdout


def test_consumers_run_locked_down(deployment: Deployment) -> None:
    """uid 10001, read-only root file system, no Vault secret mounted."""
    engine = deployment.engine
    container = deployment.compose.container("cvmfs-repo-consumers")
    info = engine.inspect(container)
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert engine.docker("exec", container, "id", "-u").stdout.strip() == str(CONSUMERS_UID)
    res = engine.docker("exec", container, "touch", "/probe", check=False)
    assert res.returncode != 0 and "Read-only file system" in res.stderr
    mounted = set(engine.docker("exec", container, "ls", "/run/secrets").stdout.split())
    assert mounted == set(CONSUMER_SECRETS)
    # Every process (tini, the daemon, the agent): no root anywhere in this container.
    owners = engine.docker("exec", container, "sh", "-c",
                           "for p in /proc/[0-9]*; do stat -c %u \"$p\"; done")
    assert set(owners.stdout.split()) == {str(CONSUMERS_UID)}


def test_zabbix_agents_answer(deployment: Deployment) -> None:
    for service, port in deployment.agent_ports.items():
        daemon = DAEMON[service]
        try:
            health = get_key(port, f"cvmfs.publisher.health[{daemon},120]")
        except OSError as exc:
            logs = "\n".join(line for line in deployment.compose.logs(service).splitlines()
                             if "entrypoint" in line or "agent" in line.lower())
            raise AssertionError(f"{service}: no agent on port {port} ({exc}):\n{logs}") from exc
        assert health == "1", service
        assert float(get_key(port, f"cvmfs.publisher.status.age[{daemon}]")) < 120
        if service != "sync-publisher":
            assert get_key(port, f"cvmfs.publisher.broker_connected[{daemon}]") == "1"


def test_repository_provisioned_through_the_publisher_queue(
        deployment: Deployment, broker: Any, openbao: Any) -> None:
    cfg = deployment.stack.config()
    label = unique_label("ctr-")
    repo = f"{label}.{DOMAIN}"
    openbao.put_keys(f"subj/cvmfs_keys/{repo}", {
        "publicKey": "pub", "certificateKey": "crt", "gatewayKey": "plain_text k GWCTR"})
    rgw = deployment.rgw()
    rgw.s3.create_bucket(Bucket=label)
    deployment.repo, deployment.label = repo, label
    amqp = Amqp(cfg)
    try:
        wait_until("publisher-consumer consuming",
                   lambda: consumers(broker, cfg.amqp.publisher_queue), 60)
        amqp.send(f"alice,subj,{repo},P")
        amqp.wait_announcement("created", repo, timeout=120)
    finally:
        amqp.close()
    wait_until("the repository queue consumed", lambda: consumers(broker, label), 60)
    assert (deployment.double_root / "var/spool/cvmfs" / repo).is_dir()
    assert revisions(deployment.double_root, repo), "mkfs recorded no revision"


def test_uploads_published(deployment: Deployment) -> None:
    names = [f"first/file-{i}.txt" for i in range(5)]
    deployment.upload(deployment.rgw(), names)
    started = time.monotonic()
    deployment.wait_published(names)
    figure("first uploads published", f"{len(names)} in {time.monotonic() - started:.0f} s")
    tree = published_tree(deployment.double_root, deployment.repo)
    assert (tree / "first/file-0.txt").read_text() == "first/file-0.txt\n"


@pytest.mark.parametrize("service", SERVICES)
def test_restart_of_each_service(deployment: Deployment, service: str) -> None:
    """``docker-compose restart``: healthy again, and uploads after it are published."""
    compose = deployment.compose
    started = time.monotonic()
    compose.run("restart", service, timeout=300)
    compose.wait_healthy([service])
    healthy = time.monotonic() - started
    names = [f"after-restart-{service}/file-{i}.txt" for i in range(10)]
    deployment.upload(deployment.rgw(), names)
    deployment.wait_published(names)
    figure(f"restart {service}",
           f"healthy after {healthy:.0f} s, {len(names)}/{len(names)} uploads published")


def publish_in_progress(deployment: Deployment, rgw: RGW, lock: Path,
                        timeout: float = 120.0) -> None:
    """Wait until sync holds ``is_publishing.lock``; one more upload every 10 s meanwhile
    (a change that came while sync was idle may be out already), and on timeout
    say what sync and the consumers were doing."""
    deadline, extra = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        nudge = time.monotonic() + 10
        while time.monotonic() < min(nudge, deadline):
            if lock.exists():
                return
            time.sleep(0.01)
        deployment.upload(rgw, [f"burst/nudge-{extra}.txt"])
        extra += 1
    raise AssertionError(f"no publish in progress after {timeout:.0f} s ({extra} extra uploads; "
                         f"{len(deployment.published())} files published); logs: "
                         f"{deployment.last_logs(('sync-publisher', 'cvmfs-repo-consumers'))}")


def test_sigkill_during_a_burst_loses_nothing(deployment: Deployment) -> None:
    """``docker kill -s KILL`` of the consumers, then of sync, while 300 uploads arrive.

    Docker counts ``docker kill`` as a manual stop (the restart policy does
    not bring the container back), so the operator's ``docker-compose up -d``
    does, while the uploads go on: what arrived meanwhile waits in RabbitMQ
    (consumers) or in the staging volume (sync).
    """
    compose, engine = deployment.compose, deployment.engine
    names = [f"burst/{i // 50}/file-{i}.txt" for i in range(BURST)]
    kills = {BURST // 4: "cvmfs-repo-consumers", BURST // 2: "sync-publisher"}
    down_for = BURST // 10  # uploads made while the killed container is down
    rgw = deployment.rgw()
    errors: list[BaseException] = []
    exits: dict[str, int] = {}
    publishing = spool_dir(deployment.double_root, deployment.repo) / "is_publishing.lock"
    killed_in_transaction: list[bool] = []

    def uploads() -> None:
        try:
            for i in range(BURST):
                if i in kills:
                    container = compose.container(kills[i])
                    if kills[i] == "sync-publisher":
                        # In the middle of a publish (the double's publish
                        # delay keeps that window open, see the override).
                        # Everything before may be published already: this
                        # upload is the one sync is killed publishing.
                        deployment.upload(rgw, names[i:i + 1])
                        publish_in_progress(deployment, rgw, publishing)
                    engine.docker("kill", "-s", "KILL", container)
                    if kills[i] == "sync-publisher":
                        killed_in_transaction.append(
                            in_transaction(deployment.double_root, deployment.repo))
                    wait_until(f"{kills[i]} dead", lambda c=container: not engine.inspect(c)[
                        "State"]["Running"], 30)
                    exits[kills[i]] = engine.inspect(container)["State"]["ExitCode"]
                if i - down_for in kills:
                    compose.run("up", "-d", "--no-build")
                if kills.get(i) != "sync-publisher":
                    deployment.upload(rgw, names[i:i + 1])
        except BaseException as exc:  # the main thread reports it
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=uploads)
    thread.start()
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors
    assert exits == {"cvmfs-repo-consumers": 137, "sync-publisher": 137}, exits
    assert killed_in_transaction == [True], "sync was not killed inside a transaction"
    deployment.wait_published(names, timeout=420)
    figure(f"burst of {BURST} uploads, consumers and sync SIGKILLed",
           f"{len(set(names) & deployment.published())}/{BURST} published "
           f"in {time.monotonic() - started:.0f} s ({down_for} uploads made while each "
           f"container was down, sync killed inside a publish)")
    started = time.monotonic()
    compose.wait_healthy()
    figure("healthy again after the kills", f"{time.monotonic() - started:.0f} s more")
    assert not in_transaction(deployment.double_root, deployment.repo)
    everything = set(deployment.uploaded)
    assert everything <= deployment.published(), sorted(everything - deployment.published())[:10]


def test_zabbix_agents_know_the_repository(deployment: Deployment) -> None:
    """After the burst: discovery lists the repository; sync's last publish was ok."""
    for service in ("cvmfs-repo-consumers", "sync-publisher"):
        port, daemon = deployment.agent_ports[service], DAEMON[service]
        discovery = json.loads(get_key(port, f"cvmfs.publisher.repo.discovery[{daemon}]"))
        assert {"{#REPO}": deployment.repo} in discovery["data"], (service, discovery)
    port = deployment.agent_ports["sync-publisher"]
    key = f"cvmfs.publisher.repo.last_result[cvmfs-repo-sync,{deployment.repo}]"
    assert get_key(port, key) == "1"


def test_logs_on_the_host_volume(deployment: Deployment) -> None:
    for service, daemon in DAEMON.items():
        log = deployment.log_dir / f"{daemon}.log"
        assert log.is_file(), f"{service}: no {log}"
        text = log.read_text(errors="replace")
        assert deployment.repo in text, f"{service}: {log} never names {deployment.repo}"
        for secret in deployment.stack.secrets():
            assert secret not in text
    assert (deployment.log_dir / "cvmfs-repo-consumers.log").stat().st_uid == CONSUMERS_UID


def test_the_entrypoint_refuses_a_spool_on_overlayfs(deployment: Deployment) -> None:
    """Without the host spool, /var/spool/cvmfs is the container's own OverlayFS."""
    # SYS_ADMIN and /dev/fuse rather than --privileged: see docker-compose.test.yml.
    res = deployment.engine.docker(
        "run", "--rm", "--cap-add", "SYS_ADMIN", "--device", "/dev/fuse", "--network", "host",
        f"sync-publisher:{TAG}", timeout=120, check=False)
    assert res.returncode == 78, res.stderr
    assert ("/var/spool/cvmfs is on OverlayFS (the container's own file system?): bind-mount "
            "an ext4 or xfs host directory there; OverlayFS on OverlayFS fails") in res.stderr
