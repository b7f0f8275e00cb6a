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
several nodes can share one epmd and one cookie: :class:`RabbitCluster` is
three of them joined into one cluster, with TLS on their AMQP listeners
(a throw-away CA and certificate, ``devstack.tls``), as production runs it.
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
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import free_port, kill_process, port_open, wait_for
from .tls import ServerCert

PACKAGE = "rabbitmq-server"
# Debian's unwrapped scripts: /usr/sbin/rabbitmq-server would switch to the
# 'rabbitmq' user and read /etc/rabbitmq; these run as the caller.
SBIN = Path("/usr/lib/rabbitmq/bin")
EPMD_CANDIDATES = ("/usr/lib/erlang/bin/epmd", "epmd")

CONF = """\
{listeners}
management.tcp.ip = 127.0.0.1
management.tcp.port = {management_port}
log.console = false
log.file.level = info
default_user = {user}
default_pass = {password}
default_user_tags.administrator = true
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
"""

#: TLS only: no plain listener a client could fall back to. Clients are not
#: asked for certificates (they log in with a password, as in production).
TLS_LISTENERS = """\
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:{amqp_port}
ssl_options.cacertfile = {ca}
ssl_options.certfile = {cert}
ssl_options.keyfile = {key}
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false"""


@dataclass
class Broker:
    """How clients reach a broker (AMQP, management API) and, for a node of ours, the node."""

    host: str = "127.0.0.1"
    port: int = 5672
    user: str = "guest"
    password: str = "guest"  # noqa: S105 - RabbitMQ's loopback-only default
    management_url: str = "http://127.0.0.1:15672"
    node: RabbitNode | None = None
    #: AMQP over TLS, verified against ``ca_file`` (a cluster of ours)
    tls: bool = False
    ca_file: str = ""
    #: every node's ``host:port`` and management URL (a cluster); empty: the one above
    hosts: list[str] = field(default_factory=list)
    management_urls: list[str] = field(default_factory=list)

    def push_url(self, vhost: str = "") -> str:
        """The URL RGW pushes to: amqps on a TLS broker (by the name its certificate has)."""
        path = f"/{vhost}" if vhost else ""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.host}:{self.port}{path}"

    def api(self, method: str, path: str, body: object = None, timeout: float = 10.0) -> object:
        """Call the management API (tests use it to inspect queues, kill connections).

        On a cluster, the first node that answers (a stopped node's API is gone too).
        """
        data = json.dumps(body).encode() if body is not None else None
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        error: OSError | None = None
        for url in self.management_urls or [self.management_url]:
            req = urllib.request.Request(url + path, data=data, method=method,  # noqa: S310
                                         headers={"Authorization": f"Basic {token}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                    raw = resp.read()
            except urllib.error.HTTPError:
                raise
            except OSError as exc:
                error = exc
                continue
            return json.loads(raw) if raw else None
        assert error is not None
        raise error

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
    #: guest (loopback only) on a single node, whose topics push without
    #: credentials; the TLS cluster has a random user, in its topics too
    user: str = "guest"
    password: str = "guest"  # noqa: S105 - RabbitMQ's loopback-only default
    extra_conf: list[str] = field(default_factory=list)
    #: a server certificate: the AMQP listener speaks TLS only
    tls: ServerCert | None = None
    proc: subprocess.Popen | None = None
    epmd: subprocess.Popen | None = None
    start_seconds: float = 0.0

    @property
    def log_file(self) -> Path:
        return self.workdir / "log" / "server.out"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def broker(self) -> Broker:
        if self.tls is not None:  # by the name in the certificate
            return Broker(host="localhost", port=self.amqp_port, user=self.user,
                          password=self.password, management_url=self.management_url,
                          node=self, tls=True, ca_file=str(self.tls.ca_file))
        return Broker(port=self.amqp_port, user=self.user, password=self.password,
                      management_url=self.management_url, node=self)

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
        listeners = (f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}" if self.tls is None else
                     TLS_LISTENERS.format(amqp_port=self.amqp_port, ca=self.tls.ca_file,
                                          cert=self.tls.cert_file, key=self.tls.key_file))
        (etc / "rabbitmq.conf").write_text(
            CONF.format(listeners=listeners, management_port=self.management_port,
                        user=self.user, password=self.password)
            + "".join(line + "\n" for line in self.extra_conf))
        (etc / "advanced.config").write_text("[].\n")
        (etc / "enabled_plugins").write_text("[rabbitmq_management].\n")
        self._start_epmd(timeout)
        self._spawn(timeout)
        self.start_seconds = time.monotonic() - began
        return self

    def _spawn(self, timeout: float) -> None:
        server = SBIN / "rabbitmq-server"
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

    def kill(self) -> None:
        """SIGKILL the node's VM: a crash, as its cluster and clients see it (data kept)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def restart(self, timeout: float = 90.0) -> None:
        """Start a killed node again on its data (it rejoins its cluster)."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} runs already")
        self._spawn(timeout)

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


