"""Unit tests of the foundation: configuration, names, messages, log redaction."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import yaml

from cvmfs_publisher.core import config, logs
from cvmfs_publisher.core.announcements import BadAnnouncement, parse_announcement
from cvmfs_publisher.core.names import InvalidName, validate_repository, vault_path
from cvmfs_publisher.core.status import StatusDocument, read_status
from cvmfs_publisher.provisioning.messages import BadMessage, parse_request

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "publisher.example.yaml"


# -- configuration ------------------------------------------------------------------------


def test_example_config_is_valid_and_complete(tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    for section in raw.values():
        for key in list(section):
            if key.endswith("_file") and section[key].startswith("/run/secrets/"):
                (tmp_path / key).write_text("x")
                section[key] = str(tmp_path / key)
    cfg = config.from_mapping(raw, env={})
    assert cfg.amqp.publisher_queue == "publisher_queue"
    assert cfg.amqp.tls is True and cfg.vault.verify is True and cfg.s3.verify is True
    # every key of the schema appears in the example (it is the reference)
    text = EXAMPLE.read_text()
    for section in config.Config.__dataclass_fields__:
        sub = getattr(cfg, section)
        for key in sub.__dataclass_fields__:
            name = f"{key}_file" if f"{section}.{key}" in config.SECRETS else key
            assert f"{name}:" in text, f"{section}.{name} missing from the example"


@pytest.mark.parametrize(("raw", "message"), [
    ({"amqp": {"hots": "x"}}, "amqp.hots: unknown key"),
    ({"amqpp": {}}, "amqpp: unknown section"),
    ({"amqp": {"port": "abc"}}, "amqp.port: expected an integer"),
    ({"amqp": {"port": 70000}}, "amqp.port"),
    ({"amqp": {"tls": "yes"}}, "amqp.tls: expected true or false"),
    ({"amqp": {"retry_delays": "5"}}, "amqp.retry_delays: expected a list"),
    ({"amqp": {"password": "inline"}}, "amqp.password: secrets are not accepted inline"),
    ({"s3": {"secret_key": "inline"}}, "s3.secret_key: secrets are not accepted inline"),
    ({"sync": {"quiet_seconds": 10, "max_delay_seconds": 5}}, "sync.max_delay_seconds"),
    ({"log": {"level": "LOUD"}}, "log.level"),
    ({"receipts": {"key": "cvmfs/status.json"}}, "receipts.key: 'cvmfs/status.json' is inside"),
    ({"receipts": {"key": "cvmfs-publisher/../cvmfs/x"}}, "receipts.key"),
    ({"receipts": {"key": ""}}, "receipts.key"),
    ({"receipts": {"interval": 0}}, "receipts.interval"),
    ({"receipts": {"rejected": 0}}, "receipts.rejected"),
    ({"receipts": {"enabled": "maybe"}}, "receipts.enabled: expected true or false"),
    ([1, 2], "top level"),
])
def test_config_errors_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_mapping(raw, env={})
    assert message in str(err.value)


def test_env_overrides_and_secret_sources(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-from-file\n")
    env = {"CVMFS_PUBLISHER_AMQP__PORT": "5672", "CVMFS_PUBLISHER_AMQP__TLS": "false",
           "CVMFS_PUBLISHER_AMQP__RETRY_DELAYS": "1,2,3",
           "CVMFS_PUBLISHER_S3__ACCESS_KEY": "AKENV",
           "CVMFS_PUBLISHER_S3__SECRET_KEY_FILE": str(secret)}
    cfg = config.from_mapping({"amqp": {"password_file": str(secret), "port": 1}}, env=env)
    assert cfg.amqp.port == 5672 and cfg.amqp.tls is False
    assert cfg.amqp.retry_delays == [1, 2, 3]
    assert cfg.amqp.password.get() == "s3cr3t-from-file"
    assert cfg.s3.access_key.get() == "AKENV"
    assert cfg.s3.secret_key.get() == "s3cr3t-from-file"
    assert "s3cr3t" not in repr(cfg)
    with pytest.raises(config.ConfigError, match=r"amqp\.port: expected an integer"):
        config.from_mapping({}, env={"CVMFS_PUBLISHER_AMQP__PORT": "x"})


def test_unreadable_secret_file_matters_only_to_the_daemon_that_needs_it() -> None:
    cfg = config.from_mapping({"vault": {"secret_id_file": "/nonexistent/x"}}, env={})
    config.require(config.from_mapping({"cvmfs": {"stratum0_url": "http://s0",
                                                  "gateway_url": "http://gw"},
                                        "vault": {"secret_id_file": "/nonexistent/x"}},
                                       env={}), "cvmfs-repo-sync")
    with pytest.raises(config.ConfigError) as err:
        config.require(cfg, "publisher-consumer")
    assert "amqp.password" in str(err.value)  # the first missing key
    full = {"amqp": {"password_file": __file__, "management_url": "http://m"},
            "vault": {"url": "http://v", "role_id_file": __file__,
                      "secret_id_file": "/nonexistent/x"},
            "s3": {"endpoint_url": "http://s3", "access_key_file": __file__,
                   "secret_key_file": __file__},
            "rgw": {"push_endpoint": "amqps://r"},
            "cvmfs": {"stratum0_url": "http://s0", "gateway_url": "http://gw"}}
    with pytest.raises(config.ConfigError) as err:
        config.require(config.from_mapping(full, env={}), "publisher-consumer")
    assert "vault.secret_id_file: cannot read /nonexistent/x" in str(err.value)


def test_required_keys_per_daemon() -> None:
    cfg = config.from_mapping({}, env={})
    with pytest.raises(config.ConfigError, match=r"amqp\.password: required by publisher-consumer"):
        config.require(cfg, "publisher-consumer")
    with pytest.raises(config.ConfigError, match=r"cvmfs.stratum0_url"):
        config.require(cfg, "cvmfs-repo-sync")


# -- names and messages ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice-personalrepo.infn.it", "a.infn.it", "x1.y-2.infn.it",
                                  ("a" * 52) + ".infn.it"])
def test_valid_repository_names(name: str) -> None:
    assert validate_repository(name, "infn.it") == name


@pytest.mark.parametrize("name", ["", "infn.it", "Alice.infn.it", "a_b.infn.it", "-a.infn.it",
                                  "a-.infn.it", "a..infn.it", "a.example.org", "a.infn.it.",
                                  ("a" * 53) + ".infn.it", "a/b.infn.it", "a b.infn.it",
                                  ("a" * 64) + ".b.infn.it"])
def test_invalid_repository_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_repository(name, "infn.it")


def test_vault_paths() -> None:
    assert vault_path("a-x.infn.it", "personal", "sub-1") == "sub-1/cvmfs_keys/a-x.infn.it"
    assert vault_path("a-x.infn.it", "group", "sub-1") == "groups/a-x/cvmfs_keys/a-x.infn.it"
    for subject in ("a/b", "..", "a..b", "", "/abs"):
        with pytest.raises(InvalidName):
            vault_path("a-x.infn.it", "personal", subject)


def test_parse_csv_and_json() -> None:
    r = parse_request(b" alice , sub-1 , alice-p.infn.it , P \n", "infn.it")
    assert (r.action, r.user, r.subject, r.repository, r.kind) == (
        "create", "alice", "sub-1", "alice-p.infn.it", "personal")
    r = parse_request(json.dumps({"action": "delete", "user": "bob", "subject": "s",
                                  "repository": "grp.infn.it", "type": "group"}).encode(),
                      "infn.it")
    assert (r.action, r.kind) == ("delete", "group")


@pytest.mark.parametrize("body", [b"", b"\xff", b"a,b", b"a,b,c,d,e", b"a,s,r.infn.it,Q",
                                  b"{", b"{}", b'{"action":1}', b"a\x00,s,r.infn.it,P",
                                  b'{"user":"a","subject":"s","repository":"r.infn.it",'
                                  b'"type":"personal","extra":1}',
                                  b"a,s,r.infn.it,P" + b" " * 70000, b"a b,s,r.infn.it,P"])
def test_bad_messages(body: bytes) -> None:
    with pytest.raises(BadMessage):
        parse_request(body, "infn.it")


def test_announcements() -> None:
    assert parse_announcement(b'{"event":"created","repository":"r.infn.it","queue":"r"}')
    with pytest.raises(BadAnnouncement):
        parse_announcement(b'{"event":"exploded","repository":"r","queue":"r"}')


# -- logs -------------------------------------------------------------------------------------


def test_redaction(tmp_path: Path) -> None:
    log = logs.setup("unit", str(tmp_path), "DEBUG", stdout=False, secrets=["hunter2-secret"])
    try:
        raise RuntimeError("login with hunter2-secret failed")
    except RuntimeError:
        log.exception("boom amqps://user:pa55word@host:5671/vh token=s.ABCDEFGHIJKLMNOPQRSTUVWX")
    log.info("secret_id=%s password: %s", "abcd-efgh", "p4ss")
    for h in logging.getLogger().handlers:
        h.flush()
    text = (tmp_path / "unit.log").read_text()
    for leaked in ("hunter2-secret", "pa55word", "ABCDEFGHIJKLMNOPQRSTUVWX", "abcd-efgh", "p4ss"):
        assert leaked not in text
    assert "amqps://user:***@host" in text


def test_status_document_atomic(tmp_path: Path) -> None:
    st = StatusDocument(tmp_path / "d.json", "cvmfs-repo-sync", min_interval=0)
    st.repo("a.infn.it", pending=3)
    st.incr("a.infn.it", "dead_lettered")
    st.flush(force=True)
    doc = read_status(tmp_path / "d.json")
    assert doc["repositories"]["a.infn.it"]["pending"] == 3
    assert doc["dead_lettered"] == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_status_document_tracks_every_change_between_writes(tmp_path: Path) -> None:
    """The repositories' part is encoded again only when it changed: never a stale one."""
    path = tmp_path / "d.json"
    st = StatusDocument(path, "cvmfs-repo-consumers", min_interval=0)

    def written() -> dict:
        st.flush(force=True)
        doc = read_status(path)
        assert doc == json.loads(json.dumps(st.snapshot()))  # what memory holds, always
        del doc["updated"]  # new at every write
        return doc

    st.repo("a.infn.it", pending=1, queue_depth=0)
    st.repo("b.infn.it", pending=0)
    first = written()
    st.repo("a.infn.it", pending=1, queue_depth=0)  # no change: the same part again
    assert written()["repositories"] == first["repositories"]
    for change in (lambda: st.repo("a.infn.it", pending=2),
                   lambda: st.repo("c.infn.it"),
                   lambda: st.incr("b.infn.it", "errors"),
                   lambda: st.drop_repo("a.infn.it"),
                   lambda: st.set(healthy=False)):
        before = written()
        change()
        assert written() != before
    st.repo("a.infn.it", create=False, receipt="ok")  # a late report: not brought back
    doc = written()
    assert set(doc["repositories"]) == {"b.infn.it", "c.infn.it"}
    assert doc["repositories"]["b.infn.it"]["errors"] == 1 and doc["healthy"] is False


