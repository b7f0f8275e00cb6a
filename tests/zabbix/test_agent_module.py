"""cvmfs_publisher.operations.zabbix_agent in-process: command-line parsing and malformed documents.

The agent tests cover the keys end to end; these cover the cases a real
daemon never writes (corrupt, oversized, wrongly typed documents) and the
command-line contract the UserParameter lines rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_publisher.core.status import StatusDocument, atomic_write_json
from cvmfs_publisher.operations import zabbix_agent as za

from .conftest import SCRIPTS


@pytest.fixture
def status_dir(tmp_path: Path) -> Path:
    doc = StatusDocument(tmp_path / "cvmfs-repo-sync.json", "cvmfs-repo-sync")
    doc.repo("a.infn.it", pending=5)
    doc.flush(force=True)
    return tmp_path


def run(status_dir: Path, *args: str) -> str:
    return za.run(["--status-dir", str(status_dir), *args], environ={})


def test_broker_connected_is_unsupported_for_a_daemon_without_a_broker(tmp_path: Path) -> None:
    StatusDocument(tmp_path / "cvmfs-repo-sync.json", "cvmfs-repo-sync",
                   broker=False).flush(force=True)
    with pytest.raises(za.CheckError, match="uses no broker"):
        run(tmp_path, "broker_connected", "--", "cvmfs-repo-sync")
    consumers = StatusDocument(tmp_path / "cvmfs-repo-consumers.json", "cvmfs-repo-consumers")
    consumers.flush(force=True)
    assert run(tmp_path, "broker_connected", "--", "cvmfs-repo-consumers") == "0"
    consumers.set(broker_connected=True)
    consumers.flush(force=True)
    assert run(tmp_path, "broker_connected", "--", "cvmfs-repo-consumers") == "1"


def test_status_dir_from_argument_env_and_default(status_dir: Path) -> None:
    args = ["repo", "pending", "--", "cvmfs-repo-sync", "a.infn.it"]
    assert za.run([f"--status-dir={status_dir}", *args], environ={}) == "5"
    assert za.run(args, environ={za.ENV_STATUS_DIR: str(status_dir)}) == "5"
    with pytest.raises(za.CheckError, match=f"missing: {za.DEFAULT_STATUS_DIR}/"):
        za.run(args, environ={})


@pytest.mark.parametrize(("args", "message"), [
    ([], "missing command"),
    (["health", "cvmfs-repo-sync"], "must follow a literal --"),
    (["repo", "--", "cvmfs-repo-sync", "a.infn.it"], "needs a FIELD"),
    (["repo", "nosuch", "--", "cvmfs-repo-sync", "a.infn.it"], "unknown repository field"),
    (["repo", "pending", "--", "cvmfs-repo-sync"], "takes DAEMON and REPOSITORY"),
    (["nosuch", "--", "cvmfs-repo-sync"], "unknown command"),
    (["age", "--", "cvmfs-repo-sync", "extra"], "takes 1 to 1 arguments"),
    (["health", "--", "cvmfs-repo-sync", "5m", "x"], "takes 1 to 2 arguments"),
])
def test_command_line_errors(status_dir: Path, args: list[str], message: str) -> None:
    with pytest.raises(za.CheckError, match=message):
        run(status_dir, *args)


def test_empty_trailing_arguments_are_the_agents_unset_parameters(status_dir: Path) -> None:
    """The agent passes "$2" as "" when a key omits it."""
    assert run(status_dir, "health", "--", "cvmfs-repo-sync", "") == "1"
    assert run(status_dir, "dead_lettered", "--", "cvmfs-repo-sync", "") == "0"


@pytest.mark.parametrize(("text", "seconds"), [
    ("", za.DEFAULT_MAX_AGE), ("30", 30), ("30s", 30), ("5m", 300), ("2h", 7200),
    ("1d", 86400), ("1w", 604800),
])
def test_periods(text: str, seconds: float) -> None:
    assert za.parse_period(text) == seconds


@pytest.mark.parametrize("content", [
    b"{not json", b"[]", b'{"no": "daemon"}', b"\xff\xfe", b'{"daemon": "x", "repositories": []}',
])
def test_malformed_documents(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "cvmfs-repo-sync.json").write_bytes(content)
    with pytest.raises(za.CheckError, match=r"status document|not a cvmfs-publisher"):
        run(tmp_path, "age", "--", "cvmfs-repo-sync")
    assert run(tmp_path, "health", "--", "cvmfs-repo-sync") == "0"


def test_wrongly_typed_fields_are_errors_not_guesses(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "d.json", {
        "daemon": "d", "updated": "yesterday", "healthy": "true", "dead_lettered": True,
        "repositories": {"a.infn.it": {"pending": "3", "last_result": 1,
                                       "errors": float("inf")}},
    })
    for args, message in ((["age", "--", "d"], "'updated' is not a number"),
                          (["repo", "errors", "--", "d", "a.infn.it"], "'errors'"),
                          (["dead_lettered", "--", "d"], "'dead_lettered' is not a number"),
                          (["repo", "pending", "--", "d", "a.infn.it"], "'pending'"),
                          (["repo", "last_result", "--", "d", "a.infn.it"], "'last_result'")):
        with pytest.raises(za.CheckError, match=message):
            run(tmp_path, *args)
    assert run(tmp_path, "health", "--", "d") == "0"  # "true" is not True


def test_never_flushed_document_has_no_age(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "d.json", {"daemon": "d", "updated": 0.0, "healthy": True})
    with pytest.raises(za.CheckError, match="never written"):
        run(tmp_path, "age", "--", "d")
    assert run(tmp_path, "health", "--", "d") == "0"


def test_oversized_document_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(za, "MAX_DOCUMENT_BYTES", 100)
    (tmp_path / "d.json").write_text(json.dumps({"daemon": "d", "pad": "x" * 200}))
    with pytest.raises(za.CheckError, match="larger than 100 bytes"):
        run(tmp_path, "age", "--", "d")


def test_discovery_leaves_out_names_that_cannot_be_asked_for(tmp_path: Path) -> None:
    doc = StatusDocument(tmp_path / "d.json", "d")
    for name in ("ok.infn.it", "Bad.infn.it", "x;y", "z" * 61):
        doc.repo(name)
    doc.flush(force=True)
    assert json.loads(run(tmp_path, "discovery", "--", "d")) == {
        "data": [{"{#REPO}": "ok.infn.it"}]}


def test_last_error_is_one_bounded_line(tmp_path: Path) -> None:
    doc = StatusDocument(tmp_path / "d.json", "d")
    doc.repo("a.infn.it", last_error="  " + "e" * 5000 + "\nsecond")
    doc.flush(force=True)
    assert run(tmp_path, "repo", "last_error", "--", "d", "a.infn.it") == "e" * za.MAX_ERROR_TEXT


def test_main_prints_one_line_and_exit_code(status_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert za.main(["--status-dir", str(status_dir), "age", "--", "cvmfs-repo-sync"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1 and float(out) >= 0
    assert za.main(["--status-dir", str(status_dir), "age", "--", "../x"]) == 1
    assert capsys.readouterr().out == "ZBX_NOTSUPPORTED: invalid daemon name (expected e.g. " \
        "cvmfs-repo-sync)\n"


def test_unexpected_failure_is_still_one_line(status_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object) -> str:
        raise KeyError("bug")

    monkeypatch.setattr(za, "run", broken)
    assert za.main(["age", "--", "cvmfs-repo-sync"]) == 2
    assert capsys.readouterr().out == "ZBX_NOTSUPPORTED: internal error (KeyError)\n"


def test_runs_as_the_userparameter_lines_run_it(status_dir: Path) -> None:
    """``python3 -P -m``: stdlib only, the package from PYTHONPATH, cwd not on sys.path."""
    res = subprocess.run(
        [sys.executable, "-P", "-m", "cvmfs_publisher.operations.zabbix_agent", "repo",
         "pending", "--", "cvmfs-repo-sync", "a.infn.it"],
        env={"PYTHONPATH": str(SCRIPTS), "CVMFS_PUBLISHER_STATUS_DIR": str(status_dir)},
        capture_output=True, text=True, timeout=30, check=False, cwd=status_dir)
    assert (res.returncode, res.stdout, res.stderr) == (0, "5\n", "")
