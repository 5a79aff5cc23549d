"""Inference sessions on a peer: a KV cache and a subgraph kept for all steps of a generation.

The client opens a session on the first peer of a chain, which opens one on
the next, and so on; each stream stays open for the whole generation. The
subgraphs travel once, in the open message. Each step sends only the new
tokens' hidden states and the values the chain needs. Everything a session
holds is freed when its stream ends, for whatever reason.
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

import torch
from transformers import DynamicCache

from swarmlens.intervene.budget import format_bytes
from swarmlens.intervene.errors import BudgetError, ExecutionError
from swarmlens.intervene.interpreter import Interpreter
from swarmlens.peer.errors import InvalidResponseError, PeerTimeoutError, PeerUnreachableError, RemoteError
from swarmlens.peer.protocol import ForwardResponse, SessionOpen, SessionStep
from swarmlens.peer.runner import check_carried_values
from swarmlens.peer.transport import LOGGED_MESSAGE_CHARS, ByteBudget
from swarmlens.peer.session_stream import read_request, read_response, write_error, write_request, write_response

if TYPE_CHECKING:
    from swarmlens.peer.runner import BlockRunner

logger = logging.getLogger(__name__)

OpenStream = Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class SessionCapacityError(RuntimeError):
    """The peer's sessions already hold as much memory as it allows; try another peer or later."""


class InferenceSession:
    """One generation's state on this peer: KV cache, interpreter and step counter."""

    def __init__(self, runner: "BlockRunner", opened: SessionOpen):
        self.runner = runner
        self.batch_size = opened.batch_size
        self.max_length = opened.max_length
        own = [node for node in opened.nodes if runner.block_of_node(opened.at, node) < runner.end]
        runner.validate_nodes(own, opened.at, max_step=max(opened.keep_after, default=0))
        self.keep_after = {step: by_block.get(runner.end - 1, []) for step, by_block in opened.keep_after.items()}
        keep = {node_id for ids in self.keep_after.values() for node_id in ids}
        self.interpreter = Interpreter(own, opened.at, runner.modules, keep=keep, limits=runner.limits.graph,
                                       events=runner.events_of(own, opened.at))
        self.release_after = _release_steps(own, opened.at, self.keep_after)
        self.cache = DynamicCache(config=runner.config)
        self.num_nodes = len(own)
        self.attn_implementation = opened.attn_implementation
        self.nodes_ahead = opened.nodes  # this peer's nodes and those of the peers after it
        self.keep_ahead = opened.keep_after
        self.next_step = 0
        self.past_tokens = 0
        self.held_bytes = 0  # reserved for values kept between steps, beyond the KV cache

    def run_step(self, message: SessionStep) -> tuple[torch.Tensor, dict, dict]:
        """Run this peer's blocks for one step; return hidden states, carried values and a report."""
        check_carried_values(message.values, self.nodes_ahead, self.keep_ahead)
        if message.step != self.next_step:
            raise ValueError(f"expected step {self.next_step}, got step {message.step}; steps run in order")
        batch, tokens, _ = message.hidden_states.shape
        if batch != self.batch_size or self.past_tokens + tokens > self.max_length:
            raise ValueError(f"step of shape [{batch}, {tokens}] does not fit the session opened for batch "
                             f"{self.batch_size} and {self.max_length} tokens ({self.past_tokens} used)")
        self.runner.check_inputs(message.hidden_states, message.attention_mask, message.position_ids,
                                 past_tokens=self.past_tokens)

        interpreter = self.interpreter
        interpreter.add_values(message.values)
        interpreter.step = message.step
        interpreter.budget.restart_clock()
        with interpreter.hooks():
            hidden = self.runner._forward(message.hidden_states, message.attention_mask, message.position_ids,
                                          cache=self.cache, attn_implementation=self.attn_implementation)
        interpreter.check_done(steps=message.step + 1)

        values = interpreter.take(self.keep_after.get(message.step, []))
        interpreter.release(self.release_after.get(message.step, []))
        self._reserve_held_bytes()
        self.next_step += 1
        self.past_tokens += tokens
        report = {"start": self.runner.start, "end": self.runner.end, "step": message.step,
                  "received": sorted(message.values), "sent": sorted(values)}
        return hidden, values, report

    def close(self) -> None:
        """Free the KV cache and every value, even while a traceback still refers to the session."""
        self.interpreter.clear()
        self.cache = None

    def nbytes(self) -> int:
        """Upper bound of the KV cache's size for the whole session, in bytes."""
        return session_nbytes(self.runner, self.batch_size, self.max_length)

    def _reserve_held_bytes(self) -> None:
        """Count the values kept for later steps against the peer's session memory.

        Raises BudgetError if this session alone would pass the cap, so that the client does
        not retry, and SessionCapacityError if other sessions leave too little room now.
        """
        kept_bytes = self.interpreter.memory.nbytes
        cap = self.runner.limits.max_session_bytes
        if kept_bytes + self.nbytes() > cap:
            raise BudgetError(
                f"values kept for later steps hold {format_bytes(kept_bytes)}, which with the KV cache of "
                f"{format_bytes(self.nbytes())} is above this peer's session memory of {format_bytes(cap)}; "
                "keep fewer or smaller values across steps"
            )
        if kept_bytes > self.held_bytes:
            self.runner.grow_session_bytes(kept_bytes - self.held_bytes)
        else:
            self.runner.shrink_session_bytes(self.held_bytes - kept_bytes)
        self.held_bytes = kept_bytes


