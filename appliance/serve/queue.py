"""The bounded request queue: how many requests may wait for a busy worker.

Each worker runs one request at a time behind an ``asyncio.Lock`` (first come, first served),
so concurrent requests queue and never interrupt each other. ``RequestQueue`` counts the
requests waiting across all workers and refuses a new one with ``QueueFullError`` (HTTP 429)
once ``max_waiting`` are already waiting.
"""

from __future__ import annotations

import asyncio

from appliance.errors import QueueFullError


class RequestQueue:
    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_waiting = max_waiting
        self.waiting = 0

    async def acquire(self, lock: asyncio.Lock | asyncio.Semaphore) -> None:
        """Take ``lock``, waiting in line if it is held; QueueFullError if the line is full."""
        # An unlocked lock is taken without yielding, so counting it as waiting costs nothing.
        if lock.locked() and self.waiting >= self.max_waiting:
            raise QueueFullError(
                f"the request queue is full ({self.waiting} waiting, at most {self.max_waiting}); "
                "retry later"
            )
        self.waiting += 1
        try:
            await lock.acquire()
        finally:
            self.waiting -= 1
