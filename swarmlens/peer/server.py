"""The main of a peer process: serve a span of blocks over P2P and announce it on the DHT."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol, Sequence

import hivemind
import msgpack
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

from swarmlens import __version__
from swarmlens.peer import transport
from swarmlens.peer.admission import AdmissionControl
from swarmlens.peer.errors import PeerUnreachableError
from swarmlens.peer.session_stream import SESSION_PROTOCOL

INFO_PROTOCOL = "swarmlens.info"
from swarmlens.swarm.announce import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S, Announcer
from swarmlens.swarm.dht import DEFAULT_HOST, start_dht, stop_dht, visible_maddrs

logger = logging.getLogger(__name__)

READY_MARKER = "SWARMLENS_PEER_READY"

# Limits of one peer. Hidden states of SmolLM2-135M (hidden size 576, float32) take 2.3 KB
# per token, so 64 MiB fits a batch of about 29,000 tokens plus the intervention graph.
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
# Request bytes a peer buffers at once over all streams, request bodies still arriving
# included: 16 requests of the maximum size.
DEFAULT_MAX_BUFFERED_REQUEST_BYTES = 16 * DEFAULT_MAX_REQUEST_BYTES
# Seconds a request may take on this peer, waiting for admission and the rest of the chain
# after it included.
DEFAULT_REQUEST_TIMEOUT_S = 120.0
# The runner computes on CPU threads, so more concurrent requests than this only compete
# for the same cores.
DEFAULT_MAX_CONCURRENT_REQUESTS = 2
DEFAULT_MAX_WAITING_REQUESTS = 16
DEFAULT_MAX_REQUESTS_PER_S = 50

ForwardFn = Callable[[str, bytes], Awaitable[bytes]]


class Runner(Protocol):
    """The object a peer serves: `swarmlens.peer.runner.BlockRunner` or a test runner."""

    start: int
    end: int
    throughput: float  # block-tokens per second

    async def handle_forward(self, payload: bytes, forward: ForwardFn) -> bytes: ...


RunnerFactory = Callable[[Any, int, int], Awaitable[Runner]]


@dataclasses.dataclass(frozen=True)
class PeerLimits:
    """Protection limits of a peer; see the DEFAULT_* constants of this module for units."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_buffered_request_bytes: int = DEFAULT_MAX_BUFFERED_REQUEST_BYTES
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    max_requests_per_s: int = DEFAULT_MAX_REQUESTS_PER_S
    # None keeps the defaults of swarmlens.peer.runner.RunnerLimits (1 GiB) and of
    # swarmlens.intervene.budget.Limits (4 GiB).
    max_session_bytes: int | None = None
    max_graph_bytes: int | None = None

    def runner_limits(self):
        """Return the `RunnerLimits` of the block runner that these limits imply."""
        from swarmlens.intervene.budget import Limits
        from swarmlens.peer.runner import RunnerLimits

        defaults = RunnerLimits()
        return dataclasses.replace(
            defaults,
            max_request_bytes=self.max_request_bytes,
            max_session_bytes=self.max_session_bytes or defaults.max_session_bytes,
            graph=Limits(max_held_bytes=self.max_graph_bytes or defaults.graph.max_held_bytes),
        )


