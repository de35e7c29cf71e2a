"""Tar headers for layer export, packed by hand.

tarfile's TarInfo.tobuf was two thirds of an export of small files; these produce the
same bytes (POSIX ustar, with PAX records for what ustar cannot hold) at a fraction of
the cost, which matters when a layer holds a hundred thousand entries.
"""
from __future__ import annotations

import os
import struct
import tarfile

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_NS = 1_000_000_000

# name, mode+uid+gid+size+mtime (8+8+8+12+12), chksum, typeflag, linkname, magic+version,
# uname+gname (empty), devmajor+devminor, prefix (empty), padding: 512 bytes.
_USTAR = struct.Struct("100s48s8s1s100s8s64x16s155x12x")
_MAGIC = b"ustar\x0000"
# The checksum counts the checksum field as eight spaces, and the magic is always there.
_FIXED_SUM = 8 * ord(" ") + sum(_MAGIC)
_NO_DEVICE = b"%07o\0%07o\0" % (0, 0)
_FIXED_SUM += sum(_NO_DEVICE)  # counted back out for a device
_NO_DEVICE_SUM = sum(_NO_DEVICE)


def _ustar(name: bytes, kind: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, size: int = 0,
           mtime: int = 0, linkname: bytes = b"", device: bytes = _NO_DEVICE) -> bytes:
    """A POSIX ustar header, byte for byte as tarfile writes it. Every field must fit:
    the caller moved what does not into PAX records. The checksum is summed over the
    fields that vary only; zero padding adds nothing to it."""
    owner = _owners.get((mode, uid, gid))
    if owner is None:
        if len(_owners) > 4096:
            _owners.clear()
        field = b"%07o\0%07o\0%07o\0" % (mode, uid, gid)
        owner = _owners[(mode, uid, gid)] = (field, sum(field))
    times = b"%011o\0%011o\0" % (size, mtime)
    chksum = _FIXED_SUM + owner[1] + sum(times) + sum(name) + kind[0]
    if linkname:
        chksum += sum(linkname)
    if device is not _NO_DEVICE:
        chksum += sum(device) - _NO_DEVICE_SUM
    return _USTAR.pack(name, owner[0] + times, b"%06o\0 " % chksum, kind, linkname, _MAGIC, device)


# (mode, uid, gid) -> their three fields and the sum of their bytes: a layer has few.
_owners: dict[tuple[int, int, int], tuple[bytes, int]] = {}


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return b"%d" % n + body


def _pax_time(ns: int) -> bytes:
    """Exact, unlike a float: nanoseconds survive export and import (README: layers)."""
    seconds, rest = divmod(abs(ns), _NS)
    return (b"%s%d.%09d" % (b"-" if ns < 0 else b"", seconds, rest)).rstrip(b"0").rstrip(b".")


def _pax_block(data: bytes) -> bytes:
    """The extended header holding the PAX records ``data``, padded to whole blocks."""
    header = _pax_headers.get(len(data))
    if header is None:
        if len(_pax_headers) > 4096:
            _pax_headers.clear()
        header = _pax_headers[len(data)] = _ustar(b"pax-header", tarfile.XHDTYPE, size=len(data))
    return header + data + _ZEROS[:-len(data) % BLOCK]


_pax_headers: dict[int, bytes] = {}  # the length of the records -> their header
_ZEROS = bytes(BLOCK)
_DEVICES = (tarfile.CHRTYPE, tarfile.BLKTYPE)
_ID_MAX = 8**7  # uid and gid in seven octal digits
_SIZE_MAX = 8**11


