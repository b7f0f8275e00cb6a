"""Every exit code of DESIGN §2, injected into the double: never an open
transaction, never a lost batch, every error one log line."""

from __future__ import annotations

import fcntl
import logging
import subprocess
import threading

import pytest

from cvmfs_publisher.publishing.errors import PublishError
from tests.cvmfs_server_double import drop_lease, inject_fault, spool_dir, union_dir

from .conftest import REPO, SyncEnv, files_of


def rcs(env: SyncEnv, command: str) -> list[int | None]:
    return [c["rc"] for c in env.calls(command)]


@pytest.mark.parametrize("rc", [16, 17])
def test_transaction_busy_is_retried(env: SyncEnv, rc: int) -> None:
    inject_fault(env.root, "transaction", rc=rc)
    inject_fault(env.root, "transaction", rc=rc)
    env.put("f", b"x")

    out = env.publisher().publish(REPO)

    assert out is not None and out.publishes == 1
    assert rcs(env, "transaction") == [rc, rc, 0]
    assert files_of(env.published()) == {"f": ("f", 0o644, b"x")}
    assert env.clean()


def test_transaction_busy_too_long_keeps_the_batch(env: SyncEnv) -> None:
    for _ in range(4):  # transaction_retries = 3: four attempts in all
        inject_fault(env.root, "transaction", rc=16)
    env.put("f", b"x")

    with pytest.raises(PublishError) as exc:
        env.publisher().publish(REPO)

    assert (exc.value.step, exc.value.rc) == ("transaction", 16)
    assert "lease path busy" in exc.value.detail
    assert rcs(env, "transaction") == [16, 16, 16, 16]
    assert env.staging().has_batch() and not env.revisions()
    out = env.publisher().publish(REPO)  # the lease is free again: the kept batch goes
    assert out is not None and out.replay and out.publishes == 1
    assert env.clean()


def test_transaction_other_failure_is_not_retried(env: SyncEnv) -> None:
    inject_fault(env.root, "transaction", rc=1)
    env.put("f", b"x")
    with pytest.raises(PublishError) as exc:
        env.publisher().publish(REPO)
    assert (exc.value.step, exc.value.rc) == ("transaction", 1)
    assert "cannot acquire lease" in exc.value.detail
    assert rcs(env, "transaction") == [1]
    env.publisher().publish(REPO)
    assert files_of(env.published()) == {"f": ("f", 0o644, b"x")}


def test_publish_failure_aborts_and_keeps_the_batch(env: SyncEnv) -> None:
    env.put("before", b"1")
    env.publisher().publish(REPO)
    inject_fault(env.root, "publish", rc=1)
    env.put("f", b"x")
    env.delete("before")

    with pytest.raises(PublishError) as exc:
        env.publisher().publish(REPO)

    assert (exc.value.step, exc.value.rc) == ("publish", 1)
    assert "Failed to commit transaction" in exc.value.detail
    assert not env.in_transaction()  # abort -f
    assert rcs(env, "abort") == [0]
    assert files_of(env.published()) == {"before": ("f", 0o644, b"1")}
    assert sorted(union_dir(env.root, REPO).iterdir()) == sorted(
        (union_dir(env.root, REPO) / n) for n in ("before", "new_repository"))
    assert env.staging().has_batch()

    out = env.publisher().publish(REPO)
    assert out is not None and out.replay
    assert files_of(env.published()) == {"f": ("f", 0o644, b"x")}
    assert env.clean()


def test_abort_gateway_unreachable_is_retried_first(env: SyncEnv) -> None:
    env.put("f", b"x")
    inject_fault(env.root, "publish", rc=1)
    inject_fault(env.root, "abort", rc=5)
    inject_fault(env.root, "abort", rc=5)
    problems: list[str] = []
    pub = env.publisher()
    pub.on_problem = lambda repo, text: problems.append(text)

    with pytest.raises(PublishError) as exc:
        pub.publish(REPO)

    assert exc.value.step == "publish"
    assert rcs(env, "abort") == [5, 5, 0]
    # Nothing else was done to the repository between the aborts.
    tail = [c["command"] for c in env.calls()][-4:]
    assert tail == ["publish", "abort", "abort", "abort"]
    assert len(problems) == 2 and "cannot drop lease" in problems[0]
    assert not env.in_transaction()
    env.publisher().publish(REPO)
    assert files_of(env.published()) == {"f": ("f", 0o644, b"x")}


