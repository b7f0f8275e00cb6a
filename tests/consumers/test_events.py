"""events.py: S3 event records, with real bodies captured from Ceph RGW 16.2.15."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cvmfs_publisher.core.errors import Permanent
from cvmfs_publisher.pipeline.events import BadEvent, ObjectEvent, parse_message
from cvmfs_publisher.pipeline.object_keys import map_key

DATA = Path(__file__).resolve().parent.parent / "data" / "events"
REAL = sorted(DATA.glob("ceph-*.json"))


def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_bytes())


def _body(doc: object) -> bytes:
    return json.dumps(doc).encode()


PUT = "ceph-16.2.15-ObjectCreated-Put.json"


# --- real bodies -------------------------------------------------------------


def test_real_samples_are_present() -> None:
    assert {p.name for p in REAL} == {
        "ceph-16.2.15-ObjectCreated-CompleteMultipartUpload.json",
        "ceph-16.2.15-ObjectCreated-Copy.json",
        "ceph-16.2.15-ObjectCreated-Put.json",
        "ceph-16.2.15-ObjectRemoved-Delete.json",
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (PUT, ObjectEvent(name="ObjectCreated:Put", bucket="nbkt", key="cvmfs/a.txt")),
        ("ceph-16.2.15-ObjectCreated-Copy.json", ObjectEvent(
            name="ObjectCreated:Copy", bucket="nbkt", key="cvmfs/c.txt")),
        ("ceph-16.2.15-ObjectCreated-CompleteMultipartUpload.json", ObjectEvent(
            name="ObjectCreated:CompleteMultipartUpload", bucket="nbkt", key="cvmfs/big.bin")),
        ("ceph-16.2.15-ObjectRemoved-Delete.json", ObjectEvent(
            name="ObjectRemoved:Delete", bucket="nbkt", key="cvmfs/a.txt")),
    ],
)
def test_real_bodies(name: str, expected: ObjectEvent) -> None:
    assert parse_message((DATA / name).read_bytes()) == [expected]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_bodies_with_s3_prefix_and_string_size(path: Path) -> None:
    # Older Ceph (and AWS) prefix "s3:"; some versions send size as a string.
    doc = json.loads(path.read_bytes())
    plain = parse_message(path.read_bytes())[0]
    record = doc["Records"][0]
    record["eventName"] = "s3:" + record["eventName"]
    record["s3"]["object"]["size"] = str(record["s3"]["object"]["size"])
    assert parse_message(_body(doc)) == [plain]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_keys_map_to_repository_files(path: Path) -> None:
    (event,) = parse_message(path.read_bytes())
    target = map_key(event.key)
    assert target is not None
    assert target.kind == "file"
    assert target.path == event.key.removeprefix("cvmfs/")


# --- variants ----------------------------------------------------------------


def test_several_records() -> None:
    put = _load(PUT)["Records"][0]
    delete = _load("ceph-16.2.15-ObjectRemoved-Delete.json")["Records"][0]
    second = copy.deepcopy(put)
    second["s3"]["object"]["key"] = "cvmfs/b.txt"
    events = parse_message(_body({"Records": [put, delete, second]}))
    assert [(e.name, e.key) for e in events] == [
        ("ObjectCreated:Put", "cvmfs/a.txt"),
        ("ObjectRemoved:Delete", "cvmfs/a.txt"),
        ("ObjectCreated:Put", "cvmfs/b.txt"),
    ]


@pytest.mark.parametrize(
    ("event_name", "created", "removed"),
    [
        ("ObjectCreated:Post", True, False),  # multipart initiation: accepted
        ("s3:ObjectCreated:Post", True, False),
        ("ObjectCreated:Copy", True, False),
        ("ObjectCreated:CompleteMultipartUpload", True, False),
        ("s3:ObjectRemoved:DeleteMarkerCreated", False, True),
        ("ObjectRemoved:Delete", False, True),
    ],
)
def test_event_names(event_name: str, created: bool, removed: bool) -> None:
    doc = _load(PUT)
    doc["Records"][0]["eventName"] = event_name
    (event,) = parse_message(_body(doc))
    assert event.name == event_name.removeprefix("s3:")
    assert (event.name.startswith("ObjectCreated:"),
            event.name.startswith("ObjectRemoved:")) == (created, removed)


def test_aws_record_keeps_the_key_encoded() -> None:
    # AWS URL-encodes keys; decoding is object_keys.map_key's job when configured.
    body = _body({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "eu-west-1",
        "eventTime": "2024-01-01T00:00:00.000Z", "eventName": "s3:ObjectRemoved:Delete",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": "alice"},
               "object": {"key": "cvmfs/a+b%2Bc.txt", "sequencer": "0055AED6DCD90281E5"}},
    }]})
    (event,) = parse_message(body)
    assert event.key == "cvmfs/a+b%2Bc.txt"
    assert event.name == "ObjectRemoved:Delete"


def test_raw_keys_pass_through_unchanged() -> None:
    # Hostile keys are not this module's business: map_key rejects them.
    for key in ("cvmfs/../etc/passwd", "cvmfs/a\x00b", "cvmfs/caf\u00e9 +x", "\ud800"):
        doc = _load(PUT)
        doc["Records"][0]["s3"]["object"]["key"] = key
        assert parse_message(_body(doc))[0].key == key


@pytest.mark.parametrize("size", [0, "0", " 42 ", 5243904, None])
def test_sizes(size: object) -> None:
    """Every size RGW or AWS sends is accepted (the value itself is never used)."""
    doc = _load(PUT)
    doc["Records"][0]["s3"]["object"]["size"] = size
    assert parse_message(_body(doc))[0].key == doc["Records"][0]["s3"]["object"]["key"]


def test_size_absent() -> None:
    doc = _load(PUT)
    del doc["Records"][0]["s3"]["object"]["size"]
    assert parse_message(_body(doc))[0].key == doc["Records"][0]["s3"]["object"]["key"]


def test_bytearray_and_memoryview_bodies() -> None:
    raw = (DATA / PUT).read_bytes()
    assert parse_message(bytearray(raw)) == parse_message(memoryview(raw)) == parse_message(raw)


# --- malformed messages --------------------------------------------------------


def _bad(body: bytes, reason: str, **kwargs: Any) -> BadEvent:
    with pytest.raises(BadEvent, match=reason) as info:
        parse_message(body, **kwargs)
    assert isinstance(info.value, Permanent)
    message = str(info.value)
    assert len(message) < 300
    assert "\n" not in message
    return info.value


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"   ", "not JSON"),
        (b"not json", "not JSON"),
        (b"{\"Records\": [", "not JSON"),
        (b"alice,sub,alice-personalrepo.infn.it,P", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"Records": "\xff"}', "not UTF-8"),
        (b"[]", "not a JSON object but list"),
        (b"null", "not a JSON object but NoneType"),
        (b"42", "not a JSON object but int"),
        (b'"Records"', "not a JSON object but str"),
        (b"{}", "no 'Records' list"),
        (b'{"records": []}', "no 'Records' list"),
        (b'{"Records": {}}', "no 'Records' list"),
        (b'{"Records": null}', "no 'Records' list"),
        (b'{"Records": []}', "empty 'Records' list"),
        (b'{"Records": [1]}', "record 0: not a JSON object"),
        (b'{"Records": [[]]}', "record 0: not a JSON object"),
        (b'{"Records": [{}]}', "record 0: 'eventName' missing"),
        (b'{"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "alice"}',
         "no 'Records' list \\(it is an 's3:TestEvent' message\\)"),
        # publisher-queue JSON on the wrong queue
        (b'{"action": "create", "user": "alice", "repository": "a.infn.it"}',
         "no 'Records' list"),
        (b"[" * 200_000 + b"]" * 200_000, "not JSON|nested too deeply|not a JSON object"),
    ],
)
def test_garbage(body: bytes, reason: str) -> None:
    _bad(body, reason)


def _with(path: list[str], value: object) -> bytes:
    """The real Put body with one field replaced (value ... deletes it)."""
    doc = _load(PUT)
    node: Any = doc["Records"][0]
    for name in path[:-1]:
        node = node[name]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return _body(doc)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (["s3"], ..., "record 0: no 's3' object"),
        (["s3"], "x", "record 0: no 's3' object"),
        (["s3", "bucket"], ..., r"record 0.s3: no 'bucket' object"),
        (["s3", "object"], ..., r"record 0.s3: no 'object' object"),
        (["s3", "object"], [], r"record 0.s3: no 'object' object"),
        (["s3", "bucket", "name"], ..., r"record 0.s3.bucket: 'name' missing"),
        (["s3", "bucket", "name"], "", r"'name' not a non-empty string"),
        (["s3", "bucket", "name"], 7, r"'name' not a non-empty string: 7"),
        (["s3", "object", "key"], ..., r"record 0.s3.object: 'key' missing"),
        (["s3", "object", "key"], None, r"'key' missing"),
        (["s3", "object", "key"], "", r"'key' not a non-empty string"),
        (["s3", "object", "key"], ["cvmfs/a"], r"'key' not a non-empty string"),
        (["s3", "object", "size"], "abc", "'size' is not a non-negative integer"),
        (["s3", "object", "size"], "-1", "'size' is not a non-negative integer"),
        (["s3", "object", "size"], -1, "'size' is not a non-negative integer"),
        (["s3", "object", "size"], 1.5, "'size' is not a non-negative integer"),
        (["s3", "object", "size"], 3.0, "'size' is not a non-negative integer"),
        (["s3", "object", "size"], True, "'size' is not a non-negative integer"),
        (["s3", "object", "size"], "1e3", "'size' is not a non-negative integer"),
        (["s3", "object", "size"], "", "'size' is not a non-negative integer"),
        (["s3", "object", "size"], {"n": 1}, "'size' is not a non-negative integer"),
        (["s3", "object", "eTag"], 5, "'eTag' not a non-empty string"),
        (["s3", "object", "sequencer"], [], "'sequencer' not a non-empty string"),
        (["eventTime"], 0, "'eventTime' not a non-empty string"),
        (["eventName"], ..., "'eventName' missing"),
        (["eventName"], 1, "'eventName' missing or not a string"),
        (["eventName"], "ObjectLifecycle:Expiration:Current", "unknown eventName"),
        (["eventName"], "ObjectSynced:Create", "unknown eventName"),
        (["eventName"], "s3:ObjectRestore:Completed", "unknown eventName"),
        (["eventName"], "s3:TestEvent", "unknown eventName"),
        (["eventName"], "ObjectCreated", "unknown eventName"),
        (["eventName"], "ObjectCreated:", "unknown eventName"),
        (["eventName"], "ObjectCreated:*", "unknown eventName"),
        (["eventName"], "objectcreated:put", "unknown eventName"),
        (["eventName"], "s3:s3:ObjectCreated:Put", "unknown eventName"),
        (["eventName"], "ObjectCreated:Put\n", "unknown eventName"),
        (["eventName"], "ObjectCreated:" + "A" * 100_000, "unknown eventName"),
        (["eventName"], "", "unknown eventName"),
    ],
)
def test_bad_records(path: list[str], value: object, reason: str) -> None:
    _bad(_with(path, value), reason)


def test_nan_size_is_refused() -> None:
    body = (DATA / PUT).read_bytes().replace(b'"size": 3', b'"size": NaN')
    assert b"NaN" in body
    _bad(body, "'size' is not a non-negative integer")


def test_one_bad_record_rejects_the_message() -> None:
    good = _load(PUT)["Records"][0]
    bad = copy.deepcopy(good)
    del bad["s3"]["object"]["key"]
    _bad(_body({"Records": [good, bad]}), r"record 1\.s3\.object: 'key' missing")


def test_size_limit() -> None:
    raw = (DATA / PUT).read_bytes()
    assert parse_message(raw, max_bytes=len(raw)) != []
    _bad(raw, f"message of {len(raw)} bytes exceeds the limit of {len(raw) - 1}",
         max_bytes=len(raw) - 1)
    huge = b" " * ((1 << 20) + 1)
    _bad(huge, "exceeds the limit of 1048576")


def test_body_type() -> None:
    with pytest.raises(BadEvent, match="not bytes"):
        parse_message('{"Records": []}')  # type: ignore[arg-type]
