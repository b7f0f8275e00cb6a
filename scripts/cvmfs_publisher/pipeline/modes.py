"""File mode / symlink decision from S3 object metadata (DESIGN §2).

S3 has no file modes; each client encodes them its own way (measured in
``shared/s3-clients/README.md``). One rule reads all of them:

- ``mode`` (``x-amz-meta-mode``), digits only:
  - at most 5 digits, decimal, with the S_IFREG or S_IFLNK type bits and
    nothing above ``S_IFMT``: a full ``st_mode`` as s3fs writes it
    (``33261`` = 0o100755, ``41471`` = 0o120777, a symlink);
  - 6 digits starting with ``10`` or ``12``, octal: a full ``st_mode`` as
    rclone writes it (``100755``, ``120777``);
  - 3 or 4 octal digits: permissions set by hand (``755``, ``0644``);
  - anything else (s3fs's ``493`` on directory markers, ``16877`` for a
    directory, garbage) is ignored with a note for the log line.
- ``s3cmd-attrs``: its ``mode:`` field, a decimal ``st_mode``. s3cmd never
  uploads symlinks as links, so only regular-file (or type-less) values
  are trusted there.
- otherwise (AWS CLI, web UIs, boto3: the common case) the content
  decides: an ELF header or a ``#!`` line makes an executable.

Whatever the source says, only two file modes reach the repository: 0o755
when the owner execute bit is set, 0o644 otherwise. CVMFS content is
world-readable by nature, and setuid, setgid, sticky and world-writable
bits from untrusted metadata must never be published.

A symlink's object body is its target: :func:`valid_symlink_target`
checks that it can be stored as one. The target itself is not resolved
(CVMFS clients do that, and it may legitimately be absolute); the publisher
never follows it when writing.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from .object_keys import RCLONE_SUFFIX, UnsafeKey

FILE = "file"
SYMLINK = "symlink"
EXECUTABLE = 0o755
REGULAR = 0o644
LINK = 0o777
MAX_TARGET_BYTES = 4095  # PATH_MAX minus the terminating NUL

_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() accepts other scripts
_OCTAL = re.compile(r"[0-7]+")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_EXEC_MAGIC = (b"\x7fELF", b"#!")
_MAX_SHOWN = 40


class BadSymlinkTarget(UnsafeKey):
    """A symlink object whose body cannot be a link target.

    A subclass of UnsafeKey (hence Permanent): the object is not published,
    exactly like an unsafe key.
    """


@dataclass(frozen=True)
class Decision:
    """What to create for one object.

    ``kind`` is ``"file"`` or ``"symlink"``; ``mode`` is 0o755 or 0o644 for
    files and 0o777 for symlinks; ``source`` says which convention decided
    (``"s3fs"``, ``"rclone"``, ``"s3cmd"``, ``"manual"``, ``"content"``,
    ``"default"``) for log lines; ``note`` explains metadata that was
    present but ignored (empty when nothing was), so the caller can log it.
    """

    kind: str
    mode: int
    source: str
    note: str = ""


class _Ignored(ValueError):
    """A metadata value that does not follow any known convention."""


def _shown(value: str) -> str:
    return repr(value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "...")


def _file_mode(perms: int) -> int:
    """Only 0o755 or 0o644: never setuid/setgid/sticky/world-writable."""
    return EXECUTABLE if perms & stat.S_IXUSR else REGULAR


def _from_st_mode(st_mode: int, source: str) -> Decision:
    if stat.S_IFMT(st_mode) == stat.S_IFLNK:
        return Decision(SYMLINK, LINK, source)
    return Decision(FILE, _file_mode(st_mode), source)


def parse_mode(value: str) -> Decision:
    """Read an ``x-amz-meta-mode`` value (s3fs, rclone or by hand).

    Raises ValueError (its message is the reason) when the value follows
    no convention.
    """
    if not isinstance(value, str):
        raise _Ignored(f"not a string ({type(value).__name__})")
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        raise _Ignored("not a number")
    if len(text) > 6:  # no convention is longer; also keeps int() cheap
        raise _Ignored("too many digits")
    number = int(text, 10)
    file_type = stat.S_IFMT(number) if number <= 0o177777 else -1
    if len(text) <= 5 and file_type in (stat.S_IFREG, stat.S_IFLNK):
        return _from_st_mode(number, "s3fs")
    if len(text) == 6 and text[:2] in ("10", "12") and _OCTAL.fullmatch(text):
        return _from_st_mode(int(text, 8), "rclone")
    if len(text) in (3, 4) and _OCTAL.fullmatch(text):
        return Decision(FILE, _file_mode(int(text, 8)), "manual")
    if len(text) == 5 and file_type > 0:
        # s3fs's directories (16877) and other non-file objects.
        raise _Ignored(f"s3fs st_mode of file type 0o{file_type:o}, not a file or symlink")
    raise _Ignored("no known convention (s3fs decimal, rclone octal, 3-4 octal digits)")


def parse_s3cmd_attrs(value: str) -> Decision:
    """Read the ``mode:`` field of s3cmd's ``s3cmd-attrs`` (decimal st_mode)."""
    if not isinstance(value, str):
        raise _Ignored(f"not a string ({type(value).__name__})")
    fields = dict(part.partition(":")[::2] for part in value.split("/"))
    if "mode" not in fields:
        raise _Ignored("no mode field")
    text = fields["mode"].strip()
    if not _DIGITS.fullmatch(text) or len(text) > 6:
        raise _Ignored(f"mode field {_shown(text)} is not a decimal st_mode")
    number = int(text, 10)
    if number > 0o177777 or stat.S_IFMT(number) not in (0, stat.S_IFREG):
        # s3cmd skips or follows symlinks: a link type here is not to be trusted.
        raise _Ignored(f"mode field {text} is not a regular file's st_mode")
    return Decision(FILE, _file_mode(number), "s3cmd")


