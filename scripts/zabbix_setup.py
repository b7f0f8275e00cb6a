#!/usr/bin/env python3
"""Import the cvmfs-publisher Zabbix template and create the three daemon hosts.

Run it against a Zabbix 6.0 frontend (its JSON-RPC API) whenever the template
changes or a deployment is new::

    ZABBIX_PASSWORD=... scripts/zabbix_setup.py --url https://zabbix.example/ --user Admin

It is idempotent: the template is imported only when
``configuration.importcompare`` reports a difference (or its UUID changed),
and the host group,
hosts, their agent interface, template link and ``{$CVMFS.DAEMON}`` macro are
created or corrected only where they differ, so a second run changes nothing.
It adds what it needs and removes nothing an operator added to the hosts
(other groups, templates, macros). The template's own objects are imported
with ``deleteMissing``: the file is the template's source of truth.

The password comes from ``--password-file`` or ``ZABBIX_PASSWORD`` and is
never printed (pyzabbix logs request bodies, login included, at DEBUG: its
logger is kept at WARNING whatever ``--verbose`` says). TLS certificates are
verified unless ``--insecure`` is given, which is logged.

The logic is importable: :func:`setup` takes a logged-in ``pyzabbix.ZabbixAPI``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from pyzabbix import ZabbixAPI, ZabbixAPIException
from requests import RequestException

log = logging.getLogger("zabbix_setup")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = REPO_ROOT / "config" / "zabbix" / "template_cvmfs_publisher.yaml"
DEFAULT_GROUP = "CVMFS publisher"
DAEMONS = ("publisher-consumer", "cvmfs-repo-consumers", "cvmfs-repo-sync")
DAEMON_MACRO = "{$CVMFS.DAEMON}"
AGENT_PORT = 10050
INTERFACE_AGENT = "1"

_ALL = {"createMissing": True, "updateExisting": True, "deleteMissing": True}
#: Import rules for Zabbix 6.0 (``groups`` are template groups there, create only).
IMPORT_RULES: dict[str, dict[str, bool]] = {
    "groups": {"createMissing": True},
    "templates": {"createMissing": True, "updateExisting": True},
    "templateLinkage": {"createMissing": True},
    "items": _ALL,
    "discoveryRules": _ALL,
    "triggers": _ALL,
    "graphs": _ALL,
    "templateDashboards": _ALL,
    "valueMaps": _ALL,
}


class SetupError(RuntimeError):
    """A problem the operator must fix (bad input, unexpected API state)."""


@dataclass(frozen=True)
class HostSpec:
    """One monitored daemon: Zabbix host name, daemon name and agent address."""

    name: str
    daemon: str
    address: str
    port: int = AGENT_PORT

    @property
    def useip(self) -> bool:
        """An IP address is used as such; anything else is a DNS name."""
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            return False
        return True

    def interface(self) -> dict[str, str]:
        """The agent interface as the API expects it (all values strings)."""
        return {
            "type": INTERFACE_AGENT, "main": "1", "useip": "1" if self.useip else "0",
            "ip": self.address if self.useip else "",
            "dns": "" if self.useip else self.address, "port": str(self.port),
        }


@dataclass
class SetupResult:
    """What a run did; ``changed`` is False on an idempotent re-run."""

    template: str = "unchanged"
    group: str = "unchanged"
    hosts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return (self.template != "unchanged" or self.group != "unchanged"
                or any(self.hosts.values()))


@dataclass(frozen=True)
class TemplateInfo:
    """What setup needs to know of the export: the template's name and UUID."""

    name: str
    uuid: str


def template_info(source: str) -> TemplateInfo:
    """Read the template's technical name and UUID from the export text."""
    try:
        template = yaml.safe_load(source)["zabbix_export"]["templates"][0]
        return TemplateInfo(str(template["template"]), str(template["uuid"]))
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise SetupError(f"not a Zabbix template export: {exc}") from None


def import_template(api: ZabbixAPI, source: str, info: TemplateInfo) -> str:
    """Import the template unless Zabbix already holds it; ``imported`` or ``unchanged``.

    ``configuration.importcompare`` (Zabbix 6.0+) tells whether the import
    would change anything, so an unchanged file is not re-imported (an import
    rewrites objects such as dashboards). It matches objects by name and
    ignores UUID-only changes, so the stored template's UUID is compared
    too: a changed (or invalid) UUID still goes through the import and its
    validation.
    """
    params = {"format": "yaml", "source": source, "rules": IMPORT_RULES}
    diff = api.do_request("configuration.importcompare", params)["result"]
    stored = api.template.get(filter={"host": [info.name]}, output=["uuid"])
    if not diff and stored and stored[0]["uuid"] == info.uuid:
        return "unchanged"
    api.do_request("configuration.import", params)
    return "imported"


