"""Hostile requests to real peers over P2P: each one is rejected, and the peer keeps serving.

Every case sends raw bytes or a hand-built message to the first peer of the local swarm
(blocks 0:15) and checks the error that comes back. Then a normal trace must still give the
local executor's result, and no peer may report an open session.
"""

import asyncio

import msgpack
import psutil
import pytest
import torch
from hivemind.p2p import PeerID


pytestmark = [pytest.mark.network, pytest.mark.slow]

PROMPT = "The capital of France is"
CALL_TIMEOUT_S = 30.0
HIDDEN_SIZE = 576
FIRST_SPAN = (0, 15)


@pytest.fixture(scope="module")
def swarm_model(local_swarm, checkpoint_path):  # noqa: F811
    from swarmlens.client import SwarmModel

    model = SwarmModel.from_pretrained(str(checkpoint_path), initial_peers=local_swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="module")
def reference(local_model):  # noqa: F811
    """Return the probe trace's saved block output and logits on the local executor."""
    return _probe(local_model)


@pytest.fixture(scope="module")
def first_peer(local_swarm) -> str:
    return next(peer.peer_id for peer in local_swarm.peers if (peer.start, peer.end) == FIRST_SPAN)


def _probe(model):
    with model.trace(PROMPT) as tracer:
        block = model.model.layers[20].output[:, -1].save()
    return block.value, tracer.logits


