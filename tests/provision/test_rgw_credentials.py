"""Push-endpoint credentials on the real RGW reached over plain HTTP (issue 12).

RGW (``rgw trust forwarded https = true`` in the devstack) accepts a topic
holding credentials only with ``X-Forwarded-Proto: https``, and then refuses
ListTopics/GetTopicAttributes/DeleteTopic without the header too: the header
must go on every SNS call, and a refusal must say what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_publisher.adapters.rgw import RGW
from cvmfs_publisher.core.errors import Permanent
from tests.conftest import Stack, unique_label


def _rgw(stack: Stack, tmp_path: Path, forwarded_https: bool) -> RGW:
    pw = tmp_path / "push-password"
    pw.write_text(unique_label("pushpw-"))
    cfg = stack.config(rgw={"push_user": "notification", "push_password_file": str(pw),
                            "forwarded_https": forwarded_https})
    return RGW(cfg.s3, cfg.rgw)


def test_forwarded_https_goes_on_every_sns_call(stack: Stack, tmp_path: Path) -> None:
    rgw = _rgw(stack, tmp_path, forwarded_https=True)
    name = unique_label("cred-")
    arn = rgw.create_topic(name, "notification")
    try:
        assert rgw.find_topic(name) == arn  # ListTopics
        attrs = rgw.get_topic_attributes(arn)  # GetTopicAttributes
        assert "notification:" in attrs.get("EndPoint", "") + attrs.get("push-endpoint", "")
        plain = _rgw(stack, tmp_path, forwarded_https=False)
        with pytest.raises(Permanent, match="ListTopics"):
            plain.find_topic(name)  # what deprovisioning hit before the fix
    finally:
        assert rgw.delete_topic(name) is True  # DeleteTopic (after a ListTopics)
    assert rgw.find_topic(name) is None


def test_credentials_over_plain_http_say_what_to_do(stack: Stack, tmp_path: Path) -> None:
    rgw = _rgw(stack, tmp_path, forwarded_https=False)
    name = unique_label("cred-")
    with pytest.raises(Permanent) as refused:
        rgw.create_topic(name, "notification", "repo.infn.it")
    message = str(refused.value)
    assert "HTTP 400" in message
    assert "https s3.endpoint_url" in message and "rgw.forwarded_https" in message
    assert refused.value.repository == "repo.infn.it"
    assert rgw.find_topic(name) is None
