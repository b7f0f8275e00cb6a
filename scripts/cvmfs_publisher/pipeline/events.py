"""S3 event records from Ceph RGW (and AWS) bucket notifications (DESIGN §2).

A message is ``{"Records": [{"eventName": ..., "eventTime": ...,
"s3": {"bucket": {"name": ...}, "object": {"key": ..., "size": ...,
"eTag": ..., "sequencer": ...}}}, ...]}``. Variants accepted, all seen in
Ceph's history or on AWS:

- ``eventName`` with or without the ``s3:`` prefix (older Ceph, AWS);
- ``size`` as a number or a numeric string, or absent (AWS deletes);
- several records in one message.

Only the ``ObjectCreated:*`` and ``ObjectRemoved:*`` families are accepted,
which is what provisioning subscribes to; anything else means the queue
receives something it was never meant to, and the message is rejected.
``ObjectCreated:Post`` (multipart initiation, the object does not exist
yet) is accepted: the consumer brings the key to what S3 holds now anyway,
so an early event is harmless.

The key is returned as sent: decoding (AWS URL-encodes keys, RGW does not)
is :func:`cvmfs_publisher.pipeline.object_keys.map_key`'s job, when configured, and so is
deciding whether the key is safe. Everything malformed raises
:class:`BadEvent`: the whole message is dead-lettered, nothing is written,
and reconciliation can recover whatever it described.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..core.errors import Permanent

FAMILIES = ("ObjectCreated", "ObjectRemoved")
_SUBTYPE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_SIZE = re.compile(r"[0-9]{1,20}")
_MAX_SHOWN = 80


class BadEvent(Permanent):
    """A notification message that can never be processed."""


@dataclass(frozen=True)
class ObjectEvent:
    """One record: "key K of bucket B changed" (created or removed).

    ``name`` is normalised without ``s3:`` (``"ObjectCreated:Put"``). Only
    the bucket and the key are used (S3 is asked for the current state), so
    only they are kept; the record's other fields (``size``, ``eTag``,
    ``sequencer``, ``eventTime``) are still checked, because a record whose
    shape is wrong means a producer we do not understand (DESIGN §4).
    """

    name: str
    bucket: str
    key: str


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _mapping(parent: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = parent.get(name)
    if not isinstance(value, dict):
        raise BadEvent(f"{where}: no {name!r} object")
    return value


def _string(parent: dict[str, Any], name: str, where: str, required: bool = False) -> str:
    value = parent.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        what = "missing" if value is None else f"not a non-empty string: {_shown(value)}"
        raise BadEvent(f"{where}: {name!r} {what}")
    return value


def _check_size(value: object, where: str) -> None:
    """A number or a numeric string, or absent (AWS deletes)."""
    if value is None:
        return
    # bool is an int subclass, and floats (1.5, NaN) are not object sizes.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    if isinstance(value, str) and _SIZE.fullmatch(value.strip()):
        return
    raise BadEvent(f"{where}: 'size' is not a non-negative integer: {_shown(value)}")


def _event_name(value: object, where: str) -> str:
    """Return the normalised name or raise BadEvent."""
    if not isinstance(value, str):
        raise BadEvent(f"{where}: 'eventName' missing or not a string")
    name = value.removeprefix("s3:")
    family, _, subtype = name.partition(":")
    if family not in FAMILIES or not _SUBTYPE.fullmatch(subtype):
        raise BadEvent(
            f"{where}: unknown eventName {_shown(value)} "
            "(expected ObjectCreated:* or ObjectRemoved:*)"
        )
    return name


def _record(record: object, index: int) -> ObjectEvent:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise BadEvent(f"{where}: not a JSON object")
    name = _event_name(record.get("eventName"), where)
    s3 = _mapping(record, "s3", where)
    bucket = _mapping(s3, "bucket", f"{where}.s3")
    obj = _mapping(s3, "object", f"{where}.s3")
    _check_size(obj.get("size"), f"{where}.s3.object")
    for field_name in ("eTag", "sequencer"):
        _string(obj, field_name, f"{where}.s3.object")
    _string(record, "eventTime", where)
    return ObjectEvent(
        name=name,
        bucket=_string(bucket, "name", f"{where}.s3.bucket", required=True),
        key=_string(obj, "key", f"{where}.s3.object", required=True),
    )


def parse_message(body: bytes, max_bytes: int = 1 << 20) -> list[ObjectEvent]:
    """Parse one notification message into its records, or raise BadEvent.

    All or nothing: one bad record rejects the message, so that a
    dead-lettered message can be replayed as a whole once understood.
    ``max_bytes`` bounds the memory a hostile or broken producer can cost.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise BadEvent(f"message body is not bytes: {type(body).__name__}")
    if len(body) > max_bytes:
        raise BadEvent(f"message of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise BadEvent("message is not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadEvent(f"message is not JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise BadEvent("message is not usable JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadEvent(f"message is not a JSON object but {type(doc).__name__}")
    records = doc.get("Records")
    if not isinstance(records, list):
        # AWS sends {"Event": "s3:TestEvent", ...} when a notification is configured.
        event = doc.get("Event")
        hint = f" (it is an {_shown(event)} message)" if isinstance(event, str) else ""
        raise BadEvent(f"message has no 'Records' list{hint}")
    if not records:
        raise BadEvent("message has an empty 'Records' list")
    return [_record(record, index) for index, record in enumerate(records)]