def decide(metadata: Mapping[str, str] | None, head: bytes, key: str) -> Decision:
    """Decide what the object becomes from its user metadata and first bytes.

    ``metadata`` is boto3's ``head_object()["Metadata"]`` (names without
    ``x-amz-meta-``); ``head`` holds at least the first 4 bytes of the body
    when there are that many; ``key`` is the S3 key. A ``.rclonelink`` key
    is a symlink whatever its metadata says, so that this agrees with
    :func:`cvmfs_publisher.pipeline.object_keys.map_key`.
    """
    meta = {str(name).lower(): value for name, value in (metadata or {}).items()}
    notes: list[str] = []
    if key.endswith(RCLONE_SUFFIX):
        mode = meta.get("mode")
        if mode is not None and str(mode).strip() != "120777":
            notes.append(f"mode {_shown(str(mode))} ignored: {RCLONE_SUFFIX} key is a symlink")
        return Decision(SYMLINK, LINK, "rclone", "; ".join(notes))
    for name, parse in (("mode", parse_mode), ("s3cmd-attrs", parse_s3cmd_attrs)):
        if name not in meta:
            continue
        try:
            decision = parse(meta[name])
        except _Ignored as exc:
            notes.append(f"{name} {_shown(str(meta[name]))} ignored: {exc}")
            continue
        return Decision(decision.kind, decision.mode, decision.source, "; ".join(notes))
    if head.startswith(_EXEC_MAGIC):
        return Decision(FILE, EXECUTABLE, "content", "; ".join(notes))
    return Decision(FILE, REGULAR, "default", "; ".join(notes))


def valid_symlink_target(target: bytes) -> str:
    """Return a symlink object's body as a link target, or raise BadSymlinkTarget.

    The target may be relative or absolute and may point anywhere: CVMFS
    clients resolve it on their side and the publisher never follows it.
    It must only be storable: non-empty, UTF-8, no NUL or control
    characters, at most 4095 bytes.
    """
    if not isinstance(target, bytes | bytearray | memoryview):
        raise BadSymlinkTarget(f"symlink target is not bytes: {type(target).__name__}")
    raw = bytes(target)
    if not raw:
        raise BadSymlinkTarget("empty symlink target")
    if len(raw) > MAX_TARGET_BYTES:
        raise BadSymlinkTarget(
            f"symlink target of {len(raw)} bytes exceeds {MAX_TARGET_BYTES} bytes"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSymlinkTarget("symlink target is not valid UTF-8") from None
    match = _CONTROL.search(text)
    if match:
        what = "NUL" if match.group() == "\x00" else f"control character U+{ord(match.group()):04X}"
        raise BadSymlinkTarget(f"{what} in symlink target {_shown(text)}")
    return text
