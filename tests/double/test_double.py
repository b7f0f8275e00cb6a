"""Tests of the cvmfs_server test double against ../shared/cvmfs/README.md.

The double is the only fake of the suite: every other test trusts it to fail
where the real tool fails, with the same exit code, text and stream, and to
leave the same state. These tests pin that behaviour, running the executable as
the daemons do (argument lists, separate processes).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cvmfs_server_double import (
    DOUBLE_PATH,
    calls,
    clear_faults,
    current_revision,
    double_env,
    drop_lease,
    in_transaction,
    inject_fault,
    leases,
    published_tree,
    revisions,
    spool_dir,
    union_dir,
    unmount_all,
    violations,
)

LOCAL = "test.local.repo"  # 15 characters: new_repository is then 45 bytes (README §7)
GW = "gw.test.repo"
GW_URL = "http://127.0.0.1:4929/api/v1"
REMOUNT_LINES = [
    "CernVM-FS: running with suid support",
    "CernVM-FS: loading Fuse module... done",
]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the double needs root (mkfs, mounts)")


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run(
    root: Path,
    *args: str,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    **env: str,
) -> Result:
    """Runs the double like a daemon does: its path, an argument list, no shell."""
    proc = subprocess.run(
        [str(DOUBLE_PATH), *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=double_env(root, **env),
        cwd=cwd or root,
        timeout=60,
        check=False,
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def write_keys(keydir: Path, repo: str, skip: str | None = None) -> Path:
    keydir.mkdir(parents=True, exist_ok=True)
    for suffix in ("crt", "pub", "gw"):
        if suffix != skip:
            (keydir / f"{repo}.{suffix}").write_text("plain_text gwkey1 secret\n")
    return keydir


def mkfs_gw(root: Path, repo: str = GW, keydir: Path | None = None) -> Result:
    keys = keydir or write_keys(root.parent / "keys", repo)
    return run(
        root,
        "mkfs",
        "-w",
        f"http://127.0.0.1/cvmfs/{repo}",
        "-u",
        f"gw,/srv/cvmfs/{repo}/data/txn,{GW_URL}",
        "-k",
        str(keys),
        "-o",
        "root",
        repo,
    )


def make_tar(members: dict[str, bytes | None], *, gz: bool = False) -> bytes:
    """name -> content (None = directory); names are used exactly as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.uid = info.gid = 4242
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def assert_erofs(path: Path) -> None:
    with pytest.raises(OSError) as exc:
        path.write_text("x")
    assert exc.value.errno == errno.EROFS


def overlay_options(root: Path, repo: str) -> list[str]:
    target = str(union_dir(root, repo))
    lines = [
        ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if " overlay " in ln
    ]
    mine = [ln.split() for ln in lines if ln.split()[4] == target]
    assert mine, "the union is not mounted"
    return mine[-1][5].split(",")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    base = tmp_path / "root"
    base.mkdir()
    yield base
    unmount_all(base)


@pytest.fixture
def local(root: Path) -> str:
    result = run(root, "mkfs", "-o", "root", LOCAL)
    assert result.rc == 0, result.err
    return LOCAL


@pytest.fixture
def gw(root: Path) -> str:
    result = mkfs_gw(root)
    assert result.rc == 0, result.err
    return GW


# --------------------------------------------------------------------------- basics


def test_without_root_variable_it_refuses(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CVMFS_DOUBLE_ROOT"}
    proc = subprocess.run(
        [str(DOUBLE_PATH), "list"], capture_output=True, env=env, cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    assert b"CVMFS_DOUBLE_ROOT" in proc.stderr


def test_mkfs_local_layout_revision_and_list(root: Path, local: str) -> None:
    conf = (root / f"etc/cvmfs/repositories.d/{local}/server.conf").read_text().splitlines()
    assert conf[0] == "# Created by cvmfs_server."
    keys = [line.split("=", 1)[0] for line in conf[1:]]
    assert keys[:8] == [
        "CVMFS_CREATOR_VERSION",
        "CVMFS_REPOSITORY_NAME",
        "CVMFS_REPOSITORY_TYPE",
        "CVMFS_USER",
        "CVMFS_UNION_DIR",
        "CVMFS_SPOOL_DIR",
        "CVMFS_STRATUM0",
        "CVMFS_UPSTREAM_STORAGE",
    ]
    assert keys[-1] == "CVMFS_IGNORE_XDIR_HARDLINKS"
    assert (root / f"etc/cvmfs/repositories.d/{local}/client.conf").is_file()
    content = union_dir(root, local) / "new_repository"
    assert content.read_text() == f"New CernVM-FS repository for {local}\n"
    assert content.stat().st_size == 45
    assert current_revision(root, local) == 1
    [first] = revisions(root, local)
    assert first["command"] == "mkfs"
    assert first["added"] == ["new_repository"]
    assert (root / f"srv/cvmfs/{local}/data/txn").is_dir()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (root / "etc/cvmfs/keys").iterdir()}
    assert modes[f"{local}.crt"] == 0o444
    assert modes[f"{local}.key"] == 0o400
    listing = run(root, "list")
    assert (listing.rc, listing.out) == (0, f"{local} (stratum0 / local)  \n")
    assert_erofs(union_dir(root, local) / "x")


def test_mkfs_gateway_keys_config_and_refusals(root: Path, gw: str) -> None:
    conf = (root / f"etc/cvmfs/repositories.d/{gw}/server.conf").read_text()
    assert f"CVMFS_STRATUM0=http://127.0.0.1/cvmfs/{gw}\n" in conf
    assert f"CVMFS_UPSTREAM_STORAGE=gw,/srv/cvmfs/{gw}/data/txn,{GW_URL}\n" in conf
    keys = root / "etc/cvmfs/keys"
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in keys.iterdir()} == {
        f"{gw}.crt": 0o444,
        f"{gw}.pub": 0o444,
        f"{gw}.gw": 0o400,
    }
    assert (spool_dir(root, gw) / "client.local").read_text() == ""
    assert not (root / f"srv/cvmfs/{gw}").exists()
    assert (union_dir(root, gw) / "new_repository").is_file()
    assert run(root, "list").out == f"{gw} (stratum0 / gw)  \n"

    again = mkfs_gw(root)
    assert (again.rc, again.err) == (1, f"The repository {gw} already exists\n")
    nouser = run(root, "mkfs", "-o", "nosuchuser", "other.test.repo")
    assert (nouser.rc, nouser.err) == (1, "No user nosuchuser\n")
    assert not (root / "etc/cvmfs/repositories.d/other.test.repo").exists()


