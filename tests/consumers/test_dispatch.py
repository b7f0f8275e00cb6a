"""dispatch.py: per-path order, fairness across repositories, the reserved worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from cvmfs_publisher.pipeline.dispatch import Dispatcher, Job


class Recorder:
    """A run() that records start/end order and can hold jobs until released."""

    def __init__(self, hold: Callable[[Any], bool] = lambda item: False) -> None:
        self.lock = threading.Lock()
        self.started: list[Any] = []
        self.finished: list[Any] = []
        self.running: set[Any] = set()
        self.overlaps: list[tuple[Any, Any]] = []
        self.release = threading.Event()
        self.hold = hold

    def __call__(self, job: Job) -> None:
        with self.lock:
            for other in self.running:
                if other[1] == job.item[1] and other[0] == job.item[0]:
                    self.overlaps.append((other, job.item))
            self.running.add(job.item)
            self.started.append(job.item)
        if self.hold(job.item):
            self.release.wait(10)
        else:
            time.sleep(0.002)
        with self.lock:
            self.running.discard(job.item)
            self.finished.append(job.item)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_same_path_never_overlaps_and_keeps_arrival_order() -> None:
    rec = Recorder()
    d = Dispatcher(8, rec, reserve=0).start()
    items = [("repo", f"p{i % 3}", i) for i in range(60)]
    for item in items:
        d.submit("repo", [item[1]], item)
    assert d.wait_idle(10)
    d.close()
    assert rec.overlaps == []
    for path in ("p0", "p1", "p2"):
        order = [i for (_, p, i) in rec.started if p == path]
        assert order == sorted(order), f"{path} out of arrival order"


def test_a_job_waits_for_an_earlier_waiting_job_of_its_path() -> None:
    """A later job of path A must not overtake an earlier one still waiting."""
    rec = Recorder(hold=lambda item: item[2] == 0)
    d = Dispatcher(4, rec, reserve=0).start()
    d.submit("r", ["a"], ("r", "a", 0))  # runs, held
    wait_for(lambda: ("r", "a", 0) in rec.started)
    d.submit("r", ["a", "b"], ("r", "ab", 1))  # blocked by a
    d.submit("r", ["b"], ("r", "b", 2))  # must wait for job 1 (path b)
    d.submit("r", ["c"], ("r", "c", 3))  # free to run
    wait_for(lambda: ("r", "c", 3) in rec.finished)
    assert ("r", "b", 2) not in rec.started
    rec.release.set()
    assert d.wait_idle(10)
    d.close()
    assert rec.started.index(("r", "ab", 1)) < rec.started.index(("r", "b", 2))


def test_the_reserve_worker_serves_a_quiet_repository_while_another_holds_all() -> None:
    rec = Recorder(hold=lambda item: item[0] == "busy")
    d = Dispatcher(3, rec).start()  # 3 workers + 1 reserved
    for i in range(10):
        d.submit("busy", [f"f{i}"], ("busy", f"f{i}", i))
    wait_for(lambda: len(rec.started) == 3)
    time.sleep(0.05)
    assert len(rec.started) == 3, "the reserve worker took a busy repository's job"
    d.submit("quiet", ["q"], ("quiet", "q", 0))
    wait_for(lambda: ("quiet", "q", 0) in rec.finished, 2)
    rec.release.set()
    assert d.wait_idle(10)
    d.close()
    assert len(rec.finished) == 11


def test_round_robin_across_repositories() -> None:
    rec = Recorder()
    d = Dispatcher(1, rec, reserve=0)
    for i in range(20):
        d.submit("a", [i], ("a", i, i))
    for i in range(3):
        d.submit("b", [i], ("b", i, i))
    d.start()
    assert d.wait_idle(10)
    d.close()
    first_b = [n for n, item in enumerate(rec.started) if item[0] == "b"]
    assert first_b[:3] == [1, 3, 5], rec.started[:8]


def test_drop_withdraws_waiting_jobs_only() -> None:
    rec = Recorder(hold=lambda item: True)
    d = Dispatcher(1, rec, reserve=0).start()
    d.submit("r", ["a"], ("r", "a", 0))
    wait_for(lambda: len(rec.started) == 1)
    d.submit("r", ["b"], ("r", "b", 1))
    d.submit("s", ["c"], ("s", "c", 2))
    dropped = d.drop(lambda item: item[0] == "r")
    assert dropped == [("r", "b", 1)]
    assert d.waiting() == 1 and d.running() == 1
    rec.release.set()
    assert d.wait_idle(10)
    assert d.close(timeout=5)
    assert rec.started == [("r", "a", 0), ("s", "c", 2)]


def test_a_failing_job_does_not_kill_its_worker() -> None:
    done: list[int] = []

    def run(job: Job) -> None:
        if job.item == 0:
            raise RuntimeError("boom")
        done.append(job.item)
    d = Dispatcher(1, run, reserve=0).start()
    d.submit("r", ["x"], 0)
    d.submit("r", ["x"], 1)
    assert d.wait_idle(5)
    d.close()
    assert done == [1]
