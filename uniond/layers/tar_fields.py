"""The fields of tar headers, for tar_read: numbers, names, checksums, PAX records and
GNU's sparse maps. Each refuses what it cannot read with the same InvalidArgument."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from uniond.errors import InvalidArgument

BLOCK = 512
MAX_HEADER = 1 << 20  # a PAX or GNU long-name header larger than this is hostile
_MAX_SPARSE = 1 << 16  # pieces of one sparse file
_HIGH = bytes(range(128, 256))


def unreadable(what: str) -> InvalidArgument:
    """The stream is not a tar, or not a whole one."""
    return InvalidArgument(f"not a readable layer tar: {what}")


def text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def number(field: bytes) -> int:
    """An octal field, or GNU's base-256 form (negative ones too)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise unreadable(f"a header field {text[:20]!r} is not a number") from None


def checksum_ok(block: bytes, stored: int) -> bool:
    # zlib's adler32 sums bytes in C: its low half is 1 + the sum of up to 256 bytes exactly.
    total = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    unsigned = total - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    field = block[148:156]
    high = (BLOCK - len(block.translate(None, _HIGH))) - (8 - len(field.translate(None, _HIGH)))
    return stored == unsigned - 256 * high


def pax_records(data: bytes) -> tuple[dict[str, str], list[tuple[str, str]]]:
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
            raise unreadable(f"a PAX record at byte {pos} of its header is malformed")
        key = data[space + 1:equal].decode("utf-8", "surrogateescape")
        value = data[equal + 1:end - 1].decode("utf-8", "surrogateescape")
        if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            pieces.append((key, value))
        records[key] = value
        pos = end
    return records, pieces


def decimal(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise unreadable(f"{what} {text[:40]!r} is not a number") from None
    if value < 0:
        raise unreadable(f"{what} {value} is negative")
    return value


def _pairs(numbers: list[int], realsize: int) -> tuple[tuple[int, int], ...]:
    if len(numbers) % 2 or len(numbers) > 2 * _MAX_SPARSE:
        raise unreadable(f"a sparse map of {len(numbers)} numbers")
    pairs = tuple(zip(numbers[::2], numbers[1::2], strict=True))
    end = 0
    for offset, length in pairs:
        if offset < end or length < 0 or offset + length > realsize:
            raise unreadable(f"a sparse map with a piece at {offset} of {length} bytes out of order or past its end")
        end = offset + length
    return pairs


def gnu_sparse(block: bytes, size: int, take: Callable[[int, str], bytes]) -> tuple[tuple[int, int], ...]:
    """The old GNU form: four pieces in the header, 21 in each extension block."""
    numbers: list[int] = []
    area, extended = block[386:482], block[482]
    while True:
        for at in range(0, len(area), 24):
            offset, length = number(area[at:at + 12]), number(area[at + 12:at + 24])
            if offset or length:
                numbers += (offset, length)
        if not extended:
            break
        if len(numbers) > 2 * _MAX_SPARSE:
            raise unreadable("a sparse map of too many pieces")
        more = take(BLOCK, "a sparse header")
        area, extended = more[:504], more[504]
    pairs = _pairs(numbers, number(block[483:495]))
    if sum(length for _, length in pairs) != size:
        raise unreadable("a sparse file whose pieces do not add up to its size")
    return pairs


def pax_sparse(records: dict[str, str], pieces: list[tuple[str, str]], size: int,
               take: Callable[[int, str], bytes]) -> tuple[tuple[tuple[int, int], ...], int, int]:
    """GNU's PAX forms: 0.0 (pairs of records), 0.1 (one map record), 1.0 (the map
    in front of the data). Answers the map, the real size and the data's size."""
    realsize = decimal(records.get("GNU.sparse.realsize", records.get("GNU.sparse.size", "0")), "sparse size")
    if records.get("GNU.sparse.major") == "1" and records.get("GNU.sparse.minor") == "0":
        head = b""
        used = 0
        while True:
            if used + BLOCK > min(size, MAX_HEADER):
                raise unreadable("a sparse map longer than its data")
            head += take(BLOCK, "a sparse map")
            used += BLOCK
            lines = head.split(b"\n")
            if lines and lines[0] and len(lines) > 1:
                count = decimal(lines[0].decode("ascii", "replace"), "sparse map length")
                if len(lines) - 1 > 2 * count:
                    break
        numbers = [decimal(x.decode("ascii", "replace"), "sparse map entry") for x in lines[1:2 * count + 1]]
        pairs = _pairs(numbers, realsize)
        size -= used
    elif "GNU.sparse.map" in records:
        text = records["GNU.sparse.map"]
        numbers = [decimal(x, "sparse map entry") for x in text.split(",")] if text else []
        pairs = _pairs(numbers, realsize)
    elif pieces:
        numbers = [decimal(v, k) for k, v in pieces]
        pairs = _pairs(numbers, realsize)
    else:
        raise unreadable("a GNU.sparse record without a sparse map")
    if sum(length for _, length in pairs) != size:
        raise unreadable("a sparse file whose pieces do not add up to its size")
    return pairs, realsize, size
