"""Reconcile against a real Ceph RGW bucket: existing data, drift both ways, dry run.

The bucket is filled with boto3 as the S3 clients of DESIGN §2 would (plain
uploads, s3fs and rclone metadata, symlinks, a tarball); the staged changes
are published by the real publisher into the double, and the result must
equal the bucket.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from cvmfs_publisher.adapters.rgw import RGW
from cvmfs_publisher.pipeline.reconcile import ReconcileError, content_matches, reconcile
from cvmfs_publisher.staging import manifest
from tests.conftest import unique_label
from tests.cvmfs_server_double import published_tree, union_dir

from .conftest import SyncEnv, files_of, tarball

ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 50


@pytest.fixture
def bucket_env(env: SyncEnv, ceph: Any) -> Iterator[tuple[SyncEnv, str, Any]]:
    """A fresh bucket and repository (created by mkfs), an S3 client on it."""
    label = unique_label("rc")
    repo = f"{label}.infn.it"
    env.raw["s3"] = {"endpoint_url": ceph.endpoint, "max_attempts": 2, "verify": False}
    env.envvars.update({"CVMFS_PUBLISHER_S3__ACCESS_KEY": ceph.access_key,
                        "CVMFS_PUBLISHER_S3__SECRET_KEY": ceph.secret_key})
    env.add_keys(repo)
    s3 = RGW(env.cfg.s3).s3
    s3.create_bucket(Bucket=label)
    env.publisher().ensure_repository(repo)
    yield env, repo, s3
    objs = s3.list_objects_v2(Bucket=label).get("Contents", [])
    for o in objs:
        s3.delete_object(Bucket=label, Key=o["Key"])
    s3.delete_bucket(Bucket=label)


def put(s3: Any, bucket: str, key: str, body: bytes, **meta: str) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)


def published(env: SyncEnv, repo: str) -> dict[str, Any]:
    return {k: (v[1], v[2]) if v[0] == "f" else v for k, v in files_of(env.published(repo)).items()}


def sync(env: SyncEnv, repo: str, **kw: Any) -> Any:
    plan = reconcile(env.cfg, repo, **kw)
    assert plan.ok, plan.render()
    if not kw.get("dry_run"):
        env.publisher().publish(repo)
    return plan


def fill(s3: Any, bucket: str) -> dict[str, Any]:
    """The bucket of a user who uploaded before the repository existed."""
    put(s3, bucket, "cvmfs/README", b"read me\n")
    put(s3, bucket, "cvmfs/a/b/c/nested.txt", b"nested")
    put(s3, bucket, "cvmfs/bin/prog", ELF)  # no metadata: the ELF header makes it 0755
    put(s3, bucket, "cvmfs/bin/script.sh", b"echo\n", mode="33261")  # s3fs 0755
    put(s3, bucket, "cvmfs/etc/conf", b"x=1\n", mode="100640")  # rclone 0640 -> 0644
    put(s3, bucket, "cvmfs/latest.rclonelink", b"bin/prog", mode="120777")  # rclone link
    put(s3, bucket, "cvmfs/abs", b"/etc/hostname", mode="41471")  # s3fs link
    put(s3, bucket, "cvmfs/big", b"B" * (6 << 20))
    put(s3, bucket, "cvmfs/emptydir/", b"", mode="493")  # s3fs directory marker
    put(s3, bucket, "cvmfs/pkg.tar.gz", tarball({"bin/tool": b"tool", "doc": b"d"}, gz=True))
    put(s3, bucket, "elsewhere/not-published", b"no")
    return {
        "README": (0o644, b"read me\n"),
        "a/b/c/nested.txt": (0o644, b"nested"),
        "bin/prog": (0o755, ELF),
        "bin/script.sh": (0o755, b"echo\n"),
        "etc/conf": (0o644, b"x=1\n"),
        "latest": ("l", "bin/prog"),
        "abs": ("l", "/etc/hostname"),
        "big": (0o644, b"B" * (6 << 20)),
        "software/pkg/bin/tool": (0o644, b"tool"),
        "software/pkg/doc": (0o644, b"d"),
    }


def test_bucket_with_existing_data(bucket_env: tuple[SyncEnv, str, Any]) -> None:
    env, repo, s3 = bucket_env
    bucket = repo.split(".")[0]
    wanted = fill(s3, bucket)

    dry = reconcile(env.cfg, repo, dry_run=True)
    text = str(dry)
    assert dry.counts() == {"add": 9} and dry.staged == 0
    assert env.staging(repo).pending_count() == 0  # a dry run stages nothing
    assert "(dry run: nothing staged)" in text
    assert "+ put     a/b/c/nested.txt  (missing)  <- cvmfs/a/b/c/nested.txt" in text
    assert "+ ingest  software/pkg  (missing)  <- cvmfs/pkg.tar.gz" in text

    plan = sync(env, repo)
    assert plan.staged == 9
    assert published(env, repo) == wanted
    again = reconcile(env.cfg, repo, dry_run=True)
    assert again.changes == [] and again.in_sync == 9, again.render()
    # The first reconcile walked (no manifest) and rebuilt it; the publish folded the
    # batch in: this one compares the listing with it and reads no file.
    assert again.mode == "manifest" and again.hashed == 0


def test_drift_both_ways(bucket_env: tuple[SyncEnv, str, Any]) -> None:
    env, repo, s3 = bucket_env
    bucket = repo.split(".")[0]
    wanted = fill(s3, bucket)
    sync(env, repo)
    # Events lost: the bucket moved on ...
    put(s3, bucket, "cvmfs/README", b"READ ME\n")  # same size, other content
    put(s3, bucket, "cvmfs/etc/conf", b"x=22\n", mode="100755")  # other size and mode
    put(s3, bucket, "cvmfs/new/file", b"new")
    put(s3, bucket, "cvmfs/latest.rclonelink", b"bin/script.sh")  # link retargeted
    s3.delete_object(Bucket=bucket, Key="cvmfs/a/b/c/nested.txt")
    wanted.update({"README": (0o644, b"READ ME\n"), "etc/conf": (0o755, b"x=22\n"),
                   "new/file": (0o644, b"new"), "latest": ("l", "bin/script.sh")})
    del wanted["a/b/c/nested.txt"]
    # ... and the repository has things the bucket never had.
    for path, data in (("extra.txt", b"e"), ("junk/x/1", b"1"), ("junk/x/2", b"2")):
        env.put(path, data, repo=repo)
    env.publisher().publish(repo)
    cmd = str(env.double.command)
    subprocess.run([cmd, "transaction", repo], check=True, capture_output=True)
    (union_dir(env.root, repo) / "bin" / ".cvmfscatalog").write_bytes(b"")
    subprocess.run([cmd, "publish", repo], check=True, capture_output=True)

    dry = reconcile(env.cfg, repo, dry_run=True)
    lines = {ln.split("  (")[0] for ln in dry.render().splitlines()[3:]}
    assert lines == {
        "~ put     README", "~ put     etc/conf", "+ put     new/file", "~ put     latest",
        "- delete  a", "- delete  extra.txt", "- delete  junk"}, dry.render()
    assert dry.kept >= 3  # new_repository, bin/.cvmfscatalog, software/pkg

    sync(env, repo)

    tree = env.published(repo)
    assert published(env, repo) == {**wanted, "bin/.cvmfscatalog": (0o644, b"")}
    assert "junk" not in tree and "a" not in tree
    assert (published_tree(env.root, repo) / "new_repository").exists()  # mkfs's, kept
    assert reconcile(env.cfg, repo, dry_run=True).changes == []


def test_reconcile_needs_a_repository(bucket_env: tuple[SyncEnv, str, Any]) -> None:
    env, _, _ = bucket_env
    with pytest.raises(ReconcileError):
        reconcile(env.cfg, "nobody-personalrepo.infn.it", dry_run=True)


def test_multipart_etag(bucket_env: tuple[SyncEnv, str, Any], tmp_path: Any) -> None:
    env, repo, s3 = bucket_env
    bucket = repo.split(".")[0]
    data = bytes(range(256)) * (48 * 1024)  # 12 MiB in 3 parts of 5 MiB
    mpu = s3.create_multipart_upload(Bucket=bucket, Key="cvmfs/multi")
    parts = []
    for i, off in enumerate(range(0, len(data), 5 << 20), start=1):
        r = s3.upload_part(Bucket=bucket, Key="cvmfs/multi", UploadId=mpu["UploadId"],
                           PartNumber=i, Body=io.BytesIO(data[off:off + (5 << 20)]))
        parts.append({"ETag": r["ETag"], "PartNumber": i})
    s3.complete_multipart_upload(Bucket=bucket, Key="cvmfs/multi", UploadId=mpu["UploadId"],
                                 MultipartUpload={"Parts": parts})
    etag = s3.head_object(Bucket=bucket, Key="cvmfs/multi")["ETag"].strip('"')
    assert etag.endswith("-3")
    local = tmp_path / "multi"
    local.write_bytes(data)
    assert content_matches(str(local), len(data), etag)
    local.write_bytes(data[:-1] + b"!")
    assert not content_matches(str(local), len(data), etag)
    sync(env, repo)
    assert reconcile(env.cfg, repo, dry_run=True).changes == []


def test_cli_reconcile_dry_run_then_stage(bucket_env: tuple[SyncEnv, str, Any], tmp_path,
                                          monkeypatch, capsys) -> None:
    """``cvmfs-publisher reconcile`` prints the plan; --dry-run stages nothing."""
    import yaml

    from cvmfs_publisher.operations.cli import main

    env, repo, s3 = bucket_env
    label = repo.split(".")[0]
    put(s3, label, "cvmfs/new.txt", b"new\n")
    cfg_file = tmp_path / "cli.yaml"
    cfg_file.write_text(yaml.safe_dump(env.raw))
    for k, v in env.envvars.items():
        monkeypatch.setenv(k, v)
    assert main(["--config", str(cfg_file), "reconcile", repo, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "new.txt" in out
    assert env.staging(repo).pending_count() == 0
    assert main(["--config", str(cfg_file), "reconcile", repo]) == 0
    assert env.staging(repo).pending_get("new.txt") is not None
    assert main(["--config", str(cfg_file), "reconcile", "Not_A_Repo"]) == 2


def test_manifest_reconcile_reads_no_file(bucket_env: tuple[SyncEnv, str, Any]) -> None:
    """With a manifest of the published revision: the listing alone decides."""
    env, repo, s3 = bucket_env
    bucket = repo.split(".")[0]
    wanted = fill(s3, bucket)
    sync(env, repo)
    assert published(env, repo) == wanted
    st = env.staging(repo)
    revision = manifest.published_revision(env.cfg.cvmfs.spool_dir, repo)
    assert manifest.ensure(st, published_tree(env.root, repo), revision) == "trusted"
    # What the sync daemon does when it has no manifest of this revision (lost, or a
    # deployment from before manifests): walk and hash the published tree once.
    manifest.discard(st.root, repo, "the test removes it")
    assert manifest.ensure(st, published_tree(env.root, repo), revision) == "rebuilt"
    again = reconcile(env.cfg, repo, dry_run=True)
    assert again.mode == "manifest" and again.hashed == 0, again.render()
    assert again.changes == [] and again.in_sync == 9, again.render()
    # Drift: found from the listing alone (a changed ETag, a new key, a deleted key).
    put(s3, bucket, "cvmfs/README", b"READ ME\n")
    put(s3, bucket, "cvmfs/new/file", b"new")
    s3.delete_object(Bucket=bucket, Key="cvmfs/a/b/c/nested.txt")
    drift = reconcile(env.cfg, repo)
    assert drift.mode == "manifest" and drift.hashed == 0
    assert sorted((c.op, c.path) for c in drift.changes) == [
        ("delete", "a/b/c/nested.txt"), ("put", "README"), ("put", "new/file")]
    assert drift.staged == 3
    # The publish folds the batch into the manifest (revision chained): still no file read.
    env.publisher().publish(repo)
    later = reconcile(env.cfg, repo, dry_run=True)
    assert later.mode == "manifest" and later.hashed == 0, later.render()
    assert later.changes == [], later.render()
    # Someone else published (another host, by hand): not trusted, walked, rebuilt.
    cmd = str(env.double.command)
    subprocess.run([cmd, "transaction", repo], check=True, capture_output=True)
    subprocess.run([cmd, "publish", repo], check=True, capture_output=True)
    walked = reconcile(env.cfg, repo)
    assert walked.mode == "walk" and walked.rebuilt and walked.changes == []
    assert reconcile(env.cfg, repo, dry_run=True).mode == "manifest"