def _release_steps(nodes: list, at: dict, keep_after: dict[int, list[int]]) -> dict[int, list[int]]:
    """Map each step to the values that no later step uses or sends on, so they can go after it."""
    last_step: dict[int, int] = {}
    for node in nodes:
        step = at[node.id][2]
        for node_id in (node.id, *node.refs()):
            last_step[node_id] = max(last_step.get(node_id, step), step)
    for step, ids in keep_after.items():
        for node_id in ids:
            last_step[node_id] = max(last_step.get(node_id, step), step)

    by_step: dict[int, list[int]] = {}
    for node_id, step in last_step.items():
        by_step.setdefault(step, []).append(node_id)
    return by_step


def session_nbytes(runner: "BlockRunner", batch_size: int, max_length: int) -> int:
    config = runner.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * torch.empty((), dtype=config.dtype).element_size()
    return batch_size * max_length * (runner.end - runner.start) * per_token


async def serve_session(runner: "BlockRunner", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        remote_peer_id: str, own_peer_id: str, open_stream: OpenStream,
                        budget: ByteBudget | None = None) -> None:
    """Serve one session stream from its open message to its end; free everything after.

    Each frame's bytes count in `budget`, the peer's buffered request bytes, until the
    frame has been handled.
    """
    limits = runner.limits
    downstream = None
    reserved = None
    session = None
    began = time.perf_counter()
    steps = 0
    try:
        data = await asyncio.wait_for(read_request(reader, limits.max_request_bytes, budget),
                                      limits.session_idle_timeout)
        if data is None:
            return
        with _reserved(budget, len(data)):
            opened = SessionOpen.decode(data, limits.max_request_bytes)
            del data
        if opened.batch_size < 1 or opened.max_length < 1:
            raise ValueError("a session needs batch_size >= 1 and max_length >= 1")
        if opened.batch_size * opened.max_length > limits.max_tokens:
            raise ValueError(f"a session of batch {opened.batch_size} and {opened.max_length} tokens is over this "
                             f"peer's limit of {limits.max_tokens} tokens (batch times length); ask for fewer tokens")
        runner.check_chain(opened.chain, opened.nodes, opened.at)
        reserved = runner.reserve_session_bytes(session_nbytes(runner, opened.batch_size, opened.max_length))
        session = InferenceSession(runner, opened)
        downstream = await _open_downstream(runner, opened, open_stream)
        await write_response(writer, b"")
        logger.info("session %d:%d from %s opened: batch %d, up to %d tokens, %d nodes", runner.start, runner.end,
                    remote_peer_id[-6:], opened.batch_size, opened.max_length, session.num_nodes)

        while True:
            data = await asyncio.wait_for(read_request(reader, limits.max_request_bytes, budget),
                                          limits.session_idle_timeout)
            if data is None:
                break
            with _reserved(budget, len(data)):
                step = SessionStep.decode(data, limits.max_request_bytes)
                del data
                response = await _run_step(runner, session, step, downstream, own_peer_id)
                del step
            await write_response(writer, response.encode())
            steps += 1
    except Exception as error:  # noqa: BLE001 - every session error goes back to the caller, then the session ends
        logger.warning("session %d:%d from %s failed after %d steps: %s: %s", runner.start, runner.end,
                       remote_peer_id[-6:], steps, type(error).__name__, str(error)[:LOGGED_MESSAGE_CHARS])
        await _send_error_quietly(writer, _remote_error(error, own_peer_id), own_peer_id)
    finally:
        if session is not None:
            session.close()
        if downstream is not None:
            downstream[1].close()
        if reserved is not None:
            runner.release_session_bytes(reserved + (session.held_bytes if session is not None else 0))
        logger.info("session %d:%d from %s closed after %d steps, %.1f s", runner.start, runner.end,
                    remote_peer_id[-6:], steps, time.perf_counter() - began)


