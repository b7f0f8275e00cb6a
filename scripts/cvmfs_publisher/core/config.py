"""One YAML configuration for the three daemons, validated at start-up.

Why a hand-written schema: the dependency budget is fixed (no pydantic), and
operators need one error line that names the bad key, e.g.
``config error: amqp.port: expected an integer, got 'abc'``.

Rules:
- unknown keys, wrong types and missing required values are errors;
- ``CVMFS_PUBLISHER_<SECTION>__<KEY>`` environment variables override single
  keys (``CVMFS_PUBLISHER_AMQP__HOST=rabbit``);
- secrets (see :data:`SECRETS`) are never read from the YAML itself: give
  ``<key>_file`` (a path, e.g. a Docker secret) or the environment variable.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "CVMFS_PUBLISHER_"
DEFAULT_CONFIG_PATH = "/etc/cvmfs-publisher/publisher.yaml"


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


class Secret:
    """A secret value that never prints itself (repr/str are masked)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """The clear value; use it only where it is sent to a service."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class MissingSecret(Secret):
    """A ``*_file`` that could not be read: unset, unless the daemon needs it.

    Each container mounts only the secrets its daemon uses, while all three
    share one YAML file; :func:`require` turns this into an error naming
    the file for the daemon that does need it.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        super().__init__("")
        self.reason = reason


@dataclass
class LogConfig:
    """Where logs go (also printed on stdout for ``docker logs``)."""

    dir: str = "/var/log/publisher"
    level: str = "INFO"
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    stdout: bool = True


@dataclass
class StatusConfig:
    """Where each daemon writes its JSON status document."""

    dir: str = "/var/lib/cvmfs-publisher"
    interval: float = 5.0


@dataclass
class AmqpConfig:
    """RabbitMQ connection and topology names.

    ``hosts`` lists the nodes of a cluster (``host`` or ``host:port``; the
    port defaults to ``port``): the daemons connect to any live one and move
    to the next when theirs goes away. Empty: the single ``host``.
    ``management_urls`` does the same for the management API.
    """

    host: str = "localhost"
    hosts: list[str] = field(default_factory=list)
    port: int = 5671
    vhost: str = "/"
    user: str = "guest"
    password: Secret | None = None
    tls: bool = True
    verify: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    heartbeat: int = 60
    connection_attempts: int = 1
    socket_timeout: float = 10.0
    reconnect_initial: float = 1.0
    reconnect_max: float = 30.0
    management_url: str = ""
    management_urls: list[str] = field(default_factory=list)
    publisher_queue: str = "publisher_queue"
    notification_exchange: str = "notification"
    control_exchange: str = "cvmfs.control"
    dead_letter_exchange: str = "cvmfs.dlx"
    dead_letter_queue: str = "cvmfs.dead-letter"
    delivery_limit: int = 5
    retry_delays: list[int] = field(default_factory=lambda: [5, 30, 120, 600])
    #: the shared delay queues are <retry_prefix>.<delay>s (one per delay, all queues)
    retry_prefix: str = "cvmfs.retry"

    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every configured node, in the configured order."""
        return [split_address(h, self.port) for h in (self.hosts or [self.host])]

    def management_endpoints(self) -> list[str]:
        """Every management API base URL (``management_urls``, else ``management_url``)."""
        urls = self.management_urls or ([self.management_url] if self.management_url else [])
        return [u.rstrip("/") for u in urls]


def split_address(address: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` as ``(host, port)``."""
    host, port = address.strip(), default_port
    if host.startswith("["):
        inner, _, rest = host[1:].partition("]")
        host = inner
        if rest.startswith(":"):
            port = _port_of(address, rest[1:])
    elif host.count(":") == 1:
        host, _, tail = host.partition(":")
        port = _port_of(address, tail)
    if not host:
        raise ConfigError(f"amqp.hosts: {address!r} has no host name")
    return host, port


