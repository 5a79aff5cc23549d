"""BlockRunner: a peer's span of blocks, running each request's subgraph inline.

Requests run one at a time on a single compute thread, because the hooks
that run a subgraph are attached to the shared block modules for the length of
one request.
"""

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from swarmlens.intervene.errors import ExecutionError, StopForward
from swarmlens.intervene.graph import INPUT, OUTPUT, Graph, Node
from swarmlens.intervene.budget import Limits, format_bytes
from swarmlens.intervene.interpreter import Interpreter
from swarmlens.intervene.local import attention_implementation
from swarmlens.intervene.sites import Architecture, SiteOrder, architecture_for
from swarmlens.intervene.validate import validate
from swarmlens.intervene.wire import WireError
from swarmlens.peer.errors import InvalidResponseError, PeerTimeoutError, PeerUnreachableError, RemoteError
from swarmlens.peer.protocol import ForwardRequest, ForwardResponse

logger = logging.getLogger(__name__)

ForwardFn = Callable[[str, bytes], Awaitable[bytes]]


@dataclasses.dataclass(frozen=True)
class RunnerLimits:
    """Per-request and per-session limits of this peer."""

    max_request_bytes: int = 64 * 2**20  # the peer server's default request limit: about 29k tokens at width 576
    max_response_bytes: int = 2**30
    max_tokens: int = 8192  # batch * tokens per request, past tokens of a session included
    max_session_bytes: int = 2**30  # KV caches of all open sessions together
    max_sessions: int = 64
    session_idle_timeout: float = 300.0  # seconds a session may wait for its next step
    graph: Limits = Limits()


