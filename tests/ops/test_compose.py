"""docker-compose.yml: the deployment contract of DESIGN §1, §4 and §5.

``docker-compose config`` (Debian's docker-compose 1.29, whose schema for a
file without ``version`` is the Compose specification's) validates the file,
and so does ``docker compose config`` (Compose v2) where that plugin is
installed; no engine is needed for either. The structural checks below run, on the file as
PyYAML reads it, because they encode decisions a schema cannot: which
container may be privileged, which one may see the keys, which mounts must
be shared between which containers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._support import (
    BY_SERVICE,
    COMPOSE_FILE,
    CVMFS_IMAGES,
    IMAGES,
    REPO,
    healthcheck_command,
    image_build_text,
    load_compose,
    parse_dockerfile,
)

MAIN_SERVICES = {i.service for i in IMAGES}
CVMFS_SERVICES = {i.service for i in CVMFS_IMAGES}
LAPTOP_SERVICES = {"rabbitmq", "openbao"}

KEYS_TARGET = "/etc/cvmfs/keys-shared"

#: Every mount target each container must have (DESIGN §1, §5): the CVMFS
#: state for the two CVMFS containers, staging for consumers and sync only.
CVMFS_STATE = {
    "/var/spool/cvmfs", "/cvmfs", "/srv/cvmfs", "/etc/cvmfs/repositories.d",
    "/etc/cvmfs/keys", KEYS_TARGET,
}
COMMON = {"/etc/cvmfs-publisher/publisher.yaml", "/var/log/publisher"}
EXPECTED_TARGETS = {
    "publisher-consumer": COMMON | CVMFS_STATE | {"/data/cvmfs"},
    "cvmfs-repo-consumers": COMMON | {"/data/cvmfs"},
    "sync-publisher": COMMON | CVMFS_STATE | {"/data/cvmfs"},
}

#: Secrets per container: least privilege (DESIGN §4).
EXPECTED_SECRETS = {
    "publisher-consumer": {
        "amqp_password", "vault_role_id", "vault_secret_id", "s3_access_key",
        "s3_secret_key", "rgw_push_password",
    },
    "cvmfs-repo-consumers": {"amqp_password", "s3_access_key", "s3_secret_key"},
    "sync-publisher": set(),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mounts by target; short syntax is refused (long syntax says read_only/propagation)."""
    out = {}
    for entry in service.get("volumes", []):
        assert isinstance(entry, dict), f"use the long volume syntax: {entry!r}"
        assert entry["target"] not in out, f"{entry['target']} mounted twice"
        out[entry["target"]] = entry
    return out


def secret_names(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def seconds(duration: str) -> float:
    """A compose duration such as ``2m`` or ``1m30s`` in seconds."""
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration)):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --------------------------------------------------------------------------- docker compose


def _compose_clis() -> list[list[str]]:
    """The compose command lines on this machine: docker-compose 1.29, and Compose v2."""
    clis = []
    if shutil.which("docker-compose"):
        clis.append(["docker-compose"])
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=60, check=False).returncode == 0:
        clis.append([docker, "compose"])
    return clis


