"""How a layer travels: its compression, recognised on import by its magic, and the two
digests a manifest names it by.

An image manifest lists a layer by ``digest`` (the sha256 of the blob as it travelled,
compressed or not) and its config by ``diff_id`` (the sha256 of the uncompressed tar).
Both are computed while the bytes pass, never by reading anything twice.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import zlib
from typing import Protocol

import zstandard

from uniond.errors import InvalidArgument, UniondError

COMPRESSIONS = ("none", "gzip", "zstd")

MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPES = {
    "none": MEDIA_TYPE_LAYER,
    "gzip": MEDIA_TYPE_LAYER + "+gzip",
    "zstd": MEDIA_TYPE_LAYER + "+zstd",
    "bzip2": "application/x-bzip2",  # read, never written: no OCI media type names it
    "xz": "application/x-xz",
}

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_ZSTD_WINDOW_MAX = 1 << 27  # 128 MiB, zstd's own default limit: a bigger window is a memory attack


class Reader(Protocol):
    def read(self, size: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes) -> int: ...


def sha256_digest(hasher: hashlib._Hash) -> str:
    return "sha256:" + hasher.hexdigest()


def check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"compression: {compression!r} is not one of {', '.join(COMPRESSIONS)}")


class Hashing:
    """Reads through, counting and hashing every byte; ``hasher`` None only counts."""

    def __init__(self, inner: Reader, hashing: bool = True) -> None:
        self.inner = inner
        self.hasher = hashlib.sha256() if hashing else None
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        return data

    def drain(self) -> None:
        """Read to the end, so that the digest covers the whole stream (the zero
        padding after a tar's end, a compressor's trailer)."""
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return sha256_digest(self.hasher) if self.hasher is not None else ""


class _Peeked:
    """A stream whose first bytes were read to recognise it, handed out again first."""

    def __init__(self, head: bytes, inner: Reader) -> None:
        self.head = head
        self.inner = inner

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data = self.head if size is None or size < 0 else self.head[:size]
            self.head = self.head[len(data):]
            return data
        return self.inner.read(size)


class _Guarded:
    """A decompressor's read, with corrupt data refused in the caller's words."""

    def __init__(self, inner: Reader, compression: str) -> None:
        self.inner = inner
        self.compression = compression

    def read(self, size: int = -1) -> bytes:
        try:
            return self.inner.read(size)
        except UniondError:
            raise
        except EOFError:
            raise InvalidArgument(f"the {self.compression} layer ends in the middle of its data") from None
        except (OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError, ValueError) as e:
            raise InvalidArgument(f"not a readable {self.compression} stream: {e}") from None


def _read_exactly(source: Reader, n: int) -> bytes:
    head = b""
    while len(head) < n:
        data = source.read(n - len(head))
        if not data:
            break
        head += data
    return head


def decompressing(source: Reader) -> tuple[Reader, str]:
    """(the uncompressed stream, the compression its magic names) of ``source``."""
    head = _read_exactly(source, 6)
    peeked = _Peeked(head, source)
    name = next((name for magic, name in _MAGIC if head.startswith(magic)), "none")
    if name == "none":
        return peeked, name
    if name == "gzip":
        inner: Reader = gzip.GzipFile(fileobj=peeked, mode="rb")
    elif name == "zstd":
        inner = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW_MAX).stream_reader(
            peeked, read_across_frames=True, closefd=False
        )
    elif name == "bzip2":
        inner = bz2.BZ2File(peeked, mode="rb")
    else:
        inner = lzma.LZMAFile(peeked, mode="rb")
    return _Guarded(inner, name), name


class Compressing:
    """Writes a tar stream into ``sink``, compressed as asked; ``close`` ends the
    compressed stream (the gzip trailer, the zstd frame's end) but not the sink."""

    def __init__(self, sink: Writer, compression: str) -> None:
        check_compression(compression)
        self.plain = compression == "none"
        if compression == "gzip":
            # mtime 0 and no name: the same layer gives the same bytes, so the same digest.
            self.out = gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=6, mtime=0)
        elif compression == "zstd":
            self.out = zstandard.ZstdCompressor(level=3).stream_writer(sink, closefd=False)
        else:
            self.out = sink

    def write(self, data: bytes) -> int:
        return self.out.write(data)

    def close(self) -> None:
        if not self.plain:
            self.out.close()
