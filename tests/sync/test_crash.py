"""The sync daemon as a real process, killed with SIGKILL at each step of a publish.

After the restart the published repository must equal the wanted state (the
killed batch plus a change staged after the kill: nothing lost, nothing old
published over something newer), no transaction may be open and staging must
be empty. The crash points are hit exactly: a FIFO as a staged object blocks
the copy half-way; a cvmfs_server wrapper kills its caller right before or
right after ``publish``; the double's publish delay holds a publish open.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.cvmfs_server_double import calls, inject_fault, leases, spool_dir, union_dir

from .conftest import REPO, SyncEnv, files_of, stop, wait_until

N = 10


@pytest.fixture
def fast(env: SyncEnv) -> SyncEnv:
    env.raw["sync"].update(quiet_seconds=0.2, max_delay_seconds=2.0, poll_interval=0.05)
    return env


def stage_batch(env: SyncEnv) -> dict[str, bytes]:
    wanted = {f"d/f{i}": b"v1-%d" % i for i in range(N)}
    for path, data in wanted.items():
        env.put(path, data)
    return wanted


def restart_and_settle(env: SyncEnv, wanted: dict[str, bytes]) -> None:
    """Restart the daemon, let it recover and publish, stop it with SIGTERM (exit 0)."""
    proc = env.start()
    try:
        wait_until("the wanted state published", lambda: (
            env.clean() and not env.in_transaction()
            and {k: v[2] for k, v in files_of(env.published()).items()} == wanted), 30, proc)
    finally:
        rc = stop(proc)
    assert rc == 0, env.workdir.joinpath("daemon.out").read_text()[-3000:]
    assert {k: v[2] for k, v in files_of(env.published()).items()} == wanted
    assert not env.in_transaction()
    assert env.clean()


def killed(proc: subprocess.Popen[bytes]) -> None:
    rc = proc.wait(timeout=30)
    assert rc == -signal.SIGKILL


def test_sigkill_during_the_copy(fast: SyncEnv) -> None:
    env = fast
    wanted = stage_batch(env)
    # The 6th object becomes a FIFO: the daemon blocks opening it, 5 files written.
    sixth = env.staging().pending_get("d/f5")
    assert sixth is not None
    obj = env.staging().object_path(sixth)
    obj.unlink()
    os.mkfifo(obj)
    proc = env.start()
    try:
        wait_until("copy half done", lambda: env.in_transaction() and (
            union_dir(env.root, REPO) / "d" / "f4").exists(), 30, proc)
    finally:
        proc.kill()
    killed(proc)
    assert env.in_transaction() and "d" not in env.published()
    tmp = obj.with_name(obj.name + ".restore")
    tmp.write_bytes(wanted["d/f5"])
    os.replace(tmp, obj)
    env.put("d/f0", b"v2")  # staged after the crash: must win over the replayed batch
    wanted["d/f0"] = b"v2"

    restart_and_settle(env, wanted)

    assert "stale-transaction" in env.log_text()
    assert [c["rc"] for c in calls(env.root) if c["command"] == "abort"] == [0]


def test_sigkill_between_copy_and_publish(fast: SyncEnv) -> None:
    env = fast
    env.killing_wrapper()
    env.kill_marker("before", "publish")
    wanted = stage_batch(env)
    killed(env.start())
    assert env.in_transaction()  # every file written, the publish never ran
    assert (union_dir(env.root, REPO) / "d" / f"f{N - 1}").exists()
    assert not env.revisions() and env.staging().has_batch()
    env.put("d/f1", b"v2")
    env.delete("d/f2")
    wanted["d/f1"] = b"v2"
    del wanted["d/f2"]

    restart_and_settle(env, wanted)


def test_sigkill_just_after_publish_before_staging_is_cleaned(fast: SyncEnv) -> None:
    env = fast
    env.killing_wrapper()
    env.kill_marker("after", "publish")
    wanted = stage_batch(env)
    killed(env.start())
    assert not env.in_transaction()
    assert {k: v[2] for k, v in files_of(env.published()).items()} == wanted
    assert env.staging().has_batch()  # published, not yet dropped from staging
    env.put("d/f3", b"v2")
    wanted["d/f3"] = b"v2"

    restart_and_settle(env, wanted)

    # The replayed batch was already in place: no second revision for it.
    assert [len(r["added"]) + len(r["changed"]) for r in env.revisions()] == [N + 1, 1]


def test_sigkill_of_the_process_group_during_publish(fast: SyncEnv) -> None:
    """The real tool's worst case (README §6 B): publish killed with its caller,
    in_transaction.lock and a stale is_publishing.lock left behind."""
    env = fast
    wanted = stage_batch(env)
    proc = env.start(new_session=True, CVMFS_DOUBLE_PUBLISH_DELAY="3")
    try:
        wait_until("publish running", lambda: any(
            c["command"] == "publish" and c["rc"] is None for c in calls(env.root)), 30, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    killed(proc)
    assert env.in_transaction()
    assert (spool_dir(env.root, REPO) / "is_publishing.lock").exists()
    assert not env.revisions()

    restart_and_settle(env, wanted)


def test_sigterm_finishes_the_publish_in_hand(fast: SyncEnv) -> None:
    env = fast
    wanted = stage_batch(env)
    proc = env.start(CVMFS_DOUBLE_PUBLISH_DELAY="1.5")
    wait_until("publish running", lambda: any(
        c["command"] == "publish" and c["rc"] is None for c in calls(env.root)), 30, proc)
    assert stop(proc, signal.SIGTERM) == 0
    assert {k: v[2] for k, v in files_of(env.published()).items()} == wanted
    assert not env.in_transaction() and env.clean()
    status = env.status()
    assert status["healthy"] is False  # a clean stop says so
    repo = status["repositories"][REPO]
    assert repo["last_result"] == "ok" and repo["pending"] == 0 and repo["last_publish"] > 0
    assert "stopped" in Path(env.raw["log"]["dir"], "cvmfs-repo-sync.log").read_text()


def test_lone_sigkill_of_the_daemon_during_a_long_publish(fast: SyncEnv) -> None:
    """cvmfs README §10: SIGKILL of the daemon's PID alone (KillMode=process, kill -9,
    the OOM killer) leaves the upload running: it holds is_publishing.lock (abort
    answers 22 with the lock message), the union shows the unpublished files, and
    it dies of SIGPIPE seconds later leaving the transaction open. The restart
    must wait for it, abort, and publish the batch: nothing lost."""
    env = fast
    wanted = stage_batch(env)
    proc = env.start(CVMFS_DOUBLE_PUBLISH_DELAY="4")
    try:
        wait_until("publish uploading", lambda: any(
            c["command"] == "publish" and c["rc"] is None for c in calls(env.root)), 30, proc)
        time.sleep(0.3)  # in the upload window (the double prints its line, then forks)
    finally:
        proc.kill()  # the PID only, not its group
    killed(proc)
    lock = spool_dir(env.root, REPO) / "is_publishing.lock"
    with open(lock) as fh:
        with pytest.raises(BlockingIOError):  # the upload outlived its caller
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    assert env.in_transaction() and not env.revisions()

    restart_and_settle(env, wanted)

    log = env.log_text()
    assert "outcome=already-published" not in log
    assert "outcome=waiting: a publish still holds" in log
    assert [r for r in env.revisions() if r["command"] == "publish"], "nothing published"
    assert not leases(env.root)


def test_cvmfs_server_dies_with_its_caller(env: SyncEnv) -> None:
    """A cvmfs_server child gets SIGKILL when the daemon that started it dies alone."""
    env.put("f", b"x")
    env.publisher().publish(REPO)  # the repository exists
    inject_fault(env.root, "transaction", delay=60)
    script = ("import sys; from cvmfs_publisher.adapters.cvmfs import CvmfsServer; "
              "from cvmfs_publisher.core import config; "
              "cfg = config.load(sys.argv[1]); CvmfsServer(cfg.cvmfs).transaction(sys.argv[2])")
    cfg_path = env.workdir / "caller.yaml"
    cfg_path.write_text(yaml.safe_dump(env.raw))
    caller = subprocess.Popen([sys.executable, "-c", script, str(cfg_path), REPO],
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "scripts")})
    running = wait_until("transaction running", lambda: [
        c for c in calls(env.root) if c["command"] == "transaction" and c["rc"] is None], 30)
    caller.kill()
    caller.wait()
    pid = running[0]["pid"]

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    wait_until("cvmfs_server gone with its caller", gone, 10)
    if env.in_transaction():  # it died before or after taking the lock: clean up
        subprocess.run([str(env.double.command), "abort", "-f", REPO], check=True,
                       capture_output=True)
