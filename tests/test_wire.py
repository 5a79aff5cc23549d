"""Wire format: every op of the allow-list survives a round trip; malformed messages are rejected."""

import msgpack
import pytest
import torch

from swarmlens.intervene import ops
from swarmlens.intervene.graph import Graph, Ref, Site
from swarmlens.intervene.ops import Op
from swarmlens.intervene.wire import SCHEMA_VERSION, WireError, decode_nodes, dumps, encode_nodes, loads

LIMIT = 2**20


def every_op_graph() -> Graph:
    """One node per op and per allow-listed target, with constants of every kind."""
    graph = Graph()
    hidden = graph.add(Op.READ, site=Site("model.layers.0.output", "output"), source="study.py:1: h = ...")
    value = Ref(hidden.id)
    graph.add(Op.WRITE, args=(value,), site=Site("model.layers.1.mlp", "input"))
    graph.add(Op.SAVE, args=(value,))
    graph.add(Op.GETITEM, args=(value, (slice(None), -1, Ellipsis, None)))
    graph.add(Op.SETITEM, args=(value, (slice(0, 2, 1), 3), torch.ones(2, dtype=torch.bfloat16)))
    graph.add(Op.CALL_MODULE, "model.layers.0.mlp", args=(value,), kwargs={"scale": 0.5})
    for name in sorted(ops.OPERATORS):
        graph.add(Op.OPERATOR, name, args=(value, 2))
    for name in sorted(ops.TENSOR_METHODS):
        graph.add(Op.METHOD, name, args=(value, -1), kwargs={"dtype": torch.float16, "keepdim": True})
    for name in sorted(ops.FUNCTIONS):
        graph.add(Op.FUNCTION, name, args=([value, value], "ij->ji"), kwargs={"dim": 0, "out_size": (1, 2)})
    for name in sorted(ops.ATTRIBUTES):
        graph.add(Op.GETATTR, name, args=(value,))
    return graph


def assert_same_value(actual, expected):
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected)
        assert len(actual) == len(expected)
        for item, expected_item in zip(actual, expected):
            assert_same_value(item, expected_item)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same_value(actual[key], expected[key])
    else:
        assert actual == expected
        assert type(actual) is type(expected)


def test_every_whitelisted_op_round_trips():
    graph = every_op_graph()
    at = {node.id: ("model.layers.0", "output", node.id % 3) for node in graph.nodes}
    nodes, decoded_at = decode_nodes(loads(dumps(encode_nodes(graph.nodes, at)), LIMIT))

    assert decoded_at == at
    assert len(nodes) == len(graph.nodes)
    covered = {(node.op, node.target) for node in nodes}
    for name in ops.OPERATORS:
        assert (Op.OPERATOR, name) in covered
    for name in ops.TENSOR_METHODS | set(ops.FUNCTIONS) | ops.ATTRIBUTES:
        assert any(target == name for _, target in covered)
    for actual, expected in zip(nodes, graph.nodes):
        assert (actual.id, actual.op, actual.target, actual.site, actual.source) == (
            expected.id, expected.op, expected.target, expected.site, expected.source)
        assert_same_value(actual.args, expected.args)
        assert_same_value(actual.kwargs, expected.kwargs)


@pytest.mark.parametrize("dtype", list(ops.DTYPES.values()))
def test_tensor_dtypes_round_trip(dtype):
    tensor = (torch.arange(24).reshape(2, 3, 4) % 2).to(dtype)
    assert_same_value(loads(dumps(tensor), LIMIT), tensor)


def test_empty_and_scalar_tensors_round_trip():
    for tensor in (torch.empty(0, 5), torch.tensor(3.5), torch.zeros(1, 0, 2, dtype=torch.int64)):
        assert_same_value(loads(dumps(tensor), LIMIT), tensor)


def test_oversize_message_rejected_before_decoding():
    data = dumps(torch.zeros(1000))
    with pytest.raises(WireError, match="exceeds the limit"):
        loads(data, len(data) - 1)


def test_other_schema_version_rejected():
    data = msgpack.packb({"v": SCHEMA_VERSION + 1, "body": 1})
    with pytest.raises(WireError, match="schema version"):
        loads(data, LIMIT)


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"\x92\x01", dumps(1)[:-1], b"\xff" * 64,
    msgpack.packb({"v": SCHEMA_VERSION, "body": msgpack.ExtType(99, b"")}),
    msgpack.packb({"v": SCHEMA_VERSION, "body": msgpack.ExtType(1, msgpack.packb(["float32", [4], b"abc"]))}),
    msgpack.packb({"v": SCHEMA_VERSION, "body": msgpack.ExtType(1, msgpack.packb(["complex", [1], b"12345678"]))}),
    msgpack.packb({"v": SCHEMA_VERSION, "body": msgpack.ExtType(1, msgpack.packb(["float32", [-1], b""]))}),
    msgpack.packb({"v": SCHEMA_VERSION, "body": msgpack.ExtType(2, msgpack.packb(-3))}),
    msgpack.packb({"v": SCHEMA_VERSION, "body": msgpack.ExtType(5, msgpack.packb("cuda"))}),
    msgpack.packb({"v": SCHEMA_VERSION, "body": {1: 2}}),
])
def test_malformed_messages_raise_wire_error(payload):
    with pytest.raises(WireError):
        loads(payload, LIMIT)


@pytest.mark.parametrize("node", [
    [0, "exec", None, [], {}, None, None, ""],
    [0, "read", None, [], {}, ["m", "sideways", 0], None, ""],
    [-1, "save", None, [], {}, None, None, ""],
    [0, "method", 7, [], {}, None, None, ""],
    [0, "save", None, [], {}, None, None],
])
def test_malformed_nodes_raise_wire_error(node):
    with pytest.raises(WireError):
        decode_nodes([node])


def test_unsupported_value_cannot_be_sent():
    with pytest.raises(WireError, match="cannot be sent"):
        dumps({"callable": print})


def test_deeply_nested_tuples_are_rejected():
    data = msgpack.packb([1])
    for _ in range(400):
        data = msgpack.packb([msgpack.ExtType(6, data)], use_bin_type=True)
    message = msgpack.packb({"v": SCHEMA_VERSION, "body": msgpack.ExtType(6, data)}, use_bin_type=True)
    with pytest.raises(WireError, match="nested deeper"):
        loads(message, LIMIT)


def test_moderately_nested_tuples_round_trip():
    value = (1, (2, (3, (4, (torch.ones(2), slice(1, None))))))
    assert_same_value(loads(dumps(value), LIMIT), value)


def test_many_empty_arrays_rejected():
    # 5 arrays of 2**20 - 1 empty arrays: 5 MiB on the wire, several hundred MiB as lists.
    inner = b"\xdd" + (2**20 - 1).to_bytes(4, "big") + b"\x90" * (2**20 - 1)
    body = b"\x95" + inner * 5
    message = msgpack.packb({"v": SCHEMA_VERSION, "body": 0})[:-1] + body

    with pytest.raises(WireError, match="more than 4194304 arrays, maps and elements"):
        loads(message, max_bytes=2**26)