def run_peer(
    model: str | None,
    start: int,
    end: int,
    initial_peers: Sequence[str],
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    limits: PeerLimits = PeerLimits(),
    ttl: float = DEFAULT_TTL_S,
    heartbeat: float = DEFAULT_HEARTBEAT_S,
    runner_factory: RunnerFactory | None = None,
    model_id: str | None = None,
    announce_host: str | None = None,
) -> None:
    """Serve blocks `start` to `end - 1` of `model` until SIGTERM or SIGINT.

    Resolves the checkpoint (`swarmlens.checkpoint.resolve_checkpoint(model)`), joins the
    DHT through `initial_peers`, builds the runner, serves protocol
    `transport.FORWARD_PROTOCOL`, announces the span, and then writes one line
    `SWARMLENS_PEER_READY peer_id=<id> blocks=<start>:<end>` to stdout for launchers.
    On shutdown it announces the peer offline and stops the DHT node and its p2pd.

    `runner_factory(model, start, end)` replaces `BlockRunner.create` (for tests and custom
    runners); it gets `model` unresolved, and the DHT model id is then `model_id or model`.
    `announce_host` is the address other machines dial, if not the listen address `host`.
    """
    if not 0 <= start < end:
        raise ValueError(f"invalid span {start}:{end}: expected 0 <= start < end")
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    dht: hivemind.DHT | None = None
    try:
        if runner_factory is None:
            from swarmlens.checkpoint import model_id as checkpoint_model_id
            from swarmlens.checkpoint import resolve_checkpoint

            source: Any = resolve_checkpoint(model)
            dht_model_id = model_id or checkpoint_model_id(source)
            runner_factory = functools.partial(_create_block_runner, limits=limits.runner_limits())
        else:
            source = model
            dht_model_id = model_id or model
            if not dht_model_id:
                raise ValueError("a custom runner_factory needs `model` or `model_id` to name the model on the DHT")

        logger.info("Starting peer for blocks %d:%d of %s", start, end, dht_model_id)
        dht = start_dht(initial_peers, host=host, port=port, announce_host=announce_host)
        session = _PeerSession(dht, dht_model_id, start, end, limits=limits, ttl=ttl, heartbeat=heartbeat)
        asyncio.run(session.run(runner_factory, source))
    except KeyboardInterrupt:
        logger.info("Interrupted before the peer started serving")
    finally:
        if in_main_thread:
            # A second SIGTERM must not kill the process before p2pd is stopped.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if dht is not None:
            stop_dht(dht)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        logger.info("Peer for blocks %d:%d stopped", start, end)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


async def _create_block_runner(checkpoint_path: Path, start: int, end: int, limits=None) -> Runner:
    from swarmlens.peer.runner import BlockRunner, RunnerLimits

    return await BlockRunner.create(checkpoint_path, start, end, limits or RunnerLimits())


