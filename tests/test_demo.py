"""The local demo (tools/demo.sh) runs green and stops everything it started.

It starts its own RabbitMQ node (not the suite's, not the machine's): no
process of it may survive the demo.
"""

from __future__ import annotations

from pathlib import Path

from cvmfs_publisher.devstack import demo


def test_demo_runs_green_and_cleans_up(tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "demo"
    assert demo.main(["--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    for step in ("provisioned in", "published in", "bin/hello.sh  mode 755",
                 "software/tools/demo-tool-1.0/bin/demo-tool", "deprovisioned",
                 "demo succeeded", "stopped everything"):
        assert step in out, step
    assert not workdir.exists()
    assert str(workdir) not in Path("/proc/mounts").read_text()
    assert _processes_mentioning(workdir) == [], "a process of the demo survived it"


def _processes_mentioning(path: Path) -> list[str]:
    """Command lines of live processes that name ``path`` (the demo's RabbitMQ, epmd...)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in args:
            found.append(args[:200])
    return found