def test_docker_compose_config_accepts_the_file() -> None:
    """Valid Compose, with and without the laptop profile, for every compose on the machine.

    docker-compose 1.29 is a Debian package of the suite (.ci/apt-packages.containers):
    its absence is a failure, not a skip.
    """
    clis = _compose_clis()
    assert clis and clis[0] == ["docker-compose"], "install docker-compose (Debian package)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    for cli in clis:
        command = [*cli, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
        for extra in ([], ["--profile", "laptop"]):
            res = subprocess.run([*command, *extra, "config", "--quiet"], capture_output=True,
                                 text=True, timeout=120, env=env, check=False)
            assert res.returncode == 0, (cli, res.stderr)
        res = subprocess.run([*command, "config", "--services"], capture_output=True,
                             text=True, timeout=120, env=env, check=False)
        assert res.returncode == 0, res.stderr
        # docker-compose 1.29 lists profile services too; Compose v2 only the active ones.
        assert MAIN_SERVICES <= set(res.stdout.split()) <= MAIN_SERVICES | LAPTOP_SERVICES
        res = subprocess.run([*command, "--profile", "laptop", "config", "--services"],
                             capture_output=True, text=True, timeout=120, env=env, check=False)
        assert res.returncode == 0, res.stderr
        assert set(res.stdout.split()) == MAIN_SERVICES | LAPTOP_SERVICES


def test_host_network_only(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """Every service on the host network; the default network is the host's (none created)."""
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert not service.get("ports"), f"{name}: nothing to publish on the host network"
        assert not service.get("networks"), name
    assert compose["networks"] == {"default": {"name": "host", "external": True}}
    assert "name" not in compose, "docker-compose 1.29 refuses a top-level name"


# --------------------------------------------------------------------------- services


def test_services_and_images(services: dict[str, dict[str, Any]]) -> None:
    """The three daemons under their image names, plus the laptop helpers only."""
    assert set(services) == MAIN_SERVICES | LAPTOP_SERVICES
    for name in MAIN_SERVICES:
        image = services[name]["image"]
        repository, _, tag = image.partition(":")
        assert repository == name, image
        assert tag and tag != "latest", f"{name}: give the image an explicit tag, not {tag!r}"


def test_build_files(services: dict[str, dict[str, Any]]) -> None:
    """Each image builds from its own directory with the repository root as context."""
    for name in MAIN_SERVICES:
        build = services[name]["build"]
        assert build["context"] == ".", name
        assert build["dockerfile"] == f"{BY_SERVICE[name].directory}/Dockerfile"
        assert (REPO / build["dockerfile"]).is_file()
    for name in LAPTOP_SERVICES:
        assert "build" not in services[name]


def test_privileged_and_fuse_only_on_cvmfs(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        devices = [str(d) if isinstance(d, str) else d.get("source", "")
                   for d in service.get("devices", [])]
        if name in CVMFS_SERVICES:
            assert service.get("privileged") is True, name
            assert any(d.split(":")[0] == "/dev/fuse" for d in devices), name
        else:
            assert not service.get("privileged"), f"{name} must not be privileged"
            assert not devices, f"{name} must not get devices"
            assert not service.get("cap_add") or name == "openbao", name


def test_consumers_run_unprivileged(services: dict[str, dict[str, Any]]) -> None:
    """No CVMFS, no keys, no root in cvmfs-repo-consumers (DESIGN §4)."""
    consumers = services["cvmfs-repo-consumers"]
    user = str(consumers["user"])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user
    assert consumers.get("read_only") is True
    assert consumers.get("cap_drop") == ["ALL"]
    assert "no-new-privileges=true" in consumers.get("security_opt", [])
    targets = set(mounts(consumers))
    cvmfs_dirs = ("/cvmfs", "/etc/cvmfs", "/var/spool/cvmfs", "/srv/cvmfs")
    assert not any(t == d or t.startswith(d + "/") for t in targets for d in cvmfs_dirs), targets
    # With a read-only root, what it writes outside its volumes must be tmpfs.
    tmpfs = [t.split(":", 1)[0] for t in consumers.get("tmpfs", [])]
    assert {"/tmp", "/var/lib/cvmfs-publisher"} <= set(tmpfs)


def test_mount_targets(services: dict[str, dict[str, Any]]) -> None:
    for name, expected in EXPECTED_TARGETS.items():
        assert set(mounts(services[name])) == expected, name


def test_keys_volume_is_shared_by_the_cvmfs_containers_only(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """One named volume, root-only in the images, never on the data disk."""
    sources = set()
    for name, service in services.items():
        by_target = mounts(service)
        if name in CVMFS_SERVICES:
            entry = by_target[KEYS_TARGET]
            assert entry["type"] == "volume", "the keys live on a named volume, not a host path"
            sources.add(entry["source"])
        else:
            keys_volume = {m["source"] for m in by_target.values() if m["target"] == KEYS_TARGET}
            assert not keys_volume, f"{name} must not see the keys"
    assert len(sources) == 1
    (keys,) = sources
    assert keys in compose["volumes"]
    for name, service in services.items():
        for entry in mounts(service).values():
            if entry["source"] == keys:
                assert entry["target"] == KEYS_TARGET and name in CVMFS_SERVICES, (name, entry)
    # Nor any other CVMFS state (the keys mkfs installs in /etc/cvmfs/keys...).
    cvmfs_sources = {m["source"] for name in CVMFS_SERVICES
                     for m in mounts(services[name]).values() if m["target"] in CVMFS_STATE}
    for name, service in services.items():
        if name not in CVMFS_SERVICES:
            leaked = {m["source"] for m in mounts(service).values()} & cvmfs_sources
            assert not leaked, f"{name} mounts CVMFS state: {leaked}"
    # The images create the mount point 0700 root:root; a new volume copies that.
    for image in CVMFS_IMAGES:
        text = image_build_text(image)
        assert re.search(r"install -d -m 0700 -o root -g root /etc/cvmfs/keys-shared", text)


def test_spool_and_repository_mounts(services: dict[str, dict[str, Any]]) -> None:
    """Spool on a host path (ext4, not OverlayFS); mounts propagate between containers."""
    per_target: dict[str, set[tuple[str, str]]] = {}
    for name in CVMFS_SERVICES:
        by_target = mounts(services[name])
        spool = by_target["/var/spool/cvmfs"]
        assert spool["type"] == "bind"
        assert spool["source"].startswith("/"), "the spool must be an absolute host path"
        assert spool["bind"]["propagation"] == "rshared"
        assert by_target["/cvmfs"]["type"] == "bind"
        assert by_target["/cvmfs"]["bind"]["propagation"] == "rshared"
        for target in CVMFS_STATE:
            entry = by_target[target]
            assert not entry.get("read_only"), f"{name}: {target} must be writable"
            per_target.setdefault(target, set()).add((entry["type"], entry["source"]))
    for target, sources in per_target.items():
        assert len(sources) == 1, f"{target} differs between the CVMFS containers: {sources}"


def test_staging_is_one_volume(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """Consumers write it, sync applies it, deprovisioning removes a repository's part."""
    staging = [mounts(services[name])["/data/cvmfs"] for name in sorted(MAIN_SERVICES)]
    assert all(entry == staging[0] for entry in staging)
    assert staging[0]["type"] == "volume" and staging[0]["source"] in compose["volumes"]
    assert not staging[0].get("read_only")
    # Whichever image mounts the new volume first gives it its owner: the consumers' user.
    for image in IMAGES:
        text = image_build_text(image)
        assert re.search(r"install -d -m 0755 -o 10001 -g 10001 [^\n]*/data/cvmfs", text), image


def test_named_volumes_are_declared(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    used = {m["source"] for s in services.values() for m in mounts(s).values()
            if m["type"] == "volume"}
    assert used == set(compose["volumes"])


def test_logs_on_a_host_path(services: dict[str, dict[str, Any]]) -> None:
    for name in MAIN_SERVICES:
        logs = mounts(services[name])["/var/log/publisher"]
        assert logs["type"] == "bind" and logs["source"] == "/var/log/publisher", name
        assert not logs.get("read_only")


def test_configuration_is_read_only(services: dict[str, dict[str, Any]]) -> None:
    for name in MAIN_SERVICES:
        config = mounts(services[name])["/etc/cvmfs-publisher/publisher.yaml"]
        assert config["type"] == "bind" and config["read_only"] is True, name
        assert config["source"] == "./config/publisher.yaml"
        env = services[name]["environment"]
        assert env["CVMFS_PUBLISHER_CONFIG"] == "/etc/cvmfs-publisher/publisher.yaml"


def test_secrets_come_from_files_least_privilege(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """Compose file secrets (read-only in /run/secrets), each only where needed."""
    defined = compose["secrets"]
    for name, spec in defined.items():
        assert set(spec) == {"file"}, name
        assert spec["file"] == f"./secrets/{name}"
    used: set[str] = set()
    for name, expected in EXPECTED_SECRETS.items():
        assert secret_names(services[name]) == expected, name
        used |= expected
        # No secret reaches a container through a (writable) bind mount.
        sources = [str(m.get("source", "")) for m in mounts(services[name]).values()]
        assert not any("secret" in source for source in sources), sources
    assert used == set(defined)
    for name in LAPTOP_SERVICES:
        assert not services[name].get("secrets")


def test_secrets_match_the_example_configuration(compose: dict[str, Any]) -> None:
    """Every ``*_file: /run/secrets/<name>`` of the example YAML is a compose secret."""
    example = REPO / "config" / "publisher.example.yaml"
    if not example.is_file():
        pytest.skip("config/publisher.example.yaml is not there yet")
    referenced = set(re.findall(r"_file:\s*/run/secrets/([A-Za-z0-9_.-]+)",
                                example.read_text(encoding="utf-8")))
    assert referenced, "the example configuration names no /run/secrets file"
    assert referenced <= set(compose["secrets"])


@pytest.mark.parametrize("service", [
    "publisher-consumer",
    "cvmfs-repo-consumers",
    "sync-publisher",
])
def test_each_container_starts_with_only_its_own_secrets(
        service: str, compose: dict[str, Any], tmp_path: Path) -> None:
    """The one shared YAML must load where only that container's secrets are mounted."""
    from cvmfs_publisher.core import config

    example = REPO / "config" / "publisher.example.yaml"
    if not example.is_file():
        pytest.skip("config/publisher.example.yaml is not there yet")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in secret_names(compose["services"][service]):
        (secrets / name).write_text("not-a-real-secret\n")
    yaml_file = tmp_path / "publisher.yaml"
    yaml_file.write_text(example.read_text(encoding="utf-8").replace("/run/secrets/",
                                                                      f"{secrets}/"))
    cfg = config.load(yaml_file, env={})
    config.require(cfg, BY_SERVICE[service].daemon)


def test_healthchecks_match_the_images(services: dict[str, dict[str, Any]]) -> None:
    """Compose repeats each image's HEALTHCHECK (same command) and tunes nothing away."""
    for name in MAIN_SERVICES:
        image = BY_SERVICE[name]
        check = services[name]["healthcheck"]
        test = check["test"]
        assert test[0] == "CMD", name
        command = test[1:]
        assert command[1:3] == ["-m", "cvmfs_publisher.operations.health"], command
        assert command[command.index("--daemon") + 1] == image.daemon
        stages = parse_dockerfile(image.dockerfile)
        healthcheck = stages[-1].last("HEALTHCHECK")
        assert healthcheck is not None
        assert healthcheck_command(healthcheck) == command, name
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, (name, key)
        assert seconds(check["timeout"]) < seconds(check["interval"])
    for name in LAPTOP_SERVICES:
        assert services[name]["healthcheck"]["test"][0] == "CMD"


def test_restart_and_stop(services: dict[str, dict[str, Any]]) -> None:
    """Restart unless stopped; time for the daemon to finish its step on SIGTERM."""
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
    for name in MAIN_SERVICES:
        assert seconds(services[name]["stop_grace_period"]) >= 30, name
    assert seconds(services["sync-publisher"]["stop_grace_period"]) >= 60
    for name in MAIN_SERVICES:
        assert not services[name].get("init"), "tini in the image is the init"


def test_zabbix_agent_settings(services: dict[str, dict[str, Any]]) -> None:
    """Each agent gets its server, a host name defaulting to its daemon's name, its own port."""
    ports = set()
    for name in MAIN_SERVICES:
        env = services[name]["environment"]
        assert {"ZBX_SERVER", "ZBX_SERVER_ACTIVE", "ZBX_HOSTNAME", "ZBX_LISTEN_PORT"} <= set(env)
        assert env["ZBX_HOSTNAME"] == BY_SERVICE[name].daemon
        port = int(env["ZBX_LISTEN_PORT"])
        assert 1024 <= port <= 32767, "zabbix_agentd's range"
        ports.add(port)
    assert len(ports) == len(MAIN_SERVICES), "one host network, one port per agent"


def test_laptop_profile(services: dict[str, dict[str, Any]]) -> None:
    """RabbitMQ with management and OpenBao in dev mode, on loopback, laptop only."""
    for name in MAIN_SERVICES:
        assert not services[name].get("profiles"), f"{name} must always start"
    for name in LAPTOP_SERVICES:
        service = services[name]
        assert service["profiles"] == ["laptop"], name
        image = service["image"]
        tag = image.rpartition(":")[2]
        assert re.match(r"\d+\.\d+", tag), f"{name}: pin the image version, not {image}"
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["image"].endswith("-management")
    # On the host network: every listener bound to loopback.
    env = rabbitmq["environment"]
    assert env["RABBITMQ_NODE_IP_ADDRESS"] == "127.0.0.1"
    assert env["ERL_EPMD_ADDRESS"] == "127.0.0.1"
    erl_args = env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
    assert "inet_dist_use_interface {127,0,0,1}" in erl_args
    assert '{ip,"127.0.0.1"},{port,15672}' in erl_args
    command = services["openbao"]["command"]
    assert command[:2] == ["server", "-dev"]
    assert "-dev-listen-address=127.0.0.1:8200" in command


def test_file_has_no_tabs_and_parses_without_interpolation() -> None:
    """PyYAML reads it as is (anchors included) and it is indented with spaces."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "\t" not in text
    assert isinstance(yaml.safe_load(text), dict)
    assert Path(REPO / ".dockerignore").is_file()
