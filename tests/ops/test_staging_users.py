"""The staging volume as the containers use it: two users on one directory tree.

In docker-compose.yml cvmfs-repo-consumers writes ``/data/cvmfs`` as uid
10001 while sync-publisher (root: cvmfs_server needs it) takes batches out of
it, and publisher-consumer (root) removes a deprovisioned repository's part.
Nothing in a single-process test shows whether a directory the root side
creates stays writable for the consumers, so this runs the consumer side as
uid 10001 for real. Needs root (to switch users) and a system Python that
uid 10001 can execute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_publisher.staging import area as staging

from ._support import REPO

CONSUMER_UID = 10001
REPOSITORY = "alice-personalrepo.infn.it"
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="needs root to act as the consumers' user"),
    pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK),
                       reason=f"needs {SYSTEM_PYTHON} (the test's own Python may be under /root)"),
]

CONSUMER_STAGES = """
import sys
from cvmfs_publisher.staging import area as staging, fencing
s = staging.Staging(sys.argv[1], sys.argv[2]).ensure()
if sys.argv[4] == "stage":
    s.term = "term-of-a-consumer-that-died"
    s.stage(staging.Entry(path=sys.argv[3], op="delete"))
    print("staged")
else:  # active again: what fencing set aside is checked, then forgotten
    for e in fencing.to_check(s):
        fencing.checked(s, e)
    print("checked", len(s.stale_entries()))
"""


@pytest.fixture
def staging_dir() -> Iterator[Path]:
    """A staging root uid 10001 can reach (pytest's tmp_path is root-only)."""
    top = Path(tempfile.mkdtemp(prefix="ops-staging-", dir="/tmp"))
    top.chmod(0o755)
    root = top / "cvmfs"
    root.mkdir()
    os.chown(root, CONSUMER_UID, CONSUMER_UID)  # as the images create /data/cvmfs
    yield root
    shutil.rmtree(top, ignore_errors=True)


def consumer_stages(root: Path, path: str, action: str = "stage"
                    ) -> subprocess.CompletedProcess[str]:
    if not os.access(REPO / "scripts", os.R_OK | os.X_OK):
        pytest.skip("the package sources are not readable")
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", CONSUMER_STAGES, str(root), REPOSITORY, path, action],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        user=CONSUMER_UID, group=CONSUMER_UID, extra_groups=[],
        env={"PYTHONPATH": str(REPO / "scripts"), "PATH": "/usr/bin:/bin"},
    )


def test_consumer_user_can_stage_into_the_shared_volume(staging_dir: Path) -> None:
    res = consumer_stages(staging_dir, "a.txt")
    assert res.returncode == 0, res.stderr
    assert (staging_dir / REPOSITORY).stat().st_uid == CONSUMER_UID


def test_consumer_user_can_stage_after_the_sync_daemon_took_a_batch(staging_dir: Path) -> None:
    assert consumer_stages(staging_dir, "a.txt").returncode == 0
    sync_side = staging.Staging(staging_dir, REPOSITORY)
    assert [e.path for e in sync_side.take_batch()] == ["a.txt"]
    sync_side.finish_batch()
    res = consumer_stages(staging_dir, "b.txt")
    assert res.returncode == 0, res.stderr.strip().splitlines()[-1:]



def test_consumer_user_can_check_what_the_sync_daemon_set_aside(staging_dir: Path) -> None:
    """fence() (sync, root) creates ``stale/``; the consumers list and empty it.

    Found by the container test: a root-owned 0750 ``stale/`` stopped the
    consumers after their SIGKILL (Permission denied, nothing consumed).
    """
    from cvmfs_publisher.staging import fencing

    assert consumer_stages(staging_dir, "a.txt").returncode == 0
    sync_side = staging.Staging(staging_dir, REPOSITORY)
    assert fencing.fence(sync_side) == 1  # no live term: set aside
    assert sync_side.stale_dir.stat().st_uid == CONSUMER_UID
    res = consumer_stages(staging_dir, "a.txt", action="check")
    assert res.returncode == 0, res.stderr.strip().splitlines()[-1:]
    assert res.stdout.strip() == "checked 0"
