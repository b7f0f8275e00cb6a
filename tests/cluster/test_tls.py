"""TLS on the cluster: verified by default, RGW over amqps, and no way around a bad certificate.

A certificate that does not verify (another CA, a name it was not issued
for) is an error naming each node and the reason, in the logs and in the
status document; the daemon keeps trying over TLS (the backoff) and never
connects in plain AMQP: the nodes have no plain listener, and a connection
of the daemon's name never appears on the broker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cvmfs_publisher.core import config
from cvmfs_publisher.daemons.repo_consumers import NAME
from devstack.rabbitmq import Broker, RabbitCluster
from tests.consumers.support import Env, running, wait_until


def test_tls_with_verification_is_the_default_and_rgw_pushes_over_amqps(env: Env,
                                                                         broker: Broker) -> None:
    defaults = config.AmqpConfig()
    assert defaults.tls and defaults.verify and defaults.port == 5671
    assert config.RgwConfig().verify_ssl
    a = env.cfg.amqp
    assert a.tls and a.verify and a.ca_file and len(a.addresses()) == 3
    r = env.provision()  # waits until RGW delivers this topic's events: over amqps
    attrs = json.dumps(env.rgw.get_topic_attributes(env.rgw.find_topic(r.label) or ""))
    assert f"amqps://{broker.user}:" in attrs and f"@localhost:{broker.port}/" in attrs
    assert "verify-ssl=true" in attrs, attrs
    assert "ca-location=" in attrs and Path(broker.ca_file).name in attrs, attrs


@pytest.mark.parametrize(("case", "why"), [
    ("another CA", "certificate not accepted: self-signed certificate in certificate chain"),
    ("wrong host name", "certificate not accepted: IP address mismatch"),
])
def test_a_certificate_that_does_not_verify_is_named_and_never_bypassed(
        env: Env, cluster: RabbitCluster, broker: Broker, tmp_path: Path, case: str,
        why: str) -> None:
    from devstack import tls

    overrides: dict[str, Any] = {}
    if case == "another CA":
        other, _ = tls.make_ca(tmp_path / "other-ca", "not the broker's CA")
        overrides = {"ca_file": str(other)}
    else:  # the certificate names localhost only
        overrides = {"hosts": [f"127.0.0.1:{n.amqp_port}" for n in cluster.nodes]}
    cfg = env.stack.config(amqp=overrides)
    # The broker lists a closed connection for a few seconds (its statistics interval):
    # an earlier test's daemon of the same name is no evidence against this one.
    since_ms = time.time() * 1000 - 1000
    with running(cfg) as daemon:
        consumer = daemon.source.consumer
        wait_until("two rounds of connection attempts",
                   lambda: consumer.backoff.failures >= 2, 30, 0.1)
        # the status document is written every status.interval: wait for the one
        # written after the failures
        wait_until("the error in the status document",
                   lambda: why in (env.status().get("broker_error") or ""), 30, 0.2)
        status: dict[str, Any] = env.status()
        connections = broker.api("GET", "/api/connections") or []
    assert consumer.connection is None
    for node in cluster.nodes:
        assert f":{node.amqp_port}: TLS {why}" in consumer.last_error, consumer.last_error
    assert status.get("broker_connected") is False
    assert why in status.get("broker_error", ""), status
    log = env.log_text()
    assert "no RabbitMQ node reachable over amqps" in log and why in log
    names = [(c.get("client_properties") or {}).get("connection_name") for c in connections
             if c.get("connected_at", since_ms) >= since_ms]
    assert NAME not in names, "the daemon got a connection despite the certificate"


def test_rotation_stays_on_its_node_and_starts_after_a_lost_one() -> None:
    from cvmfs_publisher.adapters import amqp

    cfg = config.from_mapping({"amqp": {"hosts": ["a", "b", "c:5673"]}}, env={}).amqp
    rot = amqp.NodeRotation(cfg)
    assert rot.order() == [("a", 5671), ("b", 5671), ("c", 5673)]
    rot.connected(("b", 5671))
    assert rot.order()[0] == ("b", 5671)  # a reconnect after a hiccup: the same node first
    rot.lost()
    assert rot.order() == [("c", 5673), ("a", 5671), ("b", 5671)]