def entry_header(raw_name: bytes, kind: bytes, st: os.stat_result | None,
                 xattrs: tuple[tuple[str, bytes], ...] = (), size: int = 0, raw_link: bytes = b"") -> bytes:
    """One entry's headers: a PAX extended header when needed, then the ustar header.
    ``raw_name`` ends in "/" for a directory.

    The PAX records are written here rather than by tarfile, which marks any
    non-UTF-8 value (a binary ``security.capability``) with ``hdrcharset=BINARY``, a
    keyword GNU tar warns about. PAX records are length-prefixed, so raw bytes are
    valid in them, and both GNU tar and tarfile read them back exactly. The usual
    entry (a short ASCII name, small ids, no xattrs) needs only its mtime's nanoseconds
    there, so that one record is formatted directly.
    """
    records = []
    if len(raw_name) >= 100 or not raw_name.isascii():
        records.append(_pax_record(b"path", raw_name))
        raw_name = b"pax-path"
    if raw_link and (len(raw_link) >= 100 or not raw_link.isascii()):
        records.append(_pax_record(b"linkpath", raw_link))
        raw_link = b"pax-linkpath"
    if size >= _SIZE_MAX:
        records.append(_pax_record(b"size", b"%d" % size))
        size = 0
    if st is None:
        header = _ustar(raw_name, kind, size=size, linkname=raw_link)
    else:
        uid, gid = st.st_uid, st.st_gid
        if uid >= _ID_MAX:
            records.append(_pax_record(b"uid", b"%d" % uid))
            uid = 0
        if gid >= _ID_MAX:
            records.append(_pax_record(b"gid", b"%d" % gid))
            gid = 0
        seconds, ns = divmod(st.st_mtime_ns, _NS)
        if seconds < 0:
            records.append(_pax_record(b"mtime", _pax_time(st.st_mtime_ns)))
            seconds = 0
        elif ns:
            value = (b"%d.%09d" % (seconds, ns)).rstrip(b"0")
            # "NN mtime=<value>\n" is len(value) + 10 bytes long while NN has two digits.
            records.append(b"%d mtime=%s\n" % (len(value) + 10, value) if len(value) < 90
                           else _pax_record(b"mtime", value))
        if kind in _DEVICES:
            device = b"%07o\0%07o\0" % (os.major(st.st_rdev), os.minor(st.st_rdev))
            header = _ustar(raw_name, kind, st.st_mode & 0o7777, uid, gid, size, seconds, raw_link, device)
        else:
            header = _ustar(raw_name, kind, st.st_mode & 0o7777, uid, gid, size, seconds, raw_link)
    for key, value in xattrs:
        records.append(_pax_record(b"SCHILY.xattr." + key.encode(), value))
    if not records:
        return header
    return _pax_block(records[0] if len(records) == 1 else b"".join(records)) + header


def file_entry(raw_name: bytes, st: os.stat_result, data: bytes) -> tuple[tuple[bytes, ...], int]:
    """A whole small regular file without xattrs, ``data`` its content: the pieces to
    write in order (headers, data, padding), and their length. The same bytes as
    ``entry_header(raw_name, REGTYPE, st, (), len(data))`` followed by the padded data.

    A layer of small files is mostly this case, so it skips the general path's checks
    and concatenations: a short ASCII name, ids that fit, and at most one PAX record,
    the mtime's nanoseconds.
    """
    size = len(data)
    pad = _ZEROS[:-size % BLOCK]
    mtime_ns = st.st_mtime_ns
    mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    owner = _owners.get((mode, uid, gid))
    if (owner is None or len(raw_name) >= 100 or not raw_name.isascii() or uid >= _ID_MAX or gid >= _ID_MAX
            or mtime_ns < 0):
        header = entry_header(raw_name, tarfile.REGTYPE, st, (), size)  # which caches the owner
        return (header, data, pad), len(header) + size + len(pad)
    seconds, ns = divmod(mtime_ns, _NS)
    times = b"%011o\0%011o\0" % (size, seconds)
    header = _USTAR.pack(raw_name, owner[0] + times, b"%06o\0 " % (_REG_SUM + owner[1] + sum(times) + sum(raw_name)),
                         tarfile.REGTYPE, b"", _MAGIC, _NO_DEVICE)
    if not ns:
        return (header, data, pad), BLOCK + size + len(pad)
    value = (b"%d.%09d" % (seconds, ns)).rstrip(b"0")
    record = b"%d mtime=%s\n" % (len(value) + 10, value)  # see entry_header
    block = _mtime_blocks.get(len(record))
    if block is None:
        block = _mtime_blocks[len(record)] = (_pax_block(record)[:BLOCK], _ZEROS[len(record):])
    return (block[0], record, block[1], header, data, pad), 3 * BLOCK + size + len(pad)


# The length of an mtime record -> its extended header and the zeros that end its block.
_mtime_blocks: dict[int, tuple[bytes, bytes]] = {}
_REG_SUM = _FIXED_SUM + tarfile.REGTYPE[0]
