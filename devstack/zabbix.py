"""Real Zabbix 6.0 (Debian's packages) on loopback: agent, API frontend, server.

The one place that knows how to start the Zabbix pieces for the tests
(``tests/zabbix/conftest.py``) and the local demo:

* :func:`start_agent` runs ``zabbix_agentd`` in the foreground on a free
  loopback port with the project's UserParameter file; :func:`get_key` asks
  it a key with the Zabbix passive-check protocol.
* :func:`start_api` prepares PostgreSQL (a private role and database, see
  :meth:`Database.private_one`, with the schema), installs the frontend's
  ``/etc/zabbix/zabbix.conf.php`` (which reads its settings from the
  environment) and serves the frontend (JSON-RPC API) with ``php -S``, the
  database's settings in its environment; :func:`drop_database` removes the
  role and database afterwards.
* :func:`start_server` optionally runs ``zabbix_server`` against that
  database, with small process counts so it fits a 2-core test machine.

Every start waits for readiness within a timeout and raises an error naming
the log file; every returned object's ``stop()`` ends what it started (its
own process group). :class:`ServiceUnavailable` means "the packages are
absent and could not be installed": the only reason tests may skip.
Measured facts behind the choices: ``../shared/zabbix/README.md``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import free_port, kill_process, port_open, wait_for

#: Debian packages for the agent alone, and for API + server (PostgreSQL).
AGENT_PACKAGES: tuple[str, ...] = ("zabbix-agent",)
SERVER_PACKAGES: tuple[str, ...] = (
    "zabbix-server-pgsql", "zabbix-frontend-php", "php-pgsql", "php-cli", "postgresql",
)

FRONTEND_DIR = Path("/usr/share/zabbix")
#: Fixed by the frontend (CConfigFile::CONFIG_FILE_PATH on Debian).
FRONTEND_CONFIG = Path("/etc/zabbix/zabbix.conf.php")
SCHEMA_DIR = Path("/usr/share/zabbix-server-pgsql")
SCHEMA_FILES = ("schema.sql.gz", "images.sql.gz", "data.sql.gz")

#: The frontend's initial super admin, created by data.sql (loopback only).
DEFAULT_USER = "Admin"
DEFAULT_PASSWORD = "zabbix"  # noqa: S105 - Zabbix's documented initial password

#: Names of the private roles and databases (:meth:`Database.private_one`).
PRIVATE_PREFIX = "cvmfs_publisher_zbx_"


class ServiceUnavailable(RuntimeError):
    """Packages are missing and cannot be installed here (tests skip on this only)."""


class AgentNotSupported(RuntimeError):
    """The agent answered ``ZBX_NOTSUPPORTED`` (the message is its reason)."""


# --------------------------------------------------------------------------- packages


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The Debian packages of ``packages`` that are not installed."""
    if not shutil.which("dpkg-query"):
        return list(packages)
    missing = []
    for name in packages:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name],
                             capture_output=True, text=True, check=False, timeout=30)
        if res.returncode != 0 or not res.stdout.endswith(" installed"):
            missing.append(name)
    return missing