def load_runner_factory(spec: str) -> RunnerFactory:
    """Import a runner factory from "module:attribute", as given on the command line."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"invalid runner factory {spec!r}: expected 'module:attribute'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"invalid runner factory {spec!r}: module {module_name} has no {attribute!r}") from None


class _PeerSession:
    """One serving session of a peer, from building the runner to announcing it offline."""

    def __init__(
        self, dht: hivemind.DHT, model_id: str, start: int, end: int, *, limits: PeerLimits, ttl: float, heartbeat: float
    ) -> None:
        self.dht = dht
        self.model_id = model_id
        self.start = start
        self.end = end
        self.limits = limits
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.span = f"{start}:{end}"
        self.p2p: hivemind.P2P | None = None
        self.runner: Runner | None = None
        self.admission = AdmissionControl(
            max_concurrent=limits.max_concurrent_requests,
            max_waiting=limits.max_waiting_requests,
            max_per_second=limits.max_requests_per_s,
        )
        self.request_budget = transport.ByteBudget(limits.max_buffered_request_bytes)

    async def run(self, runner_factory: RunnerFactory, source: Any) -> None:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop_event.set)

        started_at = time.perf_counter()
        self.runner = await runner_factory(source, self.start, self.end)
        if (self.runner.start, self.runner.end) != (self.start, self.end):
            raise RuntimeError(
                f"the runner serves blocks {self.runner.start}:{self.runner.end}, expected {self.span}"
            )
        logger.info("Built the runner for blocks %s in %.1f s", self.span, time.perf_counter() - started_at)

        self.p2p = await self.dht.replicate_p2p()
        peer_id = self.p2p.peer_id.to_base58()
        await transport.serve(
            self.p2p, transport.FORWARD_PROTOCOL, self.handle_request,
            max_request_bytes=self.limits.max_request_bytes, budget=self.request_budget,
        )
        serves_sessions = callable(getattr(self.runner, "handle_session", None))
        if serves_sessions:
            await self.p2p.add_binary_stream_handler(SESSION_PROTOCOL, self.handle_session_stream)
        await transport.serve(self.p2p, INFO_PROTOCOL, self.handle_info, max_request_bytes=1024)

        maddrs = await asyncio.to_thread(visible_maddrs, self.dht)
        runner = self.runner
        announcer = Announcer(
            self.dht, self.model_id, self.start, self.end,
            peer_id=peer_id, maddrs=maddrs, throughput=lambda: runner.throughput,
            version=__version__, ttl=self.ttl, heartbeat=self.heartbeat,
        )
        await asyncio.to_thread(announcer.start)
        try:
            logger.info("Serving blocks %s of %s as peer %s at %s", self.span, self.model_id, peer_id, ", ".join(maddrs))
            sys.stdout.write(f"{READY_MARKER} peer_id={peer_id} blocks={self.span}\n")
            sys.stdout.flush()
            await stop_event.wait()
            logger.info("Shutting down the peer for blocks %s", self.span)
        finally:
            await asyncio.to_thread(announcer.stop)
            await self.p2p.remove_binary_stream_handler(transport.FORWARD_PROTOCOL)
            if serves_sessions:
                await self.p2p.remove_binary_stream_handler(SESSION_PROTOCOL)
            await self.p2p.remove_binary_stream_handler(INFO_PROTOCOL)
            # BlockRunner has shutdown() for its worker threads; the Runner protocol does not require it.
            shutdown = getattr(self.runner, "shutdown", None)
            if callable(shutdown):
                shutdown()

    async def handle_request(self, payload: bytes, remote_peer_id: str) -> bytes:
        """Run one forward request; log it at INFO, or its error at WARNING and re-raise."""
        started_at = time.perf_counter()
        deadline = asyncio.timeout(self.limits.request_timeout)
        try:
            async with deadline:
                async with self.admission.admit():
                    response = await self.runner.handle_forward(payload, self.forward)
        except Exception as error:
            if isinstance(error, TimeoutError) and deadline.expired():
                timeout_error = TimeoutError(
                    f"request did not finish within {self.limits.request_timeout:.0f} s on blocks {self.span}"
                )
                self._log_failure(remote_peer_id, payload, started_at, timeout_error)
                raise timeout_error from None
            self._log_failure(remote_peer_id, payload, started_at, error)
            raise

        elapsed_ms = (time.perf_counter() - started_at) * 1000
        logger.info(
            "forward %s from %s: %d B in, %d B out, %.1f ms",
            self.span, _short(remote_peer_id), len(payload), len(response), elapsed_ms,
        )
        return response

    def _log_failure(self, remote_peer_id: str, payload: bytes, started_at: float, error: Exception) -> None:
        elapsed_ms = (time.perf_counter() - started_at) * 1000
        logger.warning(
            "forward %s from %s: failed after %.1f ms, %d B in: %s: %s",
            self.span, _short(remote_peer_id), elapsed_ms, len(payload), type(error).__name__,
            str(error)[:transport.LOGGED_MESSAGE_CHARS],
        )

    async def handle_info(self, payload: bytes, remote_peer_id: str) -> bytes:
        """Return this peer's state as msgpack: span, throughput, open sessions and their memory."""
        info = {"start": self.start, "end": self.end, "model_id": self.model_id, "version": __version__,
                "throughput": float(self.runner.throughput)}
        runner_info = getattr(self.runner, "info", None)
        if callable(runner_info):
            info.update(runner_info())
        return msgpack.packb(info)

    async def handle_session_stream(self, stream_info, reader: asyncio.StreamReader,
                                    writer: asyncio.StreamWriter) -> None:
        """Serve one inference session stream until it ends; the runner frees its state."""
        remote_peer_id = stream_info.peer_id.to_base58()
        try:
            # Sessions are bounded by the runner's KV cache budget, not by admission slots: a
            # session holds its stream open between steps, and would block forward requests.
            await self.runner.handle_session(reader, writer, remote_peer_id, self.p2p.peer_id.to_base58(),
                                             self.open_session_stream, budget=self.request_budget)
        except Exception as error:  # noqa: BLE001 - a session must never stop the peer
            logger.warning("session from %s ended with %s: %s", _short(remote_peer_id), type(error).__name__, error)
        finally:
            writer.close()

    async def open_session_stream(self, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a session stream to the next peer of a chain; raise PeerUnreachableError if it fails."""
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id),
                                                                          SESSION_PROTOCOL)
        except (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, asyncio.IncompleteReadError) as error:
            raise PeerUnreachableError(peer_id, f"cannot open a session stream: {error}") from error
        return reader, writer

    async def forward(self, peer_id: str, payload: bytes) -> bytes:
        """Send `payload` to the next peer of the chain and return its response."""
        return await transport.call(
            self.p2p, peer_id, transport.FORWARD_PROTOCOL, payload, timeout=self.limits.request_timeout
        )


def _short(peer_id: str) -> str:
    return "..." + peer_id[-6:]
