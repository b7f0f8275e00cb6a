"""RabbitMQ: a private node of Debian's ``rabbitmq-server`` on free loopback ports.

The test suite, the benchmarks and the demo each start their own node, so
that nothing they do (queues, policies, ``stop_app``/``start_app``) touches
the machine's broker, and nothing is left behind when they stop: own node
name, own Erlang cookie, own epmd on a private port, AMQP, management and
Erlang distribution on free ports of 127.0.0.1, data, logs, configuration
and plugin list in one temporary directory. The management plugin is
enabled for this node only (the consumers list repository queues through
its HTTP API).

:class:`RabbitNode` takes its name, ports and cookie as parameters, so that
several nodes can share one epmd and one cookie (a cluster).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika

from .common import free_port, kill_process, port_open, wait_for

PACKAGE = "rabbitmq-server"
# Debian's unwrapped scripts: /usr/sbin/rabbitmq-server would switch to the
# 'rabbitmq' user and read /etc/rabbitmq; these run as the caller.
SBIN = Path("/usr/lib/rabbitmq/bin")
EPMD_CANDIDATES = ("/usr/lib/erlang/bin/epmd", "epmd")

CONF = """\
listeners.tcp.1 = 127.0.0.1:{amqp_port}
management.tcp.ip = 127.0.0.1
management.tcp.port = {management_port}
log.console = false
log.file.level = info
"""


@dataclass
class Broker:
    """How clients reach a broker (AMQP, management API) and, for a node of ours, the node."""

    host: str = "127.0.0.1"
    port: int = 5672
    user: str = "guest"
    password: str = "guest"  # noqa: S105 - RabbitMQ's loopback-only default
    management_url: str = "http://127.0.0.1:15672"
    node: RabbitNode | None = None

    def api(self, method: str, path: str, body: object = None, timeout: float = 10.0) -> object:
        """Call the management API (tests use it to inspect queues, kill connections)."""
        data = json.dumps(body).encode() if body is not None else None
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(self.management_url + path, data=data, method=method,  # noqa: S310
                                     headers={"Authorization": f"Basic {token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else None

    def api_ok(self) -> bool:
        try:
            self.api("GET", "/api/overview", timeout=2.0)
            return True
        except OSError:
            return False

    def _own_node(self) -> RabbitNode:
        if self.node is None:
            raise RuntimeError("this broker is not a node the devstack started: "
                               "it will not stop or restart it")
        return self.node

    def stop_app(self) -> None:
        """Stop the RabbitMQ application of our node (clients see the broker go away)."""
        self._own_node().stop_app()

    def start_app(self) -> None:
        self._own_node().start_app()

    def restart_app(self, down_seconds: float = 0.5) -> None:
        """Stop and start the application: a broker restart, as clients see it."""
        self.stop_app()
        time.sleep(down_seconds)
        self.start_app()


@dataclass
class RabbitNode:
    """One RabbitMQ node of our own, with everything it writes under ``workdir``.

    ``epmd_port`` is shared by the nodes of one cluster (each host's epmd is
    looked up on that port); the node starts an epmd there if none runs and
    stops it again. Ports left at 0 are picked free at :meth:`start`.
    """

    workdir: Path
    name: str = field(default_factory=lambda: f"cvmfs-{secrets.token_hex(4)}@localhost")
    amqp_port: int = 0
    management_port: int = 0
    dist_port: int = 0
    epmd_port: int = 0
    cookie: str = field(default_factory=lambda: secrets.token_hex(16))
    extra_conf: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    epmd: subprocess.Popen | None = None
    start_seconds: float = 0.0

    @property
    def log_file(self) -> Path:
        return self.workdir / "log" / "server.out"

    def broker(self) -> Broker:
        return Broker(port=self.amqp_port,
                      management_url=f"http://127.0.0.1:{self.management_port}", node=self)

    def env(self) -> dict[str, str]:
        """Environment of the server and of rabbitmqctl for this node (nothing from /etc)."""
        w = self.workdir
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(w / "home"),  # holds .erlang.cookie
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # our epmd runs already (_start_epmd): the VMs must not start one of
            # their own (an 'epmd -daemon' that outlives the node)
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false",
            "RABBITMQ_CTL_ERL_ARGS": "-start_epmd false",
            "RABBITMQ_CONF_ENV_FILE": str(w / "etc" / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(w / "etc" / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "etc" / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "etc" / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(w / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(w / "run" / "rabbit.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(w / "mnesia" / "feature_flags"),
        })
        return env

    def start(self, timeout: float = 90.0) -> RabbitNode:
        server = SBIN / "rabbitmq-server"
        if not server.exists():
            raise RuntimeError(f"{server} is missing: apt-get install -y {PACKAGE}")
        began = time.monotonic()
        shutil.rmtree(self.workdir, ignore_errors=True)
        for d in ("home", "etc", "mnesia", "log", "run", "plugins-expand"):
            (self.workdir / d).mkdir(parents=True)
        self.amqp_port = self.amqp_port or free_port()
        self.management_port = self.management_port or free_port()
        self.dist_port = self.dist_port or free_port()
        self.epmd_port = self.epmd_port or free_port()
        cookie = self.workdir / "home" / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        etc = self.workdir / "etc"
        (etc / "rabbitmq-env.conf").write_text("")
        (etc / "rabbitmq.conf").write_text(
            CONF.format(amqp_port=self.amqp_port, management_port=self.management_port)
            + "".join(line + "\n" for line in self.extra_conf))
        (etc / "advanced.config").write_text("[].\n")
        (etc / "enabled_plugins").write_text("[rabbitmq_management].\n")
        self._start_epmd(timeout)
        with open(self.log_file, "ab") as logf:
            # a session of its own: a stop signal reaches the script and the VM
            self.proc = subprocess.Popen([str(server)], env=self.env(), cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        broker = self.broker()
        try:
            wait_for(f"rabbitmq node {self.name}", lambda: port_open(self.amqp_port)
                     and broker.api_ok(), timeout, self.log_file, alive=self._alive,
                     interval=0.2)
        except RuntimeError:
            self.stop(keep=True)
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _start_epmd(self, timeout: float) -> None:
        """An epmd of ours on ``epmd_port``, unless one (a cluster peer's) answers there."""
        if port_open(self.epmd_port):
            return
        binary = next((b for b in map(shutil.which, EPMD_CANDIDATES) if b), None)
        if binary is None:
            raise RuntimeError(f"epmd is missing: apt-get install -y {PACKAGE}")
        self.epmd = subprocess.Popen(
            [binary, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for("epmd", lambda: port_open(self.epmd_port), timeout,
                 alive=lambda: self.epmd is not None and self.epmd.poll() is None)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl -n <this node> ...``; raise with its output when it fails."""
        res = subprocess.run([str(SBIN / "rabbitmqctl"), "-n", self.name, *args],
                             env=self.env(), capture_output=True, text=True,
                             timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name} failed "
                               f"({res.returncode}): {(res.stderr or res.stdout).strip()[-500:]}")
        return res.stdout

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self, timeout: float = 90.0) -> None:
        self.ctl("start_app")
        broker = self.broker()
        wait_for(f"rabbitmq node {self.name} after start_app",
                 lambda: port_open(self.amqp_port) and broker.api_ok(), timeout,
                 self.log_file, alive=self._alive, interval=0.2)

    def stop(self, keep: bool = False) -> None:
        """Stop the node (SIGTERM: a clean shutdown; SIGKILL after 30 s) and our epmd."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            self.proc = None
        if self.epmd is not None:
            kill_process(self.epmd)
            self.epmd = None
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_node(workdir: Path, timeout: float = 90.0) -> RabbitNode:
    return RabbitNode(workdir).start(timeout)


def close_connections(broker: Broker, name_prefix: str) -> int:
    """Force-close connections whose client-provided name starts with ``name_prefix``."""
    n = 0
    for c in broker.api("GET", "/api/connections") or []:  # type: ignore[union-attr]
        cname = (c.get("client_properties") or {}).get("connection_name", "")
        if cname.startswith(name_prefix):
            broker.api("DELETE", "/api/connections/" + urllib.parse.quote(c["name"], safe=""))
            n += 1
    return n


def cleanup_amqp(cfg: Any, broker: Broker, labels: list[str]) -> None:
    """Delete the queues, exchanges and policies a test or the demo left on the broker."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        cfg.amqp.host, cfg.amqp.port, credentials=pika.PlainCredentials(
            cfg.amqp.user, cfg.amqp.password.get())))  # type: ignore[union-attr]
    ch = conn.channel()
    a = cfg.amqp
    delays = [f"{a.retry_prefix}.{d}s" for d in a.retry_delays]
    for q in [a.publisher_queue, a.dead_letter_queue, *labels, *delays]:
        ch.queue_delete(q)
    for ex in (a.control_exchange, a.dead_letter_exchange, *delays):
        ch.exchange_delete(ex)
    conn.close()
    for label in labels:
        with contextlib.suppress(Exception):
            broker.api("DELETE", f"/api/policies/%2F/cvmfs-repo-{label}")