@dataclass
class RabbitCluster:
    """Three nodes of our own on one cookie and one epmd, joined, TLS on AMQP.

    The nodes start in parallel; the second and third then join the first
    (``stop_app``, ``join_cluster``, ``start_app``). :meth:`broker` lists
    every node (``hosts``, ``management_urls``), the first one as ``host``/
    ``port``. Each node is stopped and started by its own
    :meth:`RabbitNode.stop_app` / :meth:`RabbitNode.start_app`.
    """

    workdir: Path
    cert: ServerCert
    size: int = 3
    nodes: list[RabbitNode] = field(default_factory=list)
    start_seconds: float = 0.0

    def start(self, timeout: float = 180.0) -> RabbitCluster:
        began = time.monotonic()
        tag, cookie, epmd = secrets.token_hex(3), secrets.token_hex(16), free_port()
        user, password = f"publisher{secrets.token_hex(3)}", secrets.token_hex(16)
        self.nodes = [RabbitNode(self.workdir / f"node{i}", name=f"cvmfs-{tag}-{i}@localhost",
                                 epmd_port=epmd, cookie=cookie, user=user, password=password,
                                 tls=self.cert) for i in range(self.size)]
        self.nodes[0].start(timeout)  # it starts the shared epmd
        errors: list[BaseException] = []

        def start(node: RabbitNode) -> None:
            try:
                node.start(timeout)
            except BaseException as exc:  # reported below, in this thread
                errors.append(exc)
        threads = [threading.Thread(target=start, args=(n,)) for n in self.nodes[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if errors:
                raise errors[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", self.nodes[0].name)
                node.start_app(timeout)
            running = self.nodes[0].ctl("cluster_status", "--formatter", "json")
            members = set(json.loads(running).get("running_nodes", []))
            if members != {n.name for n in self.nodes}:
                raise RuntimeError(f"cluster incomplete: running {sorted(members)}")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def broker(self) -> Broker:
        b = self.nodes[0].broker()
        b.hosts = [f"{b.host}:{n.amqp_port}" for n in self.nodes]
        b.management_urls = [n.management_url for n in self.nodes]
        return b

    def stop(self) -> None:
        for node in reversed(self.nodes):  # the first one owns the epmd
            node.stop()


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
    from cvmfs_publisher.adapters import amqp  # noqa: PLC0415 - the daemons' own connection

    conn = amqp.connect(cfg.amqp, "devstack-cleanup")
    ch = conn.channel()
    a = cfg.amqp
    delays = [amqp.delay_exchange_name(a, d) for d in a.retry_delays]
    quorum_delays = [amqp.delay_queue_name(a, d) for d in a.retry_delays]
    for q in [a.publisher_queue, a.dead_letter_queue, *labels, *delays, *quorum_delays]:
        ch.queue_delete(q)
    for ex in (a.control_exchange, a.dead_letter_exchange, *delays):
        ch.exchange_delete(ex)
    conn.close()
    for label in labels:
        with contextlib.suppress(Exception):
            broker.api("DELETE", f"/api/policies/%2F/cvmfs-repo-{label}")
