"""The foundation's service layers against the real services: Vault, cvmfs_server, TLS."""

from __future__ import annotations

import fcntl
import logging
import ssl
from pathlib import Path

import pytest

from cvmfs_publisher.adapters import amqp
from cvmfs_publisher.adapters.cvmfs import (
    CommandTimeout,
    CvmfsError,
    CvmfsServer,
    GatewayUnreachable,
    NotInTransaction,
    PublishInProgress,
    TransactionBusy,
    TransactionRefused,
)
from cvmfs_publisher.adapters.rgw import RGW
from cvmfs_publisher.adapters.vault import VaultClient
from cvmfs_publisher.core import config
from cvmfs_publisher.core.errors import Permanent, Transient
from tests.conftest import Stack
from tests.cvmfs_server_double import calls, inject_fault


@pytest.fixture
def vault_cfg(stack: Stack) -> config.Config:
    return stack.config()


def test_vault_relogin_after_token_revoked(vault_cfg, openbao) -> None:
    openbao.put_keys("subj/cvmfs_keys/v.infn.it", {"publicKey": "p", "certificateKey": "c",
                                                   "gatewayKey": "g", "masterKey": "m"})
    client = VaultClient(vault_cfg.vault)
    keys = client.read_keys("subj/cvmfs_keys/v.infn.it", "v.infn.it")
    assert (keys.pub, keys.crt, keys.gw) == ("p", "c", "g")
    assert "m" not in repr(keys)
    # an operator (or the token's max TTL) revokes the token: 403, log in again, read
    openbao.client().auth.token.revoke(client._client.token)
    assert client.read_keys("subj/cvmfs_keys/v.infn.it", "v.infn.it").gw == "g"


def test_vault_token_renewed_when_half_the_ttl_is_gone(vault_cfg, openbao) -> None:
    openbao.put_keys("subj/cvmfs_keys/r.infn.it", {"publicKey": "p", "certificateKey": "c",
                                                   "gatewayKey": "g"})
    client = VaultClient(vault_cfg.vault)
    client.login()
    token = client._client.token
    client._expires -= client._ttl * 0.6  # pretend 60 % of the TTL has passed
    client.read("subj/cvmfs_keys/r.infn.it")
    assert client._client.token == token, "renewal must keep the token"
    ttl = openbao.client().auth.token.lookup(token)["data"]["ttl"]
    assert ttl > client._ttl * 0.9


def test_vault_errors_are_classified(vault_cfg, openbao, tmp_path: Path) -> None:
    client = VaultClient(vault_cfg.vault)
    with pytest.raises(Permanent, match="no keys in Vault"):
        client.read_keys("nobody/cvmfs_keys/x.infn.it", "x.infn.it")
    openbao.put_keys("subj/cvmfs_keys/partial.infn.it", {"publicKey": "p"})
    with pytest.raises(Permanent, match="lacks certificateKey, gatewayKey"):
        client.read_keys("subj/cvmfs_keys/partial.infn.it", "partial.infn.it")
    bad = tmp_path / "bad_secret_id"
    bad.write_text("not-the-secret-id")
    wrong = config.from_mapping({"vault": {"url": openbao.url, "role_id_file": str(bad),
                                           "secret_id_file": str(bad)}}, env={})
    with pytest.raises(Permanent, match="login refused") as err:
        VaultClient(wrong.vault).login()
    assert "not-the-secret-id" not in str(err.value)
    down = config.from_mapping({"vault": {"url": "http://127.0.0.1:9", "role_id_file": str(bad),
                                          "secret_id_file": str(bad), "timeout": 1.0}}, env={})
    with pytest.raises(Transient, match="Vault unreachable"):
        VaultClient(down.vault).login()


def gateway_repository(stack: Stack, repo: str) -> tuple[config.Config, CvmfsServer]:
    """A gateway-mode repository created with keys in the configured keys_dir."""
    cfg = stack.config()
    keys = Path(cfg.cvmfs.keys_dir)
    keys.mkdir(parents=True, exist_ok=True)
    for ext in ("pub", "crt", "gw"):
        (keys / f"{repo}.{ext}").write_text("k")
    cv = CvmfsServer(cfg.cvmfs)
    cv.mkfs_gateway(repo, str(keys))
    return cfg, cv


