"""The admin CLI against the real broker, Vault and RGW (and the daemon it drives)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.operations.cli import main
from tests.provision.helpers import assert_provisioned, running


def cli(stack, cfg_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvmfs_publisher.operations.cli", "--config",
                           str(cfg_file), *args], env=stack.subprocess_env(),
                          capture_output=True, text=True, timeout=60, check=False)


def write_config(s) -> Path:
    a = s.cfg.amqp
    return s.stack.write(amqp={"publisher_queue": a.publisher_queue,
                               "control_exchange": a.control_exchange,
                               "dead_letter_exchange": a.dead_letter_exchange,
                               "dead_letter_queue": a.dead_letter_queue})


def test_provision_dlq_list_and_replay(scenario, broker, openbao) -> None:
    """Operator workflow: keys missing -> dead letter -> keys added -> replay -> provisioned."""
    s = scenario()
    cfg_file = write_config(s)
    openbao.client().secrets.kv.v2.delete_metadata_and_all_versions(s.vault_path,
                                                                    mount_point="secrets")
    with running(s.cfg, broker):
        res = cli(s.stack, cfg_file, "provision", s.repo, "--user", "alice", "--subject",
                  s.subject)
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + 30
        listing = {}
        while time.monotonic() < deadline:
            res = cli(s.stack, cfg_file, "dlq", "list", "--json")
            assert res.returncode == 0, res.stderr
            listing = json.loads(res.stdout)
            if listing:
                break
            time.sleep(0.3)
        assert len(listing) == 1
        assert listing[0]["repository"] == s.repo
        assert "no keys in Vault" in listing[0]["error"]
        # listing consumed nothing
        assert s.amqp.queue_depth(s.cfg.amqp.dead_letter_queue) == 1
        openbao.put_keys(s.vault_path, s.keys)
        res = cli(s.stack, cfg_file, "dlq", "replay", "--repo", "someone-else.infn.it")
        assert "0 message(s) replayed" in res.stdout
        res = cli(s.stack, cfg_file, "dlq", "replay", "--repo", s.repo)
        assert res.returncode == 0 and "1 message(s) replayed" in res.stdout, res.stderr
        s.amqp.wait_announcement("created", s.repo)
        res = cli(s.stack, cfg_file, "deprovision", s.repo)
        assert res.returncode == 0, res.stderr
        s.amqp.wait_announcement("deleted", s.repo)
    assert s.amqp.queue_depth(s.cfg.amqp.dead_letter_queue) == 0
    assert not (Path(s.cfg.cvmfs.repositories_dir) / s.repo).exists()


def test_provision_rejects_invalid_requests_before_queueing(scenario) -> None:
    s = scenario()
    res = cli(s.stack, write_config(s), "provision", "Bad_Name.infn.it")
    assert res.returncode == 2 and "Bad_Name" in res.stderr
    assert s.amqp.ch.queue_declare(s.cfg.amqp.publisher_queue).method.message_count == 0


def test_status_table_and_json(scenario, broker) -> None:
    s = scenario()
    cfg_file = write_config(s)
    status_dir = Path(s.cfg.status.dir)
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
    assert_provisioned(s, broker)
    for daemon in ("cvmfs-repo-consumers", "cvmfs-repo-sync"):
        doc = StatusDocument(status_dir / f"{daemon}.json", daemon,
                             broker=daemon != "cvmfs-repo-sync")  # as runtime.start does
        doc.repo(s.repo, pending=0, last_publish=time.time() - 30, last_result="ok")
        doc.flush(force=True)
    pc = StatusDocument(status_dir / "publisher-consumer.json", "publisher-consumer")
    pc.flush(force=True)
    res = cli(s.stack, cfg_file, "status")
    assert res.returncode == 0, res.stdout + res.stderr
    assert s.repo in res.stdout and "everything is published" in res.stdout
    # a failing repository: exit 1, the error on its line
    sync = StatusDocument(status_dir / "cvmfs-repo-sync.json", "cvmfs-repo-sync", broker=False)
    error = (f"publish exited 1: gateway unreachable; lease held on /var/spool/cvmfs/{s.repo}/"
             "in_transaction.lock (check the gateway)")  # longer than any column
    sync.repo(s.repo, pending=4, last_result="failed", consecutive_failures=2,
              last_error=error)
    sync.flush(force=True)
    res = cli(s.stack, cfg_file, "status")
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(s.repo))
    assert "failed" in lines[i] and " 4 " in lines[i]
    assert lines[i + 1].strip() == f"last error: cvmfs-repo-sync: {error}"  # whole
    res = cli(s.stack, cfg_file, "status", "--json")
    doc = json.loads(res.stdout)
    assert doc["all_published"] is False
    assert doc["repositories"][s.repo]["queue_depth"] == 0
    assert doc["repositories"][s.repo]["last_error"] == f"cvmfs-repo-sync: {error}"
    # broker_connected only where there is a broker: cvmfs-repo-sync has none
    assert "broker_connected" not in doc["daemons"]["cvmfs-repo-sync"]
    assert doc["daemons"]["publisher-consumer"]["broker_connected"] is False


def test_config_check(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("amqp:\n  port: five\n")
    assert main(["config", "check", str(bad)]) == 78
    assert "amqp.port" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    pw = tmp_path / "pw"
    pw.write_text("x")
    good.write_text(f"cvmfs:\n  stratum0_url: http://s0/cvmfs\n  gateway_url: http://gw/api\n"
                    f"amqp:\n  password_file: {pw}\n  management_url: http://127.0.0.1:1\n"
                    f"s3:\n  endpoint_url: http://127.0.0.1:2\n  access_key_file: {pw}\n"
                    f"  secret_key_file: {pw}\n")
    assert main(["config", "check", str(good), "--daemon", "cvmfs-repo-consumers",
                 "--daemon", "cvmfs-repo-sync"]) == 0
    assert main(["config", "check", str(good)]) == 78  # publisher-consumer needs Vault
    assert "vault" in capsys.readouterr().err