def ensure_packages(packages: Sequence[str], *, timeout: float = 900.0) -> None:
    """Install whichever of ``packages`` is missing, or raise :class:`ServiceUnavailable`.

    Waits for another apt/dpkg run's lock instead of failing, and runs
    ``apt-get update`` only when a first install attempt fails (a stale or
    empty package list), to keep the common case fast.
    """
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceUnavailable(
            f"Debian packages missing and not installable here (need root and apt-get): "
            f"{' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    install = ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *missing]
    res = subprocess.run(install, env=env, capture_output=True, text=True, check=False,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        subprocess.run(["apt-get", *lock, "update", "-q"], env=env, capture_output=True,
                       check=False, timeout=timeout, stdin=subprocess.DEVNULL)
        res = subprocess.run(install, env=env, capture_output=True, text=True, check=False,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    still = missing_packages(missing)
    if still:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-10:])
        raise ServiceUnavailable(f"cannot install {' '.join(still)} with apt-get:\n{tail}")


# --------------------------------------------------------------------------- processes


def _spawn(argv: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, output appended to ``log_file``.

    Its own session makes the process group ours to end, children included
    (zabbix_agentd and zabbix_server fork workers).
    """
    with open(log_file, "ab") as log:
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env or os.environ),
                                cwd=cwd, start_new_session=True)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the leader (it ends its workers), then SIGKILL any straggler of its group."""
    if proc.poll() is None:
        kill_process(proc, signal.SIGTERM, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def zabbix_port(attempts: int = 200) -> int:
    """A free 127.0.0.1 port in 10000-32767: Zabbix daemons refuse ``ListenPort`` above 32767.

    :func:`common.free_port` asks the kernel, which hands out ephemeral ports
    (32768 and up on Linux), so the Zabbix daemons need their own probe.
    """
    for _ in range(attempts):
        port = random.randint(10000, 32767)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 10000-32767 on 127.0.0.1")


def _write_config(path: Path, settings: Mapping[str, object], extra: Sequence[str] = ()) -> None:
    lines = [f"{k}={v}" for k, v in settings.items()]
    path.write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- agent


def get_key(port: int, key: str, host: str = "127.0.0.1", timeout: float = 10.0) -> str:
    """Ask a passive agent for ``key`` (what ``zabbix_get`` does).

    Request: ``ZBXD\\x01`` + little-endian 64-bit length + key; the reply has
    the same 13-byte header. Raises :class:`AgentNotSupported` when the agent
    refuses the key (unknown key, unsafe parameters, timeout).
    """
    data = key.encode("utf-8")
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"ZBXD\x01" + struct.pack("<Q", len(data)) + data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) < 13 or raw[:4] != b"ZBXD":
        raise RuntimeError(f"agent on port {port}: not a Zabbix protocol reply: {raw[:40]!r}")
    (length,) = struct.unpack("<Q", raw[5:13])
    value = raw[13:13 + length]
    if value.startswith(b"ZBX_NOTSUPPORTED\x00") or value == b"ZBX_NOTSUPPORTED":
        raise AgentNotSupported(value[17:].decode("utf-8", "replace"))
    return value.decode("utf-8", "replace")


@dataclass
class Agent:
    """A running ``zabbix_agentd`` (foreground, our child)."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    config_file: Path
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, key: str, timeout: float = 10.0) -> str:
        """:func:`get_key` on this agent."""
        return get_key(self.port, key, timeout=timeout)

    def stop(self) -> None:
        """End the agent and its workers."""
        _stop_group(self.process)


def start_agent(workdir: Path, userparameter_files: Sequence[Path] = (), *,
                env: Mapping[str, str] | None = None, hostname: str = "cvmfs-publisher-test",
                server_active: str | None = None, extra_config: Sequence[str] = (),
                timeout: float = 20.0, install: bool = True) -> Agent:
    """Start ``zabbix_agentd`` on a free 127.0.0.1 port; return once it answers.

    ``userparameter_files`` are included as they are (the project's file is
    tested unchanged); ``env`` is added to the agent's environment, which
    its UserParameter commands inherit (e.g. ``CVMFS_PUBLISHER_STATUS_DIR``,
    ``PYTHONPATH``). ``server_active`` enables active checks (logrt).
    """
    if install:
        ensure_packages(AGENT_PACKAGES)
    binary = shutil.which("zabbix_agentd") or "/usr/sbin/zabbix_agentd"
    if not Path(binary).exists():
        raise ServiceUnavailable("zabbix_agentd not found (package zabbix-agent)")
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "zabbix_agentd.log"
    config_file = workdir / "zabbix_agentd.conf"
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = zabbix_port()
        settings: dict[str, object] = {
            "LogFile": log_file, "LogType": "file", "PidFile": workdir / "zabbix_agentd.pid",
            "Server": "127.0.0.1", "ListenIP": "127.0.0.1", "ListenPort": port,
            "StartAgents": 3, "Hostname": hostname, "Timeout": 10,
        }
        if server_active:
            settings["ServerActive"] = server_active
        if os.geteuid() == 0:
            settings["AllowRoot"] = 1  # else it drops to user zabbix, who cannot read tmp dirs
        includes = [f"Include={Path(p).resolve()}" for p in userparameter_files]
        _write_config(config_file, settings, [*includes, *extra_config])
        proc = _spawn([binary, "-f", "-c", str(config_file)], log_file,
                      {**os.environ, **(env or {})}, cwd=workdir)
        agent = Agent(port, proc, workdir, config_file, log_file)
        try:
            wait_for(f"zabbix_agentd on port {port}", lambda a=agent: _agent_ready(a),
                     timeout, log_file, alive=lambda p=proc: p.poll() is None)
            return agent
        except RuntimeError as exc:
            agent.stop()
            last_error = exc
    raise RuntimeError(f"zabbix_agentd did not start: {last_error}")


def _agent_ready(agent: Agent) -> bool:
    try:
        return agent.get("agent.ping", timeout=2) == "1"
    except (OSError, RuntimeError):
        return False


# --------------------------------------------------------------------------- database


@dataclass(frozen=True)
class Database:
    """Where the Zabbix schema lives, and as whom the frontend and server connect."""

    host: str = "127.0.0.1"
    port: int = 5432
    name: str = "zabbix"
    user: str = "zabbix"
    password: str = field(default="zabbix", repr=False)  # loopback test database
    admin_user: str = "postgres"
    private: bool = False  # made by private_one(), ours to drop (drop_database refuses others)

    @classmethod
    def private_one(cls, **kwargs: Any) -> Database:
        """A role and a database of random names, for one test session.

        Concurrent sessions on one machine each get their own (no shared
        state, no lock), and :func:`drop_database` removes them afterwards:
        nothing is left in a PostgreSQL server the tests did not start.
        """
        name = PRIVATE_PREFIX + secrets.token_hex(6)
        return cls(name=name, user=name, password=secrets.token_urlsafe(18), private=True,
                   **kwargs)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"}

    def frontend_env(self) -> dict[str, str]:
        """The variables :data:`FRONTEND_CONFIG_TEXT` reads, for the frontend's process."""
        return {"CVMFS_PUBLISHER_ZBX_DB_HOST": self.host,
                "CVMFS_PUBLISHER_ZBX_DB_PORT": str(self.port),
                "CVMFS_PUBLISHER_ZBX_DB_NAME": self.name,
                "CVMFS_PUBLISHER_ZBX_DB_USER": self.user,
                "CVMFS_PUBLISHER_ZBX_DB_PASSWORD": self.password}


def _psql(db: Database, sql: str, *, user: str, dbname: str, single_transaction: bool = False,
          timeout: float = 300.0, variables: Mapping[str, str] | None = None) -> str:
    """Run SQL from stdin (so psql ``:'var'`` quoting applies); raise with psql's error."""
    argv = ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", db.host,
            "-p", str(db.port), "-U", user, "-d", dbname]
    for name, value in (variables or {}).items():
        argv += ["-v", f"{name}={value}"]
    if single_transaction:
        argv.append("-1")
    res = subprocess.run(argv, input=sql.encode("utf-8"), capture_output=True, check=False,
                         timeout=timeout, env=db.env())
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", "replace").strip()[-800:]
        raise RuntimeError(f"psql on {db.host}:{db.port}/{dbname} as {user} failed: {err}")
    return res.stdout.decode("utf-8", "replace")


def ensure_postgresql(db: Database, timeout: float = 60.0) -> None:
    """Make sure PostgreSQL answers on ``db.host:db.port``, starting Debian's clusters if not.

    This machine kind starts PostgreSQL before a session; a plain Debian box
    (or a stopped cluster) gets ``pg_ctlcluster <version> <name> start``.
    """
    if port_open(db.port, db.host):
        return
    if not shutil.which("pg_lsclusters"):
        ensure_packages(("postgresql",))
    res = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True,
                         check=False, timeout=30)
    clusters = [line.split()[:2] for line in res.stdout.splitlines() if line.strip()]
    if not clusters:
        raise RuntimeError("no PostgreSQL cluster exists (pg_lsclusters lists none)")
    for version, name in clusters:
        subprocess.run(["pg_ctlcluster", version, name, "start"], capture_output=True,
                       check=False, timeout=120)
    log = Path(f"/var/log/postgresql/postgresql-{clusters[0][0]}-{clusters[0][1]}.log")
    wait_for(f"PostgreSQL on {db.host}:{db.port}", lambda: port_open(db.port, db.host),
             timeout, log)