def test_cvmfs_exit_codes_are_mapped(stack: Stack, cvmfs_double) -> None:
    repo = "layer.infn.it"
    _, cv = gateway_repository(stack, repo)
    assert cv.exists(repo) and cv.healthy(repo)
    cv.transaction(repo)
    assert cv.in_transaction(repo)
    with pytest.raises(TransactionBusy) as err:
        cv.transaction(repo)
    assert err.value.rc == 17 and "already open" in str(err.value)
    cv.abort(repo)
    with pytest.raises(NotInTransaction):
        cv.abort(repo)
    inject_fault(cvmfs_double.root, "transaction", rc=16)
    with pytest.raises(TransactionBusy) as err:
        cv.transaction(repo)
    assert err.value.rc == 16
    cv.transaction(repo)
    inject_fault(cvmfs_double.root, "abort", rc=5)
    with pytest.raises(GatewayUnreachable):
        cv.abort(repo)
    assert cv.in_transaction(repo), "abort 5 leaves the transaction open"
    cv.abort(repo)
    with pytest.raises(CvmfsError) as err:
        cv.publish(repo)
    assert err.value.rc == 1 and "not in a transaction" in str(err.value)
    with pytest.raises(CvmfsError, match="cannot run"):
        CvmfsServer(config.from_mapping({"cvmfs": {"server_command": "/nonexistent"}},
                                        env={}).cvmfs).transaction(repo)
    inject_fault(cvmfs_double.root, "transaction", delay=5)
    with pytest.raises(CommandTimeout):
        cv.run("transaction", repo, ["transaction", repo], timeout=1)
    # the timeout killed the command's process group: nothing of it runs on
    assert not [c for c in calls(cvmfs_double.root) if c["rc"] is None and alive(c["pid"])]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_cvmfs_exit_codes_are_read_with_their_message(stack: Stack, cvmfs_double) -> None:
    """cvmfs README §10: abort's 22 is two things; transaction's 22 is permanent;
    the Stacktrace: block is not a message."""
    repo = "layer2.infn.it"
    cfg, cv = gateway_repository(stack, repo)
    assert cv.installed(repo) == []
    inject_fault(cvmfs_double.root, "transaction", rc=22)
    with pytest.raises(TransactionRefused):
        cv.transaction(repo)
    inject_fault(cvmfs_double.root, "transaction", rc=1)
    with pytest.raises(CvmfsError) as err:
        cv.transaction(repo)
    assert "cannot acquire lease" in str(err.value) and "0x" not in str(err.value)
    cv.transaction(repo)
    with open(cv.publish_lock(repo), "a") as fh:  # a publish running
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(PublishInProgress) as busy:
            cv.abort(repo)
        assert busy.value.rc == 22 and "is_publishing.lock" in str(busy.value)
        assert not cv.wait_publish_lock(repo, timeout=0.3)
    assert cv.wait_publish_lock(repo, timeout=0)
    cv.abort(repo)
    with pytest.raises(NotInTransaction):
        cv.abort(repo)
    (Path(cfg.cvmfs.repositories_dir) / repo / "server.conf").unlink()
    assert cv.installed(repo) == ["server.conf"]


def test_tls_verification_is_on_by_default(caplog) -> None:
    cfg = config.from_mapping({"amqp": {"host": "rabbit.example.org"}}, env={})
    params = amqp.connection_parameters(cfg.amqp, "t")
    ctx = params.ssl_options.context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert params.ssl_options.server_hostname == "rabbit.example.org"
    off = config.from_mapping({"amqp": {"verify": False}}, env={})
    with caplog.at_level(logging.WARNING):
        ctx = amqp.connection_parameters(off.amqp, "t").ssl_options.context
    assert ctx.verify_mode == ssl.CERT_NONE
    assert "verification is DISABLED" in caplog.text
    s3 = config.from_mapping({"s3": {"endpoint_url": "https://rgw.example.org"}}, env={})
    assert RGW(s3.s3).s3._endpoint.http_session._verify is True
