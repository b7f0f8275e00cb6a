"""Provisioning fixtures: a repository scenario on the session's real services."""

from __future__ import annotations

import pytest

from tests.provision.helpers import Scenario


@pytest.fixture
def scenario(stack, broker, openbao, ceph):
    made: list[Scenario] = []

    def make(**kw) -> Scenario:
        s = Scenario(stack, broker, openbao, ceph, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.assert_no_secrets()
        s.close()