def test_abort_22_is_not_believed_while_in_transaction_lock_is_there(env: SyncEnv) -> None:
    """cvmfs README §10: an exit code alone never decides a state. 22 means "not
    in a transaction" only with that message and in_transaction.lock gone; here
    the lock is still there, so the abort is retried until it is gone."""
    env.put("f", b"x")
    inject_fault(env.root, "publish", rc=1)
    inject_fault(env.root, "abort", rc=22,
                 stderr=f"Repository {REPO} is not in a transaction")
    with pytest.raises(PublishError):
        env.publisher().publish(REPO)
    assert rcs(env, "abort") == [22, 0]
    assert not env.in_transaction() and env.staging().has_batch()

    out = env.publisher().publish(REPO)

    assert out is not None and out.replay
    assert [c["command"] for c in env.calls()][-2:] == ["transaction", "publish"]
    assert files_of(env.published()) == {"f": ("f", 0o644, b"x")}


def test_abort_waits_for_a_publish_still_holding_its_lock(env: SyncEnv) -> None:
    """22 with ``Could not acquire lock .../is_publishing.lock``: a publish (an
    orphan of a killed daemon) still runs. The flock says when it is over; then
    the abort goes through."""
    env.put("old", b"published")
    env.publisher().publish(REPO)
    subprocess.run([str(env.double.command), "transaction", REPO], check=True,
                   capture_output=True)
    lock = spool_dir(env.root, REPO) / "is_publishing.lock"
    holder = open(lock, "a")  # held across the timer below
    fcntl.flock(holder, fcntl.LOCK_EX)
    released = threading.Timer(1.0, holder.close)
    released.start()
    try:
        assert env.publisher().transactions.recover(REPO)
    finally:
        released.cancel()
        holder.close()
    assert rcs(env, "abort")[0] == 22 and rcs(env, "abort")[-1] == 0
    assert "Could not acquire lock" in env.calls("abort")[0]["stderr"]
    assert not env.in_transaction()


def test_transaction_22_needs_an_operator(env: SyncEnv) -> None:
    """transaction 22 (expired whitelist, layout mismatch) is permanent until an
    operator acts: not retried, the batch kept, a long backoff, status says so."""
    inject_fault(env.root, "transaction", rc=22)
    env.put("f", b"x")
    daemon = env.daemon()
    daemon.tick(env.clock[0] + 10)
    assert rcs(env, "transaction") == [22]
    assert env.staging().has_batch() and not env.revisions()
    repo = env.status()["repositories"][REPO]
    assert repo["last_result"] == "needs-operator"
    assert repo["backoff"] >= 900
    assert "until an operator acts" in repo["last_error"]
    daemon.tick(env.clock[0] + 60)  # no retry a minute later
    assert rcs(env, "transaction") == [22]
    daemon.tick(env.clock[0] + 2000)
    assert files_of(env.published()) == {"f": ("f", 0o644, b"x")}


def test_stacktrace_is_cut_from_the_error(env: SyncEnv) -> None:
    """Gateway unreachable at transaction: the message, not the address block."""
    inject_fault(env.root, "transaction", rc=1)
    env.put("f", b"x")
    with pytest.raises(PublishError) as exc:
        env.publisher().publish(REPO)
    assert "cannot acquire lease" in exc.value.detail
    assert "Stacktrace" not in exc.value.detail and "0x" not in exc.value.detail
    env.publisher().publish(REPO)


def test_a_leaked_lease_is_reported_with_the_way_out(env: SyncEnv) -> None:
    """rmfs of a repository in a transaction leaks its lease (cvmfs README §10):
    the recreated repository gets 16 for as long as the lease lives. When 16
    lasts longer than a publish takes, the error names the lease path and the
    documented way out."""
    env.put("f", b"x")
    env.publisher().publish(REPO)
    cmd = str(env.double.command)
    subprocess.run([cmd, "transaction", REPO], check=True, capture_output=True)
    subprocess.run([cmd, "rmfs", "-f", REPO], check=True, capture_output=True)
    env.put("g", b"y")
    pub = env.publisher()
    with pytest.raises(PublishError) as exc:
        pub.publish(REPO)  # mkfs again, then 16 until the retries are spent
    assert exc.value.rc == 16 and "leases-by-path" not in exc.value.detail
    pub.transactions.lease_held_after = 0.0  # as if the 16s had lasted longer than any publish
    with pytest.raises(PublishError) as exc:
        pub.publish(REPO)
    detail = exc.value.detail
    assert exc.value.rc == 16 and f"lease {REPO}/" in detail
    assert f"cvmfs_server abort -f {REPO}" in detail
    assert f"DELETE http://gateway.test:4929/api/v1/leases-by-path/{REPO}/" in detail
    assert drop_lease(env.root, f"{REPO}/")  # what the admin does on the gateway
    out = pub.publish(REPO)
    assert out is not None and out.publishes == 1
    assert files_of(env.published())["g"] == ("f", 0o644, b"y")