def test_mkfs_missing_key_leaves_unhealthy_leftover_that_rmfs_cleans(root: Path) -> None:
    keydir = write_keys(root.parent / "partial", GW, skip="crt")
    failed = mkfs_gw(root, keydir=keydir)
    assert failed.rc == 1
    assert failed.out.endswith(
        f"Importing CernVM-FS Master Key and Certificate from '{keydir}'... "
    )
    assert failed.err == (
        f"cp: cannot stat '{keydir}/{GW}.crt': No such file or directory\nfail!\n"
    )
    assert (root / f"etc/cvmfs/repositories.d/{GW}").is_dir()
    assert run(root, "list").out == f"{GW} (stratum0 / gw - unhealthy)  \n"
    assert mkfs_gw(root, keydir=keydir).err == f"The repository {GW} already exists\n"
    assert run(root, "transaction", GW).rc == 1

    removed = run(root, "rmfs", "-f", GW)
    assert removed.rc == 0, removed.err
    assert not (root / f"etc/cvmfs/repositories.d/{GW}").exists()
    assert run(root, "list").out == ""
    assert mkfs_gw(root).rc == 0
    assert run(root, "list").out == f"{GW} (stratum0 / gw)  \n"


# --------------------------------------------------------------------------- transaction


def test_transaction_exit_codes_and_lock_file(root: Path, local: str) -> None:
    opened = run(root, "transaction", local)
    assert (opened.rc, opened.out, opened.err) == (0, "", "")
    lock = spool_dir(root, local) / "in_transaction.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert lock.stat().st_size == 0
    assert in_transaction(root, local)
    assert "rw" in overlay_options(root, local)

    again = run(root, "transaction", local)
    assert (again.rc, again.out) == (17, "")
    assert again.err == "CernVM-FS transaction error: another transaction is already open\n"

    retried = run(root, "transaction", "-t", "1", local, CVMFS_DOUBLE_BACKOFF_SCALE="0.1")
    assert retried.rc == 17
    assert "repository busy, retrying\n" in retried.out

    missing = run(root, "transaction", "no.such.repo")
    assert missing.rc == 1
    assert missing.err == (
        "CernVM-FS error: Unable to find the configuration file `server.conf` for the "
        "cvmfs publisher: no.such.repo\n"
    )


def test_gateway_transaction_token_and_lease_path_checks(root: Path, gw: str) -> None:
    opened = run(root, "transaction", gw)
    assert (opened.rc, opened.out) == (0, "Gateway reply: ok\n")
    token = spool_dir(root, gw) / "session_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_bytes()) == 56
    assert token.read_bytes().endswith(b"====")
    assert run(root, "abort", "-f", gw).rc == 0
    assert not token.exists()

    noparent = run(root, "transaction", f"{gw}/a/b")
    assert (noparent.rc, noparent.out) == (2, "Gateway reply: ok\nGateway reply: ok\n")
    assert (
        noparent.err
        == "CernVM-FS transaction error: cannot open transaction on non-existing path /a\n"
    )
    notdir = run(root, "transaction", f"{gw}/new_repository/x")
    assert notdir.rc == 20
    assert "cannot open transaction on /new_repository, which is not a directory" in notdir.err
    assert not in_transaction(root, gw)


