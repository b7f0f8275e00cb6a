"""The anti-entropy scheduler: who is reconciled, when, how many at once.

The reconcile itself is replaced by a recording function here (the
scheduler's contract is about triggers and bounds; the real reconciles
against RGW are in test_anti_entropy.py). No timing is asserted: the tests
wait for events and check what ran.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cvmfs_publisher.core.config import ConsumersConfig
from cvmfs_publisher.core.errors import Transient
from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.pipeline.anti_entropy import AntiEntropy
from cvmfs_publisher.pipeline.reconcile import ManifestPending
from tests.consumers.support import wait_until


@dataclass
class FakePlan:
    staged: int = 0
    seconds: float = 0.01
    mode: str = "manifest"
    failed: list[tuple[str, str]] = field(default_factory=list)
    in_sync: int = 0
    in_flight: int = 0
    recent: int = 0
    hashed: int = 0


class Recorder:
    """Stands for the reconcile: records calls, can block, can fail, returns plans."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.running = 0
        self.max_running = 0
        self.gate = threading.Event()
        self.gate.set()
        self.plans: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, repository: str, reason: str) -> Any:
        with self._lock:
            self.calls.append((repository, reason))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.gate.wait(10)
            queued = self.plans.get(repository)
            result = queued.pop(0) if queued else FakePlan()
            if isinstance(result, Exception):
                raise result
            return result
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def status(tmp_path: Path) -> StatusDocument:
    return StatusDocument(tmp_path / "s.json", "cvmfs-repo-consumers")


def scheduler(status: StatusDocument, rec: Recorder, **cfg: Any) -> AntiEntropy:
    ae = AntiEntropy(ConsumersConfig(**cfg), status, rec)
    ae.start()
    return ae


def test_only_active_repositories_are_reconciled(status: StatusDocument) -> None:
    rec = Recorder()
    ae = scheduler(status, rec)
    try:
        ae.request("idle.infn.it", "periodic")  # this host is not its active consumer
        ae.activated("a.infn.it", "active consumer")
        wait_until("a reconciled", lambda: ("a.infn.it", "active consumer") in rec.calls)
        time.sleep(0.3)
        assert [c[0] for c in rec.calls] == ["a.infn.it"]
        # the next run is the periodic one, jittered around the default 600 s
        delay, why = ae.pending()["a.infn.it"]
        assert why == "periodic" and 600 * 0.9 - 1 <= delay <= 600 * 1.1
        ae.deactivated("a.infn.it")
        assert "a.infn.it" not in ae.pending(), "another host reconciles it now"
    finally:
        ae.stop()


def test_bounded_parallelism_and_coalescing(status: StatusDocument) -> None:
    rec = Recorder()
    rec.gate.clear()
    ae = scheduler(status, rec, reconcile_parallel=2)
    try:
        repos = [f"r{i}.infn.it" for i in range(5)]
        for r in repos:
            ae.activated(r, "active consumer")
            ae.request(r, "S3 back after an outage")  # coalesces with the first request
        wait_until("two running", lambda: rec.running == 2)
        time.sleep(0.3)
        assert rec.running == 2, "at most reconcile_parallel at once"
        rec.gate.set()
        wait_until("all five ran", lambda: len(rec.calls) == 5)
        assert rec.max_running == 2
        assert sorted(c[0] for c in rec.calls) == repos, "one run per repository"
    finally:
        ae.stop()


def test_provisioned_waits_for_the_topic_warm_up(status: StatusDocument) -> None:
    rec = Recorder()
    ae = scheduler(status, rec)
    try:
        ae.activated("new.infn.it", "active consumer")
        wait_until("first run", lambda: len(rec.calls) == 1)
        ae.created("new.infn.it")
        delay, why = ae.pending()["new.infn.it"]
        assert why == "provisioned" and 35 <= delay <= 40, "after the ~30 s warm-up"
    finally:
        ae.stop()


