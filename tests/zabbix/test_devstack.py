"""devstack.zabbix's own contract: clear failures, skips only when uninstallable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devstack import zabbix as zbx

from .conftest import needs_packages


def test_agent_that_cannot_start_names_its_log(tmp_path: Path) -> None:
    needs_packages(lambda: zbx.ensure_packages(zbx.AGENT_PACKAGES))
    with pytest.raises(RuntimeError, match=re.escape(str(tmp_path / "zabbix_agentd.log"))):
        zbx.start_agent(tmp_path, extra_config=["NoSuchOption=1"], timeout=5)


def test_missing_packages_without_root_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one case where the tests may skip: absent and not installable."""
    monkeypatch.setattr(zbx, "missing_packages", list)
    monkeypatch.setattr(zbx.os, "geteuid", lambda: 1000)
    with pytest.raises(zbx.ServiceUnavailable, match="zabbix-agent"):
        zbx.ensure_packages(zbx.AGENT_PACKAGES)


def test_installed_packages_are_not_reinstalled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zbx, "missing_packages", lambda packages: [])

    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError("apt-get must not run")

    monkeypatch.setattr(zbx.subprocess, "run", no_apt)
    zbx.ensure_packages(zbx.SERVER_PACKAGES)


def test_zabbix_ports_fit_listen_port_range() -> None:
    """zabbix_agentd and zabbix_server refuse ListenPort above 32767."""
    assert all(10000 <= zbx.zabbix_port() <= 32767 for _ in range(20))


def test_frontend_config_is_php_escaped(tmp_path: Path) -> None:
    target = tmp_path / "zabbix.conf.php"
    zbx.write_frontend_config(zbx.Database(password="it's\\x"), target)
    text = target.read_text()
    assert "$DB['PASSWORD'] = 'it\\'s\\\\x';" in text
    assert "$DB['TYPE'] = 'POSTGRESQL';" in text
    assert target.stat().st_mode & 0o777 == 0o640
