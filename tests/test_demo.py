"""The local demo (tools/demo.sh) runs green and stops everything it started."""

from __future__ import annotations

from pathlib import Path

from devstack import demo


def test_demo_runs_green_and_cleans_up(tmp_path: Path, capsys, broker) -> None:
    workdir = tmp_path / "demo"
    assert demo.main(["--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    for step in ("provisioned in", "published in", "bin/hello.sh  mode 755",
                 "software/tools/demo-tool-1.0/bin/demo-tool", "deprovisioned",
                 "demo succeeded", "stopped everything"):
        assert step in out, step
    assert not workdir.exists()
    assert str(workdir) not in Path("/proc/mounts").read_text()
