"""The RGW adapter's own GET (``RGW.get_object``), the consumers' download path.

It must answer exactly as boto3's ``get_object`` for what the consumers read,
and fail as it does: checked side by side on the real RGW for a corpus of
awkward keys, metadata and sizes, missing objects and buckets, wrong
credentials and an endpoint that is down. The faults the real RGW cannot
produce on demand (503 SlowDown, a body cut short) come from a small local
HTTP server, said so where it is used.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from cvmfs_publisher.adapters.rgw import RGW, classify, object_missing
from cvmfs_publisher.core.config import Secret
from cvmfs_publisher.core.errors import Permanent, Transient
from cvmfs_publisher.pipeline import fetch
from cvmfs_publisher.pipeline.object_keys import map_key
from cvmfs_publisher.staging.area import Staging
from tests.conftest import Stack, unique_label

KEYS = [
    "cvmfs/plain.txt",
    "cvmfs/with space/and+plus=eq&amp?q#hash",
    "cvmfs/ünïcödé/日本語.bin",
    "cvmfs/percent%20not-decoded%2F.txt",
    "cvmfs/tilde~/semi;colon,comma'quote\"(paren)",
    "cvmfs/double//slash/./dot/../dotdot",
    "cvmfs/" + "long-" * 150 + "end",
]
BODIES = [b"", b"x", bytes(range(256)) * 4096]  # empty, one byte, 1 MiB
METADATA = [{}, {"mode": "33261"}, {"mode": "41471", "mtime": "1700000000",
                                    "s3cmd-attrs": "uid:0/gid:0/mode:33188"}]


@pytest.fixture
def rgw(stack: Stack) -> RGW:
    cfg = stack.config()
    return RGW(cfg.s3, cfg.rgw)


@pytest.fixture
def bucket(rgw: RGW) -> Iterator[str]:
    name = unique_label("get-")
    rgw.s3.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(Exception):
        for obj in rgw.s3.list_objects_v2(Bucket=name).get("Contents", []):
            rgw.s3.delete_object(Bucket=name, Key=obj["Key"])
        rgw.s3.delete_bucket(Bucket=name)


def _fields(answer: dict[str, Any]) -> dict[str, Any]:
    body = answer["Body"]
    try:
        data = body.read()
    finally:
        body.close()
    return {"Body": data, "ETag": answer["ETag"], "LastModified": answer["LastModified"],
            "ContentLength": answer["ContentLength"], "Metadata": answer["Metadata"]}


def test_answers_as_boto3_for_awkward_keys_metadata_and_sizes(rgw: RGW, bucket: str) -> None:
    for i, key in enumerate(KEYS):
        rgw.s3.put_object(Bucket=bucket, Key=key, Body=BODIES[i % len(BODIES)],
                          Metadata=METADATA[i % len(METADATA)])
    for key in KEYS:
        ours = _fields(rgw.get_object(bucket, key))
        theirs = _fields(rgw.s3.get_object(Bucket=bucket, Key=key))
        assert ours == theirs, key
    assert _fields(rgw.get_object(bucket, KEYS[1]))["Metadata"] == METADATA[1]


def test_missing_object_and_missing_bucket_fail_as_boto3(rgw: RGW, bucket: str) -> None:
    for b, key, code, missing in [(bucket, "cvmfs/absent", "NoSuchKey", True),
                                  (unique_label("nobucket-"), "cvmfs/a", "NoSuchBucket", False)]:
        with pytest.raises(botocore.exceptions.ClientError) as ours:
            rgw.get_object(b, key)
        with pytest.raises(botocore.exceptions.ClientError) as theirs:
            rgw.s3.get_object(Bucket=b, Key=key)
        for info in (ours, theirs):
            assert info.value.response["Error"]["Code"] == code
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
            assert object_missing(info.value) is missing
    assert isinstance(classify(ours.value, "GET"), Permanent)  # NoSuchBucket


def test_wrong_credentials_are_refused_permanently(stack: Stack, bucket: str,
                                                   rgw: RGW) -> None:
    rgw.s3.put_object(Bucket=bucket, Key="cvmfs/a", Body=b"a")
    cfg = stack.config()
    cfg.s3.secret_key = Secret("not-the-secret")
    wrong = RGW(cfg.s3, cfg.rgw)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        wrong.get_object(bucket, "cvmfs/a")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    out = classify(info.value, "GET 'cvmfs/a'", "repo.infn.it")
    assert isinstance(out, Permanent) and "HTTP 403 SignatureDoesNotMatch" in str(out)
    assert "not-the-secret" not in str(out)


def test_an_endpoint_that_is_down_is_transient_after_the_retries(stack: Stack) -> None:
    cfg = stack.config(s3={"endpoint_url": "http://127.0.0.1:1", "max_attempts": 2})
    down = RGW(cfg.s3, cfg.rgw)
    with pytest.raises(botocore.exceptions.EndpointConnectionError) as info:
        down.get_object("bucket", "cvmfs/a")
    assert isinstance(classify(info.value, "GET"), Transient)


def test_connections_are_reused(rgw: RGW, bucket: str) -> None:
    """A GET read to its end and closed, as fetch does, leaves its connection pooled."""
    rgw.s3.put_object(Bucket=bucket, Key="cvmfs/a", Body=b"a" * 1000)
    for _ in range(20):
        _fields(rgw.get_object(bucket, "cvmfs/a"))
    http = rgw.s3._endpoint.http_session
    pool = http._get_connection_manager(rgw._base, None).connection_from_url(rgw._base)
    assert pool.num_connections <= 2


class _Faulty(http.server.BaseHTTPRequestHandler):
    """A stand-in S3 endpoint for what the real RGW cannot be made to answer: the
    first ``slow`` GETs get 503 SlowDown, then a body shorter than its length."""

    slow = 0
    seen = 0

    def do_GET(self) -> None:  # http.server's name for it
        type(self).seen += 1
        if type(self).seen <= type(self).slow:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.send_header("ETag", '"abc"')
        self.send_header("x-amz-meta-mode", "33188")
        self.end_headers()
        self.wfile.write(b"y" * 50)  # then the connection closes
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def faulty() -> Iterator[type[_Faulty]]:
    handler = type("Faulty", (_Faulty,), {"slow": 0, "seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def _faulty_rgw(stack: Stack, faulty: type[_Faulty], attempts: int) -> RGW:
    cfg = stack.config(s3={"endpoint_url": faulty.url,  # type: ignore[attr-defined]
                           "max_attempts": attempts})
    return RGW(cfg.s3, cfg.rgw)


def test_slow_down_is_retried_then_a_short_body_is_an_interrupted_download(
        stack: Stack, faulty: type[_Faulty], tmp_path: Path) -> None:
    faulty.slow = 1
    rgw = _faulty_rgw(stack, faulty, attempts=3)
    st = Staging(tmp_path, "repo.infn.it").ensure()
    target = map_key("cvmfs/a")
    assert target is not None
    with pytest.raises(Transient, match="download interrupted"):
        fetch.stage_key(rgw, st, "bucket", target, "repo.infn.it")
    assert faulty.seen == 2  # the 503 retried once
    assert st.pending_count() == 0 and list(st.tmp.iterdir()) == []


def test_slow_down_on_every_attempt_is_transient(stack: Stack, faulty: type[_Faulty]) -> None:
    faulty.slow = 10
    rgw = _faulty_rgw(stack, faulty, attempts=2)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        rgw.get_object("bucket", "cvmfs/a")
    assert faulty.seen == 2
    assert info.value.response["Error"] == {"Code": "SlowDown", "Message": "Please reduce"}
    assert isinstance(classify(info.value, "GET"), Transient)
