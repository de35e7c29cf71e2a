"""What a caller could reach on its own, judged from file modes with the caller's ids.

This picks the polkit action for a Mount: a caller who could read every lower and
owns the upper and the mountpoint gets the plain ``mount`` action, anyone else needs
``mount-any``. The daemon runs as root, so os.access would answer for root; switching
the daemon's own ids per call would affect its other threads. ACLs are not read, so
an ACL that grants access only makes the check stricter (mount-any), never looser.
"""

from __future__ import annotations

import os
import stat

from uniond.access.caller import Caller

_R, _W, _X = 4, 2, 1


def _allows(caller: Caller, st: os.stat_result, want: int) -> bool:
    if caller.uid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == caller.uid:
        bits = (mode >> 6) & 7
    elif st.st_gid in caller.gids:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def _ancestors_searchable(caller: Caller, path: str) -> bool:
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent, follow_symlinks=False)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or not _allows(caller, st, _X):
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def can_read(caller: Caller, path: str, st: os.stat_result) -> bool:
    """The caller could list and enter ``path`` itself."""
    return _allows(caller, st, _R | _X) and _ancestors_searchable(caller, path)


def owns(caller: Caller, path: str, st: os.stat_result) -> bool:
    """The caller owns ``path``, can use it fully and reach it."""
    return st.st_uid == caller.uid and _allows(caller, st, _R | _W | _X) and _ancestors_searchable(caller, path)
