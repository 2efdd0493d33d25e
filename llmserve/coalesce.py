"""Merging a stream's SSE events when the replica is busy, sending at once when it is not.

Every item a replica yields becomes one Ray object on its way to the client,
and on a small machine that per-object CPU is taken from the engine. A fixed
batching timer would add its full delay to every token even when idle. Here
the first event always leaves at once (time to first token is untouched);
later events wait at most ``window()`` seconds, a window the caller sizes from
how many streams the replica is serving, so a lone stream sees no delay and a
crowded replica sends fewer, larger messages.

Example::

    async for merged in coalesced(engine_events, window=lambda: 0.01):
        yield merged
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

_END = object()


async def coalesced(events: AsyncIterator[str], window: Callable[[], float]) -> AsyncIterator[str]:
    """``events`` joined into fewer strings; exceptions from ``events`` are re-raised in order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except Exception as exc:  # handed to the consumer, which decides what the client sees
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    pumping = asyncio.create_task(pump())
    try:
        first = True
        while True:
            item = await queue.get()
            if not first and not isinstance(item, Exception) and item is not _END:
                delay = window()
                if delay > 0:
                    await asyncio.sleep(delay)
            first = False
            parts: list[str] = []
            while True:
                if item is _END:
                    if parts:
                        yield "".join(parts)
                    return
                if isinstance(item, Exception):
                    if parts:
                        yield "".join(parts)
                    raise item
                parts.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            yield "".join(parts)
    finally:
        # The client went away (or we finished): stop pulling, so vLLM aborts the request.
        pumping.cancel()
