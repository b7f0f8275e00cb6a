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


def test_frontend_config_takes_the_database_from_the_environment(tmp_path: Path) -> None:
    """One fixed file for every frontend on the machine, and no password in it."""
    target = tmp_path / "zabbix.conf.php"
    zbx.write_frontend_config(target)
    text = target.read_text()
    assert "$DB['TYPE'] = 'POSTGRESQL';" in text
    for var in zbx.Database.private_one().frontend_env():
        assert f"getenv('{var}')" in text
    assert target.stat().st_mode & 0o777 == 0o644


def test_private_database_names_are_random_and_droppable_only_when_private() -> None:
    a, b = zbx.Database.private_one(), zbx.Database.private_one()
    assert a.name != b.name and a.user == a.name and a.password != b.password
    assert a.name.startswith(zbx.PRIVATE_PREFIX) and a.private
    with pytest.raises(ValueError, match="refusing to drop 'zabbix'"):
        zbx.drop_database(zbx.Database())


def test_private_database_is_dropped_with_its_role() -> None:
    """Against the machine's PostgreSQL: created, then nothing of it left."""
    needs_packages(lambda: zbx.ensure_packages(("postgresql",)))
    db = zbx.Database.private_one()
    zbx.ensure_postgresql(db)
    admin = {"user": db.admin_user, "dbname": "postgres"}
    query = ("SELECT (SELECT count(*) FROM pg_database WHERE datname = :'n') ||','||"
             " (SELECT count(*) FROM pg_roles WHERE rolname = :'n');\n")
    zbx._psql(db, "SELECT format('CREATE ROLE %I LOGIN', :'n') \\gexec\n"
              "SELECT format('CREATE DATABASE %I OWNER %I', :'n', :'n') \\gexec\n",
              variables={"n": db.name}, **admin)
    try:
        assert zbx._psql(db, query, variables={"n": db.name}, **admin).strip() == "1,1"
    finally:
        zbx.drop_database(db)
    assert zbx._psql(db, query, variables={"n": db.name}, **admin).strip() == "0,0"
