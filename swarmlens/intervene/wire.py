"""Wire format: msgpack with tensors, references, slices, dtypes and tuples as extension types.

Nothing here can build an arbitrary Python object: decoding yields only
msgpack scalars, lists, string-keyed maps and the extension types below, all
checked against size limits before and while they are decoded.
"""

import math
from typing import Any

import msgpack
import torch

from swarmlens.intervene.graph import EVENT_KINDS, SITE_KINDS, Node, Ref, Site
from swarmlens.intervene.ops import DTYPE_NAMES, DTYPES, Op

SCHEMA_VERSION = 2  # 2: forward responses carry `stopped`

_TENSOR, _REF, _SLICE, _ELLIPSIS, _DTYPE, _TUPLE = 1, 2, 3, 4, 5, 6
_MAX_DIMS = 8
_MAX_STRING = 1 << 20  # 1 MiB: source lines and names, never bulk data
_MAX_ITEMS = 1 << 20  # elements of one array or map
_MAX_EXT_DEPTH = 32  # nested tuples, tensors and slices; intervention arguments nest a few levels
# Arrays, maps and their elements in one message, over all nesting levels. An empty array is
# one byte on the wire but about 64 bytes as a Python list, so without this cap a 64 MiB
# message could decode into several GiB.
_MAX_DECODED_ITEMS = 1 << 22


class WireError(ValueError):
    """A message that cannot be decoded: malformed, too large or of another schema version."""


# --- values ----------------------------------------------------------------


def _default(value: Any) -> msgpack.ExtType:
    if isinstance(value, torch.Tensor):
        return msgpack.ExtType(_TENSOR, _pack(_tensor_fields(value)))
    if isinstance(value, Ref):
        return msgpack.ExtType(_REF, _pack(value.node))
    if isinstance(value, slice):
        return msgpack.ExtType(_SLICE, _pack([value.start, value.stop, value.step]))
    if value is Ellipsis:
        return msgpack.ExtType(_ELLIPSIS, b"")
    if isinstance(value, torch.dtype):
        if value not in DTYPE_NAMES:
            raise WireError(f"dtype {value} cannot be sent; supported: {', '.join(DTYPES)}")
        return msgpack.ExtType(_DTYPE, _pack(DTYPE_NAMES[value]))
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE, _pack(list(value)))
    raise WireError(f"values of type {type(value).__name__} cannot be sent")


def _tensor_fields(tensor: torch.Tensor) -> list:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype not in DTYPE_NAMES:
        raise WireError(f"tensors of dtype {tensor.dtype} cannot be sent; supported: {', '.join(DTYPES)}")
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return [DTYPE_NAMES[tensor.dtype], list(tensor.shape), raw]


def _ext_hook(code: int, data: bytes, depth: int, decoded: list[int]) -> Any:
    if code == _TENSOR:
        return _decode_tensor(_unpack(data, depth, decoded))
    if code == _REF:
        node = _unpack(data, depth, decoded)
        if not isinstance(node, int) or isinstance(node, bool) or node < 0:
            raise WireError(f"invalid node reference {node!r}")
        return Ref(node)
    if code == _SLICE:
        parts = _unpack(data, depth, decoded)
        if not isinstance(parts, list) or len(parts) != 3:
            raise WireError("invalid slice")
        return slice(*parts)
    if code == _ELLIPSIS:
        return Ellipsis
    if code == _DTYPE:
        name = _unpack(data, depth, decoded)
        if name not in DTYPES:
            raise WireError(f"unknown dtype {name!r}")
        return DTYPES[name]
    if code == _TUPLE:
        items = _unpack(data, depth, decoded)
        if not isinstance(items, list):
            raise WireError("invalid tuple")
        return tuple(items)
    raise WireError(f"unknown extension type {code}")


