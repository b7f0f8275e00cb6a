"""A real zabbix_agentd with config/zabbix/userparameters_cvmfs_publisher.conf answers every key.

Values are read from status documents written by ``StatusDocument`` (the
daemons' own writer) and asked with the Zabbix passive-check protocol, as
the server does. Also: discovery, a missing, unhealthy, stale and FIFO
document, and hostile key parameters (nothing runs, nothing leaks).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from devstack import zabbix as zbx

from .conftest import CONSUMERS, FIFO, MISSING, STALE, STALE_AGE, SYNC, USERPARAMETERS

ALICE = "alice-personalrepo.infn.it"
ATLAS = "atlas-group.infn.it"
NOT_SUPPORTED = "ZBX_NOTSUPPORTED: "


def repo_key(field: str, repo: str, daemon: str = SYNC) -> str:
    return f"cvmfs.publisher.repo.{field}[{daemon},{repo}]"


def test_every_userparameter_is_a_fixed_command_with_quoted_arguments() -> None:
    """The agent's shell runs these lines: only our module, user values quoted after ``--``."""
    text = USERPARAMETERS.read_text()
    assert not re.search(r"^\s*UnsafeUserParameters", text, re.M)
    lines = [line for line in text.splitlines() if line.startswith("UserParameter=")]
    assert len(lines) == 16
    pattern = re.compile(
        r'^UserParameter=cvmfs\.publisher\.[a-z_.]+\[\*\],'
        r'python3 -P -m cvmfs_publisher\.operations\.zabbix_agent '
        r'[a-z_]+( [a-z_]+)? -- "\$1"( "\$2")?$')
    for line in lines:
        assert pattern.match(line), line


@pytest.mark.parametrize(("key", "expected"), [
    (f"cvmfs.publisher.health[{SYNC}]", "1"),
    (f"cvmfs.publisher.health[{SYNC},5m]", "1"),
    (f"cvmfs.publisher.health[{SYNC},300]", "1"),
    (f"cvmfs.publisher.dead_lettered[{SYNC}]", "2"),
    (f"cvmfs.publisher.broker_connected[{SYNC}]", "1"),
    (repo_key("pending", ALICE), "3"),
    (repo_key("queue_depth", ALICE), "7"),
    (repo_key("last_result", ALICE), "1"),
    (repo_key("consecutive_failures", ALICE), "0"),
    (repo_key("errors", ALICE), "1"),
    (repo_key("dead_lettered", ALICE), "2"),
    (repo_key("last_error", ALICE), "rsync failed: disk full"),
    (repo_key("healed_total", ALICE), "5"),
    (repo_key("reconcile_healed", ALICE), "2"),
    (repo_key("healed_total", ATLAS), "0"),
    (repo_key("pending", ATLAS), "0"),
    (repo_key("last_result", ATLAS), "0"),
    (repo_key("consecutive_failures", ATLAS), "4"),
    (repo_key("errors", ATLAS), "9"),
    (repo_key("last_result", "cms.infn.it"), "2"),
    (repo_key("last_error", "cms.infn.it"), ""),
    (f"cvmfs.publisher.health[{CONSUMERS}]", "0"),
    (f"cvmfs.publisher.broker_connected[{CONSUMERS}]", "0"),
    (f"cvmfs.publisher.health[{STALE}]", "0"),
    (f"cvmfs.publisher.health[{STALE},1h]", "1"),
    (f"cvmfs.publisher.health[{MISSING}]", "0"),
    (f"cvmfs.publisher.health[{MISSING},5m]", "0"),
    (f"cvmfs.publisher.health[{FIFO}]", "0"),
])
def test_agent_answers_key(agent: zbx.Agent, key: str, expected: str) -> None:
    assert agent.get(key) == expected


def test_discovery_lists_the_repositories(agent: zbx.Agent) -> None:
    data = json.loads(agent.get(f"cvmfs.publisher.repo.discovery[{SYNC}]"))
    assert data == {"data": [{"{#REPO}": ALICE}, {"{#REPO}": ATLAS}, {"{#REPO}": "cms.infn.it"}]}
    empty = json.loads(agent.get(f"cvmfs.publisher.repo.discovery[{CONSUMERS}]"))
    assert empty == {"data": []}


