"""A runner for peer process tests that needs no model: it adds its block count to a number.

Request and response payloads are msgpack maps:
    {"value": int, "chain": [peer ids after this peer], "fail_at": int, "sleep": float}
The runner adds `end - start` to `value`, sleeps `sleep` seconds if given, raises
ValueError if its span starts at block `fail_at`, and forwards the rest of the request to `chain[0]` if
the chain is not empty. So a chain over blocks 0:30 turns value 0 into 30.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import msgpack

ECHO_THROUGHPUT = 1000.0  # block-tokens per second, a made-up constant for routing


class EchoRunner:
    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.throughput = ECHO_THROUGHPUT

    async def handle_forward(self, payload: bytes, forward: Callable[[str, bytes], Awaitable[bytes]]) -> bytes:
        request = msgpack.unpackb(payload)
        if request.get("sleep"):
            await asyncio.sleep(request["sleep"])
        if request.get("fail_at") == self.start:
            raise ValueError(f"failed on purpose at block {self.start}")

        value = request["value"] + (self.end - self.start)
        chain = request.get("chain", [])
        if chain:
            next_request = {**request, "value": value, "chain": chain[1:]}
            return await forward(chain[0], msgpack.packb(next_request))
        return msgpack.packb({"value": value})


async def create_echo_runner(model: object, start: int, end: int) -> EchoRunner:
    return EchoRunner(start, end)
