"""When the daemon publishes: quiet window, maximum delay, coalescing, backoff,
independent repositories, status document. Driven with a fake clock (counts and
order are asserted, never timings)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.daemons.repo_sync import NAME
from cvmfs_publisher.publishing.scheduler import RepoSync
from cvmfs_publisher.staging.area import PendingTimes
from tests.conftest import DOUBLE
from tests.cvmfs_server_double import calls, inject_fault

from .conftest import OTHER, REPO, SyncEnv, files_of, wait_until

T0 = 1_800_000_000.0


def test_burst_is_coalesced_into_one_publish(env: SyncEnv) -> None:
    daemon = env.daemon()
    daemon.tick(T0)  # start-up recovery: nothing there yet
    for i in range(300):
        env.put(f"burst/f{i:03d}", b"%d" % i, t=T0 + i * 0.005)
        if i % 50 == 0:
            assert daemon.tick(T0 + i * 0.005 + 0.1) == []  # still busy: no publish
    assert daemon.tick(T0 + 1.5 + 2.0) == [REPO]  # quiet for 2 s after the last one

    assert len(env.revisions()) == 1
    assert len(files_of(env.published())) == 300
    assert env.clean()


def test_quiet_window(env: SyncEnv) -> None:
    daemon = env.daemon(sync={"quiet_seconds": 2.0, "max_delay_seconds": 30.0})
    daemon.tick(T0)
    env.put("a", b"1", t=T0)
    assert daemon.tick(T0 + 1.0) == []
    env.put("b", b"2", t=T0 + 1.5)  # the window starts again
    assert daemon.tick(T0 + 3.0) == []
    assert not env.revisions()
    assert daemon.tick(T0 + 3.5) == [REPO]
    assert daemon.tick(T0 + 100) == []  # nothing pending: nothing to do
    assert len(env.revisions()) == 1
    assert set(files_of(env.published())) == {"a", "b"}


def test_max_delay_bounds_a_steady_trickle(env: SyncEnv) -> None:
    daemon = env.daemon(sync={"quiet_seconds": 2.0, "max_delay_seconds": 5.0})
    daemon.tick(T0)
    published_at = []
    for i in range(12):  # one change a second: never quiet for 2 s
        t = T0 + i
        env.put(f"t{i}", b"x", t=t)
        if daemon.tick(t + 0.5):
            published_at.append(i)
    # The oldest change (t0) has waited 5 s at t=5.5; the next batch starts with
    # t6 and is published at t=11.5.
    assert published_at == [5, 11]
    assert [len(r["added"]) for r in env.revisions()] == [6, 6]


def test_pending_times_follow_the_directory(env: SyncEnv) -> None:
    st = env.staging()
    times = PendingTimes(st)
    assert times.get() is None
    env.put("a", b"1", t=T0)
    env.put("b", b"1", t=T0 + 5)
    assert times.get() == (T0, T0 + 5) and times.count == 2
    env.put("a", b"2", t=T0 + 9)  # replaced: first_time stays, time moves
    assert times.get() == (T0, T0 + 9)
    st.take_batch()
    assert times.get() is None and times.count == 0


def test_failing_repository_backs_off_alone(env: SyncEnv) -> None:
    daemon = env.daemon(sync={"quiet_seconds": 0.0, "backoff_initial": 10.0,
                              "backoff_max": 40.0})
    daemon.tick(T0)
    inject_fault(env.root, "publish", rc=1, repo=REPO)
    inject_fault(env.root, "publish", rc=1, repo=REPO)
    env.put("mine", b"a", t=T0)
    env.put("theirs", b"b", repo=OTHER, t=T0)

    assert sorted(daemon.tick(T0 + 1)) == [REPO, OTHER]
    doc = env.status()["repositories"]
    assert doc[OTHER]["last_result"] == "ok" and doc[OTHER]["pending"] == 0
    assert files_of(env.published(OTHER)) == {"theirs": ("f", 0o644, b"b")}
    mine = doc[REPO]
    assert mine["last_result"] == "failed" and mine["consecutive_failures"] == 1
    assert 5.0 <= mine["backoff"] <= 10.0 and "step=publish rc=1" in mine["last_error"]
    assert mine["pending"] == 0 or mine["pending"] == 1

    env.put("more", b"c", repo=OTHER, t=T0 + 2)
    assert daemon.tick(T0 + 3) == [OTHER]  # REPO waits for its backoff, OTHER goes on
    assert daemon.tick(T0 + 12) == [REPO]  # second failure: backoff doubles
    assert env.status()["repositories"][REPO]["consecutive_failures"] == 2
    assert daemon.tick(T0 + 13) == []
    assert daemon.tick(T0 + 40) == [REPO]
    doc = env.status()["repositories"][REPO]
    assert (doc["last_result"], doc["consecutive_failures"], doc["backoff"],
            doc["last_error"]) == ("ok", 0, 0.0, "")
    assert doc["last_publish"] > 0 and doc["last_publish_duration"] > 0
    assert files_of(env.published()) == {"mine": ("f", 0o644, b"a")}
    assert not env.in_transaction()


def test_status_shows_pending_changes(env: SyncEnv) -> None:
    daemon = env.daemon()
    daemon.tick(T0)
    for i in range(3):
        env.put(f"p{i}", b"x", t=T0)
    env.staging().take_batch()  # a batch in flight counts too
    env.put("p3", b"x", t=T0)
    daemon.repos[REPO].recovered = True
    daemon.repos[REPO].next_attempt = T0 + 100  # hold it back
    daemon.tick(T0 + 1)
    daemon.status.flush(force=True)  # the run loop's job
    assert env.status()["repositories"][REPO]["pending"] == 4


def test_slow_repository_does_not_delay_the_others(env: SyncEnv) -> None:
    """Thread pool: REPO's publish hangs (3 s) while OTHER publishes."""
    # Not a "delay" fault: the double sleeps holding its faults lock, which would
    # stall every other call. The publish delay, for REPO only, through a wrapper.
    slow = env.root / "bin" / "cvmfs_server_slow"
    slow.write_text(f'#!/bin/sh\nif [ "$1" = publish ] && [ "$2" = {REPO} ]; then '
                    f'export CVMFS_DOUBLE_PUBLISH_DELAY=3; fi\n'
                    f'CVMFS_DOUBLE_ROOT="{env.root}" exec "{sys.executable}" "{DOUBLE}" "$@"\n')
    slow.chmod(0o755)
    cfg = env.config(sync={"quiet_seconds": 0.05, "poll_interval": 0.02},
                     cvmfs={"server_command": str(slow)})
    status = StatusDocument(Path(cfg.status.dir) / f"{NAME}.json", NAME, min_interval=0)
    daemon = RepoSync(cfg, status)
    env.put("slow", b"s")
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_until("REPO publishing", lambda: any(
            c["command"] == "publish" and c["rc"] is None for c in calls(env.root)))
        env.put("fast", b"f", repo=OTHER)
        wait_until("OTHER published", lambda: "fast" in env.published(OTHER))
        assert "slow" not in env.published()  # REPO still in its publish
    finally:
        daemon.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert "slow" in env.published()  # the publish in hand was finished
    assert env.status()["healthy"] is False  # stopped cleanly