def test_abort_22_when_nothing_open_is_fine(env: SyncEnv) -> None:
    env.put("f", b"x")
    env.publisher().publish(REPO)
    env.publisher().transactions.abort(REPO)  # nothing open: 22, no retry, no error
    assert rcs(env, "abort") == [22]


def test_ingest_failure_keeps_the_batch(env: SyncEnv) -> None:
    from .conftest import tarball

    env.ingest("pkg", tarball({"f": b"1"}))
    env.put("software/keep", b"k")
    inject_fault(env.root, "ingest", rc=1)

    with pytest.raises(PublishError) as exc:
        env.publisher().publish(REPO)

    assert exc.value.step == "ingest" and exc.value.rc == 1
    assert not env.in_transaction()  # ingest aborts its own transaction
    assert env.staging().has_batch()
    out = env.publisher().publish(REPO)
    assert out is not None and out.unchanged == 1  # the file phase was already published
    assert files_of(env.published())["software/pkg/f"][2] == b"1"
    assert env.clean()


def test_every_error_is_one_log_line(env: SyncEnv, caplog: pytest.LogCaptureFixture) -> None:
    """Through the daemon: repository, step, exit code and the tool's own words."""
    caplog.set_level(logging.INFO)
    env.put("f", b"x")
    inject_fault(env.root, "publish", rc=1, stderr="Synchronization failed: disk on fire")
    daemon = env.daemon()
    daemon.tick(env.clock[0] + 10)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    line = errors[0]
    for part in (f"repository={REPO}", "step=publish", "rc=1", "disk on fire", "retry"):
        assert part in line
    assert "\n" not in line


def test_stale_transaction_at_start_up(env: SyncEnv, caplog: pytest.LogCaptureFixture) -> None:
    """A crash left the repository in a transaction with half-written content and
    a taken batch: the start aborts it and applies the batch again, then the rest."""
    env.put("old", b"published")
    env.publisher().publish(REPO)
    env.put("f1", b"batch")
    env.delete("old")
    env.staging().take_batch()  # the crashed daemon had taken it
    env.put("f2", b"pending")
    subprocess.run([str(env.double.command), "transaction", REPO], check=True,
                   capture_output=True)
    (union_dir(env.root, REPO) / "junk").write_text("half written")
    assert env.in_transaction()

    daemon = env.daemon()
    now = env.clock[0]
    assert REPO in daemon.tick(now)  # recovery first, whatever the windows say
    assert "junk" not in env.published() and not env.in_transaction()
    assert files_of(env.published()) == {"f1": ("f", 0o644, b"batch")}
    assert env.staging().pending_count() == 1  # f2 waits for its own window
    daemon.tick(now + 1000)
    assert files_of(env.published()) == {"f1": ("f", 0o644, b"batch"),
                                         "f2": ("f", 0o644, b"pending")}
    assert env.clean()
    assert any("stale-transaction" in r.getMessage() and REPO in r.getMessage()
               for r in caplog.records)


def test_replayed_batch_already_published_adds_no_revision(env: SyncEnv) -> None:
    """Crash after publish, before staging was cleaned: the replay publishes nothing."""
    env.put("f", b"x")
    env.symlink("l", "f")
    env.delete("nothing")
    st = env.staging()
    pub = env.publisher()
    pub.apply(REPO, st, st.take_batch())  # published, batch not finished: the crash
    assert len(env.revisions()) == 1 and st.has_batch()

    daemon = env.daemon()
    daemon.tick(env.clock[0])

    assert len(env.revisions()) == 1
    assert env.clean()


def test_mkfs_failure_keeps_the_batch(env: SyncEnv) -> None:
    """The leftover of a failed mkfs is provisioning's to repair (rmfs -f, mkfs):
    the sync cannot tell it from a repository being created right now."""
    inject_fault(env.root, "mkfs", rc=1)
    env.put("f", b"x")
    with pytest.raises(PublishError) as exc:
        env.publisher().publish(REPO)
    assert (exc.value.step, exc.value.rc) == ("mkfs", 1)
    assert "fail!" in exc.value.detail
    assert env.staging().has_batch()
