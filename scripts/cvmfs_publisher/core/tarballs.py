"""Tarball rules: which keys are tarballs, and how their compression is told.

A key ending in one of :data:`SUFFIXES` is a tarball: it is not published
as a file but ingested into its own directory (``cvmfs_server ingest``),
replaced as a whole when the key is overwritten and removed when the key is
deleted. The compression is taken from the content, never from the name:
``cvmfs_server ingest`` reads uncompressed tar only, so a ``.tar`` that is
in fact gzipped, or a ``.tgz`` that is not, must still be read correctly.

Adding a format: its suffix here, its magic bytes in :data:`MAGIC`, and its
decompressor where the sync daemon streams tarballs into ``ingest``.
"""

from __future__ import annotations

#: Recognised suffixes; the part of the key before one names the ingest directory.
SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")

#: First bytes of each compression format (the staged ``compression`` field).
MAGIC: tuple[tuple[bytes, str], ...] = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
                                        (b"\xfd7zXZ\x00", "xz"))

#: Bytes of the head that :func:`compression_of` needs at most.
HEAD_BYTES = max(len(magic) for magic, _ in MAGIC)


def split(name: str) -> str | None:
    """``name`` without its tarball suffix, or None when it is not a tarball."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def compression_of(head: bytes) -> str:
    """``gzip``, ``bzip2``, ``xz`` or ``none``, from the first bytes of the content."""
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    return "none"
