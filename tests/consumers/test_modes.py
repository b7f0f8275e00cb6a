"""modes.py: file mode / symlink decision (DESIGN §2, shared/s3-clients/README.md)."""

from __future__ import annotations

import re

import pytest

from cvmfs_publisher.core.errors import Permanent
from cvmfs_publisher.pipeline.modes import BadSymlinkTarget, Decision, decide, valid_symlink_target
from cvmfs_publisher.pipeline.object_keys import UnsafeKey

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None

ELF = b"\x7fELF\x02\x01\x01\x00"
SCRIPT = b"#!/bin/sh\necho hi\n"
TEXT = b"hello\n"

# Full metadata as each client leaves it (s3-clients/README.md), boto3 style.
RCLONE_EXTRA = {"mtime": "1732590000.123", "atime": "1732590000.1", "btime": "1732590000",
                "uid": "1000", "gid": "1000"}
S3CMD_ATTRS = ("atime:1732590000/ctime:1732590000/gid:0/gname:root/md5:0123456789abcdef"
               "/mode:{}/mtime:1732590000/uid:0/uname:root")


# --- the measured client table ------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "head", "key", "expected"),
    [
        # s3fs-fuse: decimal full st_mode
        ({"mode": "33261"}, TEXT, "cvmfs/bin/tool", Decision("file", 0o755, "s3fs")),
        ({"mode": "33184"}, TEXT, "cvmfs/plain.txt", Decision("file", 0o644, "s3fs")),
        ({"mode": "33188"}, ELF, "cvmfs/lib.so", Decision("file", 0o644, "s3fs")),  # metadata wins
        ({"mode": "41471"}, b"bin/tool", "cvmfs/link", Decision("symlink", 0o777, "s3fs")),
        # rclone: octal full st_mode, symlinks by suffix
        ({"mode": "100755", **RCLONE_EXTRA}, TEXT, "cvmfs/bin/tool",
         Decision("file", 0o755, "rclone")),
        ({"mode": "100640", **RCLONE_EXTRA}, TEXT, "cvmfs/plain.txt",
         Decision("file", 0o644, "rclone")),
        ({"mode": "120777", **RCLONE_EXTRA}, b"bin/tool", "cvmfs/link.rclonelink",
         Decision("symlink", 0o777, "rclone")),
        ({}, b"bin/tool", "cvmfs/link.rclonelink", Decision("symlink", 0o777, "rclone")),
        ({"mode": "120777"}, b"bin/tool", "cvmfs/link", Decision("symlink", 0o777, "rclone")),
        # s3cmd: s3cmd-attrs mode: field, decimal
        ({"s3cmd-attrs": S3CMD_ATTRS.format(33261)}, TEXT, "cvmfs/bin/tool",
         Decision("file", 0o755, "s3cmd")),
        ({"s3cmd-attrs": S3CMD_ATTRS.format(33184)}, ELF, "cvmfs/plain.txt",
         Decision("file", 0o644, "s3cmd")),
        # AWS CLI, web UIs, boto3: no metadata, content decides
        ({}, ELF, "cvmfs/bin/prog", Decision("file", 0o755, "content")),
        ({}, SCRIPT, "cvmfs/bin/tool", Decision("file", 0o755, "content")),
        ({}, TEXT, "cvmfs/plain.txt", Decision("file", 0o644, "default")),
        ({}, b"", "cvmfs/empty", Decision("file", 0o644, "default")),
        ({}, b"\x7fEL", "cvmfs/short", Decision("file", 0o644, "default")),
        ({}, b"#", "cvmfs/hash", Decision("file", 0o644, "default")),
        ({}, b" #!/bin/sh", "cvmfs/indented", Decision("file", 0o644, "default")),
        ({"foo": "bar"}, SCRIPT, "cvmfs/x", Decision("file", 0o755, "content")),
        # a hand-set mode
        ({"mode": "755"}, TEXT, "cvmfs/x", Decision("file", 0o755, "manual")),
        ({"mode": "0755"}, TEXT, "cvmfs/x", Decision("file", 0o755, "manual")),
        ({"mode": "644"}, ELF, "cvmfs/x", Decision("file", 0o644, "manual")),
        ({"mode": "0700"}, TEXT, "cvmfs/x", Decision("file", 0o755, "manual")),
        ({"mode": "0600"}, TEXT, "cvmfs/x", Decision("file", 0o644, "manual")),
        ({"mode": " 0755 "}, TEXT, "cvmfs/x", Decision("file", 0o755, "manual")),
        ({"Mode": "33261"}, TEXT, "cvmfs/x", Decision("file", 0o755, "s3fs")),
    ],
)
def test_client_table(metadata: dict[str, str], head: bytes, key: str,
                      expected: Decision) -> None:
    assert decide(metadata, head, key) == expected


