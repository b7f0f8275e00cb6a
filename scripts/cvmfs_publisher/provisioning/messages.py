"""Messages on the publisher queue (DESIGN §2).

The announcements publisher-consumer sends once a repository is created or
deleted are in :mod:`cvmfs_publisher.core.announcements`.

Two accepted forms of a provisioning request:

- CSV from the Stratum-0 repository agent:
  ``<AAI user>,<IAM subject>,<repository>,<P|G>`` (whitespace ignored);
- JSON: ``{"action": "create"|"delete", "user": ..., "subject": ...,
  "repository": ..., "type": "personal"|"group"}``.

Anything else raises :class:`BadMessage`, a permanent error: the message is
dead-lettered, never retried.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..core.names import InvalidName, validate_repository, validate_subject

_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._+-]{0,127}$")
_KINDS = {"P": "personal", "G": "group", "personal": "personal", "group": "group"}


class BadMessage(ValueError):
    """A message that can never be processed (malformed or invalid)."""


@dataclass(frozen=True)
class ProvisionRequest:
    """A validated request to create or delete one repository."""

    action: str
    user: str
    subject: str
    repository: str
    kind: str


def _text(body: bytes, max_bytes: int) -> str:
    if len(body) > max_bytes:
        raise BadMessage(f"message of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadMessage("message is not UTF-8 text") from None
    if not text:
        raise BadMessage("message is empty")
    if any(ord(c) < 32 and c not in "\t\r\n" for c in text) or "\x7f" in text:
        raise BadMessage("message contains control characters")
    return text


def parse_request(body: bytes, domain: str, max_bytes: int = 65536) -> ProvisionRequest:
    """Parse and validate a publisher-queue message."""
    text = _text(body, max_bytes)
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadMessage(f"invalid JSON: {exc.msg} at position {exc.pos}") from None
        if not isinstance(doc, dict):
            raise BadMessage("JSON message is not an object")
        unknown = set(doc) - {"action", "user", "subject", "repository", "type"}
        if unknown:
            raise BadMessage(f"JSON message has unknown fields: {', '.join(sorted(unknown))}")
        action = doc.get("action", "create")
        fields: dict[str, Any] = {k: doc.get(k) for k in ("user", "subject", "repository", "type")}
        if action not in ("create", "delete"):
            raise BadMessage(f"unknown action {action!r} (expected create or delete)")
    else:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            raise BadMessage(
                f"CSV message has {len(parts)} fields, expected 4: user,subject,repository,P|G"
            )
        action = "create"
        fields = dict(zip(("user", "subject", "repository", "type"), parts, strict=True))
    for name in ("user", "subject", "repository", "type"):
        if not isinstance(fields[name], str) or not fields[name]:
            raise BadMessage(f"field {name!r} is missing or not a string")
    kind = _KINDS.get(fields["type"])
    if kind is None:
        raise BadMessage(f"unknown repository type {fields['type']!r} (expected P or G)")
    if not _USER.match(fields["user"]):
        raise BadMessage(f"user {fields['user']!r} is not a valid user name")
    try:
        repository = validate_repository(fields["repository"], domain)
        subject = validate_subject(fields["subject"])
    except InvalidName as exc:
        raise BadMessage(str(exc)) from None
    return ProvisionRequest(action, fields["user"], subject, repository, kind)
