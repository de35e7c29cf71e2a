"""Writing layer tars: a mount's upper as an OCI / Docker image layer (ExportDiff).

The upper becomes a PAX tar with AUFS-style whiteouts (E1, E2), streamed straight to
the caller's file descriptor; file data moves in bounded chunks (sendfile for big
files). The layer holds every entry of the upper, including copies-up that Diff does
not report (D5): a copied-up file no longer shares the lower's inode, so leaving it
out would make a stacked layer show hard links the mount did not show.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import struct
import tarfile
from dataclasses import dataclass

from uniond.errors import InvalidArgument
from uniond.layers import tree
from uniond.layers.compress import MEDIA_TYPES, Compressing, check_compression, sha256_digest
from uniond.layers.stream import CHUNK, Sink, check_fd

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."  # AUFS bookkeeping (.wh..wh.plnk, ...): not content
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


@dataclass(frozen=True)
class ExportResult:
    bytes: int  # written to the fd, after compression
    entries: int  # tar members, whiteouts and opaque markers included
    diff_id: str = ""  # sha256:<hex> of the uncompressed tar, when asked for
    digest: str = ""  # sha256:<hex> of the bytes written, when asked for
    media_type: str = ""


def _pax_time(ns: int) -> str:
    seconds, rest = divmod(abs(ns), 1_000_000_000)
    return f"{'-' if ns < 0 else ''}{seconds}.{rest:09d}".rstrip("0").rstrip(".")


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _fits_ustar(raw: bytes, limit: int = 100) -> bool:
    return len(raw) < limit and raw.isascii()


_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")
_BLANK_CHKSUM = b" " * 8


def _ustar(name: bytes, kind: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, size: int = 0,
           mtime: int = 0, linkname: bytes = b"", devmajor: int = 0, devminor: int = 0) -> bytes:
    """A POSIX ustar header, as tarfile writes it, at a fraction of TarInfo.tobuf's cost
    (which was two thirds of an export of small files). Every field must fit: the
    caller moved what does not into PAX records."""
    fields = [name, b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid, b"%011o\0" % size,
              b"%011o\0" % mtime, _BLANK_CHKSUM, kind, linkname, b"ustar\0", b"00", b"", b"",
              b"%07o\0" % devmajor, b"%07o\0" % devminor, b"", b""]
    fields[6] = b"%06o\0 " % sum(b"".join(fields))  # the zero padding adds nothing to the sum
    return _USTAR.pack(*fields)


@functools.lru_cache(maxsize=4096)
def _pax_ext_header(length: int) -> bytes:
    return _ustar(b"pax-header", tarfile.XHDTYPE, size=length)


def _header(name: str, kind: bytes, st: os.stat_result | None, xattrs: tuple[tuple[str, bytes], ...] = (),
            size: int = 0, linkname: str = "") -> bytes:
    """One entry's headers: a PAX extended header when needed, then the ustar header.

    The PAX records are written here rather than by tarfile, which marks any
    non-UTF-8 value (a binary ``security.capability``) with ``hdrcharset=BINARY``, a
    keyword GNU tar warns about. PAX records are length-prefixed, so raw bytes are
    valid in them, and both GNU tar and tarfile read them back exactly.
    """
    records = []
    raw_name = name.encode("utf-8", "surrogateescape") + (b"/" if kind == tarfile.DIRTYPE else b"")
    if not _fits_ustar(raw_name):
        records.append(_pax_record("path", raw_name))
        raw_name = b"pax-path"
    raw_link = linkname.encode("utf-8", "surrogateescape")
    if not _fits_ustar(raw_link):
        records.append(_pax_record("linkpath", raw_link))
        raw_link = b"pax-linkpath"
    if size >= 8**11:
        records.append(_pax_record("size", str(size).encode()))
        size = 0
    if st is None:
        header = _ustar(raw_name, kind, size=size, linkname=raw_link)
    else:
        ids = []
        for field, value in (("uid", st.st_uid), ("gid", st.st_gid)):
            if value >= 8**7:
                records.append(_pax_record(field, str(value).encode()))
                value = 0
            ids.append(value)
        seconds, ns = divmod(st.st_mtime_ns, 1_000_000_000)
        if ns or seconds < 0:
            records.append(_pax_record("mtime", _pax_time(st.st_mtime_ns).encode()))  # exact, unlike a float
        device = kind in (tarfile.CHRTYPE, tarfile.BLKTYPE)
        header = _ustar(raw_name, kind, stat.S_IMODE(st.st_mode), ids[0], ids[1], size, max(seconds, 0), raw_link,
                        os.major(st.st_rdev) if device else 0, os.minor(st.st_rdev) if device else 0)
    for key, value in xattrs:
        records.append(_pax_record(f"SCHILY.xattr.{key}", value))
    if not records:
        return header
    data = b"".join(records)
    return _pax_ext_header(len(data)) + data + bytes(-len(data) % _BLOCK) + header


class _Counted:
    """The uncompressed tar stream's length, for padding its end to a whole record, and
    its sha256 when a diff_id is wanted."""

    def __init__(self, out: Sink | Compressing, sink: Sink | None, hashing: bool) -> None:
        self.out = out
        self.sink = sink  # the fd itself when nothing compresses and nothing hashes: sendfile
        self.length = 0
        self.hasher = hashlib.sha256() if hashing else None

    def write(self, data: bytes) -> int:
        self.length += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        return self.out.write(data)


_SENDFILE_MIN = 1 << 16


def _copy_into(out: _Counted, path: str, size: int, header: bytes, what: str, rel: str) -> None:
    """File data, exactly ``size`` bytes: a file that shrank meanwhile is padded, one that
    grew is cut, as the header already promised ``size`` (GNU tar does the same).

    Into an uncompressed stream, large files go by sendfile(2): the kernel moves the
    pages, nothing passes through Python.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        # Deleted since the walk saw it (a live mount): its header is written, so zeros follow.
        log.warning("%s: /%s vanished while the layer was written; its content is zeros", what, rel)
        out.write(header + bytes(size + (-size % _BLOCK)) if size < _SENDFILE_MIN else header)
        for _ in range(size // CHUNK):
            out.write(bytes(CHUNK))
        if size >= _SENDFILE_MIN:
            out.write(bytes(size % CHUNK + (-size % _BLOCK)))
        return
    try:
        if size < _SENDFILE_MIN:
            data = os.read(fd, size) if size else b""
            if len(data) == size:  # the usual case, in one write: header, data, padding
                out.write(header + data + bytes(-size % _BLOCK))
                return
            out.write(header + data)
            left = size - len(data)
        else:
            out.write(header)
            left = size
        if left and size >= _SENDFILE_MIN and out.sink is not None:
            left -= out.sink.sendfile(fd, size)
            out.length += size - left
        while left:
            data = os.read(fd, min(left, CHUNK))
            if not data:
                log.warning("%s: /%s shrank while it was read; padded with zeros", what, rel)
                data = bytes(min(left, CHUNK))
            out.write(data)
            left -= len(data)
    finally:
        os.close(fd)
    if size % _BLOCK:
        out.write(bytes(_BLOCK - size % _BLOCK))


def export_diff(upperdir: str, fd: int, compression: str = "none", what: str = "export",
                digests: bool = False) -> ExportResult:
    """Stream ``upperdir`` to ``fd`` as a layer tar; the caller keeps ``fd`` open.

    ``what`` starts the log lines about files that change meanwhile (e.g. the mount id);
    ``digests`` asks for the diff_id and digest (file data then passes through Python
    instead of sendfile, to be hashed).
    """
    check_compression(compression)
    check_fd(fd, writing=True)
    sink = Sink(fd, hashing=digests)
    zipped = Compressing(sink, compression)
    plain = compression == "none"
    out = _Counted(zipped, sink if plain and not digests else None, digests and not plain)
    first_names: dict[tuple[int, int], str] = {}  # D7: (dev, ino) -> first name in the layer
    entries = 0
    for e in tree.walk_upper(upperdir) if upperdir else ():
        st = e.st
        head, _, base = e.rel.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):
            raise InvalidArgument(
                f"the mount holds {'/' + e.rel!r}: a layer cannot carry a name starting with "
                f"{WHITEOUT_PREFIX!r}, every reader would take it for a whiteout (E3); rename it"
            )
        if e.whiteout:
            # E1: a deletion is an empty regular file named .wh.<name>.
            name = f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base
            out.write(_header(name, tarfile.REGTYPE, None))
            entries += 1
            continue
        mode = st.st_mode
        xattrs = tree.read_xattrs(e.path)
        if stat.S_ISDIR(mode):
            out.write(_header(e.rel, tarfile.DIRTYPE, st, xattrs))
            entries += 1
            if e.opaque:
                # E1: the directory entry, without overlay xattrs, then its marker.
                out.write(_header(f"{e.rel}/{OPAQUE_MARKER}", tarfile.REGTYPE, None))
                entries += 1
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = first_names.get(key)
            if first is not None:
                out.write(_header(e.rel, tarfile.LNKTYPE, st, xattrs, linkname=first))
                entries += 1
                continue
            first_names[key] = e.rel
        if stat.S_ISREG(mode):
            header = _header(e.rel, tarfile.REGTYPE, st, xattrs, size=st.st_size)
            _copy_into(out, e.path, st.st_size, header, what, e.rel)
        elif stat.S_ISLNK(mode):
            out.write(_header(e.rel, tarfile.SYMTYPE, st, xattrs, linkname=os.readlink(e.path)))
        elif stat.S_ISFIFO(mode):
            out.write(_header(e.rel, tarfile.FIFOTYPE, st, xattrs))
        elif stat.S_ISCHR(mode):
            out.write(_header(e.rel, tarfile.CHRTYPE, st, xattrs))
        elif stat.S_ISBLK(mode):
            out.write(_header(e.rel, tarfile.BLKTYPE, st, xattrs))
        else:
            continue
        entries += 1
    # The end: two zero blocks, padded to a whole record as tar(1) and tarfile write it.
    trailer = 2 * _BLOCK
    out.write(bytes(trailer + (-(out.length + trailer)) % _RECORD))
    zipped.close()  # writes the compressor's trailer into the sink
    sink.flush()
    if not digests:
        return ExportResult(sink.written, entries)
    digest = sink.digest
    diff_id = digest if out.hasher is None else sha256_digest(out.hasher)
    return ExportResult(sink.written, entries, diff_id, digest, MEDIA_TYPES[compression])