def test_subpath_lease_drops_writes_outside_it(root: Path, gw: str) -> None:
    assert run(root, "transaction", f"{gw}/other").rc == 0
    union = union_dir(root, gw)
    (union / "other").mkdir()
    (union / "other/kept").write_text("in the lease")
    (union / "dropped").write_text("outside the lease")
    published = run(root, "publish", gw)
    assert published.rc == 0, published.err
    assert published.out.endswith("Changes submitted to repository gateway\n")
    tree = published_tree(root, gw)
    assert (tree / "other/kept").read_text() == "in the lease"
    assert not (tree / "dropped").exists()
    assert revisions(root, gw)[-1]["added"] == ["other", "other/kept"]


# --------------------------------------------------------------------------- publish


def test_publish_refusals(root: Path, local: str) -> None:
    idle = run(root, "publish", local)
    assert (idle.rc, idle.out, idle.err) == (1, f"Repository {local} is not in a transaction\n", "")
    missing = run(root, "publish", "no.such.repo")
    assert (missing.rc, missing.err) == (1, "The repository no.such.repo does not exist.\n")

    assert run(root, "transaction", local).rc == 0
    union = union_dir(root, local)
    (union / "sub").mkdir()
    with open(union / "sub/open.txt", "w") as held:
        held.write("still writing")
        busy = run(root, "publish", local)
        assert (busy.rc, busy.out) == (1, f"Open writable file descriptors on {local}\n")
    inside = run(root, "publish", local, cwd=union / "sub")
    assert inside.rc == 1
    assert inside.out == (
        f"Current working directory is in {union}.  Please release, e.g. by 'cd $HOME'.\n"
    )
    with open(spool_dir(root, local) / "is_publishing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        other = run(root, "publish", local)
        assert (other.rc, other.err) == (1, f"Another publish process is active for {local}\n")
    assert in_transaction(root, local)
    assert run(root, "publish", local).rc == 0
    assert not in_transaction(root, local)


def test_every_publish_and_ingest_makes_a_revision(root: Path, local: str) -> None:
    assert run(root, "transaction", local).rc == 0
    done = run(root, "publish", local)
    assert done.rc == 0
    assert done.err == ""
    lines = done.out.splitlines()
    assert lines[0].startswith("Using auto tag 'generic-")
    assert lines[1:] == [
        "Swissknife Sync: Processing changes...",
        "Waiting for upload of files before committing...",
        "Committing file catalogs...",
        "Swissknife Sync: Wait for all uploads to finish",
        "Swissknife Sync: Exporting repository manifest",
        f"Statistics stored at: {spool_dir(root, local)}/stats.db",
        f"Tagging {local}",
        "Flushing file system buffers",
        "Signing new manifest",
        "Remounting newly created repository revision",
    ]
    empty = revisions(root, local)[-1]
    assert (empty["revision"], empty["command"]) == (2, "publish")
    assert (empty["added"], empty["changed"], empty["deleted"]) == ([], [], [])

    assert run(root, "transaction", local).rc == 0
    tagged = run(root, "publish", "-a", "v1", "-m", "first release", local)
    assert tagged.rc == 0
    assert "Using auto tag" not in tagged.out
    assert revisions(root, local)[-1]["tag"] == "v1"
    assert revisions(root, local)[-1]["description"] == "first release"
    assert run(root, "transaction", local).rc == 0
    dup = run(root, "publish", "-a", "v1", local)
    assert (dup.rc, dup.err) == (1, "Tag name 'v1' is already in use.\n")
    assert run(root, "publish", local).rc == 0

    ingested = run(root, "ingest", "-d", "nothing/here", local)
    assert ingested.rc == 0
    assert ingested.err == "[WARNING] 'nothing/here' cannot be deleted. Unrecognized file type.\n"
    assert [r["revision"] for r in revisions(root, local)] == [1, 2, 3, 4, 5]
    assert revisions(root, local)[-1]["command"] == "ingest"
    assert (spool_dir(root, local) / "tmp").is_dir()
    assert list((spool_dir(root, local) / "tmp").iterdir()) == []
    assert list((spool_dir(root, local) / "scratch/current").iterdir()) == []


def test_publish_applies_whiteouts_opaque_dirs_and_modes(root: Path, local: str) -> None:
    union = union_dir(root, local)
    tree = published_tree(root, local)
    assert run(root, "transaction", local).rc == 0
    (union / "keep").mkdir()
    (union / "keep/a").write_text("a")
    (union / "keep/b").write_text("b")
    (union / "gone").mkdir()
    (union / "gone/x").write_text("x")
    (union / "tool").write_text("#!/bin/sh\n")
    (union / "tool").chmod(0o755)
    (union / "link").symlink_to("keep/a")
    assert run(root, "publish", local).rc == 0
    assert stat.S_IMODE((tree / "tool").stat().st_mode) == 0o755
    assert os.readlink(tree / "link") == "keep/a"

    assert run(root, "transaction", local).rc == 0
    (union / "keep/a").unlink()  # whiteout
    (union / "keep/b").write_text("b2")  # copy-up
    for child in (union / "gone").iterdir():
        child.unlink()
    (union / "gone").rmdir()  # whiteout of a directory
    (union / "gone").mkdir()  # ... re-created: opaque
    (union / "gone/y").write_text("y")
    (union / "new_repository").unlink()
    whiteouts = [
        p for p in (spool_dir(root, local) / "scratch/current").rglob("*") if p.is_char_device()
    ]
    assert whiteouts
    assert run(root, "publish", local).rc == 0

    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")) == [
        "gone",
        "gone/y",
        "keep",
        "keep/b",
        "link",
        "tool",
    ]
    assert (tree / "keep/b").read_text() == "b2"
    last = revisions(root, local)[-1]
    assert last["deleted"] == ["gone/x", "keep/a", "new_repository"]
    assert last["added"] == ["gone/y"]
    assert "keep/b" in last["changed"]
    assert "gone" in last["changed"]
    for path in tree.rglob("*"):
        assert not [
            x for x in os.listxattr(path, follow_symlinks=False) if x.startswith("trusted.")
        ]
    assert (union / "keep/b").read_text() == "b2"
    assert_erofs(union / "keep/c")
    with pytest.raises(OSError) as exc:
        (union / "d").mkdir()
    assert exc.value.errno == errno.EROFS


