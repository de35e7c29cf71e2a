"""Reading a tar stream header by header, for ImportLayer.

Python's tarfile costs more per member than creating the file does (a TarInfo object, a
stream buffer copied at each read), and a layer of small files is mostly members. This
reader parses ustar, GNU (long names, sparse files) and PAX (local and global headers,
sparse maps) headers by slicing one buffer filled in large reads, and hands file bodies
to os.write as views into that buffer. It holds at most a buffer and one member's
extended headers, whatever the layer's size.

It answers what the archive says and refuses what cannot be read; whether a member may
be made (names, ids, types) is tar_import's decision.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import NamedTuple

from uniond.errors import InvalidArgument
from uniond.layers.compress import Reader

BLOCK = 512
CHUNK = 1 << 20
MAX_HEADER = 1 << 20  # a PAX or GNU long-name header larger than this is hostile
_MAX_SPARSE = 1 << 16  # pieces of one sparse file
_ZERO = bytes(BLOCK)
_PAD = b" \0"
_HIGH = bytes(range(128, 256))
# name mode uid gid size mtime chksum type linkname magic version uname gname major minor prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
REGULAR = (b"0", b"\0", b"7")  # tar's regular file, the old form, a contiguous file
SPARSE = b"S"
EXTENDED = (b"x", b"X", b"g", b"L", b"K")
_BODIED = REGULAR + (SPARSE,)  # the members whose size is data that follows (tarfile's rule)
_KNOWN = _BODIED + (b"1", b"2", b"3", b"4", b"5", b"6")


def _unreadable(what: str) -> InvalidArgument:
    """The stream is not a tar, or not a whole one."""
    return InvalidArgument(f"not a readable layer tar: {what}")


class Member(NamedTuple):
    """One member, its extended headers applied."""

    name: str
    type: bytes  # tar's type flag; a regular file's is normalised to b"0"
    mode: int
    uid: int
    gid: int
    size: int  # the bytes the archive holds for it (a sparse file's data pieces)
    mtime: int  # seconds, from the header; a PAX "mtime" record is in ``pax``
    linkname: str
    devmajor: int
    devminor: int
    pax: dict[str, str]  # PAX records, global ones included; empty for most members
    sparse: tuple[tuple[int, int], ...] | None = None  # (offset, length) of each data piece
    realsize: int = 0  # a sparse file's length


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """An octal field, or GNU's base-256 form (negative ones too)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _unreadable(f"a header field {text[:20]!r} is not a number") from None


