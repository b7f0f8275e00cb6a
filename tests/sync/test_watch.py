"""The sync daemon's wake-up: inotify on the staging directories (no polling of idle ones).

Real inotify on a temporary staging root, entries staged by the real
staging API. The waits have generous upper bounds; nothing asserts how
fast an event comes.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cvmfs_publisher.staging.area import Entry, Staging
from cvmfs_publisher.staging.watch import PendingWatch, Wakeups

A = "alice-personalrepo.infn.it"
B = "bob-personalrepo.infn.it"


def stage(root: Path, repo: str, path: str) -> None:
    Staging(root, repo).ensure().stage(Entry(op="delete", path=path, time=1.0))


def wait_for(watch: PendingWatch, repo: str) -> set[str] | None:
    seen: set[str] = set()
    for _ in range(50):
        got = watch.wait(0.2)
        if got is None:
            return None
        seen |= got
        if repo in seen:
            break
    return seen


def test_a_staged_entry_names_its_repository_also_after_a_batch_was_taken(tmp_path: Path
                                                                          ) -> None:
    for repo in (A, B):
        Staging(tmp_path, repo).ensure()
    watch = PendingWatch(tmp_path)
    assert watch.available
    try:
        assert watch.wait(0) == set()  # the first wait also watches the root
        for repo in (A, B):
            watch.watch(repo)
        stage(tmp_path, A, "one")
        assert wait_for(watch, A) == {A}  # B's directory did not change
        Staging(tmp_path, A).take_batch()  # pending/ becomes batch/, a new pending/
        assert A in (wait_for(watch, A) or {A})
        watch.watch(A)  # what the daemon does before it lists A again
        while watch.wait(0.1):
            pass  # the take's own events
        stage(tmp_path, A, "two")
        assert wait_for(watch, A) == {A}
    finally:
        watch.close()


def test_a_new_repository_directory_means_look_at_everything(tmp_path: Path) -> None:
    watch = PendingWatch(tmp_path)
    try:
        watch.wait(0)
        Staging(tmp_path, A).ensure()
        assert wait_for(watch, A) is None
    finally:
        watch.close()


def test_wakeups_idle_change_at_once_active_ones_per_poll_and_a_first_scan(tmp_path: Path
                                                                          ) -> None:
    for repo in (A, B):
        Staging(tmp_path, repo).ensure()
    watch = PendingWatch(tmp_path)
    active: set[str] = set()
    wake = Wakeups(watch, poll_interval=0.2, scan_interval=3600, active=lambda: set(active),
                   stopping=lambda: False)
    try:
        assert wake.next() is None  # the first call: every repository
        watch.wait(0)
        for repo in (A, B):
            watch.watch(repo)
        active.add(B)
        assert wake.next() == [B]  # nothing changed: the active one at its poll
        stage(tmp_path, A, "x")
        assert wake.next() == [A, B]  # the idle one that changed first, then the active one
    finally:
        watch.close()


def test_a_stop_request_ends_the_wait(tmp_path: Path) -> None:
    watch = PendingWatch(tmp_path)
    stopping = threading.Event()
    wake = Wakeups(watch, poll_interval=3600, scan_interval=3600, active=set,
                   stopping=stopping.is_set)

    def stop() -> None:  # what RepoSync.stop does, from a signal handler
        stopping.set()
        watch.wake()
    try:
        assert wake.next() is None
        threading.Timer(0.2, stop).start()
        assert wake.next() == []  # returned although nothing is due for an hour
    finally:
        watch.close()


def test_a_staging_root_created_after_the_start_is_watched_once_it_exists(tmp_path: Path
                                                                          ) -> None:
    root = tmp_path / "staging"
    watch = PendingWatch(root)
    try:
        assert watch.wait(3600) is None  # no root yet: look again (soon), at everything
        Staging(root, A).ensure()
        assert watch.wait(0) == set()  # now the root is watched
        watch.watch(A)
        stage(root, A, "x")
        assert wait_for(watch, A) == {A}
    finally:
        watch.close()