def test_ages_are_measured_from_the_document(agent: zbx.Agent,
                                             status_docs: dict[str, Any]) -> None:
    doc = status_docs[SYNC]
    before = time.time()
    age = float(agent.get(f"cvmfs.publisher.status.age[{SYNC}]"))
    after = time.time()
    assert before - doc["updated"] - 0.01 <= age <= after - doc["updated"] + 0.01
    published = float(agent.get(repo_key("last_publish_age", ALICE)))
    assert 100 <= published <= 100 + (time.time() - status_docs["written_at"]) + 0.01
    # Never published: measured from the daemon's start.
    never = float(agent.get(repo_key("last_publish_age", ATLAS)))
    assert never == pytest.approx(time.time() - doc["started"], abs=2)
    stale = float(agent.get(f"cvmfs.publisher.status.age[{STALE}]"))
    assert STALE_AGE <= stale <= STALE_AGE + 120


@pytest.mark.parametrize("key", [
    f"cvmfs.publisher.status.age[{MISSING}]",
    f"cvmfs.publisher.dead_lettered[{MISSING}]",
    f"cvmfs.publisher.broker_connected[{MISSING}]",
    f"cvmfs.publisher.repo.discovery[{MISSING}]",
    repo_key("pending", ALICE, MISSING),
    repo_key("last_publish_age", ALICE, MISSING),
])
def test_missing_document_is_reported_not_invented(agent: zbx.Agent, key: str) -> None:
    """Not a number (the item becomes unsupported) and never an empty LLD list."""
    value = agent.get(key)
    assert value.startswith(NOT_SUPPORTED + "status document missing: ")
    assert value.endswith(f"/{MISSING}.json")


def test_fifo_instead_of_document_does_not_hang(agent: zbx.Agent) -> None:
    start = time.monotonic()
    value = agent.get(f"cvmfs.publisher.status.age[{FIFO}]")
    assert value.startswith(NOT_SUPPORTED + "status document is not a regular file")
    assert time.monotonic() - start < 5


def test_unknown_repository(agent: zbx.Agent) -> None:
    value = agent.get(repo_key("pending", "nosuch.infn.it"))
    assert value == NOT_SUPPORTED + "repository nosuch.infn.it not in the status document"


@pytest.mark.parametrize(("key", "reason"), [
    (repo_key("pending", "--status-dir=/etc"), "invalid repository name"),
    (repo_key("pending", "../../../etc/passwd"), "invalid repository name"),
    (repo_key("pending", "a b.infn.it"), "invalid repository name"),
    (repo_key("pending", "--"), "invalid repository name"),
    (repo_key("pending", "Alice.infn.it"), "invalid repository name"),
    (repo_key("pending", "x" * 61), "invalid repository name"),
    ("cvmfs.publisher.health[../../etc/passwd]", "invalid daemon name"),
    ("cvmfs.publisher.health[--status-dir=/etc]", "invalid daemon name"),
    ("cvmfs.publisher.status.age[.hidden]", "invalid daemon name"),
    ("cvmfs.publisher.status.age[]", "invalid daemon name"),
    (f"cvmfs.publisher.health[{SYNC},-5m]", "invalid period"),
    (f"cvmfs.publisher.health[{SYNC},5 m]", "invalid period"),
    (f"cvmfs.publisher.health[{SYNC},0]", "invalid period"),
])
def test_hostile_parameters_are_refused_by_the_module(agent: zbx.Agent, key: str,
                                                      reason: str) -> None:
    assert agent.get(key).startswith(NOT_SUPPORTED + reason)


@pytest.mark.parametrize("value", [
    "a;touch {marker}",
    "$(touch {marker})",
    "`touch {marker}`",
    "a' ; touch '{marker}",
    "a|touch {marker}",
    "a&touch {marker}",
    "a>{marker}",
])
def test_shell_metacharacters_never_reach_a_shell(agent: zbx.Agent, tmp_path: Path,
                                                  value: str) -> None:
    """The agent itself refuses them (UnsafeUserParameters stays 0); nothing runs."""
    marker = tmp_path / "pwned"
    hostile = value.format(marker=marker)
    quoted = '"' + hostile.replace('"', '\\"') + '"'
    for key in (repo_key("pending", quoted), f"cvmfs.publisher.health[{quoted}]"):
        with pytest.raises(zbx.AgentNotSupported, match="Special characters"):
            agent.get(key)
    assert not marker.exists()


def test_unknown_key(agent: zbx.Agent) -> None:
    with pytest.raises(zbx.AgentNotSupported):
        agent.get("cvmfs.publisher.nosuchkey[cvmfs-repo-sync]")