def _checksum_ok(block: bytes, stored: int) -> bool:
    # zlib's adler32 sums bytes in C: its low half is 1 + the sum of up to 256 bytes exactly.
    total = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    unsigned = total - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    field = block[148:156]
    high = (BLOCK - len(block.translate(None, _HIGH))) - (8 - len(field.translate(None, _HIGH)))
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The records of a PAX header, and the sparse 0.0 pairs in their order."""
    records: dict[str, str] = {}
    pieces: list[tuple[str, str]] = []
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 24)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        equal = data.find(b"=", space, end)
        if length <= 0 or equal < 0 or end > len(data) or data[end - 1] != 0x0A:
            raise _unreadable(f"a PAX record at byte {pos} of its header is malformed")
        key = data[space + 1:equal].decode("utf-8", "surrogateescape")
        value = data[equal + 1:end - 1].decode("utf-8", "surrogateescape")
        if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            pieces.append((key, value))
        records[key] = value
        pos = end
    return records, pieces


def _int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _unreadable(f"{what} {text[:40]!r} is not a number") from None
    if value < 0:
        raise _unreadable(f"{what} {value} is negative")
    return value


def _pairs(numbers: list[int], realsize: int) -> tuple[tuple[int, int], ...]:
    if len(numbers) % 2 or len(numbers) > 2 * _MAX_SPARSE:
        raise _unreadable(f"a sparse map of {len(numbers)} numbers")
    pairs = tuple(zip(numbers[::2], numbers[1::2], strict=True))
    end = 0
    for offset, length in pairs:
        if offset < end or length < 0 or offset + length > realsize:
            raise _unreadable(f"a sparse map with a piece at {offset} of {length} bytes out of order or past its end")
        end = offset + length
    return pairs


class TarReader:
    """Members of the tar read from ``source``, in order."""

    def __init__(self, source: Reader) -> None:
        self.source = source
        self.buf = b""
        self.view = memoryview(self.buf)
        self.pos = 0
        self.offset = 0  # of buf[0] in the archive, for messages
        self.globals: dict[str, str] = {}  # PAX "g" records, for every later member
        self.pending = 0  # bytes of the last member's data (and padding) not read yet

    def _refill(self, need: int) -> bool:
        """Make ``need`` bytes available from ``pos`` on; False at the stream's end."""
        rest = self.buf[self.pos:]
        parts = [rest]
        have = len(rest)
        while have < need:
            data = self.source.read(max(CHUNK, need - have))
            if not data:
                break
            parts.append(data)
            have += len(data)
        self.offset += self.pos
        self.buf = b"".join(parts)
        self.view = memoryview(self.buf)
        self.pos = 0
        return have >= need

    def _take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            if not self._refill(n):
                raise _unreadable(f"the stream ends in the middle of {what}")
            end = n
        data = self.buf[self.pos:end]
        self.pos = end
        return data

    def _extended(self, size: int, what: str) -> bytes:
        if size > MAX_HEADER:
            raise InvalidArgument(f"a {what} of {size} bytes; at most {MAX_HEADER} are accepted")
        return self._take(-(-size // BLOCK) * BLOCK, f"a {what}")[:size]

    def next(self) -> Member | None:
        """The next member, or None at the archive's end."""
        if self.pending:
            if self.pos + self.pending <= len(self.buf):
                self.pos += self.pending
            else:
                self._skip(self.pending)
            self.pending = 0
        pax: dict[str, str] | None = None
        pieces: list[tuple[str, str]] = []
        longname = longlink = None
        while True:
            at = self.offset + self.pos
            if self.pos + BLOCK > len(self.buf) and not self._refill(BLOCK):
                if self.pos == len(self.buf) and at and pax is None and longname is longlink is None:
                    return None  # the end without the two zero blocks: tarfile and GNU tar accept it
                raise _unreadable("the stream ends in the middle of a header" if at else "the stream is empty")
            block = self.buf[self.pos:self.pos + BLOCK]
            self.pos += BLOCK
            if block == _ZERO:
                if pax is not None or longname is not None or longlink is not None:
                    raise _unreadable(f"an extended header at byte {at} is followed by no member")
                return None
            fields = _HEADER.unpack_from(block)
            try:  # the common form: octal digits, then NULs or spaces
                mode, uid, gid = int(fields[1].rstrip(_PAD), 8), int(fields[2].rstrip(_PAD), 8), \
                    int(fields[3].rstrip(_PAD), 8)
                size, mtime, chksum = int(fields[4].rstrip(_PAD), 8), int(fields[5].rstrip(_PAD), 8), \
                    int(fields[6].rstrip(_PAD), 8)
            except ValueError:
                mode, uid, gid, size, mtime, chksum = (_number(f) for f in fields[1:7])
            # zlib's adler32 sums bytes in C: its low half is 1 + the sum of up to 256 bytes.
            if chksum != (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) + 254 - sum(
                    block[148:156]) and not _checksum_ok(block, chksum):
                raise _unreadable(f"the header at byte {at} has a bad checksum")
            if size < 0:
                raise _unreadable(f"the header at byte {at} has a negative size")
            kind = fields[7]
            if kind in EXTENDED:
                if kind in (b"x", b"X", b"g"):
                    records, found = _pax_records(self._extended(size, "PAX header"))
                    if kind == b"g":
                        self.globals.update(records)
                        continue
                    pax = {**records, **pax} if pax is not None else records  # the first header wins (tarfile)
                    pieces = pieces or found
                elif kind == b"L":
                    text = _text(self._extended(size, "GNU long name"))
                    longname = longname if longname is not None else text
                else:
                    text = _text(self._extended(size, "GNU long link"))
                    longlink = longlink if longlink is not None else text
                continue
            text = fields[0].partition(b"\0")[0].decode("utf-8", "surrogateescape")
            if fields[9] == b"ustar\0" and fields[15][0]:
                text = _text(fields[15]) + "/" + text
            if kind == b"\0" and text.endswith("/"):
                kind = b"5"  # the old form of a directory
            elif kind in REGULAR:
                kind = b"0"
            link = longlink if longlink is not None else _text(fields[8]) if kind in (b"1", b"2") else ""
            if longname is not None:
                text = longname
            major = minor = 0
            if kind in (b"3", b"4"):
                major, minor = _number(fields[13]), _number(fields[14])
            member = Member(text, kind, mode, uid, gid, size, mtime, link, major, minor, self.globals)
            if pax is not None or self.globals:
                member = self._extend(member, block, {**self.globals, **pax} if pax is not None else self.globals,
                                      pieces)
            elif kind == SPARSE:
                member = member._replace(sparse=self._gnu_sparse(block, size), realsize=_number(block[483:495]))
            if member.type in _BODIED or member.type not in _KNOWN:
                self.pending = -(-member.size // BLOCK) * BLOCK
            return member

    def _extend(self, member: Member, block: bytes, records: dict[str, str], pieces: list[tuple[str, str]]) -> Member:
        """A member with its PAX records applied."""
        changes: dict[str, object] = {"pax": records}
        for key, field in (("path", "name"), ("GNU.sparse.name", "name"), ("linkpath", "linkname")):
            if key in records:
                changes[field] = records[key]
        for key in ("uid", "gid", "size"):
            if key in records:
                changes[key] = _int(records[key], f"PAX {key}")
        size = changes.get("size", member.size)
        assert isinstance(size, int)
        if member.type == b"0" and any(k.startswith("GNU.sparse.") for k in records):
            changes["sparse"], changes["realsize"], changes["size"] = self._pax_sparse(records, pieces, size)
            changes["type"] = SPARSE
        elif member.type == SPARSE:
            changes["sparse"], changes["realsize"] = self._gnu_sparse(block, size), _number(block[483:495])
        return member._replace(**changes)

    def _gnu_sparse(self, block: bytes, size: int) -> tuple[tuple[int, int], ...]:
        """The old GNU form: four pieces in the header, 21 in each extension block."""
        numbers: list[int] = []
        area, extended = block[386:482], block[482]
        while True:
            for at in range(0, len(area), 24):
                offset, length = _number(area[at:at + 12]), _number(area[at + 12:at + 24])
                if offset or length:
                    numbers += (offset, length)
            if not extended:
                break
            if len(numbers) > 2 * _MAX_SPARSE:
                raise _unreadable("a sparse map of too many pieces")
            more = self._take(BLOCK, "a sparse header")
            area, extended = more[:504], more[504]
        pairs = _pairs(numbers, _number(block[483:495]))
        if sum(length for _, length in pairs) != size:
            raise _unreadable("a sparse file whose pieces do not add up to its size")
        return pairs

    def _pax_sparse(self, records: dict[str, str], pieces: list[tuple[str, str]],
                    size: int) -> tuple[tuple[tuple[int, int], ...], int, int]:
        """GNU's PAX forms: 0.0 (pairs of records), 0.1 (one map record), 1.0 (the map
        in front of the data). Answers the map, the real size and the data's size."""
        realsize = _int(records.get("GNU.sparse.realsize", records.get("GNU.sparse.size", "0")), "sparse size")
        if records.get("GNU.sparse.major") == "1" and records.get("GNU.sparse.minor") == "0":
            head = b""
            used = 0
            while True:
                if used + BLOCK > min(size, MAX_HEADER):
                    raise _unreadable("a sparse map longer than its data")
                head += self._take(BLOCK, "a sparse map")
                used += BLOCK
                lines = head.split(b"\n")
                if lines and lines[0] and len(lines) > 1:
                    count = _int(lines[0].decode("ascii", "replace"), "sparse map length")
                    if len(lines) - 1 > 2 * count:
                        break
            numbers = [_int(x.decode("ascii", "replace"), "sparse map entry") for x in lines[1:2 * count + 1]]
            pairs = _pairs(numbers, realsize)
            size -= used
        elif "GNU.sparse.map" in records:
            text = records["GNU.sparse.map"]
            numbers = [_int(x, "sparse map entry") for x in text.split(",")] if text else []
            pairs = _pairs(numbers, realsize)
        elif pieces:
            numbers = [_int(v, k) for k, v in pieces]
            pairs = _pairs(numbers, realsize)
        else:
            raise _unreadable("a GNU.sparse record without a sparse map")
        if sum(length for _, length in pairs) != size:
            raise _unreadable("a sparse file whose pieces do not add up to its size")
        return pairs, realsize, size

    def _skip(self, n: int) -> None:
        while n:
            if self.pos == len(self.buf) and not self._refill(1):
                raise _unreadable("the stream ends in the middle of a file's data")
            step = min(n, len(self.buf) - self.pos)
            self.pos += step
            n -= step

    def body(self, member: Member) -> bytes | memoryview:
        """The last member's data, whole (a small file's, not sparse): a view into the
        buffer when it lies there."""
        n = member.size
        end = self.pos + n
        if end <= len(self.buf):
            data: bytes | memoryview = self.view[self.pos:end]
            self.pos = end
        else:
            data = self._take(n, "a file's data")
        self.pending = -n % BLOCK
        return data

    def write_body(self, fd: int, member: Member) -> None:
        """Copy the last member's data into ``fd`` (a new, empty file)."""
        self.pending = 0
        if member.sparse is None:
            self._copy(fd, member.size)
        else:
            for offset, length in member.sparse:
                os.lseek(fd, offset, os.SEEK_SET)
                self._copy(fd, length)
            os.ftruncate(fd, member.realsize)
        self._skip(-member.size % BLOCK)

    def _copy(self, fd: int, n: int) -> None:
        while n:
            if self.pos == len(self.buf) and not self._refill(1):
                raise _unreadable("the stream ends in the middle of a file's data")
            end = min(self.pos + n, len(self.buf))
            view = self.view[self.pos:end]
            while view:
                view = view[os.write(fd, view):]
            n -= end - self.pos
            self.pos = end