def _port_of(address: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ConfigError(f"amqp.hosts: {address!r}: {text!r} is not a TCP port")
    return int(text)


@dataclass
class VaultConfig:
    """Vault / OpenBao with AppRole login (only publisher-consumer uses it)."""

    url: str = ""
    mount: str = "secrets"
    approle_mount: str = "approle"
    role_id: Secret | None = None
    secret_id: Secret | None = None
    secret_id_wrapped: bool = False
    verify: bool = True
    ca_file: str = ""
    timeout: float = 10.0
    namespace: str = ""


@dataclass
class S3Config:
    """Ceph RGW S3 + SNS endpoint."""

    endpoint_url: str = ""
    region: str = "default"
    access_key: Secret | None = None
    secret_key: Secret | None = None
    verify: bool = True
    ca_file: str = ""
    path_style: bool = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 3
    prefix: str = "cvmfs/"
    decode_keys: bool = False


@dataclass
class RgwConfig:
    """How the RGW topic pushes bucket events into RabbitMQ."""

    push_endpoint: str = ""
    push_user: str = ""
    push_password: Secret | None = None
    amqp_ack_level: str = "broker"
    persistent: bool = True
    verify_ssl: bool = True
    #: the CA file RGW verifies an amqps broker with (a path on the RGW host); empty: its default
    ca_location: str = ""
    forwarded_https: bool = False
    notification_id: str = "cvmfs-publisher"
    create_buckets: bool = False


@dataclass
class CvmfsConfig:
    """cvmfs_server and the paths it uses (configurable for tests)."""

    server_command: str = "/usr/bin/cvmfs_server"
    domain: str = "infn.it"
    stratum0_url: str = ""
    gateway_url: str = ""
    owner: str = "root"
    keys_dir: str = "/etc/cvmfs/keys-shared"
    repositories_dir: str = "/etc/cvmfs/repositories.d"
    spool_dir: str = "/var/spool/cvmfs"
    mount_dir: str = "/cvmfs"
    staging_dir: str = "/data/cvmfs"
    command_timeout: float = 3600.0
    tarball_dir: str = "software"


@dataclass
class PublisherConfig:
    """publisher-consumer behaviour."""

    max_attempts: int = 5
    max_message_bytes: int = 65536


@dataclass
class ConsumersConfig:
    """cvmfs-repo-consumers behaviour."""

    downloads: int = 4
    #: Each download thread fetches in a worker process of its own
    #: (:mod:`cvmfs_publisher.pipeline.download_processes`): the GETs run outside
    #: the daemon's GIL. False: on the threads themselves (one process, less memory).
    download_processes: bool = True
    refresh_interval: float = 60.0
    max_attempts: int = 10
    #: Anti-entropy (DESIGN §3, Self-healing): every repository this host is the
    #: active consumer of is reconciled with its bucket every ``reconcile_interval``
    #: seconds (0 turns the periodic run off), spread by +-``reconcile_jitter``
    #: (a fraction) so that repositories do not all list at once, at most
    #: ``reconcile_parallel`` at a time; ``reconcile_after_created`` seconds after a
    #: repository is announced created (a new RGW topic delivers its first events
    #: about 30 s late, measured on Ceph 16.2); objects modified in the last
    #: ``reconcile_grace`` seconds are left to their events (checked again then).
    reconcile_interval: float = 600.0
    reconcile_jitter: float = 0.1
    reconcile_parallel: int = 2
    reconcile_after_created: float = 40.0
    reconcile_grace: float = 30.0


@dataclass
class SyncConfig:
    """cvmfs-repo-sync behaviour."""

    quiet_seconds: float = 2.0
    max_delay_seconds: float = 30.0
    poll_interval: float = 0.5
    #: every repository is looked at this often even without an inotify event
    scan_interval: float = 60.0
    backoff_initial: float = 5.0
    backoff_max: float = 300.0
    transaction_retries: int = 10
    #: a publish of more entries (or bytes) than this is a bulk publish: its
    #: ``cvmfs_server`` runs at ``bulk_nice``, so that small publishes of other
    #: repositories get the CPU first (0: no bulk publishes)
    bulk_entries: int = 100
    bulk_bytes: int = 64 << 20
    bulk_nice: int = 10


@dataclass
class ReceiptsConfig:
    """The receipt each repository's bucket holds for its uploader (DESIGN §3).

    ``key`` must lie outside ``s3.prefix``: writing it then raises no bucket
    event and it is never published. ``interval``: at most one write per
    repository per interval (changes in between are coalesced into the next).
    ``recent`` / ``rejected``: how many published changes and rejected keys
    the receipt lists; ``known_keys``: how many published keys the sync
    daemon remembers (with their ETag) for ``cvmfs-publisher status --key``.
    """

    enabled: bool = True
    key: str = "cvmfs-publisher/status.json"
    interval: float = 5.0
    recent: int = 50
    rejected: int = 100
    known_keys: int = 10000


@dataclass
class Config:
    """The whole configuration."""

    log: LogConfig = field(default_factory=LogConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    amqp: AmqpConfig = field(default_factory=AmqpConfig)
    vault: VaultConfig = field(default_factory=VaultConfig)
    s3: S3Config = field(default_factory=S3Config)
    rgw: RgwConfig = field(default_factory=RgwConfig)
    cvmfs: CvmfsConfig = field(default_factory=CvmfsConfig)
    publisher: PublisherConfig = field(default_factory=PublisherConfig)
    consumers: ConsumersConfig = field(default_factory=ConsumersConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)


#: Keys that hold secrets: ``section.key``.
SECRETS = frozenset(
    f"{s.name}.{f.name}"
    for s in dataclasses.fields(Config)
    for f in dataclasses.fields(s.default_factory())  # type: ignore[misc]
    if "Secret" in str(f.type)
)

#: Keys required per daemon (checked by :func:`require`).
REQUIRED: dict[str, tuple[str, ...]] = {
    "publisher-consumer": (
        "amqp.password", "vault.url", "vault.role_id", "vault.secret_id",
        "s3.endpoint_url", "s3.access_key", "s3.secret_key", "rgw.push_endpoint",
        "cvmfs.stratum0_url", "cvmfs.gateway_url", "amqp.management_url",
    ),
    "cvmfs-repo-consumers": (
        "amqp.password", "amqp.management_url", "s3.endpoint_url", "s3.access_key",
        "s3.secret_key",
    ),
    "cvmfs-repo-sync": ("cvmfs.stratum0_url", "cvmfs.gateway_url"),
}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, tp: Any, value: Any, from_env: bool) -> Any:
    """Check ``value`` against type ``tp``; environment strings are parsed first."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value, from_env)
    if tp is Secret:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string secret")
        return Secret(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_env and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v, from_env) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if from_env and isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _read_secret_file(key: str, path: str) -> Secret:
    try:
        with open(path, encoding="utf-8") as fh:
            return Secret(fh.read().strip())
    except OSError as exc:
        return MissingSecret(f"{key}_file: cannot read {path}: {exc.strerror}")


def _build_section(name: str, cls: type, raw: Any, env: dict[str, str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key.endswith("_file") and f"{name}.{key[:-5]}" in SECRETS:
            if not isinstance(value, str):
                raise ConfigError(f"{full}: expected a path")
            if value:
                values[key[:-5]] = _read_secret_file(f"{name}.{key[:-5]}", value)
            continue
        if key not in fields:
            raise ConfigError(f"{full}: unknown key")
        if full in SECRETS:
            raise ConfigError(
                f"{full}: secrets are not accepted inline; use {key}_file or "
                f"the environment variable {env_name(full)}"
            )
        values[key] = _coerce(full, hints[key], value, from_env=False)
    for key in fields:
        full = f"{name}.{key}"
        ev = env.get(env_name(full))
        if ev is not None:
            values[key] = _coerce(full, hints[key], ev, from_env=True)
        elif full in SECRETS and env.get(env_name(full) + "_FILE"):
            values[key] = _read_secret_file(full, env[env_name(full) + "_FILE"])
    return cls(**values)


def env_name(key: str) -> str:
    """``amqp.host`` -> ``CVMFS_PUBLISHER_AMQP__HOST``."""
    section, _, name = key.partition(".")
    return f"{ENV_PREFIX}{section.upper()}__{name.upper()}"


def from_mapping(raw: Any, env: dict[str, str] | None = None) -> Config:
    """Validate a parsed YAML document (plus environment overrides)."""
    env = dict(os.environ if env is None else env)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("top level: expected a mapping of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{key}: unknown section")
    built = {
        name: _build_section(name, f.default_factory, raw.get(name), env)  # type: ignore[misc]
        for name, f in sections.items()
    }
    cfg = Config(**built)
    _check_values(cfg)
    return cfg


def _check_values(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.amqp.port <= 0 or cfg.amqp.port > 65535:
        raise ConfigError(f"amqp.port: {cfg.amqp.port} is not a TCP port")
    cfg.amqp.addresses()  # every amqp.hosts entry parses
    if cfg.rgw.amqp_ack_level not in ("none", "broker", "routable"):
        raise ConfigError("rgw.amqp_ack_level: expected none, broker or routable")
    if cfg.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log.level: expected DEBUG, INFO, WARNING or ERROR")
    if not cfg.amqp.retry_delays or any(d <= 0 for d in cfg.amqp.retry_delays):
        raise ConfigError("amqp.retry_delays: expected a non-empty list of positive seconds")
    c = cfg.consumers
    if c.reconcile_interval < 0 or (0 < c.reconcile_interval < 10):
        raise ConfigError("consumers.reconcile_interval: expected 0 (off) or at least 10 "
                          "seconds")
    if not 0 <= c.reconcile_jitter < 1:
        raise ConfigError("consumers.reconcile_jitter: expected a fraction in [0, 1)")
    if c.reconcile_parallel < 1:
        raise ConfigError("consumers.reconcile_parallel: expected at least 1")
    if c.reconcile_after_created < 0 or c.reconcile_grace < 0:
        raise ConfigError("consumers.reconcile_after_created and consumers.reconcile_grace: "
                          "expected seconds >= 0")
    if cfg.sync.quiet_seconds < 0 or cfg.sync.max_delay_seconds < cfg.sync.quiet_seconds:
        raise ConfigError("sync.max_delay_seconds: must be >= sync.quiet_seconds >= 0")
    if cfg.sync.poll_interval <= 0 or cfg.sync.scan_interval < cfg.sync.poll_interval:
        raise ConfigError("sync.scan_interval: must be >= sync.poll_interval > 0")
    if not 0 <= cfg.sync.bulk_nice <= 19:
        raise ConfigError("sync.bulk_nice: must be in [0, 19] (a niceness added)")
    if cfg.sync.bulk_entries < 0 or cfg.sync.bulk_bytes < 0:
        raise ConfigError("sync.bulk_entries, sync.bulk_bytes: must be >= 0")
    if not cfg.s3.prefix.endswith("/"):
        raise ConfigError("s3.prefix: must end with '/'")
    _check_receipts(cfg.receipts, cfg.s3.prefix)
    domain = cfg.cvmfs.domain
    if not domain or domain.startswith(".") or domain.endswith("."):
        raise ConfigError("cvmfs.domain: expected a DNS domain such as infn.it")


def _check_receipts(rc: ReceiptsConfig, prefix: str) -> None:
    """The receipt key is a plain relative key outside the notified prefix."""
    parts = rc.key.split("/")
    if not rc.key or rc.key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"receipts.key: {rc.key!r} is not a plain relative object key")
    if rc.key.startswith(prefix):
        raise ConfigError(f"receipts.key: {rc.key!r} is inside s3.prefix {prefix!r}: writing "
                          "it would raise a bucket event and publish it; choose a key "
                          "outside that prefix")
    if rc.interval <= 0:
        raise ConfigError("receipts.interval: expected a positive number of seconds")
    for name in ("recent", "rejected", "known_keys"):
        if getattr(rc, name) < 1:
            raise ConfigError(f"receipts.{name}: expected a positive integer")


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path`` (default from the environment)."""
    env = dict(os.environ if env is None else env)
    path = path or env.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return from_mapping(raw, env)


def get(cfg: Config, key: str) -> Any:
    """Value of ``section.key``."""
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def require(cfg: Config, daemon: str) -> None:
    """Fail with the first missing key that ``daemon`` needs."""
    for key in REQUIRED.get(daemon, ()):
        value = get(cfg, key)
        if isinstance(value, MissingSecret):
            raise ConfigError(f"{value.reason} (required by {daemon})")
        if key == "amqp.management_url" and cfg.amqp.management_urls:
            continue  # the list stands for the single URL
        if value is None or value == "" or (isinstance(value, Secret) and not value):
            hint = f" (set {key}_file or {env_name(key)})" if key in SECRETS else ""
            raise ConfigError(f"{key}: required by {daemon} but not set{hint}")
    if "rgw.push_endpoint" in REQUIRED.get(daemon, ()) and cfg.rgw.push_user:
        # the topics it creates carry push_user's password: an unreadable file would
        # only show up as RGW failing to push, much later, with nothing in our logs
        pw = cfg.rgw.push_password
        if isinstance(pw, MissingSecret):
            raise ConfigError(f"{pw.reason} (rgw.push_user is set; required by {daemon})")
        if not pw:
            raise ConfigError(f"rgw.push_password: required by {daemon} when rgw.push_user "
                              f"is set (set rgw.push_password_file or "
                              f"{env_name('rgw.push_password')})")


def secret_values(cfg: Config) -> list[str]:
    """Every secret's clear value: the log redaction filter masks them."""
    out = []
    for key in SECRETS:
        value = get(cfg, key)
        if isinstance(value, Secret) and value.get():
            out.append(value.get())
    return out