def test_s3_back_reconciles_every_active_repository_once(status: StatusDocument) -> None:
    rec = Recorder()
    ae = scheduler(status, rec)
    try:
        for r in ("a.infn.it", "b.infn.it"):
            ae.activated(r, "active consumer")
        wait_until("first runs", lambda: len(rec.calls) == 2)
        ae.s3_ok()  # no outage seen: nothing
        ae.s3_failed()
        ae.s3_failed()
        ae.s3_ok()
        ae.s3_ok()
        wait_until("runs after the outage", lambda: len(rec.calls) == 4)
        assert sorted(rec.calls[2:]) == [("a.infn.it", "S3 back after an outage"),
                                         ("b.infn.it", "S3 back after an outage")]
    finally:
        ae.stop()


def test_results_in_status_and_retries(status: StatusDocument) -> None:
    rec = Recorder()
    rec.plans["a.infn.it"] = [FakePlan(staged=3), FakePlan(staged=2, recent=4)]
    rec.plans["b.infn.it"] = [RuntimeError("RGW unreachable")]
    ae = scheduler(status, rec)
    try:
        ae.activated("a.infn.it", "active consumer")
        ae.activated("b.infn.it", "active consumer")
        wait_until("both ran", lambda: len(rec.calls) == 2)
        wait_until("status written", lambda: status.snapshot()["repositories"].get(
            "b.infn.it", {}).get("reconcile_error"))
        a = status.snapshot()["repositories"]["a.infn.it"]
        assert a["reconcile_healed"] == 3 and a["healed_total"] == 3
        assert a["last_reconcile"] > 0 and a["reconcile_mode"] == "manifest"
        b = status.snapshot()["repositories"]["b.infn.it"]
        assert "RGW unreachable" in b["reconcile_error"]
        assert ae.pending()["b.infn.it"][1].startswith("retry"), "a failure is retried"
        ae.request("a.infn.it", "operator")
        wait_until("second run of a", lambda: len(rec.calls) == 3)
        wait_until("counted", lambda: status.snapshot()["repositories"]["a.infn.it"][
            "healed_total"] == 5)
        # objects too recent to tell: looked at again after the grace period
        delay, why = ae.pending()["a.infn.it"]
        assert why == "objects too recent last time" and delay <= 31 + 1
    finally:
        ae.stop()


def test_a_reconcile_failing_on_s3_then_succeeding_reconciles_the_others(
        status: StatusDocument) -> None:
    rec = Recorder()
    rec.plans["a.infn.it"] = [FakePlan(), Transient("S3 unreachable"), FakePlan()]
    ae = scheduler(status, rec)
    try:
        for r in ("a.infn.it", "b.infn.it"):
            ae.activated(r, "active consumer")
        wait_until("first runs", lambda: len(rec.calls) == 2)
        ae.request("a.infn.it", "periodic")  # S3 is down now: no event shows it
        wait_until("failed run", lambda: len(rec.calls) == 3)
        ae.request("a.infn.it", "operator")  # S3 is back
        wait_until("b after the outage", lambda: ("b.infn.it", "S3 back after an outage")
                   in rec.calls)
        assert ("a.infn.it", "S3 back after an outage") not in rec.calls
    finally:
        ae.stop()


def test_a_missing_manifest_is_no_s3_outage(status: StatusDocument) -> None:
    """Before the sync daemon's first manifest every reconcile fails as ManifestPending:
    it is retried with backoff, and the next download's success starts no "S3 back"
    reconcile (which failed the same way, one reconcile per event)."""
    rec = Recorder()
    rec.plans["a.infn.it"] = [ManifestPending("no manifest yet")]
    ae = scheduler(status, rec)
    try:
        ae.activated("a.infn.it", "active consumer")
        wait_until("failed run", lambda: ae.pending().get("a.infn.it", (0, ""))[1].startswith(
            "retry"))
        for _ in range(3):
            ae.s3_ok()  # downloads go on succeeding
        delay, why = ae.pending()["a.infn.it"]
        assert why.startswith("retry") and delay > 10, "backoff, not 'S3 back' at once"
        assert rec.calls == [("a.infn.it", "active consumer")]
    finally:
        ae.stop()