def ensure_host_group(api: ZabbixAPI, name: str) -> tuple[str, str]:
    """The host group's id, creating it if needed; (id, created|unchanged)."""
    found = api.hostgroup.get(filter={"name": [name]}, output=["groupid"])
    if found:
        return found[0]["groupid"], "unchanged"
    created = api.hostgroup.create(name=name)
    return created["groupids"][0], "created"


def ensure_host(api: ZabbixAPI, spec: HostSpec, groupid: str, templateid: str) -> list[str]:
    """Create or correct one host; returns the list of changes made (empty: none)."""
    wanted_if = spec.interface()
    found = api.host.get(
        filter={"host": [spec.name]}, output=["hostid", "host"],
        selectGroups=["groupid"], selectParentTemplates=["templateid"],
        selectMacros=["hostmacroid", "macro", "value"],
        selectInterfaces=["interfaceid", "type", "main", "useip", "ip", "dns", "port"],
    )
    if not found:
        api.host.create(
            host=spec.name, groups=[{"groupid": groupid}],
            templates=[{"templateid": templateid}], interfaces=[wanted_if],
            macros=[{"macro": DAEMON_MACRO, "value": spec.daemon}],
        )
        return ["created"]
    host = found[0]
    hostid = host["hostid"]
    changes: list[str] = []
    if groupid not in {g["groupid"] for g in host["groups"]}:
        api.host.massadd(hosts=[{"hostid": hostid}], groups=[{"groupid": groupid}])
        changes.append("group added")
    if templateid not in {t["templateid"] for t in host["parentTemplates"]}:
        api.host.massadd(hosts=[{"hostid": hostid}], templates=[{"templateid": templateid}])
        changes.append("template linked")
    macro = next((m for m in host["macros"] if m["macro"] == DAEMON_MACRO), None)
    if macro is None:
        api.usermacro.create(hostid=hostid, macro=DAEMON_MACRO, value=spec.daemon)
        changes.append("macro created")
    elif macro["value"] != spec.daemon:
        api.usermacro.update(hostmacroid=macro["hostmacroid"], value=spec.daemon)
        changes.append("macro updated")
    main = next((i for i in host["interfaces"]
                 if i["type"] == INTERFACE_AGENT and i["main"] == "1"), None)
    if main is None:
        api.hostinterface.create(hostid=hostid, **wanted_if)
        changes.append("interface created")
    elif any(main[k] != v for k, v in wanted_if.items()):
        api.hostinterface.update(interfaceid=main["interfaceid"], **wanted_if)
        changes.append("interface updated")
    return changes


def setup(api: ZabbixAPI, template_source: str, hosts: Sequence[HostSpec],
          group: str = DEFAULT_GROUP) -> SetupResult:
    """Import the template, then create or correct the host group and ``hosts``.

    ``api`` must be logged in. Raises :class:`SetupError` or pyzabbix's
    ``ZabbixAPIException`` on failure.
    """
    result = SetupResult()
    info = template_info(template_source)
    result.template = import_template(api, template_source, info)
    found = api.template.get(filter={"host": [info.name]}, output=["templateid"])
    if not found:
        raise SetupError(f"template {info.name!r} not found after import")
    templateid = found[0]["templateid"]
    groupid, result.group = ensure_host_group(api, group)
    for spec in hosts:
        result.hosts[spec.name] = ensure_host(api, spec, groupid, templateid)
    return result


# --------------------------------------------------------------------------- command line


def connect(url: str, user: str, password: str, *, verify: bool | str = True,
            timeout: float = 30.0) -> ZabbixAPI:
    """A logged-in API client; ``verify`` is requests' (True, False or a CA bundle path)."""
    api = ZabbixAPI(url, timeout=timeout)
    api.session.verify = verify
    api.login(user, password)
    return api


