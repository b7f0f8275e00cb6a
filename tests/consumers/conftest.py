"""Fixtures of the consumers tests: a private RabbitMQ vhost and a consumers stack."""

from __future__ import annotations

import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from cvmfs_publisher.adapters.rabbitmq_api import ManagementAPI
from cvmfs_publisher.adapters.rgw import RGW
from devstack.rabbitmq import Broker
from tests.conftest import Stack, WarmTopics, unique_label
from tests.consumers.support import Env


@pytest.fixture(scope="session")
def vhost(broker: Broker) -> Iterator[str]:
    """A RabbitMQ virtual host for this session's consumers tests (deleted at the end).

    The daemon consumes every queue bound to ``notification``: in our own vhost
    that is only what these tests provision, even on a shared broker.
    """
    name = unique_label("cvmfs-consumers-tests-")
    quoted = urllib.parse.quote(name, safe="")
    broker.api("PUT", f"/api/vhosts/{quoted}", {})
    broker.api("PUT", f"/api/permissions/{quoted}/{broker.user}",
               {"configure": ".*", "write": ".*", "read": ".*"})
    yield name
    # deleting a vhost full of quorum queues can take longer than a usual API call
    try:
        broker.api("DELETE", f"/api/vhosts/{quoted}", timeout=120)
    except OSError as exc:
        warnings.warn(f"could not delete test vhost {name}: {exc}", stacklevel=1)


def consumer_overrides(broker: Broker, vhost: str, **extra: dict[str, Any]
                       ) -> dict[str, dict[str, Any]]:
    """Stack overrides: our vhost for the daemon and for RGW's pushes."""
    base: dict[str, dict[str, Any]] = {
        "amqp": {"vhost": vhost},
        "rgw": {"push_endpoint": broker.push_url(vhost)},
        "consumers": {"downloads": 4, "refresh_interval": 60.0, "max_attempts": 4},
    }
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return base


@pytest.fixture
def env(stack: Stack, broker: Broker, vhost: str, openbao: Any,
        warm_topics: WarmTopics) -> Iterator[Env]:
    overrides = consumer_overrides(broker, vhost)
    stack.raw = {k: dict(v) for k, v in stack.raw.items()}
    for section, values in overrides.items():
        stack.raw.setdefault(section, {}).update(values)
    cfg = stack.config()
    e = Env(stack, cfg, openbao, RGW(cfg.s3, cfg.rgw, max_pool_connections=64),
            ManagementAPI(cfg.amqp), warm_topics)
    yield e
    e.cleanup()
