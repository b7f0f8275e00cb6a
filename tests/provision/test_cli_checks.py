"""CLI bugs found as a user (issue 12): status exact after a dead letter, config check
of push credentials, ``health`` options through ``cvmfs-publisher``."""

from __future__ import annotations

import time
from pathlib import Path

import pika
import pytest

from cvmfs_publisher.adapters import amqp
from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.operations.cli import main
from tests.provision.test_cli import cli, write_config

DAEMONS = ("publisher-consumer", "cvmfs-repo-consumers", "cvmfs-repo-sync")


def test_status_sees_a_dead_letter_at_once(scenario) -> None:
    s = scenario()
    cfg_file = write_config(s)
    status_dir = Path(s.cfg.status.dir)
    for daemon in DAEMONS:
        StatusDocument(status_dir / f"{daemon}.json", daemon).flush(force=True)
    amqp.declare_common(s.amqp.ch, s.cfg.amqp)
    res = cli(s.stack, cfg_file, "status")
    assert res.returncode == 0 and "everything is published" in res.stdout, res.stdout
    # a dead letter, as a daemon writes it; the management API's sampled counters
    # show it only seconds later: status must not say "everything is published"
    s.amqp.ch.basic_publish(s.cfg.amqp.dead_letter_exchange, s.cfg.amqp.publisher_queue,
                            b"poison", pika.BasicProperties(delivery_mode=2,
                                                            headers={"x-error": "test"}))
    t0 = time.monotonic()
    res = cli(s.stack, cfg_file, "status")
    took = time.monotonic() - t0
    assert res.returncode == 1, f"status {took:.1f}s after the dead letter:\n{res.stdout}"
    assert "NOT everything is published" in res.stdout
    assert "dead-letter queue: 1 message(s)" in res.stdout
    res = cli(s.stack, cfg_file, "status", "--json")
    assert res.returncode == 1 and '"dead_letter_queue": 1' in res.stdout


def _config(tmp_path: Path, rgw: str) -> Path:
    pw = tmp_path / "pw"
    pw.write_text("x")
    path = tmp_path / "publisher.yaml"
    path.write_text(
        f"cvmfs:\n  stratum0_url: http://s0/cvmfs\n  gateway_url: http://gw/api\n"
        f"amqp:\n  password_file: {pw}\n  management_url: http://127.0.0.1:1\n"
        f"vault:\n  url: http://127.0.0.1:3\n  role_id_file: {pw}\n  secret_id_file: {pw}\n"
        f"s3:\n  endpoint_url: http://127.0.0.1:2\n  access_key_file: {pw}\n"
        f"  secret_key_file: {pw}\n"
        f"rgw:\n  push_endpoint: amqps://rabbit:5671\n{rgw}")
    return path


def test_config_check_names_an_unreadable_push_password(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-secret"
    bad = _config(tmp_path, f"  push_user: notification\n  push_password_file: {missing}\n")
    assert main(["config", "check", str(bad)]) == 78
    err = capsys.readouterr().err
    assert "rgw.push_password_file" in err and str(missing) in err, err
    # the daemons that create no topics do not need it
    assert main(["config", "check", str(bad), "--daemon", "cvmfs-repo-sync"]) == 0
    unset = _config(tmp_path, "  push_user: notification\n")
    assert main(["config", "check", str(unset)]) == 78
    assert "rgw.push_password" in capsys.readouterr().err
    readable = _config(tmp_path, f"  push_user: notification\n  push_password_file: "
                                 f"{tmp_path / 'pw'}\n")
    assert main(["config", "check", str(readable)]) == 0


def test_health_subcommand_takes_its_options(tmp_path: Path, capsys) -> None:
    doc = StatusDocument(tmp_path / "cvmfs-repo-sync.json", "cvmfs-repo-sync")
    doc.flush(force=True)
    assert main(["health", "--daemon", "cvmfs-repo-sync", "--status-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("healthy: cvmfs-repo-sync")
    assert main(["health", "--max-age", "60", "--daemon", "cvmfs-repo-consumers",
                 "--status-dir", str(tmp_path)]) == 1
    assert "unhealthy: no status document" in capsys.readouterr().out
    with pytest.raises(SystemExit) as help_exit:
        main(["health", "--help"])
    assert help_exit.value.code == 0
    assert "--daemon" in capsys.readouterr().out