def _decode_tensor(fields: Any) -> torch.Tensor:
    if not (isinstance(fields, list) and len(fields) == 3):
        raise WireError("invalid tensor: expected [dtype, shape, bytes]")
    name, shape, raw = fields
    if name not in DTYPES:
        raise WireError(f"invalid tensor dtype {name!r}")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise WireError(f"invalid tensor shape {shape!r}")
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
        raise WireError(f"invalid tensor shape {shape!r}")
    if not isinstance(raw, bytes):
        raise WireError("invalid tensor payload")

    dtype = DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected != len(raw):
        raise WireError(f"tensor of shape {shape} and dtype {name} needs {expected} bytes, got {len(raw)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)


def _unpack(data: bytes, depth: int = 0, decoded: list[int] | None = None) -> Any:
    """Decode msgpack; extension types nest through `depth`, which is capped.

    Each nested extension re-enters the C decoder, so without the cap a small
    message could overflow the C stack and kill the process. `decoded` counts the
    arrays, maps and elements of the whole message against _MAX_DECODED_ITEMS.
    """
    if depth > _MAX_EXT_DEPTH:
        raise WireError(f"malformed message: extension types nested deeper than {_MAX_EXT_DEPTH} levels")
    decoded = decoded if decoded is not None else [0]

    def count(items: list) -> list:
        decoded[0] += len(items) + 1
        if decoded[0] > _MAX_DECODED_ITEMS:
            raise WireError(f"message has more than {_MAX_DECODED_ITEMS} arrays, maps and elements; "
                            "send a smaller graph")
        return items

    def count_pairs(pairs: list) -> dict:
        return dict(count(pairs))

    try:
        return msgpack.unpackb(
            data,
            ext_hook=lambda code, payload: _ext_hook(code, payload, depth + 1, decoded),
            list_hook=count,
            object_pairs_hook=count_pairs,
            raw=False,
            strict_map_key=True,
            max_str_len=_MAX_STRING,
            max_bin_len=len(data),
            max_ext_len=len(data),
            max_array_len=_MAX_ITEMS,
            max_map_len=_MAX_ITEMS,
        )
    except WireError:
        raise
    except msgpack.StackError:
        raise WireError("malformed message: nested deeper than the decoder allows") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as error:
        raise WireError(f"malformed message: {error or type(error).__name__}") from error


def dumps(value: Any) -> bytes:
    """Encode a message: {"v": schema version, "body": value}."""
    return _pack({"v": SCHEMA_VERSION, "body": value})


def loads(data: bytes, max_bytes: int) -> Any:
    """Decode a message from `dumps`, rejecting it before decoding if it exceeds `max_bytes`."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    message = _unpack(data)
    if not isinstance(message, dict) or "v" not in message or "body" not in message:
        raise WireError("not a swarmlens message")
    if message["v"] != SCHEMA_VERSION:
        raise WireError(f"schema version {message['v']!r} is not supported; this side speaks {SCHEMA_VERSION}. "
                        "Upgrade swarmlens on the older side")
    return message["body"]


# --- graphs ----------------------------------------------------------------


def encode_nodes(nodes: list[Node], at: dict[int, tuple[str, str, int]] | None = None) -> list:
    """Encode nodes as lists; `at` adds each node's scheduled event."""
    encoded = []
    for node in nodes:
        site = None if node.site is None else [node.site.module, node.site.kind, node.site.step]
        event = None if at is None else list(at[node.id])
        encoded.append([node.id, node.op.value, node.target, node.args, node.kwargs, site, event, node.source])
    return encoded


def decode_nodes(encoded: Any) -> tuple[list[Node], dict[int, tuple[str, str, int]]]:
    """Decode nodes from `encode_nodes`; raise WireError on any malformed field."""
    if not isinstance(encoded, list):
        raise WireError("graph must be a list of nodes")
    nodes: list[Node] = []
    at: dict[int, tuple[str, str, int]] = {}
    for item in encoded:
        node, event = _decode_node(item)
        nodes.append(node)
        if event is not None:
            at[node.id] = event
    return nodes, at


def _decode_node(item: Any) -> tuple[Node, tuple[str, str, int] | None]:
    if not isinstance(item, list) or len(item) != 8:
        raise WireError("node must be [id, op, target, args, kwargs, site, at, source]")
    node_id, op, target, args, kwargs, site, event, source = item
    if not isinstance(node_id, int) or isinstance(node_id, bool) or node_id < 0:
        raise WireError(f"invalid node id {node_id!r}")
    try:
        op = Op(op)
    except ValueError:
        raise WireError(f"node %{node_id}: unknown op {op!r}") from None
    if target is not None and not isinstance(target, str):
        raise WireError(f"node %{node_id}: target must be a string")
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not isinstance(source, str):
        raise WireError(f"node %{node_id}: malformed arguments")
    return Node(node_id, op, target, tuple(args), kwargs, _decode_site(node_id, site), source), _decode_event(
        node_id, event
    )


def _decode_site(node_id: int, site: Any) -> Site | None:
    if site is None:
        return None
    if not (isinstance(site, list) and len(site) == 3 and isinstance(site[0], str) and site[1] in SITE_KINDS
            and isinstance(site[2], int) and not isinstance(site[2], bool) and site[2] >= 0):
        raise WireError(f"node %{node_id}: invalid site {site!r}")
    return Site(site[0], site[1], site[2])


def _decode_event(node_id: int, event: Any) -> tuple[str, str, int] | None:
    if event is None:
        return None
    if not (isinstance(event, list) and len(event) == 3 and isinstance(event[0], str) and event[1] in EVENT_KINDS
            and isinstance(event[2], int) and not isinstance(event[2], bool) and event[2] >= 0):
        raise WireError(f"node %{node_id}: invalid event {event!r}")
    return event[0], event[1], event[2]