# --------------------------------------------------------------------------- abort


def test_abort_exit_codes_and_prompt(root: Path, local: str) -> None:
    union = union_dir(root, local)
    assert run(root, "transaction", local).rc == 0
    (union / "scratch-file").write_text("discard me")
    aborted = run(root, "abort", "-f", local)
    assert (aborted.rc, aborted.err) == (0, "")
    assert aborted.out.splitlines()[:2] == REMOUNT_LINES
    assert not (union / "scratch-file").exists()
    assert not in_transaction(root, local)
    assert_erofs(union / "x")

    idle = run(root, "abort", "-f", local)
    assert (idle.rc, idle.err) == (22, f"Repository {local} is not in a transaction\n")
    missing = run(root, "abort", "-f", "no.such.repo")
    assert missing.rc == 1
    assert "Unable to find the configuration file `server.conf`" in missing.err

    assert run(root, "transaction", local).rc == 0
    declined = run(root, "abort", local, stdin=b"n\n")
    assert declined.rc == errno.EINTR
    assert declined.out == (
        "You are about to DISCARD ALL CHANGES OF THE CURRENT TRANSACTION for "
        f"{local}!  Are you sure (y/N)? "
    )
    assert in_transaction(root, local)
    at_eof = run(root, "abort", local, stdin=b"")
    assert at_eof.rc == 0
    assert not in_transaction(root, local)
    assert current_revision(root, local) == 1


# --------------------------------------------------------------------------- faults


def test_injected_faults_leave_the_real_failure_state(root: Path, gw: str) -> None:
    inject_fault(root, "transaction", rc=16)
    inject_fault(root, "transaction", rc=16)
    for _ in range(2):
        busy = run(root, "transaction", gw)
        assert busy.rc == 16
        assert busy.out == "Path busy. Time remaining = 1h59m59.808167894s\n"
        assert busy.err == "CernVM-FS transaction error: lease path busy\n"
        assert not in_transaction(root, gw)
    assert run(root, "transaction", gw).rc == 0

    union = union_dir(root, gw)
    (union / "payload").write_text("x")
    inject_fault(root, "publish", rc=1, stderr="SessionContext: could not commit session.")
    failed = run(root, "publish", gw)
    assert failed.rc == 1
    assert failed.err == "SessionContext: could not commit session.\n"
    assert failed.out.rstrip().endswith("/stats.db")
    assert in_transaction(root, gw)
    assert (spool_dir(root, gw) / "session_token").exists()
    assert not (spool_dir(root, gw) / "is_publishing.lock").exists()
    assert "rw" in overlay_options(root, gw)
    (union / "still-writable").write_text("y")
    assert current_revision(root, gw) == 1

    inject_fault(root, "abort", rc=5)
    unreachable = run(root, "abort", "-f", gw)
    assert unreachable.rc == 5
    assert unreachable.err == "Make lease drop request failed: 7. Reply: ''\ncannot drop lease\n"
    assert in_transaction(root, gw)
    assert run(root, "abort", "-f", gw).rc == 0
    assert not (union / "payload").exists()

    inject_fault(root, "transaction", rc=16, repo="some.other.repo")
    assert run(root, "transaction", gw).rc == 0
    clear_faults(root)
    assert run(root, "abort", "-f", gw).rc == 0
    inject_fault(root, "publish", delay=0.1)
    assert run(root, "transaction", gw).rc == 0
    assert run(root, "publish", gw).rc == 0
    assert json.loads((root / "double/faults.json").read_text()) == {"publish": []}
    with pytest.raises(ValueError, match="unknown command"):
        inject_fault(root, "gc", rc=1)


