"""scripts/zabbix_setup.py against a real Zabbix 6.0 API (php -S frontend, PostgreSQL).

The server-side validation is the real one: a template it rejects fails
these tests. The Zabbix objects are deleted first, so the first run really
creates them and the second run really has nothing to do.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyzabbix import ZabbixAPIException

import zabbix_setup as zs
from devstack import zabbix as zbx

TEMPLATE_NAME = "CVMFS publisher by Zabbix agent"
HOST_PORT = 10050


def hosts(port: int = HOST_PORT) -> list[zs.HostSpec]:
    return [zs.HostSpec(name, name, "127.0.0.1", port) for name in zs.DAEMONS]


def remove_everything(api: Any) -> None:
    """Delete what setup creates, so that its first run starts from nothing."""
    found = api.host.get(filter={"host": list(zs.DAEMONS)}, output=["hostid"])
    if found:
        api.host.delete(*[h["hostid"] for h in found])
    found = api.template.get(filter={"host": [TEMPLATE_NAME]}, output=["templateid"])
    if found:
        api.template.delete(*[t["templateid"] for t in found])
    found = api.hostgroup.get(filter={"name": [zs.DEFAULT_GROUP, "Templates/CVMFS"]},
                              output=["groupid"])
    if found:
        api.hostgroup.delete(*[g["groupid"] for g in found])


@pytest.fixture(scope="module")
def first_run(zapi: Any, template_source: str) -> zs.SetupResult:
    remove_everything(zapi)
    return zs.setup(zapi, template_source, hosts())


@pytest.fixture(scope="module")
def template_id(zapi: Any, first_run: zs.SetupResult) -> str:
    return zapi.template.get(filter={"host": [TEMPLATE_NAME]}, output=["templateid"])[0][
        "templateid"]


@pytest.fixture(scope="module")
def expected(template_source: str) -> dict[str, Any]:
    return yaml.safe_load(template_source)["zabbix_export"]["templates"][0]


def export_all(api: Any) -> dict[str, Any]:
    """The template and the hosts as Zabbix exports them (minus the export date)."""
    tid = api.template.get(filter={"host": [TEMPLATE_NAME]}, output=["templateid"])
    hid = api.host.get(filter={"host": list(zs.DAEMONS)}, output=["hostid"])
    text = api.configuration.export(format="yaml", options={
        "templates": [t["templateid"] for t in tid], "hosts": [h["hostid"] for h in hid]})
    doc = yaml.safe_load(text)["zabbix_export"]
    doc.pop("date", None)
    return doc


def test_first_run_creates_everything(first_run: zs.SetupResult) -> None:
    assert first_run.template == "imported"
    assert first_run.group == "created"
    assert first_run.hosts == {name: ["created"] for name in zs.DAEMONS}


def test_api_lists_the_templates_items(zapi: Any, template_id: str,
                                       expected: dict[str, Any]) -> None:
    items = zapi.item.get(templateids=template_id, output=["key_", "type", "value_type"])
    assert {i["key_"] for i in items} == {i["key"] for i in expected["items"]}
    assert len(items) == 5
    logrt = [i for i in items if i["key_"].startswith("logrt[")]
    assert [(i["type"], i["value_type"]) for i in logrt] == [("7", "2")]  # active, log


def test_api_lists_discovery_rule_and_prototypes(zapi: Any, template_id: str,
                                                 expected: dict[str, Any]) -> None:
    rules = zapi.discoveryrule.get(templateids=template_id, output=["itemid", "key_"])
    assert [r["key_"] for r in rules] == ["cvmfs.publisher.repo.discovery[{$CVMFS.DAEMON}]"]
    prototypes = zapi.itemprototype.get(discoveryids=rules[0]["itemid"], output=["key_"])
    wanted = {p["key"] for p in expected["discovery_rules"][0]["item_prototypes"]}
    assert {p["key_"] for p in prototypes} == wanted
    for field in ("pending", "last_publish_age", "last_result", "consecutive_failures",
                  "queue_depth", "healed_total", "reconcile_healed", "last_reconcile_age"):
        assert f"cvmfs.publisher.repo.{field}[{{$CVMFS.DAEMON}},{{#REPO}}]" in wanted
    triggers = zapi.triggerprototype.get(discoveryids=rules[0]["itemid"],
                                         output=["description", "expression"])
    assert len(triggers) == 3
    healed = [t for t in triggers if "events were lost" in t["description"]]
    assert len(healed) == 1 and healed[0]["expression"].endswith(">0")
    unpublished = [t for t in triggers if "not published" in t["description"]]
    assert len(unpublished) == 1
    assert "{$CVMFS.PUBLISH.MAX_AGE}" in unpublished[0]["expression"]
    graphs = zapi.graphprototype.get(discoveryids=rules[0]["itemid"], output=["name"])
    assert len(graphs) == 2


def test_api_lists_the_triggers(zapi: Any, template_id: str) -> None:
    triggers = zapi.trigger.get(templateids=template_id, output=["description", "expression"],
                                selectDependencies=["description"],
                                selectFunctions="extend")
    by_name = {t["description"]: t for t in triggers}
    expanded = {t["description"]: t["expression"] for t in zapi.trigger.get(
        templateids=template_id, output=["description", "expression"], expandExpression=True)}
    assert set(by_name) == {
        "{$CVMFS.DAEMON}: daemon down or unhealthy", "{$CVMFS.DAEMON}: status document stale",
        "{$CVMFS.DAEMON}: messages dead-lettered", "{$CVMFS.DAEMON}: errors in the log"}
    down = by_name["{$CVMFS.DAEMON}: daemon down or unhealthy"]
    assert "nodata(" in expanded[down["description"]]
    assert {"function": "nodata", "parameter": "$,{$CVMFS.NODATA.TIMEOUT}"} in [
        {"function": f["function"], "parameter": f["parameter"]} for f in down["functions"]]
    assert [d["description"] for d in down["dependencies"]] == [
        "{$CVMFS.DAEMON}: status document stale"]
    assert "{$CVMFS.STATUS.MAX_AGE}" in by_name[
        "{$CVMFS.DAEMON}: status document stale"]["expression"]


def test_api_lists_the_dashboard_and_macros(zapi: Any, template_id: str) -> None:
    dashboards = zapi.templatedashboard.get(templateids=template_id, selectPages="extend")
    assert [d["name"] for d in dashboards] == ["CVMFS publisher"]
    widgets = dashboards[0]["pages"][0]["widgets"]
    assert sorted(w["type"] for w in widgets) == sorted(
        ["item"] * 4 + ["graph", "plaintext", "graphprototype", "graphprototype"])
    macros = {m["macro"]: m["value"] for m in zapi.usermacro.get(hostids=template_id)}
    assert macros["{$CVMFS.PUBLISH.MAX_AGE}"] == "1h"
    assert macros["{$CVMFS.STATUS.MAX_AGE}"] == "2m"


def test_hosts_are_linked_with_their_daemon_macro(zapi: Any, template_id: str) -> None:
    found = zapi.host.get(filter={"host": list(zs.DAEMONS)}, output=["host"],
                          selectMacros=["macro", "value"], selectGroups=["name"],
                          selectParentTemplates=["templateid"],
                          selectInterfaces=["type", "main", "useip", "ip", "port"])
    assert sorted(h["host"] for h in found) == sorted(zs.DAEMONS)
    for host in found:
        assert {"macro": "{$CVMFS.DAEMON}", "value": host["host"]} in [
            {"macro": m["macro"], "value": m["value"]} for m in host["macros"]]
        assert [g["name"] for g in host["groups"]] == [zs.DEFAULT_GROUP]
        assert [t["templateid"] for t in host["parentTemplates"]] == [template_id]
        assert host["interfaces"] == [{"type": "1", "main": "1", "useip": "1",
                                       "ip": "127.0.0.1", "port": str(HOST_PORT)}]


def test_template_file_is_what_zabbix_stores(zapi: Any, first_run: zs.SetupResult,
                                             template_source: str) -> None:
    """importcompare finds nothing: no field of the file was dropped or normalised away.

    If this fails after an edit, re-export the template (configuration.export)
    from this test instance and keep the header comment.
    """
    diff = zapi.do_request("configuration.importcompare", {
        "format": "yaml", "source": template_source, "rules": zs.IMPORT_RULES})["result"]
    assert diff == []


def test_second_run_changes_nothing(zapi: Any, first_run: zs.SetupResult,
                                    template_source: str) -> None:
    before = export_all(zapi)
    again = zs.setup(zapi, template_source, hosts())
    assert not again.changed, again
    assert again.hosts == {name: [] for name in zs.DAEMONS}
    assert export_all(zapi) == before


def test_drift_is_corrected_then_stable(zapi: Any, first_run: zs.SetupResult,
                                        template_source: str) -> None:
    host = zapi.host.get(filter={"host": ["cvmfs-repo-sync"]}, output=["hostid"],
                         selectMacros=["hostmacroid", "macro"],
                         selectInterfaces=["interfaceid"])[0]
    macro = next(m for m in host["macros"] if m["macro"] == "{$CVMFS.DAEMON}")
    zapi.usermacro.update(hostmacroid=macro["hostmacroid"], value="wrong")
    zapi.hostinterface.update(interfaceid=host["interfaces"][0]["interfaceid"], port="10999")
    fixed = zs.setup(zapi, template_source, hosts())
    assert fixed.hosts["cvmfs-repo-sync"] == ["macro updated", "interface updated"]
    assert not zs.setup(zapi, template_source, hosts()).changed


def test_server_validation_rejects_a_bad_uuid(zapi: Any, first_run: zs.SetupResult,
                                              template_source: str) -> None:
    """Proof that validation is real: a UUID that is not v4 is refused, nothing changes."""
    template_uuid = yaml.safe_load(template_source)["zabbix_export"]["templates"][0]["uuid"]
    broken = template_source.replace(template_uuid, "0123456789abcdef0123456789abcdef")
    with pytest.raises(ZabbixAPIException, match="UUIDv4"):
        zs.setup(zapi, broken, hosts())
    stored = zapi.template.get(filter={"host": [TEMPLATE_NAME]}, output=["uuid"])
    assert [t["uuid"] for t in stored] == [template_uuid]


@pytest.fixture(scope="module")
def api_user(zapi: Any) -> tuple[str, str]:
    """A super admin with a random password, so its absence from logs means something."""
    name, password = "cvmfs-setup-test", "Pw-" + secrets.token_hex(12)
    found = zapi.user.get(filter={"username": name}, output=["userid"])
    if found:
        zapi.user.update(userid=found[0]["userid"], passwd=password)
    else:
        zapi.user.create(username=name, passwd=password, roleid="3",
                         usrgrps=[{"usrgrpid": "7"}])
    return name, password


def test_command_line_never_shows_the_password(
        frontend: zbx.Frontend, first_run: zs.SetupResult, api_user: tuple[str, str],
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    user, password = api_user
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "password"
    secret_file.write_text(password + "\n")
    args = ["--url", frontend.url, "--user", user, "--agent-address", "127.0.0.1",
            "--agent-port", str(HOST_PORT), "-v"]
    assert zs.main([*args, "--password-file", str(secret_file), "--insecure"]) == 0
    assert "TLS certificate verification disabled" in caplog.text
    assert "nothing to change" in caplog.text
    monkeypatch.setenv("ZABBIX_PASSWORD", password)
    assert zs.main(args) == 0
    monkeypatch.setenv("ZABBIX_PASSWORD", password + "-wrong")
    assert zs.main(args) == 1
    assert "Incorrect user name or password" in caplog.text
    out = capsys.readouterr()
    for text in (caplog.text, out.out, out.err):
        assert password not in text


def test_command_line_errors_exit_non_zero(caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZABBIX_PASSWORD", raising=False)
    caplog.set_level(logging.INFO)
    assert zs.main(["--url", "http://127.0.0.1:9/"]) == 1
    assert "no password" in caplog.text
    monkeypatch.setenv("ZABBIX_PASSWORD", "x")
    assert zs.main(["--url", "http://127.0.0.1:9/", "--timeout", "5"]) == 1
    assert "cannot reach the Zabbix API" in caplog.text
