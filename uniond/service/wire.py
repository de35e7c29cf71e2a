"""The D-Bus wire format of the Mount objects, packed once per object and reused.

dbus-next marshals every value through a generic, signature-driven marshaller (about
100 us per Mount object); GetManagedObjects of 10,000 mounts would take a second and
hold the event loop all that time. A Mount object never changes, so its entry of the
a{oa{sa{sv}}} answer is packed here once, by hand, for the few types its properties
use. An entry of that dictionary always starts on an 8-byte boundary, so its bytes do
not depend on where it lands: GetManagedObjects joins the cached entries, and
InterfacesAdded (body "oa{sa{sv}}", which has the same layout) sends one as it is.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from dbus_next import Message
from dbus_next.constants import MessageType

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
LITTLE_ENDIAN, PROTOCOL_VERSION = ord("l"), 1


def _pad(buf: bytearray, align: int) -> None:
    buf += b"\0" * (-len(buf) % align)


def _string(buf: bytearray, value: str) -> None:
    data = value.encode()
    _pad(buf, 4)
    buf += _U32.pack(len(data))
    buf += data
    buf += b"\0"


def _signature(buf: bytearray, value: str) -> None:
    buf.append(len(value))
    buf += value.encode()
    buf += b"\0"


def _value(buf: bytearray, sig: str, value: Any) -> None:
    if sig in ("s", "o"):
        _string(buf, value)
    elif sig in ("b", "u"):
        _pad(buf, 4)
        buf += _U32.pack(int(value))
    elif sig == "t":
        _pad(buf, 8)
        buf += _U64.pack(value)
    elif sig == "as":
        _pad(buf, 4)
        at = len(buf)
        buf += b"\0\0\0\0"
        for item in value:
            _string(buf, item)
        _U32.pack_into(buf, at, len(buf) - at - 4)
    elif sig == "a{sv}":
        _variants(buf, [(key, v.signature, v.value) for key, v in value.items()])
    else:
        raise TypeError(f"no packing for D-Bus type {sig!r}")


def _variants(buf: bytearray, items: Sequence[tuple[str, str, Any]]) -> None:
    _pad(buf, 4)
    at = len(buf)
    buf += b"\0\0\0\0"
    _pad(buf, 8)
    start = len(buf)
    for key, sig, value in items:
        _pad(buf, 8)
        _string(buf, key)
        _signature(buf, sig)
        _value(buf, sig, value)
    _U32.pack_into(buf, at, len(buf) - start)


def object_entry(path: str, interface: str, properties: Sequence[tuple[str, str, Any]]) -> bytes:
    """One {o: {s: a{sv}}} entry, also the whole body of InterfacesAdded(o, a{sa{sv}})."""
    buf = bytearray()
    _string(buf, path)
    _pad(buf, 4)
    at = len(buf)
    buf += b"\0\0\0\0"
    _pad(buf, 8)
    start = len(buf)
    _string(buf, interface)
    _variants(buf, properties)
    _U32.pack_into(buf, at, len(buf) - start)
    return bytes(buf)


def strings(*values: str) -> bytes:
    """A body of strings and object paths only (e.g. signature "os")."""
    buf = bytearray()
    for value in values:
        _string(buf, value)
    return bytes(buf)


def managed_objects(entries: Iterable[bytes]) -> bytes:
    """The body of GetManagedObjects' a{oa{sa{sv}}} answer, from packed entries."""
    parts = [b"\0\0\0\0\0\0\0\0"]
    size = 0
    for entry in entries:
        pad = -size % 8
        if pad:
            parts.append(b"\0" * pad)
        parts.append(entry)
        size += pad + len(entry)
    parts[0] = _U32.pack(size) + b"\0\0\0\0"
    return b"".join(parts)


def _header(msg: Message, body_length: int, unix_fds: int) -> bytes:
    """The fixed part and the a(yv) fields, in dbus-next's order, padded to 8."""
    buf = bytearray(16)
    for code, sig, value in (
        (1, "o", msg.path), (2, "s", msg.interface), (3, "s", msg.member), (4, "s", msg.error_name),
        (5, "u", msg.reply_serial), (6, "s", msg.destination), (8, "g", msg.signature), (9, "u", unix_fds),
    ):
        if value:
            _pad(buf, 8)
            buf.append(code)
            _signature(buf, sig)
            if sig == "g":
                _signature(buf, value)
            else:
                _value(buf, sig, value)
    struct.pack_into("<BBBBIII", buf, 0, LITTLE_ENDIAN, msg.message_type.value, msg.flags.value,
                     PROTOCOL_VERSION, body_length, msg.serial, len(buf) - 16)
    _pad(buf, 8)
    return bytes(buf)


_SIMPLE = {"s", "o", "u", "b", "t", "h", "as", "ao"}


def _simple_body(signature: str, body: Sequence[Any]) -> bytes | None:
    """The body of a message made only of strings, paths, integers and string arrays
    (replies, errors, signals: nearly every message uniond sends), or None."""
    codes: list[str] = []
    rest = signature
    while rest:
        code = rest[:2] if rest[0] == "a" else rest[0]
        if code not in _SIMPLE:
            return None
        codes.append(code)
        rest = rest[len(code):]
    if len(codes) != len(body):
        return None
    buf = bytearray()
    for code, value in zip(codes, body, strict=True):
        if code == "h":
            code = "u"
        elif code == "ao":
            code = "as"
        _value(buf, code, value)
    return bytes(buf)


def pack(msg: Message, negotiate_unix_fd: bool) -> bytes | None:
    """The whole message on the wire, packed by hand, or None to let dbus-next do it."""
    if isinstance(msg, PackedMessage):
        body = msg.packed_body
    else:
        body = _simple_body(msg.signature, msg.body)
        if body is None:
            return None
    fds = len(msg.unix_fds) if msg.unix_fds and negotiate_unix_fd else 0
    return _header(msg, len(body), fds) + body


class PackedMessage(Message):
    """A message whose body is already packed (dbus-next would marshal ``body``)."""

    def __init__(self, packed_body: bytes, signature: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.signature = signature
        self.packed_body = packed_body

    def _marshall(self, negotiate_unix_fd: bool = False) -> bytes:
        return _header(self, len(self.packed_body), 0) + self.packed_body


def method_return(call: Message, signature: str, packed_body: bytes) -> PackedMessage:
    return PackedMessage(
        packed_body, signature, message_type=MessageType.METHOD_RETURN, reply_serial=call.serial,
        destination=call.sender,
    )


def signal(path: str, interface: str, member: str, signature: str, packed_body: bytes) -> PackedMessage:
    return PackedMessage(
        packed_body, signature, message_type=MessageType.SIGNAL, path=path, interface=interface, member=member,
    )