def setup_database(db: Database, schema_dir: Path = SCHEMA_DIR, timeout: float = 300.0) -> bool:
    """Create the role and database if absent and load the schema once.

    The three SQL files load in ONE transaction, so a half-loaded schema
    never exists and "table dbversion exists" reliably means "loaded".
    Returns True when the schema was loaded by this call. If it fails, a
    private database is dropped again, so a failed start leaves nothing.
    """
    _psql(db, (
        "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'pw')"
        " WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \\gexec\n"
        "SELECT format('CREATE DATABASE %I OWNER %I ENCODING ''UTF8'' TEMPLATE template0"
        " LC_COLLATE ''C'' LC_CTYPE ''C''', :'db', :'role')"
        " WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \\gexec\n"
    ), user=db.admin_user, dbname="postgres",
        variables={"role": db.user, "pw": db.password, "db": db.name})
    try:
        loaded = _psql(db, "SELECT to_regclass('public.dbversion') IS NOT NULL;\n",
                       user=db.user, dbname=db.name).strip()
        if loaded == "t":
            return False
        sql = b"".join(gzip.decompress((schema_dir / f).read_bytes()) + b"\n"
                       for f in SCHEMA_FILES)
        _psql(db, sql.decode("utf-8"), user=db.user, dbname=db.name, single_transaction=True,
              timeout=timeout)
        # Planner statistics now, not whenever autovacuum gets to it: without
        # them template.delete took 11 s instead of 0.05 s (measured).
        _psql(db, "ANALYZE;\n", user=db.admin_user, dbname=db.name, timeout=timeout)
        return True
    except BaseException:
        if db.private:
            with contextlib.suppress(Exception):
                drop_database(db)
        raise


