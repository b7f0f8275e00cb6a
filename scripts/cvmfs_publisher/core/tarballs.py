"""Tarball rules: which keys are tarballs, and how their compression is told.

A key ending in one of :data:`SUFFIXES` is a tarball: it is not published
as a file but ingested into its own directory (``cvmfs_server ingest``),
replaced as a whole when the key is overwritten and removed when the key is
deleted. The compression is taken from the content, never from the name:
``cvmfs_server ingest`` reads uncompressed tar only, so a ``.tar`` that is
in fact gzipped, or a ``.tgz`` that is not, must still be read correctly.

Adding a format: its suffix in :data:`SUFFIXES`, its magic bytes in
:data:`MAGIC` and its decompressor in :func:`decompressing`; the key mapping,
staging, the checks and the streaming into ``ingest`` follow.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import lzma
import os
import shutil
import tarfile
import threading
import zlib
from collections.abc import Iterator
from typing import IO

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


def decompressing(raw: IO[bytes], kind: str) -> IO[bytes]:
    """A reader of the uncompressed bytes of ``raw`` (``kind`` from :func:`compression_of`)."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.BZ2File(raw, "rb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.LZMAFile(raw, "rb")  # type: ignore[return-value]
    return raw


def kind_of(raw: IO[bytes]) -> str:
    """The compression of an open file, read with pread: its position stays at 0
    (``cvmfs_server ingest`` may read the fd itself)."""
    return compression_of(os.pread(raw.fileno(), 512, 0))


def check(raw: IO[bytes]) -> str:
    """Why this tarball must not be ingested ("" when it may be).

    Why a full pass before ``ingest``: the tool publishes whatever it could
    read, so a truncated or corrupt upload would become a half-published
    directory; and a member that escapes the base directory (absolute,
    ``..``) or a device node has no business in a repository. Streaming
    (``r|``): constant memory for any size.
    """
    try:
        dec = decompressing(raw, kind_of(raw))
        with tarfile.open(fileobj=dec, mode="r|") as tf:
            while (m := tf.next()) is not None:
                tf.members = []  # streaming: do not keep every member in memory
                name = m.name[2:] if m.name.startswith("./") else m.name
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if name.startswith("/") or ".." in parts:
                    return f"member {m.name[:200]!r} escapes the base directory"
                if m.islnk():
                    link = [p for p in m.linkname.split("/") if p not in ("", ".")]
                    if m.linkname.startswith("/") or ".." in link:
                        return f"hard link {m.name[:200]!r} points outside the tarball"
                elif not (m.isreg() or m.isdir() or m.issym()):
                    return f"member {m.name[:200]!r} is a device or fifo"
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        return f"not a readable tar archive: {type(exc).__name__}: {str(exc)[:200]}"
    return ""


@contextlib.contextmanager
def stream(raw: IO[bytes], chunk: int = 1 << 20) -> Iterator[IO[bytes]]:
    """An uncompressed tar stream with a real fd, for the tool's standard input.

    ``cvmfs_server ingest`` reads uncompressed tar only; compressed tarballs
    are decompressed on the fly by a thread writing into a pipe, so nothing
    is written to disk and memory stays constant. Takes ``raw`` over (closes it).
    """
    kind = kind_of(raw)
    if kind == "none":
        with raw:
            yield raw
        return
    r, w = os.pipe()
    out = os.fdopen(w, "wb")
    reader = os.fdopen(r, "rb")
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            with raw, out:
                shutil.copyfileobj(decompressing(raw, kind), out, chunk)
        except BrokenPipeError:
            pass  # the tool stopped reading: its exit code tells why
        except BaseException as exc:  # reported after the tool returns
            failure.append(exc)

    t = threading.Thread(target=pump, name="tar-decompress", daemon=True)
    t.start()
    try:
        yield reader
    finally:
        reader.close()
        t.join()
    if failure:
        raise OSError(errno.EIO, f"decompressing the tarball failed: {failure[0]}")
