"""Session fixtures for the Zabbix tests: a real agent, API (frontend + PostgreSQL), server.

Everything is started by ``devstack.zabbix`` (the code the
local demo uses too). A fixture skips ONLY when the Debian packages are
missing and cannot be installed (``ServiceUnavailable``); any other start-up
problem is an error, so nothing passes silently.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest

TESTS_ZABBIX = Path(__file__).resolve().parent
REPO_ROOT = TESTS_ZABBIX.parent.parent
SCRIPTS = REPO_ROOT / "scripts"
if str(SCRIPTS) not in sys.path:  # zabbix_setup.py lives beside the package
    sys.path.insert(0, str(SCRIPTS))

from cvmfs_publisher.core.status import StatusDocument  # noqa: E402
from devstack import zabbix as zbx  # noqa: E402

USERPARAMETERS = REPO_ROOT / "config" / "zabbix" / "userparameters_cvmfs_publisher.conf"
TEMPLATE = REPO_ROOT / "config" / "zabbix" / "template_cvmfs_publisher.yaml"

#: The status documents the tests write (daemon names as the agent keys see them).
SYNC = "cvmfs-repo-sync"  # healthy, three repositories
CONSUMERS = "cvmfs-repo-consumers"  # reports unhealthy
MISSING = "publisher-consumer"  # no document at all
STALE = "stale-daemon"  # healthy but written 1000 s ago
STALE_AGE = 1000.0
FIFO = "fifo-daemon"  # a FIFO where the document should be

T = TypeVar("T")


def needs_packages(start: Callable[[], T]) -> T:
    """Run a devstack start; skip only if the packages are absent and not installable."""
    try:
        return start()
    except zbx.ServiceUnavailable as exc:
        pytest.skip(f"Zabbix packages unavailable: {exc}")


def agent_env(status_dir: Path) -> dict[str, str]:
    """The agent's environment: its UserParameters inherit it.

    ``python3`` resolves to this interpreter's directory first (a venv's),
    and the package comes from the work tree.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH")) if p)
    return {"CVMFS_PUBLISHER_STATUS_DIR": str(status_dir), "PYTHONPATH": pythonpath,
            "PATH": path}


@pytest.fixture(scope="session")
def zabbix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zabbix")


def write_status_documents(status_dir: Path) -> dict[str, Any]:
    """Status documents written by the daemons' own writer; returns what was written."""
    status_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()

    sync = StatusDocument(status_dir / f"{SYNC}.json", SYNC)
    sync.set(healthy=True, broker_connected=True)
    sync.repo("alice-personalrepo.infn.it", pending=3, queue_depth=7, last_publish=now - 100,
              last_result="ok", consecutive_failures=0, errors=1,
              last_error="rsync failed: disk full\nTraceback (most recent call last): ...")
    sync.incr("alice-personalrepo.infn.it", "dead_lettered", 2)
    sync.repo("alice-personalrepo.infn.it", last_reconcile=now - 60, reconcile_healed=2)
    sync.incr("alice-personalrepo.infn.it", "healed_total", 5)
    sync.repo("atlas-group.infn.it", pending=0, queue_depth=0, last_result="failed",
              consecutive_failures=4, errors=9)
    sync.repo("cms.infn.it")  # nothing happened yet: REPO_DEFAULTS
    sync.flush(force=True)

    consumers = StatusDocument(status_dir / f"{CONSUMERS}.json", CONSUMERS)
    consumers.set(healthy=False)
    consumers.flush(force=True)

    with mock.patch("cvmfs_publisher.core.status.time.time", return_value=now - STALE_AGE):
        stale = StatusDocument(status_dir / f"{STALE}.json", STALE)
        stale.repo("old.infn.it", pending=1)
        stale.flush(force=True)

    os.mkfifo(status_dir / f"{FIFO}.json")
    return {"dir": status_dir, "written_at": now,
            SYNC: json.loads((status_dir / f"{SYNC}.json").read_text())}


@pytest.fixture(scope="session")
def status_docs(zabbix_dir: Path) -> dict[str, Any]:
    return write_status_documents(zabbix_dir / "status")


@pytest.fixture(scope="session")
def agent(zabbix_dir: Path, status_docs: dict[str, Any]) -> Iterator[zbx.Agent]:
    """A real zabbix_agentd with the project's UserParameter file, unchanged."""
    started = needs_packages(lambda: zbx.start_agent(
        zabbix_dir / "agent", [USERPARAMETERS], env=agent_env(status_docs["dir"])))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def zabbix_db() -> Iterator[zbx.Database]:
    """This session's own PostgreSQL role and database (random names), dropped at the end.

    The machine's PostgreSQL is shared: nothing of ours stays in it, and
    concurrent sessions never see each other's hosts or templates. Torn down
    after the frontend and the server, which depend on it.
    """
    db = zbx.Database.private_one()
    yield db
    zbx.drop_database(db)


@pytest.fixture(scope="session")
def frontend(zabbix_dir: Path, zabbix_db: zbx.Database) -> Iterator[zbx.Frontend]:
    """The Zabbix 6.0 API: PostgreSQL schema, /etc/zabbix/zabbix.conf.php, php -S."""
    started = needs_packages(lambda: zbx.start_api(zabbix_dir / "frontend", zabbix_db))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def zapi(frontend: zbx.Frontend) -> Any:
    """A logged-in pyzabbix client."""
    from pyzabbix import ZabbixAPI

    api = ZabbixAPI(frontend.url, timeout=60)
    api.login(frontend.user, frontend.password)
    return api


@pytest.fixture(scope="session")
def zabbix_server(zabbix_dir: Path, frontend: zbx.Frontend,
                  zabbix_db: zbx.Database) -> Iterator[zbx.Server]:
    """zabbix_server on the same database (after the frontend set it up)."""
    started = needs_packages(lambda: zbx.start_server(zabbix_dir / "server", zabbix_db))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def template_source() -> str:
    return TEMPLATE.read_text(encoding="utf-8")
