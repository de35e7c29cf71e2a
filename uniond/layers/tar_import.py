"""Reading layer tars: an OCI / Docker image layer into overlay's native form
(ImportLayer).

A layer (plain or compressed) from a caller's descriptor is written into an empty
directory through the Builder, so that the directory can be a lowerdir (E3). Layers are
hostile until proven otherwise: every name, size, id and header is checked, and only
names (for duplicates and hard links) and directory mtimes are remembered.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import stat
import tarfile
from dataclasses import dataclass

from uniond.errors import InvalidArgument
from uniond.layers import tree
from uniond.layers.stream import CHUNK, Source, check_fd
from uniond.layers.tar_export import AUFS_META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX
from uniond.layers.tree import Builder, Meta

log = logging.getLogger("uniond.layers.tar")

_MAX_HEADER = 1 << 20  # a PAX or GNU long-name header larger than this is hostile


class _Header(tarfile.TarInfo):
    """Refuses extended headers big enough to exhaust memory: tarfile reads them whole."""

    def _proc_pax(self, tf):
        if self.size > _MAX_HEADER:
            raise InvalidArgument(f"a PAX header of {self.size} bytes; at most {_MAX_HEADER} are accepted")
        return super()._proc_pax(tf)

    def _proc_gnulong(self, tf):
        if self.size > _MAX_HEADER:
            raise InvalidArgument(f"a GNU long name of {self.size} bytes; at most {_MAX_HEADER} are accepted")
        return super()._proc_gnulong(tf)


def _components(name: str, what: str = "name") -> list[str]:
    """A member name as path components below the layer's root; refuses escapes (E3)."""
    if name.startswith("/"):
        raise InvalidArgument(f"entry {name!r}: absolute {what}; a layer holds relative paths")
    if "\0" in name:
        raise InvalidArgument(f"entry {name!r}: a NUL byte in the {what}")
    if len(name.encode("utf-8", "surrogateescape")) > tree.PATH_MAX:
        raise InvalidArgument(f"entry {name[:64]!r}...: {what} longer than {tree.PATH_MAX} bytes")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidArgument(f"entry {name!r}: '..' in the {what} would leave the layer")
        if len(part.encode("utf-8", "surrogateescape")) > tree.NAME_MAX:
            raise InvalidArgument(f"entry {name!r}: a component is longer than {tree.NAME_MAX} bytes")
        parts.append(part)
    return parts


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text:
        whole, _, frac = text.partition(".")
        try:
            seconds = int(whole)
            ns = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            raise InvalidArgument(f"entry {member.name!r}: bad PAX mtime {text!r}") from None
        mtime_ns = seconds * 1_000_000_000 + (-ns if text.startswith("-") else ns)
    else:
        mtime_ns = int(member.mtime) * 1_000_000_000
    if not -(1 << 63) <= mtime_ns // 1_000_000_000 < 1 << 63:  # time_t
        raise InvalidArgument(f"entry {member.name!r}: mtime {mtime_ns // 1_000_000_000} s is out of range")
    return mtime_ns


def _meta(member: tarfile.TarInfo) -> Meta:
    for what, value in (("uid", member.uid), ("gid", member.gid)):
        if not 0 <= value < (1 << 32) - 1:  # (uid_t)-1 would mean "leave as it is"
            raise InvalidArgument(f"entry {member.name!r}: {what} {value} is out of range")
    xattrs = []
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr."):]
        if not tree.exported_xattr(name):
            # D6: overlay's own (and other trusted/security) xattrs never come from a layer.
            log.info("import: dropped xattr %s of %s", name, member.name)
            continue
        raw = value.encode("utf-8", "surrogateescape")
        if len(raw) > tree.XATTR_SIZE_MAX:
            raise InvalidArgument(f"entry {member.name!r}: xattr {name} is larger than {tree.XATTR_SIZE_MAX} bytes")
        xattrs.append((name, raw))
    return Meta(member.mode & 0o7777, member.uid, member.gid, _mtime_ns(member), tuple(sorted(xattrs)))


@dataclass(frozen=True)
class ImportResult:
    entries: int