def _assert_still_serving(swarm_model, local_swarm, reference) -> None:
    block, logits = _probe(swarm_model)
    torch.testing.assert_close(block, reference[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, reference[1], rtol=0, atol=1e-5)
    for peer in local_swarm.peers:
        info = swarm_model.connection.peer_info(peer.peer_id)
        assert info["open_sessions"] == 0, info
        assert info["session_bytes"] == 0, info


def _call(swarm_model, peer_id: str, protocol: str, payload: bytes):
    """Send one framed request and return the RemoteError it raises; fail the test if it succeeds."""
    from swarmlens.peer.errors import RemoteError
    from swarmlens.peer.transport import call

    connection = swarm_model.connection
    with pytest.raises(RemoteError) as caught:
        connection.run(call(connection._p2p, peer_id, protocol, payload, timeout=CALL_TIMEOUT_S))
    return caught.value


def _request(peer_id: str, nodes, hidden=None, position_ids=None) -> bytes:
    from swarmlens.peer.protocol import ForwardRequest
    from swarmlens.swarm.routing import Hop

    hidden = torch.randn(1, 4, HIDDEN_SIZE) if hidden is None else hidden
    batch, tokens, _ = hidden.shape
    if position_ids is None:
        position_ids = torch.arange(tokens).expand(batch, tokens).contiguous()
    at = {node.id: ("model.layers.3", "output", 0) for node in nodes}
    return ForwardRequest(hidden, torch.ones(batch, tokens, dtype=torch.int64), position_ids,
                          [Hop(peer_id, *FIRST_SPAN)], nodes, at, {FIRST_SPAN[1] - 1: []}, {}).encode()


def _read_then(*extra):
    from swarmlens.intervene.graph import Node, Site
    from swarmlens.intervene.ops import Op

    return [Node(0, Op.READ, site=Site("model.layers.3", "output", 0)), *extra]


def _malformed_payloads():
    from swarmlens.intervene import wire

    tensor_ext = msgpack.ExtType(1, msgpack.packb(["float32", [10**6, 10**6], b"\x00"]))
    return {
        "garbage": (b"\xc1" * 100, "WireError"),
        "empty": (b"", "WireError"),
        "other schema version": (msgpack.packb({"v": 99, "body": {}}), "schema version 99"),
        "missing fields": (wire.dumps({"hidden_states": 1}), "missing"),
        "tensor bytes do not match its shape": (msgpack.packb({"v": 1, "body": tensor_ext}), "needs"),
        "nested lists past msgpack's depth limit": (b"\x91" * 5000 + b"\x00", "WireError"),
    }


@pytest.mark.parametrize("case", sorted(_malformed_payloads()))
def test_malformed_payload_rejected(swarm_model, local_swarm, reference, first_peer, case):
    payload, expected = _malformed_payloads()[case]
    error = _call(swarm_model, first_peer, "swarmlens.forward", payload)
    assert expected in f"{error.type_name} {error.message}"
    _assert_still_serving(swarm_model, local_swarm, reference)


def _hostile_graphs():
    from swarmlens.intervene.graph import Node, Ref
    from swarmlens.intervene.ops import Op

    return {
        "method outside the allow-list": (
            _read_then(Node(1, Op.METHOD, "__class__", (Ref(0),))), "InvalidGraphError"),
        "attribute outside the allow-list": (
            _read_then(Node(1, Op.GETATTR, "data", (Ref(0),))), "InvalidGraphError"),
        "call of a module another peer holds": (
            _read_then(Node(1, Op.CALL_MODULE, "model.layers.20", (Ref(0),))), "InvalidGraphError"),
        "reference to a later node": (
            _read_then(Node(1, Op.OPERATOR, "add", (Ref(5), 1))), "InvalidGraphError"),
        "integer power with a huge exponent": (
            _read_then(Node(1, Op.OPERATOR, "pow", (2, 10**6))), "BudgetError"),
        "torch.zeros with a terabyte shape": (
            _read_then(Node(1, Op.FUNCTION, "torch.zeros", ((2**20, 2**20),))), "BudgetError"),
        "torch.arange over 10**12 elements": (
            _read_then(Node(1, Op.FUNCTION, "torch.arange", (0, 10**12))), "BudgetError"),
        "expand to more elements than the limit": (
            _read_then(Node(1, Op.METHOD, "expand", (Ref(0), 2**20, 4, HIDDEN_SIZE))), "BudgetError"),
        "op that fails at run time": (
            _read_then(Node(1, Op.METHOD, "view", (Ref(0), 7, 7))), "RuntimeError"),
    }


@pytest.mark.parametrize("case", sorted(_hostile_graphs()))
def test_hostile_graph_rejected(swarm_model, local_swarm, reference, first_peer, case):
    nodes, expected = _hostile_graphs()[case]
    error = _call(swarm_model, first_peer, "swarmlens.forward", _request(first_peer, nodes))
    assert expected in error.type_name
    _assert_still_serving(swarm_model, local_swarm, reference)


def test_values_over_memory_limit_rejected_and_freed(swarm_model, local_swarm, reference, first_peer):
    from swarmlens.intervene.graph import Node
    from swarmlens.intervene.ops import Op

    peer = psutil.Process(next(peer.pid for peer in local_swarm.peers if peer.peer_id == first_peer))
    rss_before = peer.memory_info().rss
    ones = [Node(index, Op.FUNCTION, "torch.ones", ((2**28,),)) for index in range(1, 6)]  # 1 GiB each

    error = _call(swarm_model, first_peer, "swarmlens.forward", _request(first_peer, _read_then(*ones)))

    assert error.type_name == "BudgetError"
    assert "above the limit of 4.0 GiB" in error.message
    assert peer.memory_info().rss < rss_before + 2**29
    _assert_still_serving(swarm_model, local_swarm, reference)


@pytest.mark.parametrize("case", ["hidden states of the wrong width", "too many tokens", "positions out of range"])
def test_bad_forward_inputs_rejected(swarm_model, local_swarm, reference, first_peer, case):
    if case == "hidden states of the wrong width":
        payload, expected = _request(first_peer, _read_then(), hidden=torch.randn(1, 4, 100)), "width 100"
    elif case == "too many tokens":
        payload, expected = _request(first_peer, _read_then(), hidden=torch.zeros(1, 9000, HIDDEN_SIZE)), "limit"
    else:
        positions = torch.full((1, 4), 10**9)
        payload, expected = _request(first_peer, _read_then(), position_ids=positions), "position ids"
    error = _call(swarm_model, first_peer, "swarmlens.forward", payload)
    assert error.type_name == "ValueError"
    assert expected in error.message
    _assert_still_serving(swarm_model, local_swarm, reference)


def _session_exchange(swarm_model, peer_id: str, opened: bytes, steps: list[bytes]) -> list:
    """Open a session stream and send `opened`, then `steps`.

    Returns the length of each response, or the error that ended the exchange.
    """
    from swarmlens.peer.session_stream import read_response, write_request

    async def exchange():
        _, reader, writer = await swarm_model.connection._p2p.call_binary_stream_handler(
            PeerID.from_base58(peer_id), "swarmlens.session")
        results = []
        try:
            for frame in [opened, *steps]:
                await write_request(writer, frame)
                try:
                    results.append(len(await read_response(reader, peer_id, 2**31)))
                except Exception as error:  # noqa: BLE001 - the test inspects every error
                    results.append(error)
                    break
        finally:
            writer.close()
        return results

    return swarm_model.connection.run(asyncio.wait_for(exchange(), CALL_TIMEOUT_S))


def _session_open(peer_id: str, batch_size: int = 1, max_length: int = 16) -> bytes:
    from swarmlens.peer.protocol import SessionOpen
    from swarmlens.swarm.routing import Hop

    return SessionOpen([Hop(peer_id, *FIRST_SPAN)], [], {}, {0: {FIRST_SPAN[1] - 1: []}}, batch_size,
                       max_length).encode()


def _session_step(step: int, tokens: int = 1, past: int = 0) -> bytes:
    from swarmlens.peer.protocol import SessionStep

    return SessionStep(step, torch.randn(1, tokens, HIDDEN_SIZE), torch.ones(1, past + tokens, dtype=torch.int64),
                       torch.arange(past, past + tokens)[None], {}).encode()


@pytest.mark.parametrize("case", ["step out of order", "step repeated", "more tokens than opened for",
                                  "undecodable step", "session over the token limit"])
def test_session_misuse_rejected_and_freed(swarm_model, local_swarm, reference, first_peer, case):
    from swarmlens.peer.errors import RemoteError

    opened = _session_open(first_peer)
    if case == "step out of order":
        steps, expected = [_session_step(3)], "expected step 0, got step 3"
    elif case == "step repeated":
        steps, expected = [_session_step(0), _session_step(0, past=1)], "expected step 1, got step 0"
    elif case == "more tokens than opened for":
        steps, expected = [_session_step(0, tokens=17)], "does not fit the session"
    elif case == "undecodable step":
        steps, expected = [b"\x00" * 10], "WireError"
    else:
        opened, steps, expected = _session_open(first_peer, 10**6, 10**6), [], "over this peer's limit of 8192 tokens"

    results = _session_exchange(swarm_model, first_peer, opened, steps)
    error = results[-1]
    assert isinstance(error, RemoteError), results
    assert expected in f"{error.type_name} {error.message}"
    assert all(isinstance(result, int) for result in results[:-1]), results
    _assert_still_serving(swarm_model, local_swarm, reference)


def test_empty_session_freed(swarm_model, local_swarm, reference, first_peer):
    assert _session_exchange(swarm_model, first_peer, _session_open(first_peer), []) == [0]
    _assert_still_serving(swarm_model, local_swarm, reference)


def test_kept_values_count_as_session_memory(swarm_model, local_swarm, reference):
    from swarmlens.intervene import ExecutionError

    layers = swarm_model.model.layers
    with pytest.raises(ExecutionError) as caught:
        with swarm_model.generate(PROMPT, max_new_tokens=2) as tracer:
            with tracer.iter[0]:  # three values of 512 MiB, computed on the first peer at step 0
                kept_values = [layers[3].output[0, 0, 0].expand(2**27) + float(index) for index in range(3)]
            with tracer.iter[1]:  # and multiplied there by a value of step 1, so they must stay
                scale = layers[3].output[0, -1, 0]
                layers[3].output[0, -1, 0] = sum((value * scale)[0] for value in kept_values)

    assert caught.value.original_type == "BudgetError"
    assert "values kept for later steps hold 1.5 GiB" in str(caught.value)
    _assert_still_serving(swarm_model, local_swarm, reference)