async def _open_downstream(runner: "BlockRunner", opened: SessionOpen, open_stream: OpenStream):
    following = opened.chain[1:]
    if not following:
        return None
    peer_id = following[0].peer_id
    try:
        reader, writer = await open_stream(peer_id)
        message = dataclasses.replace(
            opened,
            chain=following,
            nodes=[node for node in opened.nodes if runner.block_of_node(opened.at, node) >= runner.end],
            keep_after={step: {block: ids for block, ids in by_block.items() if block >= runner.end}
                        for step, by_block in opened.keep_after.items()},
        )
        await write_request(writer, message.encode())
        await read_response(reader, peer_id, runner.limits.max_response_bytes)
    except (PeerUnreachableError, PeerTimeoutError, InvalidResponseError, ConnectionError, OSError) as error:
        raise RemoteError(type(error).__name__, f"cannot open a session on peer {peer_id}: {error}", peer_id) from error
    return reader, writer, peer_id


async def _run_step(runner: "BlockRunner", session: InferenceSession, message: SessionStep, downstream,
                    own_peer_id: str) -> ForwardResponse:
    began = time.perf_counter()
    loop = asyncio.get_running_loop()
    hidden, values, report = await loop.run_in_executor(runner._executor, session.run_step, message)
    report.update(peer_id=own_peer_id, compute_ms=round((time.perf_counter() - began) * 1000, 2))
    if downstream is None:
        return ForwardResponse(hidden, values, [report])

    reader, writer, peer_id = downstream
    following = SessionStep(message.step, hidden, message.attention_mask, message.position_ids, values)
    try:
        await write_request(writer, following.encode())
        data = await read_response(reader, peer_id, runner.limits.max_response_bytes)
    except (PeerUnreachableError, InvalidResponseError, ConnectionError, OSError) as error:
        raise RemoteError(type(error).__name__, str(error), peer_id) from error
    response = ForwardResponse.decode(data, runner.limits.max_response_bytes)
    response.hops.insert(0, report)
    return response


@contextlib.contextmanager
def _reserved(budget: ByteBudget | None, nbytes: int) -> Iterator[None]:
    """Release a frame's `nbytes` from `budget` when the block ends."""
    try:
        yield
    finally:
        if budget is not None:
            budget.release(nbytes)


def _remote_error(error: Exception, own_peer_id: str) -> Exception:
    if isinstance(error, ExecutionError):
        return RemoteError(error.original_type or "ExecutionError", str(error), own_peer_id)
    return error


async def _send_error_quietly(writer: asyncio.StreamWriter, error: Exception, own_peer_id: str) -> None:
    try:
        await write_error(writer, error, own_peer_id)
    except (ConnectionError, OSError) as send_error:
        logger.debug("could not send the session error to the caller: %s", send_error)
