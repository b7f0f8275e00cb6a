"""object_keys.py: S3 object key -> safe repository path (DESIGN §2, §4)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cvmfs_publisher.core import tarballs
from cvmfs_publisher.core.errors import Permanent
from cvmfs_publisher.pipeline.object_keys import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    Target,
    UnsafeKey,
    map_key,
    safe_join,
    validate_path,
)

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None


# --- what is published -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("cvmfs/a.txt", "a.txt"),
        ("cvmfs/bin/tool", "bin/tool"),
        ("cvmfs/dir with space/a b.txt", "dir with space/a b.txt"),
        ("cvmfs/a+b.txt", "a+b.txt"),
        ("cvmfs/%2e%2e/x", "%2e%2e/x"),  # RGW keys are raw: no decoding by default
        ("cvmfs/caf\u00e9/\u65e5\u672c.txt", "caf\u00e9/\u65e5\u672c.txt"),
        ("cvmfs/a\\b", "a\\b"),  # backslash is an ordinary POSIX character
        ("cvmfs/..\\..\\etc", "..\\..\\etc"),
        ("cvmfs/.hidden", ".hidden"),
        ("cvmfs/.../x", ".../x"),  # "..." is a legal name, only "." and ".." are special
        ("cvmfs/a./b.", "a./b."),
        ("cvmfs/a..b", "a..b"),
        ("cvmfs/.CVMFSCATALOG", ".CVMFSCATALOG"),  # CVMFS names are case-sensitive
        ("cvmfs/x.cvmfscatalog", "x.cvmfscatalog"),
        ("cvmfs/cvmfs/a", "cvmfs/a"),
        ("cvmfs/a.tbz2", "a.tbz2"),  # only the suffixes of core.tarballs are ingested
        ("cvmfs/a.tar.zst", "a.tar.zst"),
        ("cvmfs/A.TAR", "A.TAR"),  # suffixes are case-sensitive
        ("cvmfs/a.tar.gz.txt", "a.tar.gz.txt"),
        ("cvmfs/\u200b", "\u200b"),  # format characters are not control characters
    ],
)
def test_plain_files(key: str, path: str) -> None:
    assert map_key(key) == Target("file", path, key)


@pytest.mark.parametrize(
    "key",
    [
        "other/a.txt",
        "cvmfsx/a.txt",
        "cvmfs",
        "/cvmfs/a.txt",
        "CVMFS/a.txt",
        "",
        "cvmfs/",  # the prefix itself
        "cvmfs/bin/",  # s3fs / web UI directory markers
        "cvmfs/a/b/",
        "cvmfs//",
        "cvmfs/../",  # a marker writes nothing, whatever its name
        "other/../\x00",  # not ours: not even looked at
    ],
)
def test_ignored_keys(key: str) -> None:
    assert map_key(key) is None


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("cvmfs/pkg/foo-1.0.tar.gz", "software/pkg/foo-1.0"),
        ("cvmfs/foo.tgz", "software/foo"),
        ("cvmfs/foo.tar", "software/foo"),
        ("cvmfs/foo.tar.bz2", "software/foo"),
        ("cvmfs/pkg/foo-2.0.tar.xz", "software/pkg/foo-2.0"),
        ("cvmfs/a/b/c.d.tar", "software/a/b/c.d"),
        ("cvmfs/software/foo.tar", "software/software/foo"),
        ("cvmfs/x.tar.tar", "software/x.tar"),
    ],
)
def test_tarballs(key: str, path: str) -> None:
    assert map_key(key) == Target("tarball", path, key)


@pytest.mark.parametrize(
    ("tarball_dir", "path"),
    [("sw/ingest", "sw/ingest/foo"), ("/sw/", "sw/foo"), ("", "foo"), ("/", "foo")],
)
def test_tarball_dir(tarball_dir: str, path: str) -> None:
    target = map_key("cvmfs/foo.tgz", tarball_dir=tarball_dir)
    assert target == Target("tarball", path, "cvmfs/foo.tgz")


@pytest.mark.parametrize("tarball_dir", ["../x", "a/../../b", "a//b", ".", "a/\x00", ".cvmfs"])
def test_bad_tarball_dir_is_a_configuration_error(tarball_dir: str) -> None:
    # ValueError, not Permanent: a bad configuration must not dead-letter events.
    with pytest.raises(ValueError, match="tarball_dir") as info:
        map_key("cvmfs/foo.tar", tarball_dir=tarball_dir)
    assert not isinstance(info.value, Permanent)
    # Plain files do not depend on it.
    assert map_key("cvmfs/foo.txt", tarball_dir=tarball_dir) is not None


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("cvmfs/link.rclonelink", "link"),
        ("cvmfs/bin/tool.rclonelink", "bin/tool"),
        ("cvmfs/a.tar.rclonelink", "a.tar"),  # a link named like a tarball is a link
        ("cvmfs/x.rclonelink.rclonelink", "x.rclonelink"),
    ],
)
def test_rclone_links(key: str, path: str) -> None:
    assert map_key(key) == Target("symlink-rclone", path, key)


def test_custom_and_empty_prefix() -> None:
    assert map_key("data/a", prefix="data/") == Target("file", "a", "data/a")
    assert map_key("cvmfs/a", prefix="data/") is None
    assert map_key("a/b", prefix="") == Target("file", "a/b", "a/b")
    with pytest.raises(UnsafeKey):
        map_key("../a", prefix="")


# --- what is refused ---------------------------------------------------------

LONG_NAME = "x" * (MAX_COMPONENT_BYTES + 1)
LONG_UTF8 = "\u00e9" * 128  # 128 characters, 256 bytes
LONG_PATH = "/".join(["d" * 200] * 21)  # 4220 bytes


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("cvmfs/../etc/passwd", "'..' path component"),
        ("cvmfs/a/../../b", "'..' path component"),
        ("cvmfs/a/..", "'..' path component"),
        ("cvmfs/..", "'..' path component"),
        ("cvmfs/a/.", "'.' path component"),
        ("cvmfs/./a", "'.' path component"),
        ("cvmfs/.", "'.' path component"),
        ("cvmfs/a/./b", "'.' path component"),
        ("cvmfs/a//b", "empty path component"),
        ("cvmfs//etc/passwd", "absolute path"),
        ("cvmfs/a\x00b", "NUL character"),
        ("cvmfs/\x00", "NUL character"),
        ("cvmfs/a\nb", "control character U+000A"),
        ("cvmfs/a\rb", "control character U+000D"),
        ("cvmfs/a\tb", "control character U+0009"),
        ("cvmfs/a\x1bb", "control character U+001B"),
        ("cvmfs/a\x7fb", "control character U+007F"),
        ("cvmfs/a\x85b", "control character U+0085"),
        ("cvmfs/a\x9fb", "control character U+009F"),
        ("cvmfs/" + LONG_NAME, "component of 256 bytes"),
        ("cvmfs/a/" + LONG_UTF8 + "/b", "component of 256 bytes"),
        ("cvmfs/" + LONG_PATH, "path of 4220 bytes"),
        ("cvmfs/\ud800", "not valid UTF-8"),
        ("cvmfs/.cvmfscatalog", "reserved CernVM-FS name"),
        ("cvmfs/deep/dir/.cvmfscatalog", "reserved CernVM-FS name"),
        ("cvmfs/.cvmfsdirtab", "reserved CernVM-FS name"),
        ("cvmfs/a/.cvmfsautocatalog", "reserved CernVM-FS name"),
        ("cvmfs/.cvmfs/x", "reserved CernVM-FS name"),
        ("cvmfs/.cvmfscatalog.rclonelink", "reserved CernVM-FS name"),
        # Suffix stripping must not create "", "." or "..".
        ("cvmfs/.tar", "nothing before the tarball suffix"),
        ("cvmfs/a/.tar.gz", "nothing before the tarball suffix"),
        ("cvmfs/.rclonelink", "nothing before the symlink-rclone suffix"),
        ("cvmfs/..tar", "'.' path component"),
        ("cvmfs/...tar", "'..' path component"),
        ("cvmfs/a/...rclonelink", "'..' path component"),
        ("cvmfs/..tgz", "'.' path component"),
        ("cvmfs/.cvmfscatalog.tar", "reserved CernVM-FS name"),
    ],
)
def test_unsafe_keys(key: str, reason: str) -> None:
    with pytest.raises(UnsafeKey, match=re.escape(reason)) as info:
        map_key(key)
    assert isinstance(info.value, Permanent)
    message = str(info.value)
    # One clear log line: bounded, no raw control characters.
    assert len(message) < 400
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in message)


def test_limits_are_inclusive() -> None:
    name = "x" * MAX_COMPONENT_BYTES
    assert map_key("cvmfs/" + name).path == name
    utf8 = "\u00e9" * 127 + "e"  # 255 bytes
    assert map_key("cvmfs/" + utf8).path == utf8
    path = "/".join(["d" * 255] * 15 + ["d" * 254, "x"])  # 3825 + 254 + 1 + 16 slashes
    assert len(path.encode()) == MAX_PATH_BYTES
    assert map_key("cvmfs/" + path).path == path
    with pytest.raises(UnsafeKey, match="path of 4097 bytes"):
        map_key("cvmfs/" + path + "y")


def test_tarball_path_limit_counts_the_ingest_dir() -> None:
    stem = "/".join(["d" * 255] * 15) + "/" + "e" * 250  # 4090 bytes: fine as a key
    assert map_key("cvmfs/" + stem + ".txt") is not None
    with pytest.raises(UnsafeKey, match=r"tarball.*path of 4099 bytes"):
        map_key("cvmfs/" + stem + ".tar")


def test_non_string_key() -> None:
    with pytest.raises(UnsafeKey, match="not a string"):
        map_key(b"cvmfs/a")  # type: ignore[arg-type]


def test_long_hostile_key_message_is_bounded() -> None:
    key = "cvmfs/" + "\x01" * 100_000
    with pytest.raises(UnsafeKey) as info:
        map_key(key)
    assert len(str(info.value)) < 400


# --- URL decoding (AWS) ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "decoded_key", "path"),
    [
        ("cvmfs/a+b%2Bc.txt", "cvmfs/a b+c.txt", "a b+c.txt"),
        ("cvmfs/caf%C3%A9", "cvmfs/caf\u00e9", "caf\u00e9"),
        ("cvmfs%2Fa", "cvmfs/a", "a"),
        ("cvmfs/%252e%252e/x", "cvmfs/%2e%2e/x", "%2e%2e/x"),  # decoded exactly once
        ("cvmfs/plain", "cvmfs/plain", "plain"),
    ],
)
def test_decode(key: str, decoded_key: str, path: str) -> None:
    target = map_key(key, decode=True)
    assert target is not None
    assert target.path == path
    assert target.key == decoded_key  # the real S3 key, for GET/HEAD


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("cvmfs/%2e%2e/etc/passwd", "'..'"),
        ("cvmfs/a%2F%2Fb", "empty path component"),
        ("cvmfs/%2Fetc", "absolute path"),
        ("cvmfs/a%00b", "NUL"),
        ("cvmfs/a%0Ab", "U+000A"),
        ("cvmfs/%C2%85", "U+0085"),
        ("cvmfs/%FF", "not valid UTF-8"),
        ("cvmfs/%C3", "not valid UTF-8"),
        ("cvmfs/%2Ecvmfscatalog", "reserved"),
    ],
)
def test_decode_then_check(key: str, reason: str) -> None:
    with pytest.raises(UnsafeKey, match=re.escape(reason)):
        map_key(key, decode=True)


def test_decoded_directory_marker_and_prefix() -> None:
    assert map_key("cvmfs/bin%2F", decode=True) is None
    assert map_key("other%2Fa", decode=True) is None


# --- validate_path / safe_join ----------------------------------------------


def test_validate_path() -> None:
    assert validate_path("a/b") == "a/b"
    for bad in ("", "/a", "a/", "a//b", "..", "a/./b", "a\x00", ".cvmfsdirtab"):
        with pytest.raises(UnsafeKey):
            validate_path(bad)
    with pytest.raises(UnsafeKey, match="not a string"):
        validate_path(None)  # type: ignore[arg-type]


def test_safe_join(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b c/d") == tmp_path / "a" / "b c" / "d"
    assert safe_join(tmp_path, "a\\..\\b") == tmp_path / "a\\..\\b"
    rel_root = Path("staging/repo")
    assert safe_join(rel_root, "x") == Path("staging/repo/x")


@pytest.mark.parametrize(
    "rel", ["..", "../x", "a/../../x", "/etc/passwd", "", "a//b", ".", "./a", "a/", "a\x00"]
)
def test_safe_join_refuses(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UnsafeKey):
        safe_join(tmp_path, rel)


def test_safe_join_does_not_touch_the_file_system(tmp_path: Path) -> None:
    # A symlink inside the root is not resolved here (staging uses O_NOFOLLOW).
    (tmp_path / "evil").symlink_to("/etc")
    assert safe_join(tmp_path, "evil/passwd") == tmp_path / "evil" / "passwd"


# --- properties --------------------------------------------------------------


def _assert_contained(path: str) -> None:
    assert path
    assert not path.startswith("/")
    parts = path.split("/")
    assert all(part not in ("", ".", "..") for part in parts)
    assert all(len(part.encode()) <= MAX_COMPONENT_BYTES for part in parts)
    assert len(path.encode()) <= MAX_PATH_BYTES
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in path)
    assert not any(part.startswith(".cvmfs") for part in parts)
    root = "/data/cvmfs/repo"
    full = os.path.normpath(os.path.join(root, path))
    assert full.startswith(root + "/")


if given is not None:
    _ALPHABET = st.sampled_from(
        ["/", ".", "..", "a", "\u00e9", "\\", " ", "%", "+", "%2e", "%2F", "%00", "\x00",
         "\n", "\x7f", "\x85", ".tar", ".tgz", ".tar.gz", ".rclonelink", ".cvmfs", "~",
         "\ud800", "x" * 130]
    )
    _KEYS = st.lists(_ALPHABET, max_size=40).map("".join)

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(
        rest=_KEYS,
        raw=st.text(max_size=60),
        decode=st.booleans(),
        tarball_dir=st.sampled_from(["software", "sw/ingest", ""]),
    )
    def test_property_never_escapes(rest: str, raw: str, decode: bool, tarball_dir: str) -> None:
        for key in ("cvmfs/" + rest, "cvmfs/" + raw, rest):
            try:
                target = map_key(key, tarball_dir=tarball_dir, decode=decode)
            except UnsafeKey:
                continue
            if target is None:
                continue
            _assert_contained(target.path)
            assert safe_join(Path("/data/cvmfs/repo"), target.path)
            if target.kind == "tarball" and tarball_dir:
                assert target.path.startswith(tarball_dir + "/")

    _SAFE_NAME = st.text(
        alphabet=st.characters(
            blacklist_categories=("Cc", "Cs"), blacklist_characters="/"
        ),
        min_size=1,
        max_size=20,
    ).filter(
        lambda s: s not in (".", "..")
        and not s.startswith(".cvmfs")
        and not s.endswith((*tarballs.SUFFIXES, ".rclonelink"))
    )

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(parts=st.lists(_SAFE_NAME, min_size=1, max_size=8))
    def test_property_safe_paths_round_trip(parts: list[str]) -> None:
        path = "/".join(parts)
        assert map_key("cvmfs/" + path) == Target("file", path, "cvmfs/" + path)
else:

    def test_property_needs_hypothesis() -> None:
        pytest.skip("hypothesis is not installed (test extra)")
