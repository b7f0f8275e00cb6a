"""Hostile input (DESIGN §4): dead-lettered with a reason, and nothing written outside staging.

Keys RGW accepts are uploaded for real (RGW stores ``cvmfs/../../etc/passwd``
as it is and pushes its real event); what HTTP cannot carry (NUL, paths over
the S3 key limit) and non-S3 bodies are published to the ``notification``
exchange with the repository's routing key, exactly where RGW publishes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.consumers.support import (
    Env,
    State,
    dead_letters,
    event_body,
    publish,
    queue_counts,
    running,
    tree_snapshot,
    unacked,
    wait_until,
)

#: Real uploads whose key must never become a path: (key, words expected in the reason).
UNSAFE_UPLOADS = [
    ("cvmfs/../../etc/passwd", "'..' path component"),
    ("cvmfs/a/../../b", "'..' path component"),
    ("cvmfs//etc/shadow", "absolute path"),
    ("cvmfs/./dot", "'.' path component"),
    ("cvmfs/a//b", "empty path component"),
    ("cvmfs/new\nline", "control character U+000A"),
    ("cvmfs/tab\tname", "control character U+0009"),
    ("cvmfs/" + "x" * 300, "exceeds 255 bytes"),
    ("cvmfs/sub/.cvmfscatalog", "reserved CernVM-FS name"),
    ("cvmfs/..tar", "(tarball 'software/.'): '.' path component"),
]


def test_hostile_corpus_is_dead_lettered_and_nothing_escapes(env: Env, tmp_path: Path) -> None:
    r = env.provision()
    other = env.provision()  # a real, provisioned bucket that is not this queue's
    passwd = Path("/etc/passwd")
    passwd_before = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_mtime_ns)
    crafted: list[tuple[bytes, str]] = [
        (event_body(r.label, "cvmfs/nul\x00byte"), "NUL character"),
        (event_body(r.label, "cvmfs/" + "d" * 250 + "/" + ("e" * 200 + "/") * 20 + "f"),
         "exceeds 4096 bytes"),
        (event_body(r.label, "/etc/passwd"), ""),  # outside the prefix: ignored, not DLQ
        (event_body(other.label, "cvmfs/x"), "foreign bucket"),
        (event_body(r.label, "cvmfs/x", name="ObjectTagging:Put"), "unknown eventName"),
        (b"{not json", "not JSON"),
        (b'{"Event": "s3:TestEvent", "Bucket": "x"}', "no 'Records' list"),
        (b'{"hello": "world"}', "no 'Records' list"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}', "no 'bucket'"),
    ]
    staging_root = env.staging_dir / r.repository
    with running(env.cfg, r.label, other.label):
        before = tree_snapshot(tmp_path, [staging_root, Path(env.cfg.log.dir),
                                          Path(env.cfg.status.dir)])
        for key, _ in UNSAFE_UPLOADS:
            env.put(r, key, b"hostile")
        # A symlink, then a key through it (s3fs's symlink convention).
        env.put(r, "cvmfs/evil", b"/etc", Metadata={"mode": "41471"})
        env.wait_staged(r, {"evil": State("symlink", 0o777, target="/etc")})
        env.put(r, "cvmfs/evil/passwd", b"root::0:0::/root:/bin/sh\n")
        env.put(r, "cvmfs/evil/sub/deeper", b"x")
        # Symlinks whose body cannot be a target.
        env.put(r, "cvmfs/badlink", b"a\nb", Metadata={"mode": "41471"})
        env.put(r, "cvmfs/longlink.rclonelink", b"t" * 5000)
        # A symlink replaced by a file and back: each step is a plain change of one path.
        env.put(r, "cvmfs/flip", b"target-one", Metadata={"mode": "41471"})
        env.put(r, "cvmfs/flip", b"now a file")
        env.put(r, "cvmfs/flip", b"../target-two", Metadata={"mode": "41471"})
        publish(env.cfg, r.label, [body for body, _ in crafted])

        expected_reasons = ([why for _, why in UNSAFE_UPLOADS]
                            + ["goes through 'evil', which is a symlink to '/etc'"] * 2
                            + ["control character U+000A in symlink target",
                               "a target is at most 4095 bytes"]
                            + [why for _, why in crafted if why])
        got = wait_until_dead(env, len(expected_reasons))
        env.wait_staged(r, {"evil": State("symlink", 0o777, target="/etc"),
                            "flip": State("symlink", 0o777, target="../target-two")},
                        exact=True)
        wait_until("queue drained", lambda: queue_counts(env.cfg, r.label)[0] == 0
                   and unacked(env, r.label) == 0, 20)
        after = tree_snapshot(tmp_path, [staging_root, Path(env.cfg.log.dir),
                                         Path(env.cfg.status.dir)])
    status = env.status()  # the final document, flushed when the daemon stopped

    reasons = [str(h.get("x-error", "")) for h, _ in got]
    for why in expected_reasons:
        match = [x for x in reasons if why in x]
        assert match, f"no dead letter saying {why!r}; got {reasons}"
        reasons.remove(match[0])
    assert reasons == [], f"unexpected dead letters: {reasons}"
    for headers, _ in got:
        assert headers["x-original-queue"] == r.label
        assert headers["x-daemon"] == "cvmfs-repo-consumers"
    assert dead_letters(env.cfg) == [], "more dead letters than hostile messages"
    # One log line per dead letter, with repository, key and reason.
    lines = [x for x in env.log_text().splitlines() if "outcome=dead-lettered" in x]
    assert len(lines) == len(expected_reasons)
    assert all(f"repository={r.repository} key=" in x and " reason=" in x for x in lines)
    assert any('key="cvmfs/../../etc/passwd"' in x for x in lines)
    assert any('key="cvmfs/new\\nline"' in x for x in lines), "control characters escaped"
    assert status["repositories"][r.repository]["dead_lettered"] == len(expected_reasons)
    # Nothing written anywhere else: not in the other repository, not in the test's
    # tree, not in /etc; staging holds no symlink and no file named by a key.
    assert before == after, f"written outside staging: {sorted(set(after) ^ set(before))[:5]}"
    assert not (env.staging_dir / other.repository / "pending").exists() or not any(
        (env.staging_dir / other.repository / "pending").iterdir())
    assert (hashlib.sha256(passwd.read_bytes()).hexdigest(),
            passwd.stat().st_mtime_ns) == passwd_before
    for dirpath, dirnames, filenames in os.walk(staging_root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            assert not p.is_symlink(), f"{p} is a symlink"
            assert name not in ("passwd", "shadow", "evil", "deeper"), f"{p} named by a key"


def wait_until_dead(env: Env, n: int, timeout: float = 30.0) -> list[tuple[dict, bytes]]:
    got: list[tuple[dict, bytes]] = []

    def check() -> bool:
        got.extend(dead_letters(env.cfg))
        return len(got) >= n
    wait_until(f"{n} dead letters", check, timeout, 0.2)
    return got