class BlockRunner:
    """Runs blocks [start, end) of one model for forward requests."""

    def __init__(self, blocks: nn.ModuleList, rotary: nn.Module, config: Any, architecture: Architecture,
                 start: int, end: int, limits: RunnerLimits = RunnerLimits()):
        self.blocks = blocks
        self.rotary = rotary
        self.config = config
        self.architecture = architecture
        self.start = start
        self.end = end
        self.limits = limits
        self.modules = _module_paths(blocks, architecture.blocks, start)
        self.sites = {(path, kind) for path in self.modules for kind in (INPUT, OUTPUT)}
        self.throughput = 0.0
        self.session_bytes = 0  # reserved by open sessions
        self.open_sessions = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmlens-compute")

    @classmethod
    async def create(cls, checkpoint_path: Path | str, start: int, end: int,
                     limits: RunnerLimits = RunnerLimits()) -> "BlockRunner":
        return await asyncio.get_running_loop().run_in_executor(None, cls.load, checkpoint_path, start, end, limits)

    @classmethod
    def load(cls, checkpoint_path: Path | str, start: int, end: int,
             limits: RunnerLimits = RunnerLimits()) -> "BlockRunner":
        from swarmlens.checkpoint import load_blocks, load_config, load_rotary_embedding

        blocks = load_blocks(checkpoint_path, start, end)
        config = _config_of(blocks) or load_config(checkpoint_path)
        runner = cls(blocks, load_rotary_embedding(config), config, architecture_for(config.model_type), start, end,
                     limits)
        runner.throughput = runner.measure_throughput()
        runner.site_order  # built now, so that the first request does not wait for it
        return runner

    @functools.cached_property
    def site_order(self) -> SiteOrder:
        """The model's event order, the same one clients schedule graphs with."""
        from swarmlens.checkpoint.architecture import build_meta_skeleton

        skeleton = build_meta_skeleton(self.config)
        return SiteOrder.from_skeleton(skeleton, self.architecture, self.config.num_hidden_layers)

    def events_of(self, nodes: list[Node], at: dict) -> dict[int, int]:
        """Event numbers of validated nodes, so that the interpreter frees values after their last use."""
        order = self.site_order
        events = {}
        for node in nodes:
            module, kind, step = at[node.id]
            if (module, kind) not in order.index:
                raise ValueError(f"node %{node.id} is scheduled at {module}.{kind}, which never runs in a forward pass")
            events[node.id] = step * order.size + order.index[(module, kind)]
        return events

    def measure_throughput(self, tokens: int = 32) -> float:
        """Return block-tokens per second (tokens times blocks) for one prompt, after a warm-up run."""
        hidden = torch.randn(1, tokens, self.config.hidden_size)
        positions = torch.arange(tokens).unsqueeze(0)
        mask = torch.ones(1, tokens, dtype=torch.int64)
        self._forward(hidden, mask, positions)
        began = time.perf_counter()
        self._forward(hidden, mask, positions)
        return tokens * (self.end - self.start) / (time.perf_counter() - began)

    # --- requests ----------------------------------------------------------

    async def handle_forward(self, payload: bytes, forward: ForwardFn) -> bytes:
        """Run this span for a forward request, pass the rest to the next peer, return the response."""
        request = ForwardRequest.decode(payload, self.limits.max_request_bytes)
        self._check_request(request)
        check_carried_values(request.values, request.nodes, request.keep_after)

        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        try:
            hidden, values, report = await loop.run_in_executor(self._executor, self._run_span, request)
        except ExecutionError as error:
            # Send the type of the exception raised inside the op, not the wrapper's.
            raise RemoteError(error.original_type or "ExecutionError", str(error), request.chain[0].peer_id) from error
        report["compute_ms"] = round((time.perf_counter() - began) * 1000, 2)
        report["bytes_in"] = len(payload)

        following = request.chain[1:]
        if not following or report["stopped"]:
            return ForwardResponse(hidden, values, [report], stopped=report["stopped"]).encode()

        next_request = dataclasses.replace(
            request,
            hidden_states=hidden,
            chain=following,
            nodes=[node for node in request.nodes if self.block_of_node(request.at, node) >= self.end],
            keep_after={block: ids for block, ids in request.keep_after.items() if block >= self.end},
            values=values,
        )
        try:
            data = await forward(following[0].peer_id, next_request.encode())
        except (PeerUnreachableError, PeerTimeoutError, InvalidResponseError) as error:
            # Name the peer that failed, not this one, so the client routes around it.
            raise RemoteError(type(error).__name__, str(error), error.peer_id) from error
        response = ForwardResponse.decode(data, self.limits.max_response_bytes)
        response.hops.insert(0, report)
        return response.encode()

    def _check_request(self, request: ForwardRequest) -> None:
        self.check_chain(request.chain, request.nodes, request.at)
        self.check_inputs(request.hidden_states, request.attention_mask, request.position_ids, past_tokens=0)
        if self.end - 1 not in request.keep_after:
            raise WireError(f"keep_after has no entry for block {self.end - 1}")

    def check_chain(self, chain: list, nodes: list[Node], at: dict) -> None:
        """Check that this peer heads the chain and every node runs inside the chain's blocks."""
        hop = chain[0]
        if (hop.start, hop.end) != (self.start, self.end):
            raise ValueError(f"this peer serves blocks {self.start}:{self.end}, not {hop.start}:{hop.end}; "
                             "refresh the route from the DHT")
        for node in nodes:
            block = self.block_of_node(at, node)
            if block < self.start or block >= chain[-1].end:
                raise ValueError(f"node %{node.id} runs at block {block}, outside the chain's blocks "
                                 f"{self.start}:{chain[-1].end}")

    def check_inputs(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                     past_tokens: int) -> None:
        """Check shapes, dtype and ranges of the tensors that enter the blocks."""
        if hidden_states.dtype != self.config.dtype:
            raise ValueError(f"hidden states are {hidden_states.dtype}, this peer runs {self.config.dtype}")
        batch, tokens, hidden_size = hidden_states.shape
        if hidden_size != self.config.hidden_size:
            raise ValueError(f"hidden states have width {hidden_size}, this model has {self.config.hidden_size}")
        if batch * (past_tokens + tokens) > self.limits.max_tokens:
            raise ValueError(f"request has {batch * (past_tokens + tokens)} tokens, above this peer's limit of "
                             f"{self.limits.max_tokens}")
        if tuple(position_ids.shape) != (batch, tokens):
            raise ValueError(f"position_ids must have shape [{batch}, {tokens}]")
        if tuple(attention_mask.shape) != (batch, past_tokens + tokens):
            raise ValueError(f"attention_mask must have shape [{batch}, {past_tokens + tokens}]")
        if int(position_ids.max()) >= self.config.max_position_embeddings or int(position_ids.min()) < 0:
            raise ValueError(f"position ids must be in 0..{self.config.max_position_embeddings - 1}")

    def block_of_node(self, at: dict, node: Node) -> int:
        if node.id not in at:
            raise WireError(f"node %{node.id} has no event to run at")
        prefix = self.architecture.blocks + "."
        module = at[node.id][0]
        index = module[len(prefix):].split(".", 1)[0] if module.startswith(prefix) else ""
        if not index.isdigit():
            raise ValueError(f"node %{node.id} runs at {module!r}, which is not inside a block")
        return int(index)

    # --- compute -----------------------------------------------------------

    def _run_span(self, request: ForwardRequest) -> tuple[torch.Tensor, dict[int, Any], dict]:
        own = [node for node in request.nodes if self.block_of_node(request.at, node) < self.end]
        self.validate_nodes(own, request.at, max_step=0)
        keep = request.keep_after[self.end - 1]
        interpreter = Interpreter(own, request.at, self.modules, request.values, keep, self.limits.graph,
                                  events=self.events_of(own, request.at))

        hidden = request.hidden_states
        try:
            try:
                with interpreter.hooks():
                    hidden = self._forward(request.hidden_states, request.attention_mask, request.position_ids,
                                           attn_implementation=request.attn_implementation)
            except StopForward:
                pass
            interpreter.check_done()
            values = interpreter.take(keep)
        finally:
            interpreter.clear()

        report = {
            "peer_id": request.chain[0].peer_id,
            "start": self.start,
            "end": self.end,
            "nodes": len(own),
            "received": sorted(request.values),
            "sent": sorted(values),
            "stopped": interpreter.stopped,
        }
        return hidden, values, report

    def validate_nodes(self, nodes: list[Node], at: dict, max_step: int) -> None:
        """Check this peer's nodes; values of other nodes arrive at run time, or the run fails."""
        own = {node.id for node in nodes}
        known = {ref for node in nodes for ref in node.refs() if ref not in own and ref < node.id}
        # The partition lists a peer's nodes by block, and a later step may edit an earlier
        # block. Validation expects references to earlier nodes in list order, so sort by id.
        validate(Graph(sorted(nodes, key=lambda node: node.id)), self.sites, set(self.modules), known=known)
        for node in nodes:
            module, kind, step = at[node.id]
            if node.site is not None and (module, kind, step) != (node.site.module, node.site.event_kind,
                                                                  node.site.step):
                raise ValueError(f"node %{node.id} reads or writes {node.site} but is scheduled at {at[node.id]}")
            if step > max_step or (module, kind) not in self.sites:
                raise ValueError(f"node %{node.id} is scheduled at {at[node.id]}, which this peer does not run")

    @torch.no_grad()
    def _forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any = None, attn_implementation: str = "sdpa") -> torch.Tensor:
        with attention_implementation(self.config, attn_implementation):
            position_embeddings = self.rotary(hidden, position_ids)
            mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                      cache=cache, position_ids=position_ids, layer_idx=self.start)
            for block in self.blocks:
                hidden = block(hidden, attention_mask=mask, position_ids=position_ids,
                               position_embeddings=position_embeddings, cache=cache, use_cache=cache is not None)
        return hidden

    def reserve_session_bytes(self, nbytes: int) -> int:
        """Reserve KV cache memory for a new session, or raise SessionCapacityError."""
        from swarmlens.peer.session import SessionCapacityError

        if self.open_sessions >= self.limits.max_sessions:
            raise SessionCapacityError(f"this peer has {self.open_sessions} open sessions, its maximum; "
                                       "retry later or use another peer")
        self.grow_session_bytes(nbytes, needed_by="a new session's KV cache",
                                advice="retry later, use another peer, or ask for fewer tokens")
        self.open_sessions += 1
        return nbytes

    def release_session_bytes(self, nbytes: int) -> None:
        self.open_sessions -= 1
        self.session_bytes -= nbytes

    def grow_session_bytes(self, nbytes: int, needed_by: str = "the values a session keeps for later steps",
                           advice: str = "keep fewer or smaller values across steps, or retry later") -> None:
        """Reserve more session memory, or raise SessionCapacityError if open sessions hold too much."""
        from swarmlens.peer.session import SessionCapacityError

        cap = self.limits.max_session_bytes
        if self.session_bytes + nbytes > cap:
            raise SessionCapacityError(
                f"{needed_by} needs {format_bytes(nbytes)}, but open sessions hold "
                f"{format_bytes(self.session_bytes)} of {format_bytes(cap)}; {advice}"
            )
        self.session_bytes += nbytes

    def shrink_session_bytes(self, nbytes: int) -> None:
        self.session_bytes -= nbytes

    def info(self) -> dict:
        """Return the state a peer reports to `swarmlens.info` callers."""
        return {"open_sessions": self.open_sessions, "session_bytes": self.session_bytes,
                "max_session_bytes": self.limits.max_session_bytes}

    async def handle_session(self, reader, writer, remote_peer_id: str, own_peer_id: str, open_stream,
                             budget=None) -> None:
        """Serve one inference session stream (see swarmlens.peer.session)."""
        from swarmlens.peer.session import serve_session

        await serve_session(self, reader, writer, remote_peer_id, own_peer_id, open_stream, budget)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def check_carried_values(values: dict, nodes: list[Node], keep_after: dict) -> None:
    """Reject carried values that no remaining node reads and no later block carries on.

    Without this check a request could park arbitrary data in a peer's memory.
    """
    wanted = {ref for node in nodes for ref in node.refs()}
    for ids in keep_after.values():
        wanted.update(ids if isinstance(ids, list) else [node_id for by_block in ids.values() for node_id in by_block])
    unknown = sorted(set(values) - wanted)
    if unknown:
        raise ValueError(f"carried values {unknown[:10]} are not used by any node of this chain")


def _module_paths(blocks: nn.ModuleList, prefix: str, start: int) -> dict[str, nn.Module]:
    """Map full module paths (e.g. model.layers.17.mlp) to this peer's modules."""
    paths = {}
    for offset, block in enumerate(blocks):
        for name, module in block.named_modules():
            path = f"{prefix}.{start + offset}" + (f".{name}" if name else "")
            paths[path] = module
    return paths


def _config_of(blocks: nn.ModuleList) -> Any:
    """Return the config the blocks were built with.

    Unlike a freshly loaded config, it names the attention implementation the
    blocks use, which `create_causal_mask` needs to build the padding mask.
    """
    for module in blocks.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None):
            return config
    return None