@pytest.mark.timeout(60)
def test_delay_fault_does_not_hold_the_faults_lock(root: Path, local: str) -> None:
    """Other calls (other repositories) must not wait for a slowed-down publish."""
    assert run(root, "transaction", local).rc == 0
    inject_fault(root, "publish", delay=3, repo=local)
    faults = root / "double/faults.json"
    proc = subprocess.Popen(
        [str(DOUBLE_PATH), "publish", local],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=double_env(root),
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b"Waiting for upload"):
                break
        while json.loads(faults.read_text()) != {"publish": []}:
            assert proc.poll() is None
        # faults.json is replaced just before the lock is released: allow that instant
        deadline = time.monotonic() + 1.0
        with open(root / "double/faults.lock") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the publish holds the faults lock"
                    time.sleep(0.01)
        assert proc.poll() is None  # still sleeping in the delay: it did not hold the lock
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()  # never leave it running: it would mount again after teardown
        proc.wait()
    assert current_revision(root, local) == 2


@pytest.mark.timeout(60)
def test_sigkill_during_publish_then_recovery(root: Path, local: str) -> None:
    """README §6: A while the publish runs, B after the process group was killed."""
    union = union_dir(root, local)
    spool = spool_dir(root, local)
    assert run(root, "transaction", local).rc == 0
    (union / "big").write_text("payload")
    proc = subprocess.Popen(
        [str(DOUBLE_PATH), "publish", local],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=double_env(root, CVMFS_DOUBLE_PUBLISH_DELAY="30"),
        cwd=root,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        for line in proc.stdout:
            seen += line
            if line.startswith(b"Waiting for upload"):
                break
        assert b"Waiting for upload of files before committing..." in seen
        # A: the publish is alive and holds is_publishing.lock.
        other = run(root, "publish", local)
        assert (other.rc, other.err) == (1, f"Another publish process is active for {local}\n")
        probe = run(root, "transaction", local)
        assert probe.rc == 1
        assert f"WARNING: The repository {local} is currently publishing" in probe.err
        assert f"    rm -fR {spool}/is_publishing.lock\n" in probe.err
        # README §10: abort's 22 here does not mean "not in a transaction".
        busy = run(root, "abort", "-f", local)
        assert (busy.rc, busy.err) == (22, f"Could not acquire lock {spool}/is_publishing.lock\n")
        assert in_transaction(root, local)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # B: state right after the kill.
    assert (spool / "in_transaction.lock").exists()
    assert (spool / "is_publishing.lock").exists()
    assert list((spool / "tmp").glob("catalog.*"))
    assert "ro" in overlay_options(root, local)
    assert_erofs(union / "x")
    assert current_revision(root, local) == 1
    assert run(root, "list").out == f"{local} (stratum0 / local - in transaction - unhealthy)  \n"
    killed = [c for c in calls(root) if c["pid"] == proc.pid]
    assert killed and killed[0]["rc"] is None

    txn = run(root, "transaction", local)
    assert txn.rc == 1
    lines = txn.err.splitlines()
    assert lines[:5] == [
        f"{local} is in a transaction but {union} is not mounted read/write",
        f"Repository {local} is in a transaction and cannot be repaired.",
        "--> Run `cvmfs_server abort $name` to revert and repair.",
        "(unexpected termination) cannot establish writable mountpoint",
        "Stacktrace:",
    ]
    assert len(lines) == 5 + 11
    assert not (spool / "is_publishing.lock").exists()
    assert (spool / "in_transaction.lock").exists()
    pub = run(root, "publish", local)
    assert pub.rc == 1
    assert f"--> Run `cvmfs_server abort {local}` to revert and repair." in pub.err
    assert current_revision(root, local) == 1

    aborted = run(root, "abort", "-f", local)
    assert aborted.rc == 0
    assert aborted.err.splitlines() == [
        f"{local} is in a transaction but {union} is not mounted read/write",
        f"Trying to remount {union} read/write... success",
    ]
    assert sorted(p.name for p in spool.iterdir() if p.name.endswith((".lock", "_token"))) == []
    assert list((spool / "tmp").iterdir()) == []
    assert "ro" in overlay_options(root, local)
    assert sorted(p.name for p in union.iterdir()) == ["new_repository"]
    assert run(root, "transaction", local).rc == 0
    assert run(root, "publish", local).rc == 0
    assert current_revision(root, local) == 2
    assert run(root, "abort", "-f", local).rc == 22


# --------------------------------------------------------------------------- ingest


def test_ingest_local_tar_merge_catalog_delete(root: Path, local: str) -> None:
    tree = published_tree(root, local)
    first = make_tar({"./": None, "./bin": None, "./bin/tool": b"v1", "./README": b"r"})
    tar_path = root.parent / "first.tar"
    tar_path.write_bytes(first)
    done = run(root, "ingest", "-t", str(tar_path), "-b", "sw/pkg/1.0", "-c", local)
    assert done.rc == 0, done.err
    assert done.err == ""
    assert done.out.splitlines()[1:3] == [
        "Swissknife Ingest: Processing changes...",
        "Waiting for upload of files before committing...",
    ]
    assert done.out.endswith("Remounting newly created repository revision\n")
    assert (tree / "sw/pkg/1.0/bin/tool").read_bytes() == b"v1"
    assert (tree / "sw/pkg/1.0/bin/tool").stat().st_uid == 0  # CVMFS_USER, not the tar's 4242
    marker = tree / "sw/pkg/1.0/.cvmfscatalog"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o664
    assert marker.stat().st_size == 0
    rev = revisions(root, local)[-1]
    assert rev["command"] == "ingest"
    assert "sw/pkg/1.0/bin/tool" in rev["added"]

    second = make_tar({"bin/other": b"o", "bin/tool": b"v2"})
    merged = run(root, "ingest", "-t", "-", "-b", "sw/pkg/1.0", local, stdin=second)
    assert merged.rc == 0, merged.err
    assert (tree / "sw/pkg/1.0/README").read_bytes() == b"r"
    assert (tree / "sw/pkg/1.0/bin/tool").read_bytes() == b"v2"
    assert (tree / "sw/pkg/1.0/bin/other").read_bytes() == b"o"

    removed = run(root, "ingest", "-d", "sw/pkg", local)
    assert removed.rc == 0
    assert not (tree / "sw/pkg").exists()
    assert "sw/pkg/1.0/bin/tool" in revisions(root, local)[-1]["deleted"]

    clash = run(root, "ingest", "-d", "sw", "-t", str(tar_path), "-b", "sw", local)
    assert clash.rc == 1
    assert "PANIC" in clash.err
    assert not in_transaction(root, local)
    assert [r["revision"] for r in revisions(root, local)] == [1, 2, 3, 4]


def test_ingest_refusals_gzip_and_open_transaction(root: Path, local: str) -> None:
    tgz = make_tar({"a": b"a"}, gz=True)
    refused = run(root, "ingest", "-t", "-", "-b", "dir", local, stdin=tgz)
    assert refused.rc == 1
    assert refused.err.splitlines()[:3] == [
        "Impossible to open the archive: Unrecognized archive format",
        "Swissknife Ingest: Initialization of the synchronisation engine failed",
        "Synchronization failed",
    ]
    assert REMOUNT_LINES[0] in refused.out
    assert not in_transaction(root, local)
    assert current_revision(root, local) == 1

    nofile = run(root, "ingest", "-t", "/nonexistent.tar", "-b", "dir", local)
    assert nofile.rc == 1
    assert "Impossible to open the archive: Failed to open '/nonexistent.tar'" in nofile.err

    assert run(root, "ingest", local).err.startswith("Please provide some parameters, use -t")
    assert run(root, "ingest", "-t", "x.tar", local).err.startswith(
        "Please set the base directory where to extract the tarball"
    )
    assert run(root, "ingest", "-b", "dir", local).err.startswith(
        "Please provide the tarball to extract"
    )
    missing = run(root, "ingest", "-d", "x", "no.such.repo")
    assert missing.rc == 2
    assert "no.such.repo/server.conf: No such file" in missing.err

    assert run(root, "transaction", local).rc == 0
    busy = run(root, "ingest", "-d", "new_repository", local)
    assert busy.rc == 1
    assert busy.err == (
        "CernVM-FS transaction error: another transaction is already open\n"
        "Impossible to start a transaction\n"
    )
    assert in_transaction(root, local)


def test_ingest_rejects_members_escaping_the_base_dir(root: Path, local: str) -> None:
    outside = root.parent / "evil"
    escaping = make_tar({"../../../../evil": b"pwned"})
    result = run(root, "ingest", "-t", "-", "-b", "dir", local, stdin=escaping)
    assert result.rc == 1
    assert not outside.exists()
    assert any("escapes the base directory" in v for v in violations(root))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = str(root.parent)
        tar.addfile(link)
        info = tarfile.TarInfo("link/evil")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"pwned"))
    through = run(root, "ingest", "-t", "-", "-b", "dir", local, stdin=buf.getvalue())
    assert through.rc == 1
    assert not outside.exists()
    assert not in_transaction(root, local)
    assert current_revision(root, local) == 1


