"""The template file on its own: UUID rules, and the agent keys it uses exist.

Cheap checks that name the problem precisely; the real Zabbix 6.0 server's
validation of the same file is in ``test_api.py``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .conftest import TEMPLATE, USERPARAMETERS


@pytest.fixture(scope="module")
def export() -> dict[str, Any]:
    return yaml.safe_load(TEMPLATE.read_text())["zabbix_export"]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def agent_items(export: dict[str, Any]) -> list[dict[str, Any]]:
    """Items and item prototypes (with a ``key``) that the server polls passively."""
    template = export["templates"][0]
    items = list(template["items"])
    for rule in template["discovery_rules"]:
        items.append(rule)
        items.extend(rule["item_prototypes"])
    return [i for i in items if i.get("type", "ZABBIX_PASSIVE") == "ZABBIX_PASSIVE"]


def test_format_is_zabbix_6_0(export: dict[str, Any]) -> None:
    assert export["version"] == "6.0"
    assert [g["name"] for g in export["groups"]] == ["Templates/CVMFS"]
    assert len(export["templates"]) == 1


def test_every_uuid_is_a_unique_uuid4_in_32_hex_digits(export: dict[str, Any]) -> None:
    uuids = [node["uuid"] for node in walk(export) if "uuid" in node]
    assert len(uuids) >= 25
    for value in uuids:
        assert re.fullmatch(r"[0-9a-f]{32}", value), value
        assert uuid.UUID(hex=value).version == 4, value
    assert len(set(uuids)) == len(uuids)


def test_passive_keys_are_the_userparameter_keys(export: dict[str, Any]) -> None:
    declared = set(re.findall(r"^UserParameter=([^\[,]+)\[\*\],", USERPARAMETERS.read_text(),
                              re.M))
    used = {item["key"].split("[", 1)[0] for item in agent_items(export)}
    assert used == declared
    for item in agent_items(export):
        assert item["key"].startswith(item["key"].split("[", 1)[0] + "[{$CVMFS.DAEMON}")


def test_log_item_is_an_active_logrt_check(export: dict[str, Any]) -> None:
    logs = [i for i in export["templates"][0]["items"] if i["key"].startswith("logrt[")]
    assert len(logs) == 1
    assert logs[0]["type"] == "ZABBIX_ACTIVE" and logs[0]["value_type"] == "LOG"
    assert "{$CVMFS.LOG.DIR}/{$CVMFS.DAEMON}" in logs[0]["key"]


def test_triggers_use_the_configurable_macros(export: dict[str, Any]) -> None:
    template = export["templates"][0]
    macros = {m["macro"] for m in template["macros"]}
    expressions = [t["expression"] for item in template["items"] for t in item.get("triggers", [])]
    prototypes = [t["expression"] for t in template["discovery_rules"][0]["trigger_prototypes"]]
    text = " ".join(expressions + prototypes)
    for macro in re.findall(r"\{\$[A-Z.]+\}", text + " ".join(i["key"] for i in walk(template)
                                                                  if "key" in i)):
        assert macro in macros, macro
    assert any("health[" in e and "nodata(" in e for e in expressions)
    assert any("status.age[" in e and "{$CVMFS.STATUS.MAX_AGE}" in e for e in expressions)
    assert any("dead_lettered[" in e and ">0" in e for e in expressions)
    item_prototypes = template["discovery_rules"][0]["item_prototypes"]
    nested = [t["expression"] for item in item_prototypes
              for t in item.get("trigger_prototypes", [])]
    assert any("repo.healed_total[" in e and e.startswith("change(") and e.endswith(">0")
               for e in nested), "events lost (healed by reconcile) must raise a problem"
    assert any("repo.pending[" in e and "{$CVMFS.PUBLISH.MAX_AGE}" in e
               and "last_publish_age[" in e for e in prototypes)
