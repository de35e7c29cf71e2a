"""Which directories the kernel's overlays use as their upper (M7), without reading the
whole mount table per Mount.

/proc/self/mountinfo lists every mount; with 10,000 of them, reading and parsing it per
Mount was most of a Mount's cost. Since 6.8 the kernel names each mount by a 64-bit id
that only ever grows and is never reused, lists the ids after a given one
(``listmount``), and describes one mount by id (``statmount``; its options, unescaped,
since 6.13 - STATMOUNT_OPT_ARRAY). So this table learns each mount once, when it first
sees its id, and forgets it when a lookup finds it gone; a Mount costs one listmount of
the few mounts made since the last, plus a statmount for each of those. Where the
kernel lacks them, or a seccomp filter refuses them (systemd 252's SystemCallFilter=
does not know them by name), lookups read mountinfo, but only after the kernel has said
that the table changed since the last read (poll's POLLPRI on an open mountinfo), and
a thread reads it again once the table has been quiet for a moment, so that a Mount on
a host of 10,000 mounts seldom waits for the whole table.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
import threading

from uniond.kernel import mountinfo
from uniond.kernel.syscalls import _syscall

SYS_STATMOUNT = 457  # the same on every architecture
SYS_LISTMOUNT = 458
LSMT_ROOT = 0xFFFFFFFFFFFFFFFF  # every mount of this namespace
STATMOUNT_MNT_POINT = 0x10
STATMOUNT_FS_TYPE = 0x20
STATMOUNT_OPT_ARRAY = 0x400
_WANT = STATMOUNT_MNT_POINT | STATMOUNT_FS_TYPE | STATMOUNT_OPT_ARRAY
_REQUEST = struct.Struct("<IIQQ")  # struct mnt_id_req, version 0: size, spare, mnt_id, param
_HEADER = 512  # sizeof(struct statmount); its strings follow, at offsets from here
_BATCH = 4096
_BUFFER = 1 << 16
_ESCAPED = set(" \t\n\\,")  # written as \ooo in mountinfo (a comma too, in overlay options)

__all__ = ["ChangedTable", "OverlayUppers"]

log = logging.getLogger(__name__)


def _listmount(after: int, out: ctypes.Array) -> list[int]:
    request = _REQUEST.pack(_REQUEST.size, 0, LSMT_ROOT, after)
    n = _syscall(SYS_LISTMOUNT, request, out, len(out), 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"listmount: {errno.errorcode.get(err, err)}")
    return out[:n]


def _statmount(mnt_id: int, buf: ctypes.Array) -> tuple[str, str, tuple[str, ...]] | None:
    """(fs type, mountpoint, uppers) of one mount; None if it is gone or too large."""
    request = _REQUEST.pack(_REQUEST.size, 0, mnt_id, _WANT)
    if _syscall(SYS_STATMOUNT, request, buf, len(buf), 0) < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.EOVERFLOW):  # gone; or options beyond 64 KiB, not ours
            return None
        raise OSError(err, f"statmount: {errno.errorcode.get(err, err)}")
    raw = buf.raw
    mask = struct.unpack_from("<Q", raw, 8)[0]

    def string(offset: int) -> bytes:
        start = _HEADER + offset
        return raw[start : raw.index(b"\0", start)]

    # A mount without options, or one outside this root, lacks those parts: only an
    # overlay's matter, and an overlay always has options.
    fs_type = string(struct.unpack_from("<I", raw, 36)[0]).decode() if mask & STATMOUNT_FS_TYPE else ""
    if fs_type != "overlay":
        return fs_type, "", ()
    if not mask & STATMOUNT_OPT_ARRAY:
        raise OSError(errno.ENOSYS, "statmount: this kernel does not give options as an array")
    if mask & STATMOUNT_MNT_POINT:
        mountpoint = string(struct.unpack_from("<I", raw, 108)[0])
    else:
        mountpoint = b"(a mount outside uniond's root)"
    count, offset = struct.unpack_from("<II", raw, 128)
    uppers, start = [], _HEADER + offset
    for _ in range(count):
        end = raw.index(b"\0", start)
        name, _, value = raw[start:end].partition(b"=")
        if name == b"upperdir":
            uppers.append(value.decode("utf-8", "surrogateescape"))
        start = end + 1
    return fs_type, mountpoint.decode("utf-8", "surrogateescape"), tuple(uppers)


class OverlayUppers:
    """The uppers in use by the kernel's overlays, learnt mount by mount."""

    def __init__(self) -> None:
        self._after = 0  # the highest mount id seen
        self._users: dict[str, set[int]] = {}  # upper -> ids of overlays that used it
        self._ids = (ctypes.c_uint64 * _BATCH)()
        self._buf = ctypes.create_string_buffer(_BUFFER)
        self._fallback = False
        self._table: ChangedTable | None = None  # mountinfo, where the calls are refused

    def user_of(self, upper: str) -> str | None:
        """The mountpoint of a live overlay using ``upper`` as its upper, if any."""
        if not self._fallback:
            try:
                return self._lookup(upper)
            except OSError as e:
                # ENOSYS, EINVAL: a kernel before 6.13; EPERM: a seccomp filter that does
                # not know the calls by name (systemd 252's SystemCallFilter= answers so).
                if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
                    raise
                self._fallback = True  # read the whole table instead
                log.info("%s (a seccomp filter, or a kernel before 6.13); the uppers in use are read "
                         "from %s when the mount table changes (slow with thousands of mounts: see "
                         "\"Hosts with thousands of mounts\" in the README)", e.strerror, mountinfo.MOUNTINFO)
        if self._table is None:
            self._table = ChangedTable()
        text = self._table.text()
        # A path with none of the characters mountinfo escapes appears there as it is:
        # if no line names it as an upper, nothing need be parsed (the common case).
        if not _ESCAPED & set(upper) and f"upperdir={upper}" not in text:
            return None
        for entry in mountinfo.parse(text, fstype="overlay"):
            if upper in entry.option_values("upperdir"):
                return entry.mountpoint
        return None

    def _lookup(self, upper: str) -> str | None:
        self._learn()
        users = self._users.get(upper)
        while users:
            mnt_id = next(iter(users))
            found = _statmount(mnt_id, self._buf)
            if found is not None and upper in found[2]:
                return found[1]
            users.discard(mnt_id)  # unmounted since it was learnt
        self._users.pop(upper, None)
        return None

    def _learn(self) -> None:
        while True:
            ids = _listmount(self._after, self._ids)
            for mnt_id in ids:
                found = _statmount(mnt_id, self._buf)
                if found is not None:
                    for used in found[2]:
                        self._users.setdefault(used, set()).add(mnt_id)
            if ids:
                self._after = ids[-1]
            if len(ids) < _BATCH:
                return