def test_ingest_gateway_restrictions(root: Path, gw: str) -> None:
    payload = make_tar({"f": b"1"})
    noparent = run(root, "ingest", "-t", "-", "-b", "sw/app/1.0", gw, stdin=payload)
    assert noparent.rc == 1
    assert noparent.err == (
        "CernVM-FS transaction error: cannot open transaction on non-existing path /sw/app\n"
        "Impossible to start a transaction\n"
    )
    both = run(root, "ingest", "-d", "x", "-t", "-", "-b", "y", gw, stdin=payload)
    assert (both.rc, both.err) == (
        1,
        "Could not delete and add a file in the same transaction while using gateway.\n",
    )
    many = run(root, "ingest", "-d", "x", "-d", "y", gw)
    assert (many.rc, many.err) == (
        1,
        "Could not delete multiple paths using a gateway in a single transaction.\n",
    )
    ok = run(root, "ingest", "-t", "-", "-b", "sw", gw, stdin=payload)
    assert ok.rc == 0, ok.err
    assert ok.out.startswith("Gateway reply: ok\n")
    assert ok.out.endswith("Changes submitted to repository gateway\n")
    nested = run(root, "ingest", "-t", "-", "-b", "sw/app", gw, stdin=payload)
    assert nested.rc == 0, nested.err
    assert (published_tree(root, gw) / "sw/app/f").read_bytes() == b"1"
    assert current_revision(root, gw) == 3


