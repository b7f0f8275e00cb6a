"""publisher-consumer end to end on real RabbitMQ, OpenBao and Ceph RGW.

The only double is ``cvmfs_server`` (tests/cvmfs_server_double.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cvmfs_publisher.core.names import label_of
from devstack import rabbitmq as rabbit_mod
from tests.conftest import REPO_ROOT
from tests.cvmfs_server_double import in_transaction, inject_fault, kill_during_publish, leases
from tests.provision.helpers import (
    Scenario,
    assert_provisioned,
    consumers,
    running,
    wait_until,
)


def put_and_expect_event(s: Scenario) -> dict:
    s.rgw.s3.put_object(Bucket=s.label, Key="outside/ignored.txt", Body=b"no event")
    s.rgw.s3.put_object(Bucket=s.label, Key="cvmfs/x", Body=b"hello")

    # a warm topic (tests.conftest.WarmTopics); a cold one would take up to 30 s (README)
    bodies = s.amqp.consume(s.label, 60)
    assert len(bodies) == 1, "expected exactly the cvmfs/ event (none for outside/)"
    rec = json.loads(bodies[0])["Records"][0]
    assert rec["s3"]["object"]["key"] == "cvmfs/x"
    assert rec["s3"]["bucket"]["name"] == s.label
    return rec


def test_personal_repository_end_to_end(scenario, broker) -> None:
    s = scenario(warm=True)
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        doc = s.amqp.wait_announcement("created", s.repo)
        assert doc["queue"] == s.label
    assert_provisioned(s, broker)
    put_and_expect_event(s)
    assert f"repository={s.repo}" in s.log_text()


def test_group_repository_from_json(scenario, broker) -> None:
    s = scenario(kind="group", warm=True)
    with running(s.cfg, broker):
        s.amqp.send(s.json())
        s.amqp.wait_announcement("created", s.repo)
    assert_provisioned(s, broker)
    put_and_expect_event(s)


def test_same_message_twice_changes_nothing(scenario, broker) -> None:
    s = scenario()
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
        gw_mtime = (s.keys_dir / f"{s.repo}.gw").stat().st_mtime_ns
        s.amqp.send(f"  alice , {s.subject} , {s.repo} , P  ")
        s.amqp.wait_announcement("created", s.repo)
    assert len(s.calls("mkfs")) == 1
    assert (s.keys_dir / f"{s.repo}.gw").stat().st_mtime_ns == gw_mtime
    assert len(s.rgw.get_notifications(s.label)) == 1
    assert "outcome=unchanged" in s.log_text()
    assert_provisioned(s, broker)


def test_delete_undoes_everything(scenario, broker) -> None:
    s = scenario()
    staging = Path(s.cfg.cvmfs.staging_dir) / s.repo
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
        (staging / "pending").mkdir(parents=True)
        s.amqp.send(s.json("delete"))
        s.amqp.wait_announcement("deleted", s.repo)
        # deleting again is harmless
        s.amqp.send(s.json("delete"))
        s.amqp.wait_announcement("deleted", s.repo)
    assert s.rgw.find_topic(s.label) is None
    assert s.rgw.get_notifications(s.label) == []
    with pytest.raises(OSError):
        broker.api("GET", f"/api/queues/%2F/{s.label}")
    assert not (Path(s.cfg.cvmfs.repositories_dir) / s.repo).exists()
    assert [c["argv"] for c in s.calls("rmfs")] == [["rmfs", "-f", s.repo]]
    assert not list(s.keys_dir.glob(f"{s.repo}.*"))
    assert not staging.exists()


def test_mkfs_leftover_is_removed_and_created_again(scenario, broker) -> None:
    s = scenario()
    # a failed mkfs leaves repositories.d/<repo> behind (observed on the real tool)
    leftover = Path(s.cfg.cvmfs.repositories_dir) / s.repo
    leftover.mkdir(parents=True)
    (leftover / "server.conf").write_text("# Created by cvmfs_server.\n")
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
    assert [c["argv"] for c in s.calls("rmfs")] == [["rmfs", "-f", s.repo]]
    assert_provisioned(s, broker)


def test_existing_queue_without_arguments_is_adopted(scenario, broker) -> None:
    s = scenario(warm=True)
    # the seed's deployment declared the queue as a plain classic queue
    s.amqp.ch.queue_declare(s.label, durable=True)
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
    policy = broker.api("GET", f"/api/policies/%2F/cvmfs-repo-{s.label}")
    assert policy["definition"]["dead-letter-exchange"] == s.cfg.amqp.dead_letter_exchange  # type: ignore[index]
    assert "delivery-limit" not in policy["definition"]  # type: ignore[index] # classic queue
    assert "is a classic queue" in s.log_text()
    wait_until("policy applied", lambda: broker.api("GET", f"/api/queues/%2F/{s.label}")
               .get("effective_policy_definition", {}).get("dead-letter-exchange"), 20)
    put_and_expect_event(s)


BAD_INPUTS = {
    "garbage bytes": b"\xff\xfe\x00\x81garbage",
    "wrong field count": b"alice,subject,onlythree.infn.it",
    "invalid repository name": b"alice,subj,Bad_Name.infn.it,P",
    "foreign domain": b"alice,subj,alice.example.org,P",
    "subject with slash": b"alice,../../sys/policy,alice-x.infn.it,P",
    "subject with dots": b"alice,a..b,alice-x.infn.it,P",
    "unknown type": b"alice,subj,alice-x.infn.it,X",
    "json unknown action": json.dumps({"action": "explode", "user": "a", "subject": "s",
                                       "repository": "a-x.infn.it", "type": "personal"}).encode(),
    "json not an object": b"[1,2,3]",
    "one mebibyte": b"a," * (1 << 19),
    "empty": b"",
}


def test_bad_inputs_are_dead_lettered_and_write_nothing(scenario, broker) -> None:
    s = scenario()
    with running(s.cfg, broker):
        for body in BAD_INPUTS.values():
            s.amqp.send(body)
        dead = s.amqp.dead_letters(len(BAD_INPUTS))
    bodies = {body for _, body in dead}
    assert bodies == set(BAD_INPUTS.values())
    for props, _ in dead:
        assert props.headers["x-error"].startswith("bad publisher message")
        assert props.headers["x-original-queue"] == s.cfg.amqp.publisher_queue
    assert s.calls("mkfs") == []
    assert not s.keys_dir.exists() or not list(s.keys_dir.iterdir())
    assert s.amqp.queue_depth(s.cfg.amqp.publisher_queue) == 0
    errors = [ln for ln in s.log_text().splitlines() if "outcome=dead-lettered" in ln]
    assert len(errors) == len(BAD_INPUTS)
    status = json.loads((Path(s.cfg.status.dir) / "publisher-consumer.json").read_text())
    assert status["dead_lettered"] == len(BAD_INPUTS)


def test_keys_absent_from_vault_is_permanent(scenario, broker, openbao) -> None:
    s = scenario()
    with running(s.cfg, broker):
        s.amqp.send(f"alice,nobody-{s.subject},{s.repo},P")
        (props, _), = s.amqp.dead_letters(1)
    assert "no keys in Vault" in props.headers["x-error"]
    assert props.headers["x-repository"] == s.repo
    assert s.calls("mkfs") == []
    line = next(ln for ln in s.log_text().splitlines() if "dead-lettered" in ln)
    assert f"repository={s.repo}" in line and "no keys in Vault" in line


def test_vault_down_then_back(scenario, broker, openbao) -> None:
    s = scenario(publisher={"max_attempts": 20})
    openbao.stop()
    try:
        with running(s.cfg, broker):
            s.amqp.send(s.csv)
            wait_until("a retry after Vault was unreachable",
                       lambda: "outcome=retry" in s.log_text() and "Vault unreachable"
                       in s.log_text(), 20)
            # another message behind it is not blocked by the retried one
            s.amqp.send(b"not,a,valid")
            s.amqp.dead_letters(1)
            openbao.start()
            s.amqp.wait_announcement("created", s.repo, timeout=40)
    finally:
        if openbao.proc is None:
            openbao.start()
    assert_provisioned(s, broker)


def test_rgw_down_then_back(scenario, broker, ceph) -> None:
    s = scenario(publisher={"max_attempts": 20})
    ceph.stop_rgw()
    try:
        with running(s.cfg, broker):
            s.amqp.send(s.csv)
            wait_until("a retry after RGW was unreachable",
                       lambda: "outcome=retry" in s.log_text() and "RGW unreachable"
                       in s.log_text(), 30)
            ceph.start_rgw()
            s.amqp.wait_announcement("created", s.repo, timeout=40)
    finally:
        if not ceph.rgw_alive():
            ceph.start_rgw()
    assert_provisioned(s, broker)


def test_gives_up_after_max_attempts(scenario, broker) -> None:
    s = scenario(publisher={"max_attempts": 2})
    faults = s.double_root / "double" / "faults.json"
    faults.parent.mkdir(parents=True, exist_ok=True)
    fail = {"rc": 1, "stdout": "", "stderr": "Stratum0 not reachable"}
    faults.write_text(json.dumps({"mkfs": [fail, fail, fail]}))
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        (props, _), = s.amqp.dead_letters(1, timeout=30)
    assert "gave up" in s.log_text()
    assert props.headers["x-attempts"] == 2
    assert "exited 1" in props.headers["x-error"]


def test_broker_connection_killed_mid_message(scenario, broker) -> None:
    """The ack of a finished provisioning is lost with the connection: redelivered, no harm."""
    s = scenario()
    from cvmfs_publisher.core.status import StatusDocument
    from cvmfs_publisher.daemons.publisher_consumer import PublisherConsumer

    daemon = PublisherConsumer(s.cfg, StatusDocument(
        Path(s.cfg.status.dir) / "publisher-consumer.json", "publisher-consumer"))
    original = daemon.provisioner.create
    in_handler, killed = threading.Event(), threading.Event()
    calls = []

    def create(req, conn, ch):
        calls.append(req)
        result = original(req, conn, ch)
        if len(calls) == 1:
            in_handler.set()
            killed.wait(20)
            time.sleep(0.5)
        return result

    daemon.provisioner.create = create  # type: ignore[method-assign]
    with running(s.cfg, broker, daemon):
        s.amqp.send(s.csv)
        assert in_handler.wait(30)
        # the management API lists a new connection only after its stats interval
        wait_until("connection closed by the broker",
                   lambda: rabbit_mod.close_connections(broker, "publisher-consumer"), 15)
        killed.set()
        wait_until("redelivery after reconnect", lambda: len(calls) >= 2, 30)
        wait_until("queue drained", lambda: s.amqp.queue_depth(
            s.cfg.amqp.publisher_queue) == 0 and "outcome=unchanged" in s.log_text(), 30)
    assert "amqp connection lost" in s.log_text()
    assert len(s.calls("mkfs")) == 1
    assert s.amqp.get(s.cfg.amqp.dead_letter_queue) is None
    assert_provisioned(s, broker)


def test_wrapped_secret_id(scenario, broker, openbao, tmp_path) -> None:
    wrapped = tmp_path / "wrapped_secret_id"
    wrapped.write_text(openbao.wrapped_secret_id())
    s = scenario(vault={"secret_id_file": str(wrapped), "secret_id_wrapped": True})
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
    assert wrapped.read_text() not in s.log_text()
    assert_provisioned(s, broker)


def test_daemon_process_sigterm_and_config_errors(scenario, broker, tmp_path) -> None:
    s = scenario()
    cfg_file = s.stack.write(**{"amqp": {"publisher_queue": s.cfg.amqp.publisher_queue,
                                         "control_exchange": s.cfg.amqp.control_exchange,
                                         "dead_letter_exchange": s.cfg.amqp.dead_letter_exchange,
                                         "dead_letter_queue": s.cfg.amqp.dead_letter_queue}})
    env = s.stack.subprocess_env()
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts/publisher_consumer.py"),
                             "--config", str(cfg_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until("consumer up", lambda: consumers(broker, s.cfg.amqp.publisher_queue), 30)
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert "publisher-consumer stopped" in (Path(s.cfg.log.dir) / "publisher-consumer.log"
                                            ).read_text()
    assert out == ""  # log.stdout is false in tests: nothing else is printed
    # configuration errors: one line naming the key, exit 78
    bad = tmp_path / "bad.yaml"
    for text, key in (("amqp:\n  hots: x\n", "amqp.hots"), ("amqp:\n  port: abc\n", "amqp.port"),
                      ("amqp:\n  password: inline\n", "amqp.password"),
                      ("log:\n  dir: /tmp\n", "amqp.password")):
        bad.write_text(text)
        res = subprocess.run([sys.executable, "-m", "cvmfs_publisher.daemons.publisher_consumer",
                              "--config", str(bad)], env={**env, "CVMFS_PUBLISHER_CONFIG": ""},
                             capture_output=True, text=True, timeout=30, check=False)
        assert res.returncode == 78, res.stderr
        assert key in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_label_helper() -> None:
    assert label_of("alice-personalrepo.infn.it") == "alice-personalrepo"
    assert os.sep == "/"


def test_provisioning_without_announcement_listener(scenario, broker) -> None:
    """An announcement nobody listens to (no consumers daemon yet) must not fail provisioning."""
    s = scenario()
    s.amqp.ch.queue_delete(s.amqp.announcements)
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        wait_until("provisioned", lambda: "outcome=provisioned" in s.log_text(), 30)
    assert s.amqp.queue_depth(s.cfg.amqp.dead_letter_queue) == 0
    assert_provisioned(s, broker)


def test_same_create_message_while_stuck_in_a_transaction(scenario, broker) -> None:
    """cvmfs README §10: a repository left in a transaction by a crash is
    ``in transaction - unhealthy``; rmfs + mkfs would leak its gateway lease
    (16 for two hours). Provisioning leaves it to the sync daemon, which
    repairs it with abort -f."""
    s = scenario()
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
    kill_during_publish(s.double_root, s.repo)
    listed = subprocess.run([s.cfg.cvmfs.server_command, "list"], capture_output=True,
                            text=True, check=True).stdout
    assert f"{s.repo} (stratum0 / gw - in transaction - unhealthy)" in listed
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
    assert s.calls("rmfs") == [] and len(s.calls("mkfs")) == 1
    assert in_transaction(s.double_root, s.repo)
    assert "outcome=left-to-sync" in s.log_text()
    # What the sync daemon then does: abort -f releases the lease, transactions work.
    server = [s.cfg.cvmfs.server_command]
    subprocess.run([*server, "abort", "-f", s.repo], capture_output=True, check=True)
    assert f"{s.repo}/" not in leases(s.double_root)
    subprocess.run([*server, "transaction", s.repo], capture_output=True, check=True)
    subprocess.run([*server, "abort", "-f", s.repo], capture_output=True, check=True)
    assert_provisioned(s, broker)


def test_delete_in_a_transaction_aborts_before_rmfs(scenario, broker) -> None:
    """Deprovisioning a repository in a transaction: abort -f first; while the
    abort fails (5: gateway unreachable) no rmfs (the message is retried), so
    the gateway lease is released, never leaked."""
    s = scenario()
    with running(s.cfg, broker):
        s.amqp.send(s.csv)
        s.amqp.wait_announcement("created", s.repo)
        kill_during_publish(s.double_root, s.repo)
        inject_fault(s.double_root, "abort", rc=5)
        s.amqp.send(s.json("delete"))
        s.amqp.wait_announcement("deleted", s.repo, timeout=60)
    aborts = s.calls("abort")
    assert [c["rc"] for c in aborts] == [5, 0]
    rmfs = s.calls("rmfs")
    assert [c["rc"] for c in rmfs] == [0] and rmfs[0]["start"] > aborts[1]["end"]
    assert not (Path(s.cfg.cvmfs.repositories_dir) / s.repo).exists()
    assert f"{s.repo}/" not in leases(s.double_root)
