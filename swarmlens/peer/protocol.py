"""Typed messages of the forward RPC, each parsed once by one function that raises WireError.

A forward request travels along the chain: the client sends it to the first
peer, and each peer sends the rest of it to the next. It carries the hidden
states, every remaining peer's subgraph and the values carried forward.
"""

import dataclasses
from typing import Any

import torch

from swarmlens.intervene.graph import Node
from swarmlens.intervene.wire import WireError, decode_nodes, dumps, encode_nodes, loads
from swarmlens.swarm.routing import Hop


@dataclasses.dataclass
class ForwardRequest:
    hidden_states: torch.Tensor  # [batch, tokens, hidden]
    attention_mask: torch.Tensor  # [batch, tokens] int64
    position_ids: torch.Tensor  # [batch, tokens] int64
    chain: list[Hop]  # the receiving peer first
    nodes: list[Node]  # subgraphs of every remaining hop
    at: dict[int, tuple[str, str, int]]  # node id -> (module, kind, step) of the event it runs at
    keep_after: dict[int, list[int]]  # block -> ids carried past it
    values: dict[int, Any]  # carried values: node id -> value
    attn_implementation: str = "sdpa"

    def encode(self) -> bytes:
        return dumps({
            "attn_implementation": self.attn_implementation,
            "hidden_states": self.hidden_states,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "chain": [[hop.peer_id, hop.start, hop.end] for hop in self.chain],
            "nodes": encode_nodes(self.nodes, self.at),
            "keep_after": [[block, ids] for block, ids in self.keep_after.items()],
            "values": _encode_values(self.values),
        })

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> "ForwardRequest":
        body = _expect_map(loads(data, max_bytes), "forward request",
                           ("hidden_states", "attention_mask", "position_ids", "chain", "nodes", "keep_after", "values"))
        nodes, at = decode_nodes(body["nodes"])
        return cls(
            hidden_states=_expect_tensor(body["hidden_states"], "hidden_states", dims=3, floating=True),
            attention_mask=_expect_tensor(body["attention_mask"], "attention_mask", dims=2, floating=False),
            position_ids=_expect_tensor(body["position_ids"], "position_ids", dims=2, floating=False),
            chain=_decode_chain(body["chain"]),
            nodes=nodes,
            at=at,
            keep_after=_decode_keep_after(body["keep_after"]),
            values=_decode_values(body["values"]),
            attn_implementation=_expect_attn_implementation(body.get("attn_implementation", "sdpa")),
        )


@dataclasses.dataclass
class ForwardResponse:
    hidden_states: torch.Tensor  # [batch, tokens, hidden] after the last block
    values: dict[int, Any]  # saved values and values the client needs after the blocks
    hops: list[dict]  # one report per peer: peer_id, start, end, received, sent, compute_ms
    stopped: bool = False  # a STOP node ended the pass; hidden_states are then not the model's

    def encode(self) -> bytes:
        return dumps({"hidden_states": self.hidden_states, "values": _encode_values(self.values), "hops": self.hops,
                      "stopped": self.stopped})

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> "ForwardResponse":
        body = _expect_map(loads(data, max_bytes), "forward response", ("hidden_states", "values", "hops", "stopped"))
        if not isinstance(body["hops"], list) or not all(isinstance(hop, dict) for hop in body["hops"]):
            raise WireError("forward response: hops must be a list of maps")
        if not isinstance(body["stopped"], bool):
            raise WireError("forward response: stopped must be a bool")
        return cls(
            hidden_states=_expect_tensor(body["hidden_states"], "hidden_states", dims=3, floating=True),
            values=_decode_values(body["values"]),
            hops=body["hops"],
            stopped=body["stopped"],
        )


def _encode_values(values: dict[int, Any]) -> list:
    return [[node_id, value] for node_id, value in values.items()]


def _decode_values(pairs: Any) -> dict[int, Any]:
    if not isinstance(pairs, list):
        raise WireError("values must be a list of [node id, value] pairs")
    values = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and _is_index(pair[0])):
            raise WireError("values must be a list of [node id, value] pairs")
        values[pair[0]] = pair[1]
    return values


def _decode_chain(chain: Any) -> list[Hop]:
    if not isinstance(chain, list) or not chain:
        raise WireError("chain must be a non-empty list of [peer id, start, end]")
    hops = []
    for hop in chain:
        if not (isinstance(hop, list) and len(hop) == 3 and isinstance(hop[0], str)
                and _is_index(hop[1]) and _is_index(hop[2]) and hop[1] < hop[2]):
            raise WireError(f"invalid hop {hop!r}: expected [peer id, start, end] with start < end")
        hops.append(Hop(*hop))
    for previous, following in zip(hops, hops[1:]):
        if previous.end != following.start:
            raise WireError(f"chain is not contiguous: block {previous.end} is followed by {following.start}")
    return hops


