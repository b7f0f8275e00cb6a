"""Migration from the seed's parameters.json."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cvmfs_publisher.core import config
from cvmfs_publisher.operations.cli import main

SEED = {
    "vault": {"vault_url": "https://vault.example.org:8200", "role_id": "ROLE-123",
              "secret_id": "SECRET-456"},
    "rabbitmq": {"host": "192.0.2.10", "hostname": "rabbitmq", "port": 5671,
                 "url": "https://192.0.2.10:15671/", "exchange": "notification",
                 "admin_user": "rabbitmq", "admin_password": "ADMINPW",
                 "rgw_user": "notification", "rgw_password": "RGWPW",
                 "publisher_queue": "publisher"},
    "ceph-rgw": {"access_key": "AK", "secret_key": "SKSECRET", "url": "https://rgw.example.org/",
                 "region": "default", "role": "cvmfsAccess"},
    "cvmfs": {"stratum0_url": "https://rgw.example.org:443/cvmfs/",
              "upstream_storage": "http://gw.example.org:4929/api/v1"},
    "ssl": {"ca_cert": "certs/ca.pem", "client_cert": "certs/c.pem", "client_key": "certs/k.pem"},
}


def test_migrate_config(tmp_path: Path, capsys) -> None:
    src = tmp_path / "parameters.json"
    src.write_text(json.dumps(SEED))
    out = tmp_path / "publisher.yaml"
    assert main(["migrate-config", str(src), "-o", str(out), "--secrets-dir",
                 str(tmp_path / "secrets")]) == 0
    text = out.read_text()
    for secret in ("ROLE-123", "SECRET-456", "ADMINPW", "RGWPW", "SKSECRET"):
        assert secret not in text
        assert secret not in capsys.readouterr().out
    cfg = config.load(out, env={})
    assert cfg.amqp.password.get() == "ADMINPW"
    assert cfg.vault.secret_id.get() == "SECRET-456"
    assert cfg.s3.secret_key.get() == "SKSECRET"
    assert cfg.amqp.publisher_queue == "publisher"
    assert cfg.amqp.ca_file == "certs/ca.pem" and cfg.amqp.tls
    assert cfg.rgw.push_endpoint == "amqps://rabbitmq:5671"
    assert cfg.rgw.push_user == "notification"
    assert cfg.cvmfs.stratum0_url == "https://rgw.example.org:443/cvmfs"
    assert cfg.cvmfs.gateway_url == "http://gw.example.org:4929/api/v1"
    for f in (tmp_path / "secrets").iterdir():
        assert f.stat().st_mode & 0o777 == 0o600
    # for the containers: secrets referenced where compose mounts them
    out2 = tmp_path / "container.yaml"
    assert main(["migrate-config", str(src), "-o", str(out2), "--secrets-dir",
                 str(tmp_path / "s2"), "--secrets-mount", "/run/secrets"]) == 0
    raw = yaml.safe_load(out2.read_text())
    assert raw["amqp"]["password_file"] == "/run/secrets/amqp_password"


def test_migrate_rejects_other_json(tmp_path: Path) -> None:
    src = tmp_path / "x.json"
    src.write_text("[1]")
    assert main(["migrate-config", str(src), "-o", str(tmp_path / "o.yaml"), "--secrets-dir",
                 str(tmp_path / "s")]) == 1
