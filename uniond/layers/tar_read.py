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
from uniond.layers import tar_fields
from uniond.layers.compress import Reader
from uniond.layers.tar_fields import BLOCK, MAX_HEADER, number
from uniond.layers.tar_fields import unreadable as _unreadable

CHUNK = 1 << 20
_ZERO = bytes(BLOCK)
_PAD = b" \0"
# name mode uid gid size mtime chksum type linkname magic version uname gname major minor prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
REGULAR = (b"0", b"\0", b"7")  # tar's regular file, the old form, a contiguous file
SPARSE = b"S"
EXTENDED = (b"x", b"X", b"g", b"L", b"K")
_BODIED = REGULAR + (SPARSE,)  # the members whose size is data that follows (tarfile's rule)
_KNOWN = _BODIED + (b"1", b"2", b"3", b"4", b"5", b"6")


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


class TarReader:
    """Members of the tar read from ``source``, in order."""

    def __init__(self, source: Reader) -> None:
        self.source = source
        self.buf = b""
        self.view = memoryview(self.buf)
        self.pos = 0
        self.offset = 0  # of buf[0] in the archive, for messages
        self.globals: dict[str, str] = {}  # PAX "g" records, for every later member
        self.global_bytes = 0
        self.pending = 0  # bytes of the last member's data (and padding) not read yet

    def _refill(self, need: int) -> bool:
        """Make ``need`` bytes available from ``pos`` on; False at the stream's end."""
        rest = self.buf[self.pos:]
        parts = [rest] if rest else []  # one part alone is not copied by join
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
        extended = 0  # bytes of this member's extended headers: a chain of them must end
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
            head = _HEADER.unpack_from(block)
            try:  # the common form: octal digits, then NULs or spaces
                mode, uid, gid = int(head[1].rstrip(_PAD), 8), int(head[2].rstrip(_PAD), 8), \
                    int(head[3].rstrip(_PAD), 8)
                size, mtime, chksum = int(head[4].rstrip(_PAD), 8), int(head[5].rstrip(_PAD), 8), \
                    int(head[6].rstrip(_PAD), 8)
            except ValueError:
                mode, uid, gid, size, mtime, chksum = (number(f) for f in head[1:7])
            # zlib's adler32 sums bytes in C: its low half is 1 + the sum of up to 256 bytes.
            if chksum != (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) + 254 - sum(
                    block[148:156]) and not tar_fields.checksum_ok(block, chksum):
                raise _unreadable(f"the header at byte {at} has a bad checksum")
            if size < 0:
                raise _unreadable(f"the header at byte {at} has a negative size")
            kind = head[7]
            if kind in EXTENDED:
                extended += size
                if extended > 4 * MAX_HEADER:
                    raise InvalidArgument(f"extended headers of more than {4 * MAX_HEADER} bytes for one member")
                if kind in (b"x", b"X", b"g"):
                    records, found = tar_fields.pax_records(self._extended(size, "PAX header"))
                    if kind == b"g":
                        self.globals.update(records)
                        self.global_bytes += size
                        if self.global_bytes > MAX_HEADER:
                            raise InvalidArgument(f"global PAX headers of more than {MAX_HEADER} bytes")
                        continue
                    pax = {**records, **pax} if pax is not None else records  # the first header wins (tarfile)
                    pieces = pieces or found
                elif kind == b"L":
                    text = tar_fields.text(self._extended(size, "GNU long name"))
                    longname = longname if longname is not None else text
                else:
                    text = tar_fields.text(self._extended(size, "GNU long link"))
                    longlink = longlink if longlink is not None else text
                continue
            text = head[0].partition(b"\0")[0].decode("utf-8", "surrogateescape")
            if head[9] == b"ustar\0" and head[15][0]:
                text = tar_fields.text(head[15]) + "/" + text
            if kind == b"\0" and text.endswith("/"):
                kind = b"5"  # the old form of a directory
            elif kind in REGULAR:
                kind = b"0"
            link = longlink if longlink is not None else tar_fields.text(head[8]) if kind in (b"1", b"2") else ""
            if longname is not None:
                text = longname
            major = minor = 0
            if kind in (b"3", b"4"):
                major, minor = number(head[13]), number(head[14])
            member = Member(text, kind, mode, uid, gid, size, mtime, link, major, minor, self.globals)
            if pax is not None or self.globals:
                member = self._extend(member, block, {**self.globals, **pax} if pax is not None else self.globals,
                                      pieces)
            elif kind == SPARSE:
                member = member._replace(sparse=tar_fields.gnu_sparse(block, size, self._take),
                                         realsize=number(block[483:495]))
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
                changes[key] = tar_fields.decimal(records[key], f"PAX {key}")
        size = changes.get("size", member.size)
        assert isinstance(size, int)
        if member.type == b"0" and any(k.startswith("GNU.sparse.") for k in records):
            sparse = tar_fields.pax_sparse(records, pieces, size, self._take)
            changes["sparse"], changes["realsize"], changes["size"] = sparse
            changes["type"] = SPARSE
        elif member.type == SPARSE:
            changes["sparse"] = tar_fields.gnu_sparse(block, size, self._take)
            changes["realsize"] = number(block[483:495])
        return member._replace(**changes)

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
        else:  # across a refill: copy the data, not the new buffer behind it
            head = self.buf[self.pos:]
            self.pos = len(self.buf)
            if not self._refill(n - len(head)):
                raise _unreadable("the stream ends in the middle of a file's data")
            data = head + self.buf[:n - len(head)]
            self.pos = n - len(head)
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