def test_s3fs_directory_marker_mode_is_ignored() -> None:
    # 493 = 0o755 with no type bits (s3fs directory markers, which map_key skips).
    decision = decide({"mode": "493"}, SCRIPT, "cvmfs/bin")
    assert (decision.kind, decision.mode, decision.source) == ("file", 0o755, "content")
    assert "'493' ignored" in decision.note
    decision = decide({"mode": "16877"}, TEXT, "cvmfs/bin")  # 0o40755, S_IFDIR
    assert (decision.mode, decision.source) == (0o644, "default")
    assert "file type 0o40000" in decision.note


# --- never setuid, setgid, sticky or world-writable ---------------------------


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (str(0o104755), 0o755),  # s3fs setuid
        (str(0o102755), 0o755),  # setgid
        (str(0o101777), 0o755),  # sticky, world-writable
        (str(0o100777), 0o755),
        (str(0o100666), 0o644),
        (str(0o100002), 0o644),
        (str(0o107777), 0o755),
        (str(0o100000), 0o644),
        ("104755", 0o755),  # rclone
        ("107777", 0o755),
        ("100666", 0o644),
        ("100002", 0o644),
        ("106644", 0o644),
        ("4755", 0o755),  # by hand
        ("1777", 0o755),
        ("2644", 0o644),
        ("0666", 0o644),
        ("0777", 0o755),
        ("000", 0o644),
        ("0070", 0o644),  # group-x only: owner-x decides
        ("0100", 0o755),
    ],
)
def test_dangerous_bits_are_stripped(value: str, mode: int) -> None:
    decision = decide({"mode": value}, TEXT, "cvmfs/x")
    assert decision.kind == "file"
    assert decision.mode == mode
    assert decision.note == ""


def test_s3cmd_dangerous_bits_are_stripped() -> None:
    decision = decide({"s3cmd-attrs": S3CMD_ATTRS.format(0o106777)}, TEXT, "cvmfs/x")
    assert decision == Decision("file", 0o755, "s3cmd")


# --- invalid values fall back to content, with a note -------------------------


@pytest.mark.parametrize(
    "value",
    [
        "", " ", "abc", "-1", "+755", "0o755", "0x1ed", "7.5", "8", "99", "12",
        "800", "0999", "12345",  # no s3fs type bits
        "99999",  # bits above S_IFMT
        "16877",  # directory
        "040755", "130777", "109999", "1000000", "7777777", "100755x",
        "\u0661\u0660\u0660\u0667\u0665\u0665",  # Arabic-Indic digits: isdigit() is True
        "1" * 5000,  # longer than int()'s digit limit
    ],
)
def test_invalid_mode_values(value: str) -> None:
    for head, mode, source in ((SCRIPT, 0o755, "content"), (TEXT, 0o644, "default")):
        decision = decide({"mode": value}, head, "cvmfs/x")
        assert (decision.kind, decision.mode, decision.source) == ("file", mode, source)
        assert decision.note.startswith("mode ")
        assert "ignored" in decision.note
        assert len(decision.note) < 300


@pytest.mark.parametrize(
    "attrs",
    [
        "atime:1/uid:0",  # no mode field
        "mode:abc",
        "mode:",
        "mode:41471",  # s3cmd never uploads links as links: do not trust it
        "mode:16877",  # directory
        "mode:9999999",
        "garbage",
        "",
    ],
)
def test_invalid_s3cmd_attrs(attrs: str) -> None:
    decision = decide({"s3cmd-attrs": attrs}, TEXT, "cvmfs/x")
    assert (decision.kind, decision.mode, decision.source) == ("file", 0o644, "default")
    assert decision.note.startswith("s3cmd-attrs ")


def test_s3cmd_permissions_only() -> None:
    assert decide({"s3cmd-attrs": "mode:493"}, TEXT, "cvmfs/x") == Decision(
        "file", 0o755, "s3cmd"
    )


