"""The broker as production runs it: three RabbitMQ nodes, one cluster, TLS only.

These modules alone run on the cluster (started once per session, about
40 s on 2 cores); the rest of the suite keeps its single plain node. Here
the ``broker`` fixture is the cluster: the stack (``devstack.stack``)
configures the daemons with every node (``amqp.hosts``), TLS with
certificate verification against the throw-away CA, and RGW's topics push
over ``amqps://localhost`` with ``verify-ssl`` and the CA
(``rgw.ca_location``).

RGW pushes to the *last* node, which the failover tests never stop:
radosgw 16.2.15 was seen to segfault when it reconnects an amqps endpoint
that has a ``ca-location`` (reported as Ceph tracker 57850; not re-measured
here); a crash in a test that did stop it
would be an XFAIL "radosgw crashed" (tests/conftest.py), not a result.

They have a Ceph of their own, and it and the cluster stop when these
modules are done: in a clean-clone run, after radosgw crashed here with
amqps topics (credentials, CA) in its persistent queues, the restarted
radosgw stopped answering (HeadBucket timeouts) and every later module that
uses RGW failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import ceph as ceph_mod
from devstack import tls
from devstack.rabbitmq import Broker, RabbitCluster, RabbitNode
from tests.consumers.conftest import env, vhost  # noqa: F401 - the consumers tests' fixtures


@pytest.fixture(scope="session")
def ceph(session_dir: Path) -> Iterator[ceph_mod.Ceph]:
    """A one-node Ceph for these modules only (overrides the suite's)."""
    cluster = ceph_mod.Ceph(session_dir / "ceph-cluster-tests").start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="package", autouse=True)
def _stopped_after_these_modules(cluster: RabbitCluster, ceph: ceph_mod.Ceph) -> Iterator[None]:
    """Free the three nodes and this Ceph for the rest of the suite (stop is idempotent)."""
    yield
    cluster.stop()
    ceph.stop()


@pytest.fixture(scope="session")
def ca(session_dir: Path) -> tuple[Path, Path]:
    return tls.make_ca(session_dir / "tls" / "ca")


@pytest.fixture(scope="session")
def cluster(session_dir: Path, ca: tuple[Path, Path]) -> Iterator[RabbitCluster]:
    # the name RGW and the daemons check: localhost only (127.0.0.1 is a wrong name)
    cert = tls.make_server_cert(session_dir / "tls" / "server", ca, ("DNS:localhost",))
    c = RabbitCluster(session_dir / "cluster", cert).start()
    print(f"\nthree-node TLS cluster started in {c.start_seconds:.1f}s")
    yield c
    c.stop()


@pytest.fixture(scope="session")
def broker(cluster: RabbitCluster) -> Broker:
    """The cluster, every node listed; RGW's push URL on the last node."""
    last = cluster.nodes[-1]
    return dataclasses.replace(cluster.broker(), port=last.amqp_port, node=last)


def node_of(cluster: RabbitCluster, address: str) -> RabbitNode:
    """The node behind ``localhost:<port>`` (a daemon's ``broker_node``)."""
    port = int(address.rpartition(":")[2])
    return next(n for n in cluster.nodes if n.amqp_port == port)


def hosts_from(cluster: RabbitCluster, first: int) -> list[str]:
    """Every node's address, starting with node ``first`` (the one a daemon uses first)."""
    nodes = cluster.nodes[first:] + cluster.nodes[:first]
    return [f"localhost:{n.amqp_port}" for n in nodes]
