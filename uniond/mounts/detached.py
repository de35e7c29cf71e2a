"""Detached mounts: lazily unmounted, still used, cleaned when their last user goes.

A lazy Unmount of a busy overlay takes it off its mountpoint but the kernel keeps it
alive for the processes inside (M12), and it still writes through its workdir, so the
workdir and the claims on upper and workdir stay until no process holds anything on
it; these functions notice that moment (a scan every few seconds, off the event loop)
and then clean as an Unmount would.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from uniond.errors import Busy
from uniond.kernel import holders
from uniond.mounts.records import MountRecord

if TYPE_CHECKING:
    from uniond.mounts.manager import MountManager

log = logging.getLogger("uniond.mounts.manager")

POLL_SECONDS = 2.0  # how soon the last user of a detached mount is noticed


def unmount(manager: MountManager, record: MountRecord, lazy: bool) -> MountRecord:
    users = holders.holding({record.mnt_id}).get(record.mnt_id, [])
    if not users:
        manager.forget(record)
        log.info("mount %s: detached mount unused now; cleaned", record.id)
    elif not lazy:
        raise Busy(
            f"mount {record.id} is already detached and still used by: {', '.join(map(str, users))}; "
            "it is cleaned when they have gone"
        )
    return record


def sweep(manager: MountManager, held: dict[int, list[holders.Holder]] | None = None) -> list[MountRecord]:
    """Clean every detached mount that no process holds any more (M12); run every
    few seconds while there are detached mounts (watch does). ``held``:
    a scan of the holders made meanwhile, off the event loop."""
    waiting = manager.detached()
    if not waiting:
        return []
    if held is None:
        held = holders.holding({r.mnt_id for r in waiting})
    gone = []
    for record in waiting:
        if record.mnt_id not in held and manager.records.get(record.id) == record:
            manager.forget(record)
            log.info("mount %s: the last user of the detached mount has gone; cleaned", record.id)
            gone.append(record)
    return gone


async def watch(manager: MountManager, interval: float = POLL_SECONDS) -> None:
    """Forever: notice detached mounts whose last user has gone (within ``interval``)."""
    while True:
        await asyncio.sleep(interval)
        ids = {r.mnt_id for r in manager.detached()}
        if ids:
            sweep(manager, await asyncio.to_thread(holders.holding, ids))
