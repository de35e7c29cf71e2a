"""Reading layer tars: an OCI / Docker image layer into overlay's native form
(ImportLayer).

A layer (plain or compressed) from a caller's descriptor is written into an empty
directory through the Builder, so that the directory can be a lowerdir (E3). Layers are
hostile until proven otherwise: every name, size, id and header is checked, and only
names (for duplicates and hard links) and directory mtimes are remembered.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tarfile
from dataclasses import dataclass

from uniond.errors import InvalidArgument
from uniond.kernel.overlay import empty_directory
from uniond.layers import tree
from uniond.layers.builder import Builder
from uniond.layers.compress import MEDIA_TYPES, Hashing, Reader, decompressing
from uniond.layers.stream import Source, check_fd
from uniond.layers.tar_export import AUFS_META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX
from uniond.layers.tar_member import components, relative
from uniond.layers.tar_member import meta as member_meta
from uniond.layers.tar_read import MAX_HEADER as _MAX_HEADER
from uniond.layers.tar_read import Member, TarReader
from uniond.layers.tree import Meta

log = logging.getLogger("uniond.layers.tar")

_SMALL = 1 << 16  # a file up to this size is written from the reader's buffer in one call


class SafeHeader(tarfile.TarInfo):
    """Refuses extended headers big enough to exhaust memory: tarfile reads them whole
    (for an image archive's own tar; layers are read by tar_read)."""

    def _proc_pax(self, tf):
        if self.size > _MAX_HEADER:
            raise InvalidArgument(f"a PAX header of {self.size} bytes; at most {_MAX_HEADER} are accepted")
        return super()._proc_pax(tf)

    def _proc_gnulong(self, tf):
        if self.size > _MAX_HEADER:
            raise InvalidArgument(f"a GNU long name of {self.size} bytes; at most {_MAX_HEADER} are accepted")
        return super()._proc_gnulong(tf)


@dataclass(frozen=True)
class ImportResult:
    entries: int  # entries made below destdir, parents it had to create included
    members: int = 0  # tar members read, whiteouts included
    bytes: int = 0  # read from the fd (compressed), when digests were asked for
    diff_id: str = ""  # sha256:<hex> of the uncompressed tar, when asked for
    digest: str = ""  # sha256:<hex> of the blob as read, when asked for
    media_type: str = ""
    implicit: tuple[str, ...] = ()  # directories named only as parents, when their metadata waits (adopt)


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(option: str, value: str) -> None:
    if value and not _DIGEST.fullmatch(value):
        raise InvalidArgument(f"{option}: {value[:80]!r} is not a digest; give sha256: and 64 lowercase hex digits")


class _Importer:
    def __init__(self, destdir: str, devices: bool, parents: tuple[str, ...]) -> None:
        self.builder = Builder(destdir)
        self.devices = devices
        self.parents = parents
        self.members = 0
        self.seen: dict[str, str] = {}  # rel -> "dir", "file" (any non-directory) or "whiteout"
        self.implicit: set[str] = set()  # directories made for a child before their own entry
        self.opaque: set[str] = set()
        self.known: dict[tuple[int, int, int, int], Meta] = {}
        vfs = os.statvfs(destdir)
        self.room = vfs.f_bavail * vfs.f_frsize
        self.total = 0

    def _claim(self, rel: str, kind: str) -> None:
        if rel in self.seen:
            raise InvalidArgument(f"entry {rel!r} appears twice in the layer")
        self.seen[rel] = kind

    def _made_non_directory(self, head: str) -> bool:
        """Whether this layer made ``head`` or one of its parents something other than a
        directory (a file, a whiteout)."""
        while head:
            if self.seen.get(head, "dir") not in ("dir", "marker"):
                return True
            head = head.rpartition("/")[0]
        return False

    def adopt_parents(self) -> None:
        """Fix 2: a directory the layer names only as a parent shows what the layers
        below have there, not a default that would hide their mode, owner and xattrs."""
        for rel in sorted(self.implicit):
            meta = tree.lower_directory_meta(self.parents, rel) if self.parents else None
            self.builder.directory(rel, meta or tree.IMPLICIT_DIRECTORY, exists=True)

    def add(self, reader: TarReader, member: Member) -> None:
        self.members += 1
        kind = member.type
        rel = relative(member.name)
        if not rel:
            if kind != b"5":
                raise InvalidArgument(f"entry {member.name!r}: the layer's root must be a directory")
            return  # the root: destdir itself stays as the caller made it
        if WHITEOUT_PREFIX not in rel:
            self._make(rel, kind, member, reader)
            return
        parts = rel.split("/")
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
            if self._made_non_directory(head):
                # umoci writes `todf` (now a file) and then `todf/.wh.t`: below a
                # non-directory this layer made, a whiteout hides nothing (containerd too).
                log.debug("import: skipped %s below a non-directory of the same layer", member.name)
                return
            self._claim(rel, "whiteout")
            self.builder.whiteout(rel, self.implicit)
            return
        self._make(rel, kind, member, reader)

    def _make(self, rel: str, kind: bytes, member: Member, reader: TarReader) -> None:
        """An entry that is neither a whiteout nor an opaque marker."""
        meta = member_meta(member, self.known)
        if kind == b"5":
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
        if kind in (b"0", b"S"):
            self.total += member.size
            if self.total > self.room:
                raise InvalidArgument(
                    f"entry {rel!r} of {member.size} bytes: the layer does not fit in destdir's free space"
                )
            if member.size <= _SMALL and member.sparse is None:
                self.builder.small_file(rel, meta, reader.body(member), self.implicit)
                return
            fd = self.builder.regular(rel, meta, self.implicit)
            try:
                reader.write_body(fd, member)
            except BaseException:
                os.close(fd)
                raise
            self.builder.finish_regular(fd, meta)
        elif kind == b"2":
            target = member.linkname
            if not target or "\0" in target or len(target.encode("utf-8", "surrogateescape")) >= tree.PATH_MAX:
                raise InvalidArgument(f"entry {rel!r}: empty, over-long or NUL-holding symlink target")
            self.builder.symlink(rel, member.linkname, meta, self.implicit)
        elif kind == b"1":
            target = "/".join(components(member.linkname, "link target"))
            if self.seen.get(target) != "file" or target == rel:
                raise InvalidArgument(
                    f"entry {rel!r}: hard link to {member.linkname!r}, which is not an earlier file of this layer"
                )
            self.builder.hardlink(rel, target, self.implicit)
        elif kind == b"6":
            self.builder.node(rel, stat.S_IFIFO, 0, meta, self.implicit)
        elif kind in (b"3", b"4"):
            if kind == b"3" and member.devmajor == 0 and member.devminor == 0:
                raise InvalidArgument(f"entry {rel!r}: a 0/0 device is overlay's whiteout; layers use .wh. names")
            if not self.devices:
                raise InvalidArgument(f"entry {rel!r}: a device file; pass devices=true to allow them")
            if not (0 <= member.devmajor < 1 << 12 and 0 <= member.devminor < 1 << 20):  # what mknod(2) takes
                raise InvalidArgument(f"entry {rel!r}: device {member.devmajor}:{member.devminor} is out of range")
            node = stat.S_IFCHR if kind == b"3" else stat.S_IFBLK
            self.builder.node(rel, node, os.makedev(member.devmajor, member.devminor), meta, self.implicit)
        else:
            raise InvalidArgument(f"entry {rel!r}: tar entry type {member.type!r} has no place in a layer")


def import_layer(fd: int, destdir: str, devices: bool = False, parents: tuple[str, ...] = (),
                 digests: bool = False, expected_digest: str = "", expected_diff_id: str = "") -> ImportResult:
    """Unpack the layer tar read from ``fd`` into the empty ``destdir``.

    ``parents`` are the directories the layer will sit on, top-most first: a directory
    the layer names only as a parent takes their metadata (without them: 0755, root,
    the epoch). ``digests`` reads the fd to its end and answers the layer's diff_id and
    digest; a layer that does not match ``expected_*`` is refused. On any error,
    everything made below ``destdir`` is removed again, so a refused archive leaves
    destdir as empty as it was.
    """
    check_fd(fd, writing=False)
    return unpack(Source(fd), destdir, devices, parents, digests, expected_digest, expected_diff_id)


def unpack(source: Reader, destdir: str, devices: bool = False, parents: tuple[str, ...] = (),
           digests: bool = False, expected_digest: str = "", expected_diff_id: str = "",
           defer_parents: bool = False) -> ImportResult:
    """import_layer from any reader (a blob inside an image archive). ``defer_parents``
    leaves the directories named only as parents for ``adopt``, once the layers below
    are known."""
    check_digest("expected_digest", expected_digest)
    check_digest("expected_diff_id", expected_diff_id)
    digests = digests or bool(expected_digest or expected_diff_id)
    tree.check_destdir_empty(destdir)
    importer = _Importer(destdir, devices, parents)
    try:
        blob = Hashing(source, hashing=digests)
        try:
            plain, compression = decompressing(blob)
            tarred = Hashing(plain, hashing=digests and compression != "none")
            reader = TarReader(tarred)
            while (member := reader.next()) is not None:
                importer.add(reader, member)
            if digests:
                tarred.drain()
                blob.drain()
        except (tarfile.TarError, EOFError) as e:  # an image archive's reader, around the layer
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
        digest = blob.digest
        diff_id = tarred.digest if compression != "none" else digest
        for option, expected, actual in (("expected_digest", expected_digest, digest),
                                         ("expected_diff_id", expected_diff_id, diff_id)):
            if expected and expected != actual:
                what = "digest" if option == "expected_digest" else "diff_id"
                raise InvalidArgument(f"{option}: the layer's {what} is {actual}, not {expected}; refused")
        if not defer_parents:
            importer.adopt_parents()
        entries = importer.builder.finish()
    except BaseException:
        importer.builder.close()
        empty_directory(destdir)
        raise
    importer.builder.close()
    implicit = tuple(sorted(importer.implicit)) if defer_parents else ()
    return ImportResult(entries, importer.members, blob.count, diff_id, digest, MEDIA_TYPES[compression], implicit)


def adopt(destdir: str, implicit: tuple[str, ...], parents: tuple[str, ...]) -> None:
    """The metadata of the directories an unpacked layer named only as parents, from
    ``parents`` (top-most first), as import_layer gives them (fix 2)."""
    builder = Builder(destdir)
    try:
        for rel in implicit:
            meta = tree.lower_directory_meta(parents, rel) if parents else None
            builder.directory(rel, meta or tree.IMPLICIT_DIRECTORY, exists=True)
        builder.finish()
    finally:
        builder.close()