# --------------------------------------------------------------------------- rmfs / mount / records


def test_rmfs_unmounts_and_removes_everything(root: Path, local: str) -> None:
    assert run(root, "transaction", local).rc == 0
    removed = run(root, "rmfs", "-f", local)
    assert removed.rc == 0, removed.err
    assert removed.out.splitlines() == [
        "Unmounting CernVM-FS Area... done",
        "Removing Spool Area... done",
        "Removing Configuration... done",
        "Removing Repository Storage... done",
        "Removing Keys and Certificate... done",
        "Updating global JSON information... done",
        f"CernVM-FS repository {local} wiped out!",
    ]
    for gone in (
        union_dir(root, local),
        spool_dir(root, local),
        root / f"etc/cvmfs/repositories.d/{local}",
        root / f"srv/cvmfs/{local}",
        root / f"etc/cvmfs/keys/{local}.pub",
    ):
        assert not gone.exists(), gone
    assert str(root) not in Path("/proc/self/mountinfo").read_text()
    missing = run(root, "rmfs", "-f", local)
    assert (missing.rc, missing.err) == (1, f"The repository {local} does not exist.\n")


def test_gateway_repository_content_survives_rmfs_and_mkfs(root: Path, gw: str) -> None:
    assert run(root, "ingest", "-t", "-", "-b", "sw", gw, stdin=make_tar({"f": b"1"})).rc == 0
    assert run(root, "rmfs", "-f", gw).rc == 0
    assert mkfs_gw(root).rc == 0
    assert (union_dir(root, gw) / "sw/f").read_bytes() == b"1"
    assert current_revision(root, gw) == 2


def test_mount_repairs_after_unmount(root: Path, local: str) -> None:
    assert run(root, "transaction", local).rc == 0
    unmount_all(root)
    assert run(root, "list").out == f"{local} (stratum0 / local - in transaction - unhealthy)  \n"
    mounted = run(root, "mount", "-a")
    assert (mounted.rc, mounted.err) == (0, "")
    assert "rw" in overlay_options(root, local)
    assert run(root, "list").out == f"{local} (stratum0 / local - in transaction)  \n"
    missing = run(root, "mount", "no.such.repo")
    assert missing.rc == 1


def test_calls_are_recorded(root: Path, local: str) -> None:
    run(root, "transaction", local)
    run(root, "transaction", local)
    recorded = calls(root)
    assert [c["argv"] for c in recorded] == [
        ["mkfs", "-o", "root", local],
        ["transaction", local],
        ["transaction", local],
    ]
    last = recorded[-1]
    assert (last["rc"], last["repo"], last["cwd"]) == (17, local, str(root))
    assert last["start"] <= last["end"]
    assert "another transaction is already open" in last["stderr"]
    assert isinstance(last["pid"], int)
    assert violations(root) == []


def test_plain_fallback_records_writes_outside_a_transaction(root: Path) -> None:
    plain = {"CVMFS_DOUBLE_NO_MOUNT": "1"}
    assert run(root, "mkfs", "-o", "root", LOCAL, **plain).rc == 0
    union = union_dir(root, LOCAL)
    (union / "sneaky").write_text("written while read-only")  # no EROFS without mounts
    assert run(root, "transaction", LOCAL, **plain).rc == 0
    assert any("sneaky" in v for v in violations(root))
    assert not (union / "sneaky").exists()  # reset as if the write had failed
    (union / "legit").write_text("ok")
    (union / "new_repository").unlink()
    assert run(root, "publish", LOCAL, **plain).rc == 0
    last = revisions(root, LOCAL)[-1]
    assert (last["added"], last["deleted"]) == (["legit"], ["new_repository"])
    assert (published_tree(root, LOCAL) / "legit").read_text() == "ok"
    assert run(root, "transaction", LOCAL, **plain).rc == 0
    (union / "legit").write_text("discarded")
    assert run(root, "abort", "-f", LOCAL, **plain).rc == 0
    assert (union / "legit").read_text() == "ok"
    assert len(violations(root)) == 1


# --------------------------------------------------------------------------- README §10


CALLER = """
import subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL)
for line in proc.stdout:
    if line.startswith(b"Waiting for upload"):
        print("uploading", flush=True)
proc.wait()
"""