@pytest.mark.parametrize(("daemon", "has_broker"), [
    ("publisher-consumer", True), ("cvmfs-repo-consumers", True), ("cvmfs-repo-sync", False)])
def test_broker_connected_only_for_daemons_with_a_broker(
        tmp_path: Path, daemon: str, has_broker: bool) -> None:
    """cvmfs-repo-sync has no broker: no ``broker_connected`` rather than a false ``false``."""
    from cvmfs_publisher.core import runtime

    cfg = tmp_path / "publisher.yaml"
    secret = tmp_path / "secret"
    secret.write_text("x")
    cfg.write_text(yaml.safe_dump({
        "log": {"dir": str(tmp_path / "log"), "stdout": False},
        "status": {"dir": str(tmp_path / "status")},
        "amqp": {"password_file": str(secret), "management_url": "http://127.0.0.1:1"},
        "vault": {"url": "http://127.0.0.1:1", "role_id_file": str(secret),
                  "secret_id_file": str(secret)},
        "s3": {"endpoint_url": "http://127.0.0.1:1", "access_key_file": str(secret),
               "secret_key_file": str(secret)},
        "rgw": {"push_endpoint": "amqp://127.0.0.1"},
        "cvmfs": {"stratum0_url": "http://s0/cvmfs", "gateway_url": "http://gw/api"}}))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)})
    try:
        rt = runtime.start(daemon, "test", ["--config", str(cfg)])
        assert ("broker_connected" in rt.status.snapshot()) is has_broker
    finally:  # runtime.start set up the root logger and signal handlers of a daemon
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved[0], saved[1]
        for sig, handler in saved[2].items():
            signal.signal(sig, handler)


