"""S3 object key -> safe repository path (DESIGN §2 "Key to path", §4).

Object keys are chosen by users and arrive in event records that anyone with
write access to a bucket can shape, so they are untrusted. A key becomes a
repository path only if it is a plain relative POSIX path that cannot name
anything outside the repository, whatever directory it is later joined to:

- no ``..``, ``.`` or empty components (``a//b``), not absolute;
- no control characters: C0 (including NUL and newline), DEL and C1, which
  would break log lines, tools and the catalog;
- components of at most 255 bytes and paths of at most 4096 bytes (UTF-8),
  the Linux ``NAME_MAX``/``PATH_MAX``, so a write never fails half-way
  with ENAMETOOLONG;
- valid UTF-8 (CVMFS catalogs store UTF-8 names);
- no component whose name starts with ``.cvmfs`` (see below).

Backslashes, spaces, ``+``, ``%`` and non-ASCII letters are ordinary
characters on POSIX and are published as they are.

**Reserved names.** CernVM-FS gives meaning to files named ``.cvmfs...``:
``.cvmfscatalog`` (anywhere) makes its directory a nested catalog,
``.cvmfsautocatalog`` marks catalogs made by ``.cvmfsdirtab``, and
``.cvmfsdirtab`` at the root drives automatic catalog creation. Catalog
layout is the operator's business (it decides publish cost and client
behaviour for the whole repository), and ``cvmfs_server ingest`` places its
own markers in the tarball directories, which a user's delete event must not
remove. So any component starting with ``.cvmfs`` (case-sensitive, as
CernVM-FS is) is rejected at any depth: one simple rule that also covers
names CernVM-FS may reserve later.

This module is pure: it never touches the file system. Staging and applying
open every component with ``O_NOFOLLOW`` (symlinks from users are data);
:func:`safe_join` is only the lexical half of that protection.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_plus

from ..core import tarballs
from ..core.errors import Permanent

MAX_COMPONENT_BYTES = 255  # NAME_MAX
MAX_PATH_BYTES = 4096  # PATH_MAX
RESERVED_PREFIX = ".cvmfs"
RCLONE_SUFFIX = ".rclonelink"

FILE = "file"
SYMLINK_RCLONE = "symlink-rclone"
TARBALL = "tarball"

# C0 controls (NUL, TAB, LF, ...), DEL and the C1 block (U+0080-U+009F).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_MAX_SHOWN = 120  # characters of a hostile key's repr quoted in an error message


class UnsafeKey(Permanent):
    """A key (or symlink target) that must never become a repository path."""


@dataclass(frozen=True)
class Target:
    """Where an object goes in the repository.

    ``kind`` is ``"file"``, ``"symlink-rclone"`` (the object body is the
    link target; the ``.rclonelink`` suffix is not part of ``path``) or
    ``"tarball"`` (``path`` is the ingest directory). ``path`` is relative,
    POSIX, without a leading slash, and passed :func:`validate_path`.
    ``key`` is the real S3 object key (URL-decoded when decoding is
    configured): the one to use for HEAD/GET.
    """

    kind: str
    path: str
    key: str


def _shown(text: str) -> str:
    """A bounded, single-line rendering of untrusted text for messages."""
    shown = repr(text)  # escapes control characters: one log line stays one line
    if len(shown) > _MAX_SHOWN:
        return f"{shown[:_MAX_SHOWN]}... ({len(text)} characters)"
    return shown


def _problem(rel: str) -> str:
    """Why ``rel`` is not a safe relative repository path ("" when it is)."""
    if not rel:
        return "empty path"
    if "\x00" in rel:
        return "NUL character"
    match = _CONTROL.search(rel)
    if match:
        return f"control character U+{ord(match.group()):04X}"
    try:
        size = len(rel.encode("utf-8"))
    except UnicodeEncodeError:
        # Only lone surrogates get here (e.g. "\ud800" from a JSON escape).
        return "not valid UTF-8"
    if rel.startswith("/"):
        return "absolute path"
    if size > MAX_PATH_BYTES:
        return f"path of {size} bytes exceeds {MAX_PATH_BYTES} bytes"
    for part in rel.split("/"):
        if part == "":
            return "empty path component"
        if part in (".", ".."):
            return f"{part!r} path component"
        part_size = len(part.encode("utf-8"))
        if part_size > MAX_COMPONENT_BYTES:
            return f"path component of {part_size} bytes exceeds {MAX_COMPONENT_BYTES} bytes"
        if part.startswith(RESERVED_PREFIX):
            return f"reserved CernVM-FS name {_shown(part)}"
    return ""


def validate_path(rel: str) -> str:
    """Return ``rel`` if it is a safe relative repository path, else raise UnsafeKey.

    Public so that code which gets paths from elsewhere (reconciliation
    listings, staged records read back from disk) applies the same rule.
    """
    if not isinstance(rel, str):
        raise UnsafeKey(f"path is not a string: {type(rel).__name__}")
    problem = _problem(rel)
    if problem:
        raise UnsafeKey(f"unsafe path {_shown(rel)}: {problem}")
    return rel


def _tarball_base(tarball_dir: str) -> str:
    """The configured ingest root, normalised; a bad value is a bug, not bad input."""
    base = tarball_dir.strip("/")
    if not base:
        return ""
    problem = _problem(base)
    if problem:
        # ValueError, not Permanent: a wrong configuration must not dead-letter
        # every tarball event; the handler treats it as a bug (retried).
        raise ValueError(f"cvmfs.tarball_dir {tarball_dir!r} is unsafe: {problem}")
    return base


def map_key(
    key: str, prefix: str = "cvmfs/", tarball_dir: str = "software", decode: bool = False
) -> Target | None:
    """Map an S3 object key to its place in the repository.

    Returns None for what is not ours to publish and harmless to skip (the
    caller logs a debug line): keys outside ``prefix``, the prefix itself,
    and directory markers (``.../``: repository directories are created
    from the files in them). Raises UnsafeKey, with the reason, for keys
    that must not be published (module docstring). ``decode`` URL-decodes
    the key once, AWS style (``+`` is a space), before anything else; RGW
    sends raw keys, so it is off by default. Invalid percent-encoded UTF-8
    is rejected rather than replaced, so two keys never map to one path.
    """
    if not isinstance(key, str):
        raise UnsafeKey(f"object key is not a string: {type(key).__name__}")
    if decode:
        try:
            key = unquote_plus(key, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            raise UnsafeKey(f"URL-decoded key {_shown(key)} is not valid UTF-8") from None
    if not key.startswith(prefix):
        return None
    rel = key[len(prefix):]
    if not rel or rel.endswith("/"):
        return None
    problem = _problem(rel)
    if problem:
        raise UnsafeKey(f"unsafe object key {_shown(key)}: {problem}")

    kind, path = FILE, rel
    if rel.endswith(RCLONE_SUFFIX):
        kind, path = SYMLINK_RCLONE, rel[: -len(RCLONE_SUFFIX)]
    else:
        stem = tarballs.split(rel)
        if stem is not None:
            base = _tarball_base(tarball_dir)
            kind, path = TARBALL, f"{base}/{stem}" if base else stem
    if kind != FILE:
        if not path or path.endswith("/"):
            raise UnsafeKey(f"unsafe object key {_shown(key)}: nothing before the {kind} suffix")
        # The stripped name may have become "." or ".." ("..tar", "...rclonelink").
        problem = _problem(path)
        if problem:
            raise UnsafeKey(f"unsafe object key {_shown(key)} ({kind} {_shown(path)}): {problem}")
    return Target(kind, path, key)


def safe_join(root: Path, rel: str) -> Path:
    """Join a repository path to a directory, refusing anything that leaves it.

    Lexical only (symlinks are not resolved here): ``rel`` must pass
    :func:`validate_path`, and the normalised result must still lie under
    the normalised ``root``, a second, independent check in case the first
    rule is ever loosened.
    """
    validate_path(rel)
    joined = Path(root).joinpath(*rel.split("/"))
    base = os.path.normpath(os.fspath(root))
    full = os.path.normpath(os.fspath(joined))
    if os.path.commonpath([base, full]) != base or full == base:
        raise UnsafeKey(f"path {_shown(rel)} resolves outside {os.fspath(root)!r}")
    return joined