def drop_database(db: Database, timeout: float = 120.0) -> None:
    """Drop a private database and its role (sessions still connected are ended).

    Refuses any database :meth:`Database.private_one` did not make: the
    machine's own databases are never ours to drop.
    """
    if not db.private or not db.name.startswith(PRIVATE_PREFIX):
        raise ValueError(f"refusing to drop {db.name!r}: not a private test database")
    _psql(db, ("SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', :'db') \\gexec\n"
               "SELECT format('DROP ROLE IF EXISTS %I', :'role') \\gexec\n"),
          user=db.admin_user, dbname="postgres", timeout=timeout,
          variables={"role": db.user, "db": db.name})


#: The frontend's configuration file. Its path is hard-coded in Debian's frontend
#: (``FRONTEND_CONFIG``), so one file serves every frontend on the machine: the
#: settings come from the environment of each ``php -S`` process
#: (:meth:`Database.frontend_env`), each frontend on its own private database, and the
#: file holds no password.
FRONTEND_CONFIG_TEXT = """<?php
// Written by devstack.zabbix (test instances): the settings come from
// the environment of the frontend's php -S process (Database.frontend_env()).
$DB['TYPE'] = 'POSTGRESQL';
$DB['SERVER'] = getenv('CVMFS_PUBLISHER_ZBX_DB_HOST') ?: 'localhost';
$DB['PORT'] = getenv('CVMFS_PUBLISHER_ZBX_DB_PORT') ?: '0';
$DB['DATABASE'] = getenv('CVMFS_PUBLISHER_ZBX_DB_NAME') ?: 'zabbix';
$DB['USER'] = getenv('CVMFS_PUBLISHER_ZBX_DB_USER') ?: 'zabbix';
$DB['PASSWORD'] = getenv('CVMFS_PUBLISHER_ZBX_DB_PASSWORD') ?: '';
$DB['SCHEMA'] = '';
$DB['ENCRYPTION'] = false;
$DB['DOUBLE_IEEE754'] = true;
$ZBX_SERVER_NAME = 'cvmfs-publisher devstack';
$IMAGE_FORMAT_DEFAULT = IMAGE_FORMAT_PNG;
"""


def write_frontend_config(path: Path = FRONTEND_CONFIG) -> None:
    """Install :data:`FRONTEND_CONFIG_TEXT` at ``path`` (atomically; kept if already there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == FRONTEND_CONFIG_TEXT:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(FRONTEND_CONFIG_TEXT)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- frontend / API


def api_call(url: str, method: str, params: Any = None, auth: str | None = None,
             timeout: float = 30.0) -> Any:
    """One JSON-RPC call without pyzabbix (readiness checks; ``url`` ends in api_jsonrpc.php)."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": 1}
    if auth:
        body["auth"] = auth
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an HTTP URL: {url}")
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/json-rpc"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - checked above
        reply = json.loads(resp.read())
    if "error" in reply:
        err = reply["error"]
        raise RuntimeError(f"{method}: {err.get('message')} {err.get('data')}")
    return reply["result"]


