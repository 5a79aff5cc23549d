"""Admission control for a peer: a rate limit, a concurrency limit and a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from asyncio_throttle import Throttler

from swarmlens.peer.errors import PeerBusyError


class AdmissionControl:
    """Admit requests at most `max_per_second` per second, `max_concurrent` at a time.

    Up to `max_waiting` requests wait for a slot. One more is rejected at once with
    `PeerBusyError`, so that an overloaded peer replies quickly and the client can route
    around it instead of timing out.
    """

    def __init__(self, *, max_concurrent: int, max_waiting: int, max_per_second: int) -> None:
        for name, value in (("max_concurrent", max_concurrent), ("max_per_second", max_per_second)):
            if value < 1:
                raise ValueError(f"invalid {name} {value}: it must be at least 1")
        if max_waiting < 0:
            raise ValueError(f"invalid max_waiting {max_waiting}: it must be at least 0")
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self._throttler = Throttler(rate_limit=max_per_second, period=1.0)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._waiting = 0
        self._running = 0

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts."""
        return self._running, self._waiting

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Wait for a slot for one request, or raise `PeerBusyError` if the queue is full."""
        if self._waiting >= self.max_waiting and (self._slots.locked() or self._waiting > 0):
            raise PeerBusyError(
                f"peer is busy: {self._running} requests running and {self._waiting} waiting "
                f"(limits {self.max_concurrent} and {self.max_waiting}); retry later or use another peer"
            )

        self._waiting += 1
        try:
            await self._throttler.acquire()
            await self._slots.acquire()
        finally:
            self._waiting -= 1

        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._slots.release()