def test_mode_wins_over_s3cmd_attrs() -> None:
    metadata = {"mode": "33184", "s3cmd-attrs": S3CMD_ATTRS.format(33261)}
    assert decide(metadata, TEXT, "cvmfs/x") == Decision("file", 0o644, "s3fs")


def test_invalid_mode_falls_back_to_s3cmd_attrs() -> None:
    metadata = {"mode": "junk", "s3cmd-attrs": S3CMD_ATTRS.format(33261)}
    decision = decide(metadata, TEXT, "cvmfs/x")
    assert (decision.kind, decision.mode, decision.source) == ("file", 0o755, "s3cmd")
    assert "'junk' ignored" in decision.note


def test_rclonelink_suffix_wins_over_metadata() -> None:
    decision = decide({"mode": "100644"}, b"target", "cvmfs/x.rclonelink")
    assert (decision.kind, decision.mode, decision.source) == ("symlink", 0o777, "rclone")
    assert "ignored" in decision.note


def test_none_and_non_string_metadata() -> None:
    assert decide(None, SCRIPT, "cvmfs/x") == Decision("file", 0o755, "content")
    decision = decide({"mode": 33261}, TEXT, "cvmfs/x")  # type: ignore[dict-item]
    assert (decision.mode, decision.source) == (0o644, "default")
    assert "not a string" in decision.note


# --- symlink targets ----------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [b"bin/tool", b"/etc", b"../../../../etc/passwd", b"caf\xc3\xa9", b"a b", b"x" * 4095,
     b".", b"..", b"a//b/"],
)
def test_symlink_targets_accepted(target: bytes) -> None:
    # Targets are never followed by the publisher; CVMFS clients resolve them.
    assert valid_symlink_target(target) == target.decode()


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"", "empty"),
        (b"x" * 4096, "4096 bytes exceeds 4095"),
        (b"a\x00b", "NUL"),
        (b"a\nb", "U+000A"),
        (b"target\n", "U+000A"),
        (b"\x7f", "U+007F"),
        (b"\xc2\x85", "U+0085"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"\xed\xa0\x80", "not valid UTF-8"),  # an encoded surrogate
    ],
)
def test_symlink_targets_refused(target: bytes, reason: str) -> None:
    with pytest.raises(BadSymlinkTarget, match=re.escape(reason)) as info:
        valid_symlink_target(target)
    assert isinstance(info.value, UnsafeKey)
    assert isinstance(info.value, Permanent)


def test_symlink_target_types() -> None:
    assert valid_symlink_target(bytearray(b"a")) == "a"
    with pytest.raises(BadSymlinkTarget, match="not bytes"):
        valid_symlink_target("a")  # type: ignore[arg-type]


# --- property: only 0o755 / 0o644 / 0o777 ever come out -----------------------

if given is not None:
    _VALUES = st.one_of(
        st.text(max_size=12),
        st.integers(min_value=0, max_value=0o777777).map(str),
        st.integers(min_value=0, max_value=0o777777).map(lambda n: f"{n:o}"),
        st.integers(min_value=0, max_value=0o177777).map(lambda n: f"mode:{n}"),
    )

    @settings(max_examples=2000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(
        mode=_VALUES,
        attrs=_VALUES,
        head=st.binary(max_size=8),
        key=st.sampled_from(["cvmfs/x", "cvmfs/x.rclonelink", "cvmfs/x.tar"]),
        which=st.sampled_from(["mode", "attrs", "both", "none"]),
    )
    def test_property_modes(mode: str, attrs: str, head: bytes, key: str, which: str) -> None:
        metadata = {}
        if which in ("mode", "both"):
            metadata["mode"] = mode
        if which in ("attrs", "both"):
            metadata["s3cmd-attrs"] = attrs
        decision = decide(metadata, head, key)
        if decision.kind == "symlink":
            assert decision.mode == 0o777
        else:
            assert decision.kind == "file"
            assert decision.mode in (0o755, 0o644)
        assert decision.source in ("s3fs", "rclone", "s3cmd", "manual", "content", "default")
        if key.endswith(".rclonelink"):
            assert decision.kind == "symlink"
else:

    def test_property_needs_hypothesis() -> None:
        pytest.skip("hypothesis is not installed (test extra)")
