"""Naming a mount as a person does: by id, by object path, or by a path in it.

A path names the innermost uniond mount containing it, as ``findmnt -T`` names the
mount a file is on; it is resolved (symlinks, ``..``) first, as the kernel would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from uniond import constants
from uniond.client.errors import NotFound
from uniond.client.values import MountInfo


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def resolve(name: str, mounts: Sequence[MountInfo]) -> MountInfo:
    if name.startswith(constants.MOUNT_PATH_PREFIX + "/"):
        for info in mounts:
            if info.path == name:
                return info
        raise NotFound(f"no mount object {name!r}; `unionctl list` shows the mounts")
    for info in mounts:
        if info.id == name:
            return info
    path = os.path.realpath(name)
    containing = [info for info in mounts if _inside(path, info.mountpoint)]
    if containing:
        return max(containing, key=lambda info: len(info.mountpoint))
    raise NotFound(f"{name!r} is neither a mount id nor a path inside a uniond mount; `unionctl list` shows them")
