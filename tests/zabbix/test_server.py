"""End to end: zabbix_server polls the agent through the imported template.

The server discovers the repositories from the status document, creates the
item prototypes' items, stores the values the agent reads, marks the keys
of a missing document unsupported with the reason, raises the triggers, and
receives matching log lines through the active logrt check.

Two agent processes, both with the project's files: a passive one, and an
active one started once the server knows the host (an agent asks for its
active checks at start and then only every RefreshActiveChecks >= 60 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pyzabbix import ZabbixAPIException

import zabbix_setup as zs
from devstack import zabbix as zbx

from .conftest import (
    MISSING,
    SYNC,
    USERPARAMETERS,
    agent_env,
    needs_packages,
    write_status_documents,
)

T = TypeVar("T")
ALICE = "alice-personalrepo.infn.it"
DEADLINE = 60.0


def wait(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE,
         every: Callable[[], None] | None = None) -> T:
    """Poll ``probe`` until it returns something; ``every`` runs before each try."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if every is not None:
            every()
        result = probe()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def passive_agent(zabbix_dir: Path) -> Iterator[zbx.Agent]:
    docs = write_status_documents(zabbix_dir / "server-status")
    started = needs_packages(lambda: zbx.start_agent(
        zabbix_dir / "server-agent", [USERPARAMETERS], env=agent_env(docs["dir"])))
    yield started
    started.stop()


def host_id(api: Any, name: str) -> str:
    return api.host.get(filter={"host": [name]}, output=["hostid"])[0]["hostid"]


def items_of(api: Any, hostid: str) -> dict[str, dict[str, str]]:
    found = api.item.get(hostids=hostid, output=["itemid", "key_", "type", "lastvalue",
                                                   "lastclock", "state", "error"])
    return {i["key_"]: i for i in found}


def check_now(api: Any, hostids: list[str]) -> None:
    """Ask the server to poll every passive item and LLD rule not yet polled."""
    found = api.item.get(hostids=hostids, output=["itemid", "type", "lastclock", "state"],
                         filter={"type": "0"})
    found += api.discoveryrule.get(hostids=hostids, output=["itemid"])
    for item in found:
        if item.get("lastclock", "0") == "0" and item.get("state", "0") == "0":
            try:
                api.task.create(type=6, request={"itemid": item["itemid"]})
            except ZabbixAPIException:
                pass  # not in the server's configuration cache yet: next round