@dataclass
class Frontend:
    """The Zabbix frontend (API) under ``php -S`` on loopback."""

    port: int
    process: subprocess.Popen[bytes]
    log_file: Path
    user: str = DEFAULT_USER
    password: str = field(default=DEFAULT_PASSWORD, repr=False)

    @property
    def url(self) -> str:
        """Base URL, as pyzabbix's ``ZabbixAPI(url)`` takes it."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def api_url(self) -> str:
        return self.url + "api_jsonrpc.php"

    def stop(self) -> None:
        _stop_group(self.process)


def start_frontend(workdir: Path, db: Database, *, docroot: Path = FRONTEND_DIR,
                   timeout: float = 30.0) -> Frontend:
    """Serve the frontend on ``db`` with PHP's built-in server; return once the API answers.

    Ready means ``apiinfo.version`` returns a version (the frontend reads its
    configuration file and the database on every request).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "php-frontend.log"
    port = free_port()
    proc = _spawn(["php", "-S", f"127.0.0.1:{port}", "-t", str(docroot)], log_file,
                  env={**os.environ, **db.frontend_env()}, cwd=workdir)
    frontend = Frontend(port, proc, log_file)

    def ready() -> bool:
        try:
            return bool(api_call(frontend.api_url, "apiinfo.version", timeout=5))
        except (OSError, ValueError, RuntimeError):
            return False

    try:
        wait_for(f"Zabbix frontend (php -S on port {port})", ready, timeout, log_file,
                 alive=lambda: proc.poll() is None, interval=0.2)
    except BaseException:
        frontend.stop()
        raise
    return frontend


def start_api(workdir: Path, db: Database, *, install: bool = True,
              timeout: float = 60.0) -> Frontend:
    """Everything the API needs: packages, PostgreSQL, schema, frontend config, ``php -S``.

    ``db`` is normally :meth:`Database.private_one`; the caller drops it with
    :func:`drop_database` once the frontend and the server are stopped.
    """
    if install:
        ensure_packages(SERVER_PACKAGES)
    ensure_postgresql(db, timeout)
    setup_database(db)
    write_frontend_config()
    return start_frontend(workdir, db, timeout=timeout)


# --------------------------------------------------------------------------- server


@dataclass
class Server:
    """A running ``zabbix_server`` (foreground, our child)."""

    port: int
    process: subprocess.Popen[bytes]
    config_file: Path
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        _stop_group(self.process, timeout=20.0)


def start_server(workdir: Path, db: Database, *, install: bool = True,
                 cache_update_frequency: int = 1, extra_config: Sequence[str] = (),
                 timeout: float = 60.0) -> Server:
    """Start ``zabbix_server`` on a free loopback port against ``db`` (set up by :func:`start_api`).

    Process counts are minimal (a 2-core machine) and the configuration
    cache is refreshed every ``cache_update_frequency`` seconds so that hosts
    created through the API are polled within seconds, not a minute.
    """
    if install:
        ensure_packages(SERVER_PACKAGES)
    binary = shutil.which("zabbix_server") or "/usr/sbin/zabbix_server"
    if not Path(binary).exists():
        raise ServiceUnavailable("zabbix_server not found (package zabbix-server-pgsql)")
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "zabbix_server.log"
    config_file = workdir / "zabbix_server.conf"
    port = zabbix_port()
    settings: dict[str, object] = {
        "LogFile": log_file, "LogType": "file", "PidFile": workdir / "zabbix_server.pid",
        "SocketDir": workdir, "DBHost": db.host, "DBPort": db.port, "DBName": db.name,
        "DBUser": db.user, "DBPassword": db.password, "ListenIP": "127.0.0.1",
        "ListenPort": port, "StartPollers": 2, "StartPollersUnreachable": 1,
        "StartTrappers": 1, "StartPingers": 0, "StartDiscoverers": 0, "StartHTTPPollers": 0,
        "StartTimers": 1, "StartEscalators": 1, "StartAlerters": 1, "StartDBSyncers": 1,
        "StartLLDProcessors": 1, "StartPreprocessors": 1, "StartHistoryPollers": 1,
        "StartReportWriters": 0, "CacheSize": "32M", "HistoryCacheSize": "16M",
        "HistoryIndexCacheSize": "4M", "TrendCacheSize": "4M", "ValueCacheSize": "8M",
        "CacheUpdateFrequency": cache_update_frequency, "HousekeepingFrequency": 0,
        "Timeout": 10,
    }
    if os.geteuid() == 0:
        settings["AllowRoot"] = 1
    _write_config(config_file, settings, list(extra_config))
    proc = _spawn([binary, "-f", "-c", str(config_file)], log_file, cwd=workdir)
    server = Server(port, proc, config_file, log_file)
    try:
        wait_for(f"zabbix_server on port {port}", lambda: port_open(port), timeout, log_file,
                 alive=lambda: proc.poll() is None, interval=0.2)
    except BaseException:
        server.stop()
        raise
    return server
