"""The layout's rules, kept true by the suite (docs/ARCHITECTURE.md).

- the import-linter contracts of pyproject.toml (layers, one adapter per
  outside library, the consumers never reach Vault, the sync daemon loads
  no broker library);
- the wheel ships the package only: no tests, no development stack;
- the daemons' main modules stay thin compositions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "scripts" / "cvmfs_publisher"


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        found = shutil.which("lint-imports")
        assert found, "lint-imports is missing: install the test extras (tools/setup-dev.sh)"
        lint = Path(found)
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
    res = subprocess.run([str(lint), "--no-cache"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_wheel_holds_the_package_only(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if n.endswith(".py")]
    assert code and all(n.startswith("cvmfs_publisher/") for n in code), code
    assert not [n for n in names if "devstack" in n or n.startswith("tests/")]


@pytest.mark.parametrize("daemon", ["publisher_consumer", "repo_consumers", "repo_sync"])
def test_daemon_mains_are_thin(daemon: str) -> None:
    """A daemon's main module composes; what it composes lives in its own modules."""
    lines = (PACKAGE / "daemons" / f"{daemon}.py").read_text().count("\n")
    assert lines < 200, f"daemons/{daemon}.py has {lines} lines"