@pytest.mark.timeout(240)
def test_server_polls_discovers_and_alerts(
        zapi: Any, zabbix_server: zbx.Server, passive_agent: zbx.Agent, zabbix_dir: Path,
        template_source: str) -> None:
    log_dir = zabbix_dir / "server-logs"
    log_dir.mkdir()
    log_file = log_dir / f"{SYNC}.log"
    log_file.write_text("2026-01-01 00:00:00,000 ERROR cvmfs-repo-sync: before monitoring\n")

    # Fresh hosts: new items (logrt "skip" applies to new items only).
    old = zapi.host.get(filter={"host": list(zs.DAEMONS)}, output=["hostid"])
    if old:
        zapi.host.delete(*[h["hostid"] for h in old])
    specs = [zs.HostSpec(name, name, "127.0.0.1", passive_agent.port) for name in zs.DAEMONS]
    zs.setup(zapi, template_source, specs)
    sync, missing = host_id(zapi, SYNC), host_id(zapi, MISSING)
    for macro, value in (("{$CVMFS.LOG.DIR}", str(log_dir)), ("{$CVMFS.LOG.INTERVAL}", "1s")):
        zapi.usermacro.create(hostid=sync, macro=macro, value=value)

    def all_polled() -> bool:
        got = {**items_of(zapi, sync), **items_of(zapi, missing)}
        passive = [i for i in got.values() if i["type"] == "0"]
        discovered = [k for k in got if k.startswith("cvmfs.publisher.repo.")]
        return len(discovered) == 3 * 11 and all(
            i["lastclock"] != "0" or i["state"] == "1" for i in passive)

    wait("discovery and the first values", all_polled,
         every=lambda: check_now(zapi, [sync, missing]))

    values = {k: i["lastvalue"] for k, i in items_of(zapi, sync).items()}
    daemon = "{$CVMFS.DAEMON}"
    assert values[f"cvmfs.publisher.health[{daemon},{{$CVMFS.STATUS.MAX_AGE}}]"] == "1"
    assert values[f"cvmfs.publisher.dead_lettered[{daemon}]"] == "2"
    assert values[f"cvmfs.publisher.broker_connected[{daemon}]"] == "1"
    assert 0 <= float(values[f"cvmfs.publisher.status.age[{daemon}]"]) < 120
    assert values[f"cvmfs.publisher.repo.pending[{daemon},{ALICE}]"] == "3"
    assert values[f"cvmfs.publisher.repo.queue_depth[{daemon},{ALICE}]"] == "7"
    assert values[f"cvmfs.publisher.repo.last_result[{daemon},{ALICE}]"] == "1"
    assert values[f"cvmfs.publisher.repo.last_error[{daemon},{ALICE}]"] == (
        "rsync failed: disk full")
    assert 100 <= float(values[f"cvmfs.publisher.repo.last_publish_age[{daemon},{ALICE}]"])
    assert values[f"cvmfs.publisher.repo.consecutive_failures[{daemon},atlas-group.infn.it]"] \
        == "4"
    assert values[f"cvmfs.publisher.repo.last_result[{daemon},cms.infn.it]"] == "2"
    assert values[f"cvmfs.publisher.repo.healed_total[{daemon},{ALICE}]"] == "5"
    assert values[f"cvmfs.publisher.repo.reconcile_healed[{daemon},{ALICE}]"] == "2"
    assert 60 <= float(values[f"cvmfs.publisher.repo.last_reconcile_age[{daemon},{ALICE}]"])

    gone = items_of(zapi, missing)
    assert gone[f"cvmfs.publisher.health[{daemon},{{$CVMFS.STATUS.MAX_AGE}}]"]["lastvalue"] \
        == "0"
    age = gone[f"cvmfs.publisher.status.age[{daemon}]"]
    assert age["state"] == "1" and "status document missing" in age["error"]
    rule = zapi.discoveryrule.get(hostids=missing, output=["state", "error"])[0]
    assert rule["state"] == "1"

    # Active log check: the server now knows the host, so the agent gets its list.
    active = zbx.start_agent(zabbix_dir / "server-agent-active", [], hostname=SYNC,
                             server_active=f"127.0.0.1:{zabbix_server.port}",
                             extra_config=["BufferSend=1"])
    try:
        log_item = next(i for k, i in items_of(zapi, sync).items() if k.startswith("logrt["))
        counter = iter(range(1000))

        def append() -> None:
            n = next(counter)
            with log_file.open("a") as fh:
                fh.write(f"2026-01-01 00:00:{n:02d},000 INFO cvmfs-repo-sync: published {n}\n")
                fh.write(f"2026-01-01 00:00:{n:02d},500 ERROR cvmfs-repo-sync: failed {n}\n")

        lines = wait("log lines from the active check", lambda: zapi.history.get(
            itemids=[log_item["itemid"]], history=2, output=["value"]), every=append)
    finally:
        active.stop()
    texts = [line["value"] for line in lines]
    assert all(" ERROR cvmfs-repo-sync: failed " in t for t in texts), texts

    def problems(hostid: str) -> set[str]:
        found = zapi.trigger.get(hostids=hostid, output=["description", "value"],
                                 expandDescription=True, filter={"value": "1"})
        return {t["description"] for t in found}

    assert wait("the expected problems", lambda: problems(sync) >= {
        f"{SYNC}: messages dead-lettered", f"{SYNC}: errors in the log"} or None)
    # healed_total is a counter: the trigger fires on its change, once values differ
    healed = [t for t in zapi.triggerprototype.get(
        hostids=sync, output=["expression", "description"], expandExpression=True)
        if "healed_total[" in t["expression"]]
    assert healed and "change(" in healed[0]["expression"]
    assert f"{SYNC}: daemon down or unhealthy" not in problems(sync)
    assert f"{MISSING}: daemon down or unhealthy" in problems(missing)
