"""fetch.py on S3 answers that the real RGW rarely gives on demand (botocore's Stubber).

The normal paths (files, modes, symlinks, tarballs, deletions) run against the
real RGW in test_daemon.py; here: error classes, content sniffing that
disagrees with the name, and what a failed fetch leaves in staging.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from cvmfs_publisher.core.errors import Permanent, Transient
from cvmfs_publisher.pipeline import fetch
from cvmfs_publisher.pipeline.object_keys import map_key
from cvmfs_publisher.staging.area import Entry, Staging

BUCKET = "alice-personalrepo"


@pytest.fixture
def s3() -> Any:
    return boto3.client("s3", region_name="default", endpoint_url="http://127.0.0.1:1",
                        aws_access_key_id="AK", aws_secret_access_key="SK")


@pytest.fixture
def st(tmp_path: Path) -> Staging:
    return Staging(tmp_path, "alice-personalrepo.infn.it").ensure()


def get(stub: Stubber, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    stub.add_response("get_object", {
        "Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data),
        "ETag": '"e"', "Metadata": metadata or {}}, {"Bucket": BUCKET, "Key": key})


def error(stub: Stubber, method: str, key: str, code: str, status: int) -> None:
    stub.add_client_error(method, service_error_code=code, http_status_code=status,
                          expected_params={"Bucket": BUCKET, "Key": key})


def target(key: str) -> Any:
    t = map_key(key)
    assert t is not None
    return t


def leftovers(st: Staging) -> list[str]:
    return sorted(p.name for d in (st.tmp, st.objects) for p in d.iterdir())


def test_missing_object_stages_a_deletion(s3: Any, st: Staging) -> None:
    with Stubber(s3) as stub:
        error(stub, "get_object", "cvmfs/a", "NoSuchKey", 404)
        error(stub, "get_object", "cvmfs/t.tgz", "NoSuchKey", 404)
        assert fetch.stage_key(s3, st, BUCKET, target("cvmfs/a")).op == "delete"
        assert fetch.stage_key(s3, st, BUCKET, target("cvmfs/t.tgz")).op == "ingest-delete"


def test_missing_bucket_is_permanent_not_a_deletion(s3: Any, st: Staging) -> None:
    with Stubber(s3) as stub:
        error(stub, "get_object", "cvmfs/a", "NoSuchBucket", 404)
        with pytest.raises(Permanent):
            fetch.stage_key(s3, st, BUCKET, target("cvmfs/a"), "alice-personalrepo.infn.it")
    assert st.pending_count() == 0


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("ServiceUnavailable", 503, Transient), ("SlowDown", 503, Transient),
    ("InternalError", 500, Transient), ("AccessDenied", 403, Permanent),
])
def test_s3_errors_are_classified(s3: Any, st: Staging, code: str, status: int,
                                  kind: type) -> None:
    with Stubber(s3) as stub:
        error(stub, "get_object", "cvmfs/a", code, status)
        with pytest.raises(kind) as info:
            fetch.stage_key(s3, st, BUCKET, target("cvmfs/a"), "repo.infn.it")
    assert info.value.repository == "repo.infn.it"
    assert st.pending_count() == 0 and leftovers(st) == []


def test_tarball_compression_comes_from_the_content(s3: Any, st: Staging) -> None:
    tar = b"x" * 1024
    with Stubber(s3) as stub:
        get(stub, "cvmfs/lying.tar", gzip.compress(tar))
        get(stub, "cvmfs/plain.tgz", tar)
        get(stub, "cvmfs/b.tar.bz2", bz2.compress(tar))
        get(stub, "cvmfs/x.tar.xz", lzma.compress(tar))
        get(stub, "cvmfs/x-in-gz.tar.gz", lzma.compress(tar))
        staged = [fetch.stage_key(s3, st, BUCKET, target(key)) for key in (
            "cvmfs/lying.tar", "cvmfs/plain.tgz", "cvmfs/b.tar.bz2", "cvmfs/x.tar.xz",
            "cvmfs/x-in-gz.tar.gz")]
    assert [(e.op, e.path, e.compression) for e in staged] == [
        ("ingest", "software/lying", "gzip"), ("ingest", "software/plain", "none"),
        ("ingest", "software/b", "bzip2"), ("ingest", "software/x", "xz"),
        ("ingest", "software/x-in-gz", "xz")]


def test_symlink_named_like_a_tarball_is_refused(s3: Any, st: Staging) -> None:
    with Stubber(s3) as stub:
        get(stub, "cvmfs/x.tar", b"elsewhere", {"mode": "41471"})
        with pytest.raises(Permanent, match="holds a symlink"):
            fetch.stage_key(s3, st, BUCKET, target("cvmfs/x.tar"))
    assert st.pending_count() == 0 and leftovers(st) == []


def test_interrupted_download_is_transient_and_leaves_nothing(s3: Any, st: Staging) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            raise ConnectionResetError("peer reset")

    with Stubber(s3) as stub:
        stub.add_response("get_object", {"Body": StreamingBody(Broken(), 10 << 20),
                                         "ContentLength": 10 << 20, "Metadata": {}},
                          {"Bucket": BUCKET, "Key": "cvmfs/big"})
        with pytest.raises(Transient, match="download interrupted"):
            fetch.stage_key(s3, st, BUCKET, target("cvmfs/big"))
    assert st.pending_count() == 0 and leftovers(st) == []


def test_disk_error_is_transient(s3: Any, st: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Staging, tmp_path: Path, sync: bool = True) -> str:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Staging, "commit_object", full)
    with Stubber(s3) as stub:
        get(stub, "cvmfs/a", b"data")
        with pytest.raises(Transient, match="No space left on device"):
            fetch.stage_key(s3, st, BUCKET, target("cvmfs/a"))
    assert st.pending_count() == 0 and leftovers(st) == []


def test_a_path_through_a_deleted_symlink_is_accepted(s3: Any, st: Staging) -> None:
    """Reordered events: the link's deletion is not staged yet, but S3 no longer has it."""
    st.stage(Entry("evil", "symlink", mode=0o777, target="/etc", key="cvmfs/evil"))
    with Stubber(s3) as stub:
        get(stub, "cvmfs/evil/passwd", b"fine")
        error(stub, "head_object", "cvmfs/evil", "404", 404)
        e = fetch.stage_key(s3, st, BUCKET, target("cvmfs/evil/passwd"))
    assert (e.op, e.path) == ("put", "evil/passwd")


def test_a_path_through_a_live_symlink_is_refused(s3: Any, st: Staging) -> None:
    st.stage(Entry("evil", "symlink", mode=0o777, target="/etc", key="cvmfs/evil"))
    with Stubber(s3) as stub:
        get(stub, "cvmfs/evil/passwd", b"root::0:0")
        stub.add_response("head_object", {}, {"Bucket": BUCKET, "Key": "cvmfs/evil"})
        with pytest.raises(fetch.PathConflict, match="symlink to '/etc'"):
            fetch.stage_key(s3, st, BUCKET, target("cvmfs/evil/passwd"))
    assert st.pending_get("evil/passwd") is None and leftovers(st) == []