class ChangedTable:
    """mountinfo's text, read again only when the kernel says the table changed.

    The kernel marks an open mountinfo when its namespace's table changes (poll gives
    POLLPRI); until then the text read last is what a new read would give. A Mount asks
    twice (before and after authorization) and most Mounts follow a change, so a thread
    reads the table once it has been quiet for ``QUIET`` seconds: while changes keep
    coming it reads nothing, and the caller that needs the table reads it then.
    """

    QUIET = 0.2

    def __init__(self, path: str = mountinfo.MOUNTINFO, watch: bool = True) -> None:
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._changed = select.poll()
        self._changed.register(self._fd, select.POLLPRI)
        self._text: str | None = None
        if watch:
            threading.Thread(target=self._watch, args=(path,), name="mountinfo", daemon=True).start()

    def text(self) -> str:
        with self._lock:
            if self._text is None or self._has_changed():
                self._text = self._read()
            return self._text

    def _has_changed(self) -> bool:
        """True once per change of the table since the last call (it clears the mark)."""
        return any(events & (select.POLLPRI | select.POLLERR) for _, events in self._changed.poll(0))

    def _read(self) -> str:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "surrogateescape")

    def _watch(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # its own mark, apart from text()'s
        changes = select.poll()
        changes.register(fd, select.POLLPRI)
        while True:
            changes.poll()  # until the table changes
            while changes.poll(self.QUIET * 1000):  # then until it is quiet
                pass
            with self._lock:
                if self._has_changed():
                    self._text = self._read()
