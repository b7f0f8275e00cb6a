"""Convert the seed deployment's ``parameters.json`` into our YAML + secret files.

The seed kept everything, secrets included, in one JSON file::

    {"vault": {"vault_url", "role_id", "secret_id"},
     "rabbitmq": {"host", "hostname", "port", "url", "exchange", "admin_user",
                  "admin_password", "rgw_user", "rgw_password", "publisher_queue"},
     "ceph-rgw": {"access_key", "secret_key", "url", "region", "role"},
     "cvmfs": {"stratum0_url", "upstream_storage"},
     "ssl": {"ca_cert", "client_cert", "client_key"}}

The secrets go to separate files (mode 0600) in a directory of the
operator's choice, referenced by ``*_file`` keys; the YAML never holds one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..core import config

#: (JSON section, JSON key) -> secret file name and our secret key
SECRET_MAP = {
    ("vault", "role_id"): ("vault_role_id", "vault", "role_id_file"),
    ("vault", "secret_id"): ("vault_secret_id", "vault", "secret_id_file"),
    ("rabbitmq", "admin_password"): ("amqp_password", "amqp", "password_file"),
    ("rabbitmq", "rgw_password"): ("rgw_push_password", "rgw", "push_password_file"),
    ("ceph-rgw", "access_key"): ("s3_access_key", "s3", "access_key_file"),
    ("ceph-rgw", "secret_key"): ("s3_secret_key", "s3", "secret_key_file"),
}


class MigrationError(ValueError):
    """The input is not a parameters.json we understand."""


def convert(params: dict[str, Any], secrets_dir: Path, secrets_mount: str | None = None
            ) -> tuple[dict[str, Any], list[Path]]:
    """Return the YAML mapping and the secret files written into ``secrets_dir``.

    ``secrets_mount`` is where the secrets will be in the container
    (``/run/secrets``); by default the files' own paths are referenced.
    """
    def get(section: str, key: str, default: Any = None) -> Any:
        value = params.get(section, {}).get(key, default)
        return value.strip() if isinstance(value, str) else value

    if not isinstance(params, dict) or "rabbitmq" not in params:
        raise MigrationError("not a cvmfs-publisher parameters.json (no 'rabbitmq' section)")
    rmq_host = get("rabbitmq", "hostname") or get("rabbitmq", "host")
    port = int(get("rabbitmq", "port", 5671))
    out: dict[str, Any] = {
        "amqp": {
            "host": get("rabbitmq", "host"), "port": port,
            "user": get("rabbitmq", "admin_user", "guest"),
            "tls": port == 5671 or bool(params.get("ssl")),
            "management_url": get("rabbitmq", "url", ""),
            "notification_exchange": get("rabbitmq", "exchange", "notification"),
            "publisher_queue": get("rabbitmq", "publisher_queue", "publisher_queue"),
        },
        "vault": {"url": get("vault", "vault_url", "")},
        "s3": {"endpoint_url": get("ceph-rgw", "url", ""),
               "region": get("ceph-rgw", "region", "default")},
        "rgw": {"push_endpoint": f"amqps://{rmq_host}:{port}",
                "push_user": get("rabbitmq", "rgw_user", "")},
        "cvmfs": {"stratum0_url": (get("cvmfs", "stratum0_url", "") or "").rstrip("/"),
                  "gateway_url": get("cvmfs", "upstream_storage", "")},
    }
    ssl = params.get("ssl") or {}
    for ours, theirs in (("ca_file", "ca_cert"), ("cert_file", "client_cert"),
                         ("key_file", "client_key")):
        if ssl.get(theirs):
            out["amqp"][ours] = ssl[theirs]
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    for (section, key), (fname, ours, ours_key) in SECRET_MAP.items():
        value = get(section, key)
        if not value:
            continue
        path = secrets_dir / fname
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(str(value))
        os.chmod(path, 0o600)
        written.append(path)
        ref = f"{secrets_mount.rstrip('/')}/{fname}" if secrets_mount else str(path)
        out[ours][ours_key] = ref
    return out, written


def migrate(src: Path, dest: Path, secrets_dir: Path, secrets_mount: str | None = None
            ) -> list[Path]:
    """Convert ``src`` (parameters.json) to ``dest`` (YAML) and secret files."""
    try:
        params = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        raise MigrationError(f"{src}: cannot read JSON: {exc}") from None
    out, written = convert(params, secrets_dir, secrets_mount)
    text = ("# Converted from the seed's parameters.json by `cvmfs-publisher migrate-config`.\n"
            "# Secrets were moved to files; every other key keeps its default "
            "(config/publisher.example.yaml).\n" + yaml.safe_dump(out, sort_keys=False))
    dest.write_text(text)
    if not secrets_mount:  # validate what we wrote (the files exist here)
        config.load(dest, env={})
    return written