@pytest.mark.timeout(60)
def test_publish_outlives_its_killed_caller_then_dies_of_sigpipe(root: Path, gw: str) -> None:
    """README §10: a caller killed alone leaves its publish running (it holds
    is_publishing.lock, abort answers 22 + the lock message); once it writes to
    the pipe nobody reads, it dies and the transaction, token and lease stay."""
    spool = spool_dir(root, gw)
    assert run(root, "transaction", gw).rc == 0
    (union_dir(root, gw) / "new").write_text("unpublished")
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, str(DOUBLE_PATH), "publish", gw],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=double_env(root, CVMFS_DOUBLE_PUBLISH_DELAY="3"), cwd=root,
    )
    assert caller.stdout is not None
    assert caller.stdout.readline() == b"uploading\n"
    caller.kill()
    caller.wait()
    publish = next(c for c in calls(root) if c["command"] == "publish")
    assert publish["rc"] is None  # the orphan: still running
    busy = run(root, "abort", "-f", gw)
    assert (busy.rc, busy.err) == (22, f"Could not acquire lock {spool}/is_publishing.lock\n")
    # The union shows the unpublished file; the published layer does not.
    assert (union_dir(root, gw) / "new").read_text() == "unpublished"
    assert not (published_tree(root, gw) / "new").exists()

    with open(spool / "is_publishing.lock") as fh:  # the flock says when it is over
        fcntl.flock(fh, fcntl.LOCK_EX)
    assert in_transaction(root, gw)
    assert (spool / "session_token").exists()
    assert list(leases(root)) == [f"{gw}/"]
    assert current_revision(root, gw) == 1
    aborted = run(root, "abort", "-f", gw)
    assert aborted.rc == 0 and aborted.out.startswith("Gateway reply: ok\n")
    assert leases(root) == {} and not in_transaction(root, gw)


def test_rmfs_in_a_transaction_leaks_the_gateway_lease(root: Path, gw: str) -> None:
    """README §10: rmfs drops the session token, not the lease; the repository
    created again gets 16 from every transaction until the lease expires."""
    assert run(root, "transaction", gw).rc == 0
    assert 7190 < leases(root)[f"{gw}/"] <= 7200
    assert run(root, "rmfs", "-f", gw).rc == 0
    assert mkfs_gw(root).rc == 0
    busy = run(root, "transaction", gw)
    assert busy.rc == 16
    assert busy.out.startswith("Path busy. Time remaining = 1h59m")
    assert busy.err == "CernVM-FS transaction error: lease path busy\n"
    assert not in_transaction(root, gw)
    assert run(root, "abort", "-f", gw).rc == 22  # nothing local to abort
    assert drop_lease(root, f"{gw}/")  # the admin's DELETE /api/v1/leases-by-path
    assert run(root, "transaction", gw).rc == 0

    # abort -f before rmfs releases it; a short lease expires by itself.
    assert run(root, "abort", "-f", gw).rc == 0
    assert leases(root) == {}
    # (long enough that rmfs and mkfs finish within it on a loaded machine)
    assert run(root, "transaction", gw, CVMFS_DOUBLE_LEASE_SECONDS="8").rc == 0
    leased = time.monotonic()  # the lease began before this: it ends before leased + 8
    assert run(root, "rmfs", "-f", gw).rc == 0
    assert mkfs_gw(root).rc == 0
    assert run(root, "transaction", gw).rc == 16
    time.sleep(max(0.0, leased + 8.2 - time.monotonic()))
    assert run(root, "transaction", gw).rc == 0
    # The gateway forgot this one: abort still succeeds, saying so (README §1).
    drop_lease(root, f"{gw}/")
    forgotten = run(root, "abort", "-f", gw)
    assert forgotten.rc == 0
    assert forgotten.out.startswith("Error from gateway: 'invalid lease'\n")
    assert "gateway doesn't recognize the lease" in forgotten.err


def test_transaction_exit_codes_of_section_10(root: Path, gw: str) -> None:
    """1 with the Stacktrace: block (gateway unreachable), 22 and 5 (source), 2 and 20."""
    inject_fault(root, "transaction", rc=1)
    down = run(root, "transaction", gw)
    lines = down.err.splitlines()
    assert down.rc == 1
    assert lines[:3] == ["Make lease acquire request failed: 7. Reply: ",
                         "(unexpected termination) cannot acquire lease", "Stacktrace:"]
    assert len(lines) == 3 + 11
    for rc in (22, 5):
        inject_fault(root, "transaction", rc=rc)
        failed = run(root, "transaction", gw)
        assert failed.rc == rc and failed.err.startswith("CernVM-FS transaction error: ")
        assert not in_transaction(root, gw)
    assert run(root, "transaction", f"{gw}/no/such").rc == 2
    assert leases(root) == {}  # acquired, then dropped
    assert run(root, "transaction", f"{gw}/new_repository/x").rc == 20
    assert leases(root) == {}


def test_real_timing_switch(root: Path, local: str) -> None:
    """Off: publish is quick; on: it takes at least the real tool's 0.48 s."""
    for extra in ({}, {"CVMFS_DOUBLE_REAL_TIMING": "1"}):
        assert run(root, "transaction", local).rc == 0
        (union_dir(root, local) / "f").write_text("x")
        assert run(root, "publish", local, **extra).rc == 0
    quick, real = [c for c in calls(root) if c["command"] == "publish"]
    assert real["end"] - real["start"] >= 0.48
    assert "Committing file catalogs...\n" in real["stdout"]
    assert quick["stdout"].count("Committing file catalogs...") == 1
