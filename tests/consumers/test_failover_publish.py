"""No stale publish after a failover (DESIGN §3, Scale-out; issue 12 item 3).

Two publisher hosts on one repository: each has its own staging directory
and its own consumers + sync daemon pair (real processes), both consume the
repository's single-active-consumer queue on the real RabbitMQ, both
publish into the same repository (one cvmfs_server double root stands for
the shared repository / gateway), S3 is the real RGW. The sequence of the
issue: host X stages key K and dies before publishing; host Y becomes the
active consumer, K changes again and Y publishes; X comes back (its sync
daemon first, the worst order) and must not publish its stale change over
Y's. Then Y goes away, X becomes active again, and the repository still
shows what S3 holds. Run for both orders of the hosts, and for a deletion
racing an upload in both directions.

The fence under test is the consumer term (:mod:`cvmfs_publisher.staging.fencing`).
S3's Last-Modified has a one-second resolution, so consecutive versions of K
are uploaded at least a second apart (what a race across hosts needs to be
told apart at all).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from cvmfs_publisher.staging.area import Staging
from tests.consumers.support import Env, Process, queue_counts, wait_until
from tests.cvmfs_server_double import published_tree

SYNC = "cvmfs_publisher.daemons.repo_sync"
KEY, PATH = "cvmfs/k.txt", "k.txt"
V1, V2 = b"version 1 (stale)\n", b"version 2 (newest)\n"


class Host:
    """One publisher host: a consumers daemon and a sync daemon on its own staging."""

    def __init__(self, env: Env, tmp: Path, name: str) -> None:
        self.name, self.dir = name, tmp / name
        self.overrides = {"cvmfs": {"staging_dir": str(self.dir / "staging")},
                          "log": {"dir": str(self.dir / "log")},
                          "status": {"dir": str(self.dir / "status")}}
        self.env = env
        self.consumers = Process(env.stack, f"{name}-consumers", self.overrides)
        self.sync = Process(env.stack, f"{name}-sync", self.overrides, module=SYNC)

    def staging(self, repo: str) -> Staging:
        return Staging(self.dir / "staging", repo)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.dir / "log").glob("*.log"))

    def restart_consumers(self) -> None:
        self.consumers = Process(self.env.stack, f"{self.name}-consumers", self.overrides)
        self.consumers.start()

    def restart_sync(self) -> None:
        self.sync = Process(self.env.stack, f"{self.name}-sync", self.overrides, module=SYNC)
        self.sync.start()

    def stop(self) -> None:
        self.consumers.stop()
        self.sync.stop()


def published(env: Env, repo: str) -> bytes | None:
    root = Path(env.cfg.cvmfs.repositories_dir).parents[2]
    p = Path(published_tree(root, repo)) / PATH
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None


def staged_op(host: Host, repo: str) -> str | None:
    e = host.staging(repo).pending_get(PATH)
    return e.op if e else None


def wait_active(host: Host, label: str) -> None:
    wait_until(f"{host.name} active", lambda: f"queue={label} outcome=active-consumer"
               in host.log(), 30, 0.2)


CASES = {
    # name: (K before the sequence, what X stages, what Y then makes K), None = deleted
    "stale put over a newer put": (None, V1, V2),
    "stale delete over a re-upload": (V1, None, V2),
    "stale put over a delete": (None, V1, None),
}


@pytest.mark.parametrize("order", ["a-then-b", "b-then-a"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_stale_publish_after_failover(env: Env, tmp_path: Path, case: str,
                                         order: str) -> None:
    before, x_sees, y_makes = CASES[case]
    r = env.provision()
    hosts = {n: Host(env, tmp_path, n) for n in ("host-a", "host-b")}
    x, y = (hosts["host-a"], hosts["host-b"]) if order == "a-then-b" else (
        hosts["host-b"], hosts["host-a"])
    try:
        if before is not None:  # K exists and is published (by x, the active host)
            x.consumers.start()
            x.sync.start()
            wait_active(x, r.label)
            env.put(r, KEY, before)
            wait_until("K published", lambda: published(env, r.repository) == before, 60, 0.2)
            x.sync.terminate()
        else:
            x.consumers.start()
            wait_active(x, r.label)
        y.consumers.start()
        wait_until("y waiting", lambda: f"queue={r.label} outcome=consuming" in y.log(), 20)
        # 1. x stages its version of K (x's sync daemon is down: nothing published).
        time.sleep(1.1)
        if x_sees is None:
            env.s3.delete_object(Bucket=r.label, Key=KEY)
            wait_until("x staged the deletion", lambda: staged_op(x, r.repository) == "delete",
                       30, 0.1)
        else:
            env.put(r, KEY, x_sees)
            wait_until("x staged K", lambda: staged_op(x, r.repository) == "put", 30, 0.1)
        # 2. x dies before publishing; y becomes the active consumer.
        x.consumers.kill()
        wait_active(y, r.label)
        y.sync.start()
        # 3. K changes again in S3 and y publishes it.
        time.sleep(1.1)
        if y_makes is None:
            env.s3.delete_object(Bucket=r.label, Key=KEY)
        else:
            env.put(r, KEY, y_makes)
        wait_until("y staged the newest K", lambda: f'key="{KEY}" outcome=staged op='
                   f'{"delete" if y_makes is None else "put"}' in y.log(), 60, 0.2)
        wait_until("y published the newest K", lambda: published(env, r.repository) == y_makes
                   and y.staging(r.repository).pending_count() == 0
                   and not y.staging(r.repository).has_batch(), 90, 0.2)
        # 4. x comes back, its sync daemon first (the worst order), while y is active.
        x.restart_sync()
        x.restart_consumers()
        wait_until("x's sync daemon set its stale change aside",
                   lambda: "step=fence outcome=set-aside" in x.log(), 30, 0.2)
        wait_until("x consuming (waiting)",
                   lambda: x.log().count(f"queue={r.label} outcome=consuming") >= 2, 20)
        time.sleep(5)  # several of x's publish rounds (quiet period 2 s, poll 0.5 s)
        assert published(env, r.repository) == y_makes, f"{x.name} published stale content"
        # 5. y goes away: x is the active consumer again, checks its leftover against S3.
        y.consumers.kill()
        wait_until("x active again", lambda: x.log().count(
            f"queue={r.label} outcome=active-consumer") >= 2, 30, 0.2)
        wait_until("x rechecked K", lambda: "step=fence outcome=rechecked" in x.log(), 60, 0.2)
        wait_until("x's staging drained", lambda: x.staging(r.repository).pending_count() == 0
                   and not x.staging(r.repository).stale_entries(), 60, 0.2)
        assert published(env, r.repository) == y_makes
        assert queue_counts(env.cfg, r.label)[0] == 0
    finally:
        for h in hosts.values():
            h.stop()
    record: dict[str, Any] = {"case": case, "order": order,
                              "published": None if y_makes is None else y_makes.decode()}
    print("failover sequence:", record)