class _Importer:
    def __init__(self, destdir: str, devices: bool) -> None:
        self.builder = Builder(destdir)
        self.devices = devices
        self.seen: dict[str, str] = {}  # rel -> "dir", "file" (any non-directory) or "whiteout"
        self.implicit: set[str] = set()  # directories made for a child before their own entry
        self.opaque: set[str] = set()
        vfs = os.statvfs(destdir)
        self.room = vfs.f_bavail * vfs.f_frsize
        self.total = 0

    def _claim(self, rel: str, kind: str) -> None:
        if rel in self.seen:
            raise InvalidArgument(f"entry {rel!r} appears twice in the layer")
        self.seen[rel] = kind

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _components(member.name)
        if not parts:
            if not member.isdir():
                raise InvalidArgument(f"entry {member.name!r}: the layer's root must be a directory")
            return  # the root: destdir itself stays as the caller made it
        if any(p.startswith(AUFS_META_PREFIX) for p in parts[:-1]) or (
            parts[-1].startswith(AUFS_META_PREFIX) and parts[-1] != OPAQUE_MARKER
        ):
            return
        for p in parts[:-1]:
            if p.startswith(WHITEOUT_PREFIX):
                raise InvalidArgument(f"entry {member.name!r}: a whiteout name cannot be a directory")
        base = parts[-1]
        head = "/".join(parts[:-1])
        if base == OPAQUE_MARKER:
            key = f"{head}/{OPAQUE_MARKER}"
            self._claim(key, "marker")
            if head and self.seen.get(head, "dir") != "dir":
                raise InvalidArgument(f"entry {member.name!r}: {head!r} is not a directory")
            if head:
                self.builder.set_opaque(head, self.implicit)
                if head not in self.seen:
                    self.implicit.add(head)
            else:
                raise InvalidArgument("an opaque marker at the layer's root; a root cannot hide lower layers")
            return
        if base.startswith(WHITEOUT_PREFIX):
            target = base[len(WHITEOUT_PREFIX):]
            if target in ("", ".", ".."):
                raise InvalidArgument(f"entry {member.name!r}: names no file to delete (E3)")
            rel = f"{head}/{target}" if head else target
            self._claim(rel, "whiteout")
            self.builder.whiteout(rel, self.implicit)
            return
        rel = "/".join(parts)
        meta = _meta(member)
        if member.isdir():
            existed = rel in self.implicit
            if existed:
                self.implicit.discard(rel)
                self.seen.pop(rel, None)
            self._claim(rel, "dir")
            self.builder.directory(rel, meta, exists=existed, implicit=self.implicit)
            return
        if rel in self.implicit:
            raise InvalidArgument(f"entry {rel!r}: earlier entries used it as a directory")
        self._claim(rel, "file")
        if member.isreg():
            self.total += member.size
            if self.total > self.room:
                raise InvalidArgument(
                    f"entry {rel!r} of {member.size} bytes: the layer does not fit in destdir's free space"
                )
            fd = self.builder.regular(rel, meta, self.implicit)
            try:
                src = tf.extractfile(member)
                assert src is not None
                while chunk := src.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            except BaseException:
                os.close(fd)
                raise
            self.builder.finish_regular(fd, meta)
        elif member.issym():
            target = member.linkname
            if not target or "\0" in target or len(target.encode("utf-8", "surrogateescape")) >= tree.PATH_MAX:
                raise InvalidArgument(f"entry {rel!r}: empty, over-long or NUL-holding symlink target")
            self.builder.symlink(rel, member.linkname, meta, self.implicit)
        elif member.islnk():
            target = "/".join(_components(member.linkname, "link target"))
            if self.seen.get(target) != "file" or target == rel:
                raise InvalidArgument(
                    f"entry {rel!r}: hard link to {member.linkname!r}, which is not an earlier file of this layer"
                )
            self.builder.hardlink(rel, target, self.implicit)
        elif member.isfifo():
            self.builder.node(rel, stat.S_IFIFO, 0, meta, self.implicit)
        elif member.ischr() or member.isblk():
            if member.ischr() and member.devmajor == 0 and member.devminor == 0:
                raise InvalidArgument(f"entry {rel!r}: a 0/0 device is overlay's whiteout; layers use .wh. names")
            if not self.devices:
                raise InvalidArgument(f"entry {rel!r}: a device file; pass devices=true to allow them")
            if not (0 <= member.devmajor < 1 << 12 and 0 <= member.devminor < 1 << 20):  # what mknod(2) takes
                raise InvalidArgument(f"entry {rel!r}: device {member.devmajor}:{member.devminor} is out of range")
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            self.builder.node(rel, kind, os.makedev(member.devmajor, member.devminor), meta, self.implicit)
        else:
            raise InvalidArgument(f"entry {rel!r}: tar entry type {member.type!r} has no place in a layer")


def import_layer(fd: int, destdir: str, devices: bool = False) -> ImportResult:
    """Unpack the layer tar read from ``fd`` into the empty ``destdir``.

    On any error, everything made below ``destdir`` is removed again, so a refused
    archive leaves destdir as empty as it was.
    """
    check_fd(fd, writing=False)
    tree.check_destdir_empty(destdir)
    importer = _Importer(destdir, devices)
    try:
        try:
            try:
                tf = tarfile.open(fileobj=Source(fd), mode="r|*", tarinfo=_Header, errorlevel=2)
            except TypeError:  # tarfile reading a gzip header cut short: ord(b"")
                raise tarfile.ReadError("truncated gzip header") from None
            with tf:
                while (member := tf.next()) is not None:
                    importer.add(tf, member)
                    tf.members.clear()  # stream mode keeps every header otherwise
        except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
            raise InvalidArgument(f"not a readable layer tar: {e}") from None
        except UnicodeError as e:
            raise InvalidArgument(f"a name in the layer is not valid: {e}") from None
        except (ValueError, OverflowError) as e:
            # tarfile's own parsing (a bad sparse map, ...), or a name the system calls
            # cannot take (a NUL byte in an xattr name): hostile like the rest.
            raise InvalidArgument(f"the layer cannot be unpacked: {e}") from None
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
                raise InvalidArgument(f"the layer cannot be unpacked: {e}") from None
            if e.errno == errno.ENOSPC:
                raise InvalidArgument("the layer does not fit in destdir's file system") from None
            raise
        entries = importer.builder.finish()
    except BaseException:
        importer.builder.close()
        tree.empty_directory(destdir)
        raise
    importer.builder.close()
    return ImportResult(entries)
