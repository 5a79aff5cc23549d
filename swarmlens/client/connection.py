"""SwarmConnection: the client's DHT node, its event loop thread, routing and calls with retries."""

import asyncio
import atexit
import logging
import threading
import time
from typing import Callable, Sequence

import msgpack
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

from swarmlens.client.retry import RetryPolicy
from swarmlens.peer.errors import InvalidResponseError, PeerTimeoutError, PeerUnreachableError, RemoteError
from swarmlens.peer.protocol import ForwardRequest, ForwardResponse, SessionOpen, SessionStep
from swarmlens.peer.session_stream import SESSION_PROTOCOL, read_response, write_request
from swarmlens.peer.transport import FORWARD_PROTOCOL, call
from swarmlens.swarm import choose_chain, fetch_spans_async, start_dht
from swarmlens.swarm.dht import stop_dht
from swarmlens.swarm.routing import Hop

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0  # one whole chain on CPU peers, including their queues
MAX_RESPONSE_BYTES = 2**31
# Peer records are reused for this long before the DHT is read again (30 lookups, one per
# block); a failed call reads them again at once. Peers announce every few seconds, so a
# record this old is still close to current.
SPANS_MAX_AGE_S = 10.0


class SwarmConnection:
    """A client-mode DHT node plus a background asyncio loop for P2P calls."""

    def __init__(self, initial_peers: Sequence[str], model_id: str, num_blocks: int,
                 retry: RetryPolicy = RetryPolicy(), timeout: float = DEFAULT_TIMEOUT_S):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddr of a DHT node of the swarm, e.g. the one "
                             "printed by `swarmlens up` or `swarmlens dht`")
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.retry = retry
        self.timeout = timeout
        self._spans = None
        self._spans_fetched_at = 0.0
        self.dht = start_dht(list(initial_peers), client_mode=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarmlens-client-loop", daemon=True)
        self._thread.start()
        self._p2p = self.run(self.dht.replicate_p2p())
        self._closed = False
        # A script that never calls close() would otherwise end with asyncio's
        # "Task was destroyed but it is pending" errors from the P2P replica.
        atexit.register(self.close)

    def run(self, coroutine):
        """Run a coroutine on the client's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def route(self, exclude: frozenset[str] = frozenset(), num_tokens: int = 1, refresh: bool = False) -> list[Hop]:
        """Choose a chain from peer records at most SPANS_MAX_AGE_S old; `refresh` reads the DHT again."""
        now = time.monotonic()
        if refresh or self._spans is None or now - self._spans_fetched_at > SPANS_MAX_AGE_S:
            self._spans = self.run(fetch_spans_async(self.dht, self.model_id, self.num_blocks))
            self._spans_fetched_at = now
        return choose_chain(self._spans, self.num_blocks, exclude=exclude, num_tokens=num_tokens)

    def forward(self, build: Callable[[list[Hop]], ForwardRequest], num_tokens: int) -> tuple[ForwardResponse, dict]:
        """Send a forward request along a chain; on a peer failure, route around it and resend.

        The request contains everything the chain needs, so a retry resends it whole and the
        result cannot depend on which peers served it.
        """
        excluded: set[str] = set()
        for attempt in range(1, self.retry.max_attempts + 1):
            chain = self.route(frozenset(excluded), num_tokens, refresh=attempt > 1)
            payload = build(chain).encode()
            began = time.perf_counter()
            try:
                data = self.run(call(self._p2p, chain[0].peer_id, FORWARD_PROTOCOL, payload, timeout=self.timeout,
                                     max_response_bytes=MAX_RESPONSE_BYTES))
                response = ForwardResponse.decode(data, MAX_RESPONSE_BYTES)
            except (RemoteError, PeerUnreachableError, PeerTimeoutError, InvalidResponseError) as error:
                self.retry.on_failure(error, attempt, excluded, "Forward")
                continue

            transfer = {"chain": chain, "bytes_sent": len(payload), "bytes_received": len(data),
                        "seconds": time.perf_counter() - began, "attempts": attempt}
            return response, transfer

        raise PeerUnreachableError(",".join(sorted(excluded)) or "?",
                                   f"the request failed on {self.retry.max_attempts} chains; excluded peers: "
                                   f"{sorted(excluded)}. Check `swarmlens status` for online peers")

    def peer_info(self, peer_id: str) -> dict:
        """Return a peer's reported state: span, throughput, open sessions and their memory."""
        from swarmlens.peer.server import INFO_PROTOCOL

        data = self.run(call(self._p2p, peer_id, INFO_PROTOCOL, b"", timeout=self.timeout, max_response_bytes=65536))
        return msgpack.unpackb(data)

    def open_session(self, chain: list[Hop], opened: SessionOpen) -> "RemoteSession":
        """Open an inference session along `chain`; the first peer opens it on the next, and so on."""
        async def open_stream():
            try:
                _, reader, writer = await self._p2p.call_binary_stream_handler(PeerID.from_base58(chain[0].peer_id),
                                                                              SESSION_PROTOCOL)
            except (P2PDaemonError, P2PHandlerError, ConnectionError, OSError) as error:
                raise PeerUnreachableError(chain[0].peer_id, f"cannot open a session stream: {error}") from error
            await write_request(writer, opened.encode())
            await read_response(reader, chain[0].peer_id, MAX_RESPONSE_BYTES)
            return reader, writer

        try:
            reader, writer = self.run(asyncio.wait_for(open_stream(), self.timeout))
        except TimeoutError:
            raise PeerTimeoutError(chain[0].peer_id, self.timeout) from None
        return RemoteSession(self, chain, reader, writer)

    def close(self) -> None:
        """Stop the loop thread (cancelling the P2P replica's tasks first) and the DHT node."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._loop.is_running():
            self.run(_cancel_other_tasks())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        stop_dht(self.dht)


class RemoteSession:
    """The client's end of an inference session: one stream to the first peer of the chain."""

    def __init__(self, connection: SwarmConnection, chain: list[Hop], reader, writer):
        self.connection = connection
        self.chain = chain
        self._reader = reader
        self._writer = writer
        self.bytes_sent: list[int] = []  # per step
        self.bytes_received: list[int] = []

    def step(self, message: SessionStep) -> ForwardResponse:
        payload = message.encode()

        async def exchange() -> bytes:
            await write_request(self._writer, payload)
            return await read_response(self._reader, self.chain[0].peer_id, MAX_RESPONSE_BYTES)

        try:
            data = self.connection.run(asyncio.wait_for(exchange(), self.connection.timeout))
        except TimeoutError:
            raise PeerTimeoutError(self.chain[0].peer_id, self.connection.timeout) from None
        self.bytes_sent.append(len(payload))
        self.bytes_received.append(len(data))
        return ForwardResponse.decode(data, MAX_RESPONSE_BYTES)

    def close(self) -> None:
        """End the session; every peer of the chain frees its KV cache and values."""
        if self.connection._loop.is_running():
            self.connection._loop.call_soon_threadsafe(self._writer.close)


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
