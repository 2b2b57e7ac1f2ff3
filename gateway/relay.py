"""Token-plane fan-in: one subscription on this gateway's inbox prefix, one mailbox per request
(the pattern of vLLM's output handler). Chunks are validated here; bad ones are logged and dropped."""

from __future__ import annotations

import asyncio
import logging

from ..proto import subjects
from ..proto.bus import Bus
from ..proto.messages import MessageError, decode_chunk

log = logging.getLogger(__name__)


class Mailboxes:
    def __init__(self, bus: Bus, gateway_id: str):
        self._bus = bus
        self.gateway_id = gateway_id
        self._boxes: dict[str, asyncio.Queue] = {}
        self._sub = None

    async def start(self) -> None:
        self._sub = await self._bus.subscribe_replies(self.gateway_id, self._on_chunk)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def open(self, request_id: str) -> tuple[str, asyncio.Queue]:
        box: asyncio.Queue = asyncio.Queue()
        self._boxes[request_id] = box
        return subjects.reply_inbox(self.gateway_id, request_id), box

    def close(self, request_id: str) -> None:
        self._boxes.pop(request_id, None)

    async def _on_chunk(self, request_id: str, data: bytes) -> None:
        box = self._boxes.get(request_id)
        if box is None:
            return  # the request is gone (finished, cancelled or timed out)
        try:
            chunk = decode_chunk(data)
        except MessageError as err:
            log.warning("dropped chunk for %s: %s", request_id, err)
            return
        box.put_nowait(chunk)
