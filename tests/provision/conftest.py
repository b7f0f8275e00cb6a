"""Provisioning fixtures: a repository scenario on the session's real services."""

from __future__ import annotations

import pytest

from tests.provision.helpers import Scenario


@pytest.fixture
def scenario(stack, broker, openbao, ceph, warm_topics):
    made: list[Scenario] = []

    def make(warm: bool = False, **kw) -> Scenario:
        """``warm=True``: a test that waits for its topic's events (tests.conftest.WarmTopics)."""
        s = Scenario(stack, broker, openbao, ceph, warm_topics=warm_topics if warm else None,
                     **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.assert_no_secrets()
        s.close()