def _decode_keep_after(pairs: Any) -> dict[int, list[int]]:
    if not isinstance(pairs, list):
        raise WireError("keep_after must be a list of [block, ids] pairs")
    keep_after = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and _is_index(pair[0]) and isinstance(pair[1], list)
                and all(_is_index(node_id) for node_id in pair[1])):
            raise WireError("keep_after must be a list of [block, [node ids]] pairs")
        keep_after[pair[0]] = pair[1]
    return keep_after


def _expect_map(body: Any, what: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise WireError(f"{what} must be a map")
    missing = [key for key in keys if key not in body]
    if missing:
        raise WireError(f"{what} is missing {', '.join(missing)}")
    return body


def _expect_tensor(value: Any, name: str, dims: int, floating: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != dims or value.is_floating_point() != floating:
        kind = "floating point" if floating else "integer"
        raise WireError(f"{name} must be a {dims}-d {kind} tensor")
    return value


def _expect_attn_implementation(value: Any) -> str:
    if value not in ("sdpa", "eager"):
        raise WireError(f"attn_implementation must be 'sdpa' or 'eager', got {value!r}")
    return value


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass
class SessionOpen:
    """Opens an inference session along a chain; the subgraphs travel here, once."""

    chain: list[Hop]  # the receiving peer first
    nodes: list[Node]  # subgraphs of every remaining hop, for all steps
    at: dict[int, tuple[str, str, int]]
    keep_after: dict[int, dict[int, list[int]]]  # step -> block -> ids carried past it
    batch_size: int
    max_length: int  # prompt plus generated tokens
    attn_implementation: str = "sdpa"

    def encode(self) -> bytes:
        return dumps({
            "attn_implementation": self.attn_implementation,
            "chain": [[hop.peer_id, hop.start, hop.end] for hop in self.chain],
            "nodes": encode_nodes(self.nodes, self.at),
            "keep_after": [[step, [[block, ids] for block, ids in by_block.items()]]
                           for step, by_block in self.keep_after.items()],
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        })

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> "SessionOpen":
        body = _expect_map(loads(data, max_bytes), "session open",
                           ("chain", "nodes", "keep_after", "batch_size", "max_length"))
        if not isinstance(body["keep_after"], list):
            raise WireError("keep_after must be a list of [step, [[block, ids], ...]] pairs")
        keep_after = {}
        for item in body["keep_after"]:
            if not (isinstance(item, list) and len(item) == 2 and _is_index(item[0])):
                raise WireError("keep_after must be a list of [step, [[block, ids], ...]] pairs")
            keep_after[item[0]] = _decode_keep_after(item[1])
        nodes, at = decode_nodes(body["nodes"])
        if not (_is_index(body["batch_size"]) and _is_index(body["max_length"])):
            raise WireError("batch_size and max_length must be non-negative ints")
        return cls(_decode_chain(body["chain"]), nodes, at, keep_after, body["batch_size"], body["max_length"],
                   _expect_attn_implementation(body.get("attn_implementation", "sdpa")))


@dataclasses.dataclass
class SessionStep:
    """One generation step: the new tokens' hidden states and the values the chain needs."""

    step: int
    hidden_states: torch.Tensor  # [batch, new tokens, hidden]
    attention_mask: torch.Tensor  # [batch, all tokens so far] int64
    position_ids: torch.Tensor  # [batch, new tokens] int64
    values: dict[int, Any]

    def encode(self) -> bytes:
        return dumps({
            "step": self.step,
            "hidden_states": self.hidden_states,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "values": _encode_values(self.values),
        })

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> "SessionStep":
        body = _expect_map(loads(data, max_bytes), "session step",
                           ("step", "hidden_states", "attention_mask", "position_ids", "values"))
        if not _is_index(body["step"]):
            raise WireError("step must be a non-negative int")
        return cls(
            step=body["step"],
            hidden_states=_expect_tensor(body["hidden_states"], "hidden_states", dims=3, floating=True),
            attention_mask=_expect_tensor(body["attention_mask"], "attention_mask", dims=2, floating=False),
            position_ids=_expect_tensor(body["position_ids"], "position_ids", dims=2, floating=False),
            values=_decode_values(body["values"]),
        )
