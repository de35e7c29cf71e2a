"""A D-Bus client as cheap as a raw socket: for benchmarks where the client's own CPU
would otherwise hide the daemon's (a dbus-next client costs ~1.3 ms of CPU per
Mount+Unmount pair, more than the daemon's budget on two cores).

It marshals only the few signatures the benchmarks send (strings, object paths, arrays
of strings, empty a{sv}, fds) and unmarshals only what they read back: the message
type, the reply serial, the error name and a leading string or object path, or
nothing at all (``call_raw`` gives the reply's bytes as they came off the socket).
"""

from __future__ import annotations

import array
import os
import socket
import struct

_METHOD_CALL, _METHOD_RETURN, _ERROR = 1, 2, 3
BUS_NAME, MANAGER_PATH, MANAGER_INTERFACE = "org.uniond1", "/org/uniond1", "org.uniond1.Manager"


class CallFailed(Exception):
    pass


def _pad(buf: bytearray, align: int) -> None:
    buf.extend(b"\0" * (-len(buf) % align))


def _string(buf: bytearray, value: str | bytes, length_format: str = "<I") -> None:
    data = value.encode() if isinstance(value, str) else value
    if length_format == "<I":
        _pad(buf, 4)
    buf.extend(struct.pack(length_format, len(data)))
    buf.extend(data + b"\0")


def marshal(signature: str, args: list) -> bytes:
    """The body for ``signature`` made of s, o, g, h, u, t, b, as and a{sv} (given as a
    dict of str -> (signature, value) with value a str, bool or int)."""
    buf = bytearray()
    items = list(args)
    i = 0
    sig = signature
    while sig:
        if sig.startswith("a{sv}"):
            sig = sig[5:]
            _array_of_variants(buf, items[i])
        elif sig.startswith("as"):
            sig = sig[2:]
            _pad(buf, 4)
            at = len(buf)
            buf.extend(b"\0\0\0\0")
            start = len(buf)
            for s in items[i]:
                _string(buf, s)
            struct.pack_into("<I", buf, at, len(buf) - start)
        else:
            code, sig = sig[0], sig[1:]
            _scalar(buf, code, items[i])
        i += 1
    return bytes(buf)


def _scalar(buf: bytearray, code: str, value) -> None:
    if code in "so":
        _string(buf, value)
    elif code == "g":
        _string(buf, value, "<B")
    elif code in "uhb":
        _pad(buf, 4)
        buf.extend(struct.pack("<I", int(value)))
    elif code == "t":
        _pad(buf, 8)
        buf.extend(struct.pack("<Q", value))
    else:
        raise ValueError(code)


def _array_of_variants(buf: bytearray, mapping: dict) -> None:
    _pad(buf, 4)
    at = len(buf)
    buf.extend(b"\0\0\0\0")
    _pad(buf, 8)
    start = len(buf)
    for key, (sig, value) in mapping.items():
        _pad(buf, 8)
        _string(buf, key)
        _string(buf, sig, "<B")
        _scalar(buf, sig, value)
    struct.pack_into("<I", buf, at, len(buf) - start)


class RawBus:
    """One connection; calls are sent and answered one at a time (or pipelined by hand)."""

    def __init__(self, address: str, fds: bool = False) -> None:
        assert address.startswith("unix:path=")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address[len("unix:path="):].split(",")[0])
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        self._expect(b"OK")
        if fds:
            self.sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
            self._expect(b"AGREE_UNIX_FD")
        self.sock.sendall(b"BEGIN\r\n")
        self.serial = 0
        self.pending = bytearray()
        self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello")

    def _expect(self, word: bytes) -> None:
        line = b""
        while not line.endswith(b"\r\n"):
            line += self.sock.recv(1)
        if not line.startswith(word):
            raise CallFailed(line.decode(errors="replace"))

    def send(self, destination: str, path: str, interface: str, member: str, signature: str = "",
             body: bytes = b"", fds: list[int] | None = None) -> int:
        self.serial += 1
        fields = bytearray()
        for code, sig, value in ((1, "o", path), (2, "s", interface), (3, "s", member), (6, "s", destination)):
            _pad(fields, 8)
            fields.extend(bytes([code, 1]) + sig.encode() + b"\0")
            _string(fields, value)
        if signature:
            _pad(fields, 8)
            fields.extend(b"\x08\x01g\0")
            _string(fields, signature, "<B")
        if fds:
            _pad(fields, 8)
            fields.extend(b"\x09\x01u\0")
            _scalar(fields, "u", len(fds))
        header = struct.pack("<cBBBII", b"l", _METHOD_CALL, 0, 1, len(body), self.serial)
        header += struct.pack("<I", len(fields)) + bytes(fields)
        header += b"\0" * (-len(header) % 8)
        if fds:
            self.sock.sendmsg([header + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(header + body)
        return self.serial

    def _read_message(self) -> bytes:
        while True:
            if len(self.pending) >= 16:
                body_len, _, fields_len = struct.unpack_from("<III", self.pending, 4)
                total = 16 + fields_len + (-fields_len % 8) + body_len
                if len(self.pending) >= total:
                    message = bytes(self.pending[:total])
                    del self.pending[:total]
                    return message
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise CallFailed("the bus closed the connection")
            self.pending.extend(chunk)

    def reply(self, serial: int) -> tuple[int, str, bytes]:
        """(message type, error name or "", body) of the reply to ``serial``."""
        while True:
            message = self._read_message()
            kind = message[1]
            if kind not in (_METHOD_RETURN, _ERROR):
                continue  # a signal
            fields_len = struct.unpack_from("<I", message, 12)[0]
            reply_serial, error = 0, ""
            pos, end = 16, 16 + fields_len
            while pos < end:
                pos += -pos % 8
                code, sig_len = message[pos], message[pos + 1]
                sig = message[pos + 2:pos + 2 + sig_len].decode()
                pos += 3 + sig_len
                if sig in "sou":
                    pos += -pos % 4
                    n = struct.unpack_from("<I", message, pos)[0]
                    if sig == "u":
                        if code == 5:
                            reply_serial = n
                        pos += 4
                    else:
                        if code == 4:
                            error = message[pos + 4:pos + 4 + n].decode()
                        pos += 5 + n
                elif sig == "g":
                    pos += 2 + message[pos]
                else:
                    raise CallFailed(f"unexpected header field signature {sig}")
            if reply_serial != serial:
                continue
            body = message[16 + fields_len + (-fields_len % 8):]
            return kind, error, body

    def call(self, destination: str, path: str, interface: str, member: str, signature: str = "",
             body: bytes = b"", fds: list[int] | None = None) -> bytes:
        kind, error, data = self.reply(self.send(destination, path, interface, member, signature, body, fds))
        if kind == _ERROR:
            text = first_string(data) if data else ""
            raise CallFailed(f"{error}: {text}")
        return data

    def manager(self, member: str, signature: str = "", args: list | None = None,
                fds: list[int] | None = None) -> bytes:
        body = marshal(signature, args or []) if signature else b""
        return self.call(BUS_NAME, MANAGER_PATH, MANAGER_INTERFACE, member, signature, body, fds)

    def close(self) -> None:
        self.sock.close()


def first_string(body: bytes) -> str:
    n = struct.unpack_from("<I", body, 0)[0]
    return body[4:4 + n].decode(errors="replace")


def first_u64(body: bytes) -> int:
    return struct.unpack_from("<Q", body, 0)[0]
