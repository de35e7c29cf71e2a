"""Turning a Mount request into a checked plan: every directory open, every rule met.

A plan holds the caller's directories open (through the access room, without
symlinks) from the check until the mount, so what was checked is what gets mounted.
The checks that depend on the daemon's own state (who uses which upper, workdir and
mountpoint) are run again just before the mount, because authorization awaits and
another call may have changed that state meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

from uniond.access import paths, reach
from uniond.access.caller import Caller
from uniond.access.paths import OpenDir, Places
from uniond.constants import OPTION_NO_USER_INTERACTION
from uniond.errors import AlreadyMounted, Busy, InvalidArgument
from uniond.kernel import holders, syscalls
from uniond.kernel import overlay as engine
from uniond.kernel.mounttable import OverlayUppers
from uniond.mounts.holdings import Holdings
from uniond.mounts.records import MountRecord, MountSpec

MAX_LOWERS = 500  # M1: the kernel stacks at most 500 lowers


@dataclass(frozen=True)
class MountRequest:
    lowerdirs: tuple[str, ...]
    upperdir: str
    mountpoint: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """A checked Mount: the record to write and the caller's directories, held open."""

    record: MountRecord
    lowers: tuple[OpenDir, ...]
    upper: OpenDir | None
    upper_parent: int | None  # where the daemon creates the workdir
    workdir: OpenDir | None  # the caller's own workdir option
    mountpoint: OpenDir | None  # None: the daemon makes one


@dataclass(frozen=True)
class Context:
    """What a plan is checked against: the daemon's places, the mounts it holds and the
    uppers the kernel's overlays use."""

    places: Places
    runtime_dir: str
    boot_id: str
    holdings: Holdings
    kernel: OverlayUppers


def make(
    request: MountRequest, opts: dict[str, Any], mount_id: str, owner: int, ctx: Context, held: contextlib.ExitStack
) -> Plan:
    # Every path is checked for form and size before any is opened.
    for i, p in enumerate(request.lowerdirs):
        paths.canonical(f"lowerdirs[{i}]", p)
    for argument, p in (("upperdir", request.upperdir), ("mountpoint", request.mountpoint),
                        ("workdir", opts.get("workdir"))):
        if p:
            paths.canonical(argument, p)
    places = ctx.places
    lowers = tuple(places.open(held, f"lowerdirs[{i}]", p) for i, p in enumerate(request.lowerdirs))
    if len({h.path for h in lowers}) != len(lowers) or len({(h.st.st_dev, h.st.st_ino) for h in lowers}) != len(
        lowers
    ):
        raise InvalidArgument("lowerdirs: the same directory is given twice")
    readonly = opts.get("readonly", False)
    volatile = opts.get("volatile", False)
    named = {h.argument: h.path for h in lowers}
    if volatile and (not request.upperdir or readonly):
        raise InvalidArgument("volatile: only a writable mount (with an upperdir) can be volatile")

    upper = upper_parent = workdir_handle = None
    workdir, workdir_created = "", False
    if request.upperdir:
        upper = places.open(held, "upperdir", request.upperdir, placed=True)
        named["upperdir"] = upper.path
        if not readonly:
            refuse_detached("upperdir", upper.path, ctx.holdings)
        if readonly and "workdir" in opts:
            raise InvalidArgument("workdir: a read-only mount uses no workdir; drop the option")
        if not readonly:
            refuse_upper_in_use(upper.path, ctx.holdings, ctx.kernel)
            if "workdir" in opts:
                workdir_handle = places.open(held, "workdir", opts["workdir"], placed=True)
                workdir = workdir_handle.path
                refuse_detached("workdir", workdir, ctx.holdings)
                check_workdir(workdir_handle, upper, ctx.holdings)
            else:
                parent = places.open(held, "upperdir", os.path.dirname(upper.path))
                if parent.st.st_dev != upper.st.st_dev:
                    raise InvalidArgument(
                        f"upperdir {upper.path!r} is the root of a filesystem, so the workdir cannot go beside "
                        "it; pass a 'workdir' option on the same filesystem"
                    )
                child = os.stat(os.path.basename(upper.path), dir_fd=parent.fd, follow_symlinks=False)
                if (child.st_dev, child.st_ino) != (upper.st.st_dev, upper.st.st_ino):
                    raise InvalidArgument(f"upperdir {upper.path!r} was moved while being checked; try again")
                upper_parent = parent.fd
                workdir = os.path.join(parent.path, f".{os.path.basename(upper.path)}.uniond-work-{mount_id}")
                workdir_created = True
            named["workdir"] = workdir

    mountpoint_created = not request.mountpoint
    mountpoint_handle = None
    if mountpoint_created:
        mountpoint = os.path.join(ctx.runtime_dir, "mounts", mount_id)
    else:
        mountpoint_handle = places.open(held, "mountpoint", request.mountpoint, placed=True)
        mountpoint = mountpoint_handle.path
        if syscalls.mount_identity("", mountpoint_handle.fd)[1]:
            raise AlreadyMounted(f"mountpoint {mountpoint!r} is already a mount point; unmount it or pick another")
        named["mountpoint"] = mountpoint
    paths.refuse_nesting(named)

    spec = MountSpec(
        tuple(h.path for h in lowers), upper.path if upper else "", workdir, mountpoint,
        readonly=readonly or not upper, volatile=volatile,
        dev=opts.get("dev", False), suid=opts.get("suid", False),
    )
    record = MountRecord(
        id=mount_id,
        spec=spec,
        owner=owner,
        created_us=time.time_ns() // 1000,
        boot_id=ctx.boot_id,
        options={k: v for k, v in opts.items() if k != OPTION_NO_USER_INTERACTION},
        description=opts.get("description", ""),
        workdir_created=workdir_created,
        mountpoint_created=mountpoint_created,
    )
    return Plan(record, lowers, upper, upper_parent, workdir_handle, mountpoint_handle)


def escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def details(spec: MountSpec, mount_id: str = "", owner: int | None = None) -> dict[str, str]:
    """What polkit rules can match on; lowerdirs joined with ':' as overlayfs' option (M2)."""
    details = {
        "mountpoint": spec.mountpoint,
        "lowerdirs": ":".join(escape(p) for p in spec.lowerdirs),
        "upperdir": spec.upperdir,
    }
    if mount_id:
        details["mount"] = mount_id
    if owner is not None:
        details["owner"] = str(owner)
    return details


def reachable(plan: Plan, caller: Caller) -> bool:
    """Could the caller read every lower and does it own the upper and mountpoint?"""
    if not all(reach.can_read(caller, h.path, h.st) for h in plan.lowers):
        return False
    return all(reach.owns(caller, h.path, h.st) for h in (plan.upper, plan.workdir, plan.mountpoint) if h)


def recheck(plan: Plan, holdings: Holdings, kernel: OverlayUppers) -> None:
    """What another call may have changed while this one awaited authorization."""
    spec = plan.record.spec
    if spec.upperdir and not spec.readonly:
        refuse_detached("upperdir", spec.upperdir, holdings)
        if plan.workdir is not None:
            refuse_detached("workdir", spec.workdir, holdings)
        refuse_upper_in_use(spec.upperdir, holdings, kernel)
        if plan.workdir is not None:
            check_workdir(plan.workdir, plan.upper, holdings)
    if plan.mountpoint is not None:
        # The descriptor still names the directory underneath a mount made since, so
        # ask the path and the record as well.
        # A detached mount has left its mountpoint: that one may be mounted on again
        # (the holdings index no detached mount's mountpoint).
        taken = spec.mountpoint in holdings.mountpoints
        if taken or engine.is_mount_root(spec.mountpoint):
            raise AlreadyMounted(f"mountpoint {spec.mountpoint!r} was mounted on meanwhile; pick another")


def refuse_detached(argument: str, path: str, holdings: Holdings) -> None:
    """M7, M12: a lazily unmounted overlay still uses its upper and workdir while anyone is
    inside it, so they are Busy (naming who) until it is gone, not merely "in use"."""
    for record in holdings.detached.values():
        spec = record.spec
        if path in (spec.upperdir, spec.workdir) and not spec.readonly:
            users = holders.holding({record.mnt_id}).get(record.mnt_id, [])
            raise Busy(
                f"{argument} {path!r} belongs to mount {record.id}, detached by a lazy Unmount and still used by: "
                f"{', '.join(map(str, users)) or 'processes leaving now'}; stop them and try again"
            )


def refuse_upper_in_use(upper: str, holdings: Holdings, kernel: OverlayUppers) -> None:
    """M7: two overlays sharing an upper give undefined results."""
    if upper in holdings.uppers:
        raise InvalidArgument(f"upperdir {upper!r} is already the upper of mount {holdings.uppers[upper]}")
    user = kernel.user_of(upper)
    if user is not None:
        raise InvalidArgument(f"upperdir {upper!r} is already in use by the overlay at {user}")


def check_workdir(workdir: OpenDir, upper: OpenDir | None, holdings: Holdings) -> None:
    assert upper is not None
    if workdir.st.st_dev != upper.st.st_dev:
        raise InvalidArgument(f"workdir {workdir.path!r} must be on the same filesystem as upperdir {upper.path!r}")
    leftovers = set(os.listdir(f"/proc/self/fd/{workdir.fd}")) - {"work", "index"}
    if leftovers:
        raise InvalidArgument(f"workdir {workdir.path!r} must be empty; it holds {sorted(leftovers)[:3]}")
    if workdir.path in holdings.workdirs:
        raise InvalidArgument(
            f"workdir {workdir.path!r} is already the workdir of mount {holdings.workdirs[workdir.path]}"
        )