def test_readme_documents_every_key() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for section in config.Config.__dataclass_fields__:
        for key in getattr(config.Config(), section).__dataclass_fields__:
            full = f"{section}.{key}"
            name = f"{full}_file" if full in config.SECRETS else full
            assert f"`{name}`" in readme, f"{name} missing from the README's reference"
            assert config.env_name(full) in readme


def test_amqp_hosts_list_env_and_single_host() -> None:
    """``amqp.hosts`` (a cluster) from YAML or the environment; ``amqp.host`` still works."""
    cfg = config.from_mapping({"amqp": {"hosts": ["a", "b:5673", "[::1]:5674"]}}, env={})
    assert cfg.amqp.addresses() == [("a", 5671), ("b", 5673), ("::1", 5674)]
    env = {"CVMFS_PUBLISHER_AMQP__HOSTS": "x:1, y",
           "CVMFS_PUBLISHER_AMQP__MANAGEMENT_URLS": "https://x:15671/,https://y:15671"}
    cfg = config.from_mapping({}, env=env)
    assert cfg.amqp.addresses() == [("x", 1), ("y", 5671)]
    assert cfg.amqp.management_endpoints() == ["https://x:15671", "https://y:15671"]
    cfg = config.from_mapping({"amqp": {"host": "single", "port": 5672}}, env={})
    assert cfg.amqp.addresses() == [("single", 5672)]
    with pytest.raises(config.ConfigError, match=r"amqp\.hosts: 'b:x'"):
        config.from_mapping({"amqp": {"hosts": ["a", "b:x"]}}, env={})
