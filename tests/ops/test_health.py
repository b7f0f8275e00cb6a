"""cvmfs_publisher.operations.health: the containers' HEALTHCHECK.

Documents are written with the daemons' own ``StatusDocument`` so that the
check and the writer cannot drift apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_publisher.core.status import StatusDocument
from cvmfs_publisher.operations import health

from ._support import REPO

DAEMON = "cvmfs-repo-sync"


def write_status(directory: Path, daemon: str = DAEMON, **fields: object) -> Path:
    """A status document as the daemon writes it (``flush`` stamps ``updated``)."""
    doc = StatusDocument(directory / f"{daemon}.json", daemon)
    if fields:
        doc.set(**fields)
    doc.repo("alice-personalrepo.infn.it", pending=2)
    doc.flush(force=True)
    return directory / f"{daemon}.json"


def test_fresh_healthy_document(tmp_path: Path) -> None:
    path = write_status(tmp_path)
    ok, reason = health.check(path, 120)
    assert ok, reason
    assert reason.startswith(f"{DAEMON}: ok") and "1 repositories" in reason
    assert "\n" not in reason


def test_stale_document(tmp_path: Path) -> None:
    path = write_status(tmp_path)
    ok, reason = health.check(path, 120, now=time.time() + 500)
    assert not ok
    assert "stale" in reason and "limit 120s" in reason


def test_missing_document(tmp_path: Path) -> None:
    ok, reason = health.check(tmp_path / f"{DAEMON}.json", 120)
    assert not ok
    assert "no status document" in reason and str(tmp_path) in reason


def test_unhealthy_document(tmp_path: Path) -> None:
    doc = StatusDocument(tmp_path / f"{DAEMON}.json", DAEMON)
    doc.set(healthy=False)
    doc.repo("alice-personalrepo.infn.it", consecutive_failures=3,
             last_error="gateway said: secret-looking text")
    doc.flush(force=True)
    ok, reason = health.check(tmp_path / f"{DAEMON}.json", 120)
    assert not ok
    assert "unhealthy" in reason and "alice-personalrepo.infn.it" in reason
    assert "secret-looking" not in reason, "error texts stay out of docker inspect"


def test_never_written_and_invalid_documents(tmp_path: Path) -> None:
    path = tmp_path / f"{DAEMON}.json"
    path.write_text(json.dumps({"daemon": DAEMON, "updated": 0.0, "healthy": True}))
    ok, reason = health.check(path, 120)
    assert not ok and "never written" in reason
    path.write_text(json.dumps({"daemon": DAEMON, "updated": "soon", "healthy": True}))
    assert not health.check(path, 120)[0]
    path.write_text("{not json")
    ok, reason = health.check(path, 120)
    assert not ok and "not valid JSON" in reason
    path.write_text(json.dumps(["a", "list"]))
    ok, reason = health.check(path, 120)
    assert not ok and "not a cvmfs-publisher status document" in reason


def test_document_of_another_daemon(tmp_path: Path) -> None:
    """A volume mix-up (another daemon's file under this name) is not health."""
    written = write_status(tmp_path, daemon="cvmfs-repo-consumers")
    path = tmp_path / f"{DAEMON}.json"
    written.rename(path)
    ok, reason = health.check(path, 120, daemon=DAEMON)
    assert not ok and "belongs to 'cvmfs-repo-consumers'" in reason
    assert health.check(path, 120)[0], "without daemon= only freshness and health count"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_place_of_the_document_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / f"{DAEMON}.json"
    os.mkfifo(path)
    started = time.monotonic()
    ok, reason = health.check(path, 120)
    assert not ok and "not a regular file" in reason
    assert time.monotonic() - started < 5


def test_main_exit_codes_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_status(tmp_path)
    assert health.main(["--daemon", DAEMON, "--max-age", "120", "--status-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("healthy: ") and out.count("\n") == 1
    assert health.main(["--daemon", "publisher-consumer", "--status-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("unhealthy: ") and out.count("\n") == 1


def test_usage_errors_exit_1_not_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Docker reserves exit code 2; argparse would use it."""
    for argv in ([], ["--daemon", "nope"], ["--daemon", DAEMON, "--max-age", "-5"],
                 ["--daemon", DAEMON, "--max-age", "soon"]):
        with pytest.raises(SystemExit) as exc:
            health.main(argv)
        assert exc.value.code == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err


def test_status_dir_from_the_environment() -> None:
    assert health.default_status_dir({}) == "/var/lib/cvmfs-publisher"
    assert health.default_status_dir({"CVMFS_PUBLISHER_STATUS_DIR": "/b"}) == "/b"
    both = {"CVMFS_PUBLISHER_STATUS_DIR": "/b", "CVMFS_PUBLISHER_STATUS__DIR": "/a"}
    assert health.default_status_dir(both) == "/a"


def test_module_command_line_as_docker_runs_it(tmp_path: Path) -> None:
    """``python3 -m cvmfs_publisher.operations.health --daemon ... --max-age ...``.

    As in the images' HEALTHCHECK.
    """
    write_status(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"),
           "CVMFS_PUBLISHER_STATUS__DIR": str(tmp_path)}
    command = [sys.executable, "-m", "cvmfs_publisher.operations.health", "--daemon", DAEMON,
               "--max-age", "120"]
    res = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                         check=False, cwd="/")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("\n") == 1 and res.stdout.startswith("healthy: ")
    (tmp_path / f"{DAEMON}.json").unlink()
    res = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                         check=False, cwd="/")
    assert res.returncode == 1
    assert res.stdout.startswith("unhealthy: no status document")


def test_health_module_uses_the_standard_library_only() -> None:
    """It must keep answering when a third-party dependency is broken."""
    code = (
        "import sys; import cvmfs_publisher.operations.health; "
        "bad = sorted(m for m in ('yaml', 'pika', 'boto3', 'hvac', 'pyzabbix') "
        "if m in sys.modules); print(','.join(bad))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True, cwd="/")
    assert res.stdout.strip() == ""
