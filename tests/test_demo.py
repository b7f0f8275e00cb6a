"""The local demo (tools/demo.sh): one demo per work directory, and nothing disturbed.

The whole demo runs from a clean clone in tests/test_readme.py; these are the
cases around it that need no stack: a second start where a demo runs, a
directory that is not a demo's, ``--stop`` with nothing to stop, leftovers of
a demo that died.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_publisher.operations import cli
from devstack import demo


@pytest.fixture
def pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's pointer to a kept demo, private to the test."""
    path = tmp_path / "pointer"
    monkeypatch.setattr(demo, "DEMO_CONFIG_POINTER", path)
    monkeypatch.setattr(cli, "DEMO_CONFIG_POINTER", path)
    return path


@pytest.fixture
def running_demo(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A work directory whose state file names a live process that is the demo's daemon.

    A real process whose command line names the directory's configuration,
    as the demo's daemons' do (``--config <workdir>/publisher.yaml``).
    """
    workdir = tmp_path / "demo"
    workdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--config",
                             str(workdir / "publisher.yaml")])
    (workdir / demo.STATE_FILE).write_text(json.dumps(
        {"pids": {"publisher-consumer": proc.pid}, "services": {}, "labels": [],
         "started": {str(proc.pid): demo.process_start(proc.pid)},
         "double_root": str(workdir / "cvmfs-root")}))
    yield workdir, proc
    proc.kill()
    proc.wait()


def test_a_second_demo_in_the_same_directory_refuses_and_names_the_first(
        running_demo: tuple[Path, subprocess.Popen], capsys: pytest.CaptureFixture[str],
        pointer: Path) -> None:
    workdir, proc = running_demo
    assert demo.main(["--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert f"a demo is already running in {workdir}" in err
    assert f"publisher-consumer pid {proc.pid}" in err
    assert f"tools/demo.sh --stop --workdir {workdir}" in err
    assert proc.poll() is None, "the running demo was stopped"
    assert (workdir / demo.STATE_FILE).exists()


def test_a_directory_that_is_not_a_demos_is_left_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pointer: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert demo.main(["--workdir", str(mine)]) == 1
    assert "is not a demo's work directory" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_stop_with_nothing_running_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pointer: Path) -> None:
    assert demo.main(["--stop", "--workdir", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "nothing to stop" in out
    assert "stopped" not in out


def test_stop_with_nothing_here_names_the_demo_that_runs_elsewhere(
        running_demo: tuple[Path, subprocess.Popen], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], pointer: Path) -> None:
    workdir, proc = running_demo
    pointer.write_text(f"{workdir / 'publisher.yaml'}\n")
    assert demo.main(["--stop", "--workdir", str(tmp_path / "other")]) == 0
    out = capsys.readouterr().out
    assert f"a demo runs in {workdir}: tools/demo.sh --stop --workdir {workdir}" in out
    assert proc.poll() is None


def test_a_reused_pid_is_not_the_demos(running_demo: tuple[Path, subprocess.Popen]) -> None:
    """Same number, other start time: another process, never signalled."""
    workdir, proc = running_demo
    state = json.loads((workdir / demo.STATE_FILE).read_text())
    state["started"][str(proc.pid)] = "1"
    (workdir / demo.STATE_FILE).write_text(json.dumps(state))
    assert demo.running_pids(workdir) == {}
    demo.stop_saved(workdir, quiet=True)
    assert proc.poll() is None


def test_leftovers_of_a_dead_demo_are_removed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pointer: Path) -> None:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = demo.process_start(dead.pid)
    dead.wait()
    (workdir / demo.STATE_FILE).write_text(json.dumps(
        {"pids": {"publisher-consumer": dead.pid}, "services": {}, "labels": [],
         "started": {str(dead.pid): started}}))
    (workdir / "log").mkdir()
    demo.prepare_workdir(workdir)
    assert "leftovers of a demo that no longer runs" in capsys.readouterr().out
    assert workdir.is_dir() and not any(workdir.iterdir())


def test_the_cli_uses_a_kept_demos_configuration_and_says_so(
        tmp_path: Path, pointer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "publisher.yaml"
    cfg.write_text("{}\n")
    monkeypatch.setattr(cli.config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    assert cli.config_path(None, env={}) == (str(tmp_path / "absent.yaml"), "")
    pointer.write_text(f"{cfg}\n")
    path, why = cli.config_path(None, env={})
    assert path == str(cfg) and "using the running demo's configuration" in why
    # anything naming a configuration wins over the demo
    assert cli.config_path("x.yaml", env={}) == ("x.yaml", "")
    assert cli.config_path(None, env={"CVMFS_PUBLISHER_CONFIG": "y.yaml"}) == ("y.yaml", "")
    monkeypatch.setattr(cli.config, "DEFAULT_CONFIG_PATH", str(cfg))
    assert cli.config_path(None, env={}) == (str(cfg), "")


def test_stop_ends_a_demo_still_running_its_scenario(tmp_path: Path, pointer: Path) -> None:
    """``--stop`` while a demo runs (not kept): the demo is asked to stop (SIGTERM)."""
    workdir = tmp_path / "demo"
    workdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (workdir / demo.STATE_FILE).write_text(json.dumps(
            {"demo": proc.pid, "pids": {}, "services": {}, "labels": [],
             "started": {str(proc.pid): demo.process_start(proc.pid)}}))
        assert demo.running_pids(workdir) == {"tools/demo.sh": proc.pid}
        assert demo.stop_saved(workdir, quiet=True)
        assert proc.wait(timeout=10) == -15
        assert not workdir.exists()
    finally:
        proc.kill()
        proc.wait()