def read_password(path: str | None) -> str:
    """From ``path`` (first line) or ``ZABBIX_PASSWORD``; never from the command line."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SetupError(f"cannot read password file {path}: {exc.strerror}") from None
        password = text.splitlines()[0] if text else ""
    else:
        password = os.environ.get("ZABBIX_PASSWORD", "")
    if not password:
        raise SetupError("no password: use --password-file or the ZABBIX_PASSWORD variable")
    return password


def parse_host_override(value: str) -> tuple[str, str, int]:
    """``NAME=ADDRESS[:PORT]`` (IPv6 as ``[addr]:port``)."""
    name, sep, target = value.partition("=")
    if not sep or name not in DAEMONS or not target:
        raise argparse.ArgumentTypeError(
            f"expected NAME=ADDRESS[:PORT] with NAME one of {', '.join(DAEMONS)}")
    port = AGENT_PORT
    if target.startswith("["):
        address, _, rest = target[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif target.count(":") == 1:
        address, port_text = target.split(":")
        port = int(port_text)
    else:
        address = target
    if not address or not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"bad agent address {target!r}")
    return name, address, port


def build_hosts(agent_address: str | None, agent_port: int,
                overrides: Sequence[tuple[str, str, int]]) -> list[HostSpec]:
    """The three daemon hosts; each host's agent defaults to its own name (DNS)."""
    by_name = {name: (address, port) for name, address, port in overrides}
    hosts = []
    for daemon in DAEMONS:
        address, port = by_name.get(daemon, (agent_address or daemon, agent_port))
        hosts.append(HostSpec(name=daemon, daemon=daemon, address=address, port=port))
    return hosts


def _loopback(hostname: str | None) -> bool:
    if hostname in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True,
                   help="Zabbix frontend URL (the API is <url>/api_jsonrpc.php)")
    p.add_argument("--user", default="Admin", help="API user (default Admin)")
    p.add_argument("--password-file",
                   help="file holding the password (else env ZABBIX_PASSWORD)")
    p.add_argument("--template", default=str(DEFAULT_TEMPLATE),
                   help="template export (default: %(default)s)")
    p.add_argument("--group", default=DEFAULT_GROUP, help="host group (default %(default)s)")
    p.add_argument("--agent-address",
                   help="agent IP or DNS name for every host (default: each host's name)")
    p.add_argument("--agent-port", type=int, default=AGENT_PORT,
                   help="agent port (default %(default)s)")
    p.add_argument("--host", action="append", default=[], type=parse_host_override,
                   metavar="NAME=ADDRESS[:PORT]", help="agent address of one host")
    p.add_argument("--ca-file", help="CA bundle for the frontend's certificate")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the frontend's TLS certificate (logged)")
    p.add_argument("--timeout", type=float, default=30.0, help="API timeout in seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 1 on any failure (reason logged)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # pyzabbix logs whole request bodies at DEBUG, user.login's password included.
    logging.getLogger("pyzabbix").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    verify: bool | str = True
    if args.insecure:
        log.warning("TLS certificate verification disabled (--insecure)")
        import urllib3  # noqa: PLC0415 - only needed for this warning switch
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        verify = False
    elif args.ca_file:
        verify = args.ca_file
    if urlsplit(args.url).scheme == "http" and not _loopback(urlsplit(args.url).hostname):
        log.warning("%s is plain HTTP: the password crosses the network unencrypted", args.url)
    try:
        source = Path(args.template).read_text(encoding="utf-8")
        password = read_password(args.password_file)
        hosts = build_hosts(args.agent_address, args.agent_port, args.host)
        log.info("connecting to %s as %s", args.url, args.user)
        api = connect(args.url, args.user, password, verify=verify, timeout=args.timeout)
        result = setup(api, source, hosts, args.group)
    except SetupError as exc:
        log.error("%s", exc)
        return 1
    except ZabbixAPIException as exc:
        log.error("Zabbix API: %s", exc.args[0] if exc.args else exc)
        return 1
    except RequestException as exc:
        log.error("cannot reach the Zabbix API at %s: %s", args.url, exc)
        return 1
    except OSError as exc:
        log.error("%s: %s", getattr(exc, "filename", None) or args.template, exc.strerror or exc)
        return 1
    log.info("template: %s; host group %r: %s", result.template, args.group, result.group)
    for name, changes in result.hosts.items():
        log.info("host %s: %s", name, ", ".join(changes) if changes else "unchanged")
    log.info("done: %s", "changes made" if result.changed else "nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
