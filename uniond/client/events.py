"""MountAdded / MountRemoved as a client receives them (``AsyncClient.events``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dbus_next import Message, MessageType

from uniond import constants
from uniond.client.values import Event

if TYPE_CHECKING:
    from uniond.client.aio import AsyncClient


class AsyncEvents:
    """MountAdded / MountRemoved as they come; ``close()`` ends the subscription."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.rule = (f"type='signal',sender='{constants.BUS_NAME}',path='{constants.MANAGER_PATH}',"
                     f"interface='{constants.MANAGER_INTERFACE}'")
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def _on_message(self, msg: Message) -> None:
        if (msg.message_type == MessageType.SIGNAL and msg.path == constants.MANAGER_PATH
                and msg.interface == constants.MANAGER_INTERFACE and msg.member in ("MountAdded", "MountRemoved")):
            self._queue.put_nowait(Event(msg.member, msg.body[0], msg.body[1]))

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; TimeoutError after ``timeout`` seconds without one."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    def __aiter__(self) -> AsyncEvents:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def close(self) -> None:
        bus = self.client._bus
        if bus is not None:
            bus.remove_message_handler(self._on_message)
