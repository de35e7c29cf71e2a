"""What a layer tar's member becomes below the layer's root: its path, checked so that it
stays below (E3), and its Meta, with the ids, times and xattrs a layer may carry (D6)."""

from __future__ import annotations

import logging

from uniond.errors import InvalidArgument
from uniond.layers import tree
from uniond.layers.tar_read import Member
from uniond.layers.tree import Meta

log = logging.getLogger("uniond.layers.tar")


def components(name: str, what: str = "name") -> list[str]:
    """A member name as path components below the layer's root; refuses escapes (E3)."""
    if name.startswith("/"):
        raise InvalidArgument(f"entry {name!r}: absolute {what}; a layer holds relative paths")
    if "\0" in name:
        raise InvalidArgument(f"entry {name!r}: a NUL byte in the {what}")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > tree.PATH_MAX:
        raise InvalidArgument(f"entry {name[:64]!r}...: {what} longer than {tree.PATH_MAX} bytes")
    parts = [part for part in name.split("/") if part and part != "."]
    if ".." in parts:
        raise InvalidArgument(f"entry {name!r}: '..' in the {what} would leave the layer")
    if size > tree.NAME_MAX:  # else no component can be longer
        for part in parts:
            if len(part.encode("utf-8", "surrogateescape")) > tree.NAME_MAX:
                raise InvalidArgument(f"entry {name!r}: a component is longer than {tree.NAME_MAX} bytes")
    return parts


def relative(name: str) -> str:
    """The member name as a path below the layer's root ("" for the root itself), as
    ``components`` gives it; the common plain names skip its checks one by one."""
    if name.startswith("./"):
        name = name[2:]  # how `tar -C dir .` writes every name
    if (len(name) <= tree.NAME_MAX // 4 and name and name[0] not in "/." and "/." not in name
            and "//" not in name and "\0" not in name and name[-1] != "/"):
        return name  # no empty, "." or ".." component, no long one: nothing to refuse or drop
    return "/".join(components(name))


def _mtime_ns(member: Member) -> int:
    text = member.pax.get("mtime") if member.pax else None
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


_ID_END = (1 << 32) - 1  # (uid_t)-1 would mean "leave as it is"


def meta(member: Member, known: dict[tuple[int, int, int, int], Meta]) -> Meta:
    """The member's Meta; ``known`` holds those without xattrs already made, since most
    entries of a layer share one (a Meta costs more to make than to look up)."""
    if not (0 <= member.uid < _ID_END and 0 <= member.gid < _ID_END):
        what, value = ("uid", member.uid) if not 0 <= member.uid < _ID_END else ("gid", member.gid)
        raise InvalidArgument(f"entry {member.name!r}: {what} {value} is out of range")
    if not member.pax:
        key = (member.mode & 0o7777, member.uid, member.gid, _mtime_ns(member))
        meta = known.get(key)
        if meta is None:
            if len(known) >= 4096:  # constant memory, whatever the layer
                known.clear()
            meta = known[key] = Meta(*key)
        return meta
    xattrs = []
    for key, value in member.pax.items():
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
