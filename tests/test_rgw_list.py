"""The RGW adapter's own listing (``RGW.list_page``), the anti-entropy's ListObjectsV2.

It must list exactly what boto3's ``list_objects_v2`` lists, page by page,
and fail as it does: checked side by side on the real RGW for awkward keys,
pages of a few keys, a missing bucket and wrong credentials. What the real
RGW cannot be made to answer (a document that is not XML, a truncated page
without a continuation token) comes from a small local HTTP server, said so
where it is used: a partial listing must never reach the diff, where a
missing key reads as a deletion.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest

from cvmfs_publisher.adapters.rgw import RGW, boto3_list_page, classify
from cvmfs_publisher.core.config import Secret
from cvmfs_publisher.core.errors import Permanent, Transient
from cvmfs_publisher.pipeline import reconcile
from tests.conftest import Stack, unique_label
from tests.test_rgw_get import KEYS, bucket, rgw  # noqa: F401 (fixtures)

#: besides test_rgw_get's awkward keys: what XML cannot carry without encoding-type=url
LIST_KEYS = [*KEYS, "cvmfs/control\x01char", "cvmfs/new\nline", "cvmfs/tab\tand space ",
             "outside/prefix", "cvmfs-not-the-prefix"]


def _entries(page: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(o["Key"], o["Size"], o["ETag"], o["LastModified"])
            for o in page.get("Contents", [])]


def _boto3_pages(client: RGW, name: str, prefix: str, max_keys: int) -> list[dict[str, Any]]:
    """Every page as boto3's own ListObjectsV2 gives it: the reference."""
    pages, token = [], None
    while True:
        page = boto3_list_page(client.s3, name, prefix, token, max_keys)
        pages.append(page)
        if not page.get("IsTruncated"):
            return pages
        token = page["NextContinuationToken"]


def test_pages_list_as_boto3_for_awkward_keys(rgw: RGW, bucket: str) -> None:  # noqa: F811
    for i, key in enumerate(LIST_KEYS):
        rgw.s3.put_object(Bucket=bucket, Key=key, Body=b"x" * i)
    for prefix, max_keys in [("cvmfs/", 3), ("cvmfs/", 1000), ("", 4)]:
        theirs = _boto3_pages(rgw, bucket, prefix, max_keys)
        ours, token = [], None
        for _ in theirs:
            page = rgw.list_page(bucket, prefix, token, max_keys=max_keys)
            ours.append(page)
            token = page.get("NextContinuationToken")
        assert [_entries(p) for p in ours] == [_entries(p) for p in theirs], prefix
        assert [p["IsTruncated"] for p in ours] == [p["IsTruncated"] for p in theirs]
        assert token is None
    listed = {o["Key"] for p in _boto3_pages(rgw, bucket, "cvmfs/", 1000)
              for o in p["Contents"]}
    assert listed == {k for k in LIST_KEYS if k.startswith("cvmfs/")}


def test_an_empty_prefix_and_an_empty_bucket(rgw: RGW, bucket: str) -> None:  # noqa: F811
    page = rgw.list_page(bucket, "cvmfs/")
    assert page == {"Contents": [], "IsTruncated": False}


def test_reconcile_lists_the_same_through_either_client(rgw: RGW,  # noqa: F811
                                                        bucket: str) -> None:  # noqa: F811
    for i in range(7):
        rgw.s3.put_object(Bucket=bucket, Key=f"cvmfs/d/{i}", Body=b"y" * i)
    rgw.s3.put_object(Bucket=bucket, Key="cvmfs/pkg.tar.gz", Body=b"\x1f\x8b")
    plans = [reconcile.Plan("repo.infn.it", bucket, "cvmfs/", True) for _ in range(2)]
    ours = reconcile.list_bucket(rgw, bucket, "cvmfs/", ".tarballs", plans[0])
    theirs = reconcile.list_bucket(rgw.s3, bucket, "cvmfs/", ".tarballs", plans[1])
    assert ours == theirs and len(ours) == 8 and plans[0].objects == plans[1].objects == 8


def test_missing_bucket_and_wrong_credentials_fail_as_boto3(stack: Stack, rgw: RGW,  # noqa: F811
                                                             bucket: str) -> None:  # noqa: F811
    absent = unique_label("nobucket-")
    with pytest.raises(botocore.exceptions.ClientError) as ours:
        rgw.list_page(absent, "cvmfs/")
    with pytest.raises(botocore.exceptions.ClientError) as theirs:
        rgw.s3.list_objects_v2(Bucket=absent, Prefix="cvmfs/")
    for info in (ours, theirs):
        assert info.value.response["Error"]["Code"] == "NoSuchBucket"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert isinstance(classify(ours.value, "ListObjectsV2"), Permanent)
    cfg = stack.config()
    cfg.s3.secret_key = Secret("not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        RGW(cfg.s3, cfg.rgw).list_page(bucket, "cvmfs/")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "not-the-secret" not in str(classify(info.value, "ListObjectsV2"))


class _Garbage(http.server.BaseHTTPRequestHandler):
    """A stand-in S3 endpoint (the real RGW never answers so): ``body`` with 200."""

    body = b""
    seen = 0

    def do_GET(self) -> None:  # http.server's name for it
        type(self).seen += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def garbage(stack: Stack) -> Iterator[tuple[type[_Garbage], RGW]]:
    handler = type("Garbage", (_Garbage,), {"body": b"", "seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cfg = stack.config(s3={"endpoint_url": f"http://127.0.0.1:{server.server_address[1]}",
                           "max_attempts": 1})
    try:
        yield handler, RGW(cfg.s3, cfg.rgw)
    finally:
        server.shutdown()
        server.server_close()


NS = b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


@pytest.mark.parametrize("body, reason", [
    (b"<html>a proxy's error page", "not XML"),
    (b"<ListBucketResult " + NS + b"><IsTruncated>true</IsTruncated><Contents><Key>cvmfs/a"
     b"</Key><Size>1</Size></Contents></ListBucketResult>", "no continuation token"),
    (b"<ListBucketResult " + NS + b"><Contents><Key>cvmfs/a</Key><Size>one</Size>"
     b"</Contents></ListBucketResult>", "unreadable entry"),
])
def test_an_answer_that_is_not_a_whole_listing_is_transient(
        garbage: tuple[type[_Garbage], RGW], body: bytes, reason: str) -> None:
    handler, rgw = garbage  # noqa: F811
    handler.body = body
    with pytest.raises(Transient, match=reason):
        rgw.list_page("bucket", "cvmfs/")
    plan = reconcile.Plan("repo.infn.it", "bucket", "cvmfs/", True)
    with pytest.raises(Transient, match=reason):
        reconcile.list_bucket(rgw, "bucket", "cvmfs/", ".tarballs", plan)


def test_a_continuation_token_seen_before_is_transient() -> None:
    """Pages that loop (a server bug) would list forever: refused, as botocore does."""
    class Looping:
        def list_objects_v2(self, **kw: Any) -> dict[str, Any]:
            return {"Contents": [{"Key": "cvmfs/a", "Size": 1, "ETag": '"e"'}],
                    "IsTruncated": True, "NextContinuationToken": "same"}
    plan = reconcile.Plan("repo.infn.it", "bucket", "cvmfs/", True)
    with pytest.raises(Transient, match="continuation token"):
        reconcile.list_bucket(Looping(), "bucket", "cvmfs/", ".tarballs", plan)
