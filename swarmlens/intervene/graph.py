"""Intervention graph: nodes in trace order, arguments that refer to earlier nodes.

A graph is plain data. Node ids are positions in `Graph.nodes`, so every
reference points backwards and trace order is a valid execution order.
"""

import dataclasses
from typing import Any, Callable, Iterator

import torch

from swarmlens.intervene.ops import Op

INPUT = "input"  # the first argument of a module call
INPUTS = "inputs"  # all arguments: (args tuple, kwargs dict), read at the same event as INPUT
OUTPUT = "output"
SITE_KINDS = (INPUT, INPUTS, OUTPUT)
EVENT_KINDS = (INPUT, OUTPUT)  # hook events: before (input) and after (output) a module call


@dataclasses.dataclass(frozen=True)
class Site:
    """A place in the forward pass: the input or output of one module call."""

    module: str  # module path as in the Hugging Face tree, e.g. "model.layers.3.mlp"
    kind: str  # INPUT (first argument) or OUTPUT
    step: int = 0  # generation step; 0 for a single forward

    @property
    def event_kind(self) -> str:
        """The hook event at which this site exists: INPUT for both input sites, else OUTPUT."""
        return OUTPUT if self.kind == OUTPUT else INPUT

    def __str__(self) -> str:
        step = f"@{self.step}" if self.step else ""
        return f"{self.module}.{self.kind}{step}"


@dataclasses.dataclass(frozen=True)
class Ref:
    """A reference to the value of an earlier node."""

    node: int


@dataclasses.dataclass
class Node:
    id: int
    op: Op
    target: str | None = None
    args: tuple = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    site: Site | None = None  # only READ and WRITE
    source: str = ""  # "file:line: code" of the user's line that created the node

    def refs(self) -> Iterator[int]:
        """Yield the ids of the nodes this node reads, in argument order."""
        for value in iter_leaves((self.args, self.kwargs)):
            if isinstance(value, Ref):
                yield value.node

    def format(self) -> str:
        target = f"[{self.target}]" if self.target else ""
        site = f" @ {self.site}" if self.site else ""
        args = ", ".join(_format_value(arg) for arg in self.args)
        kwargs = "".join(f", {key}={_format_value(value)}" for key, value in self.kwargs.items())
        return f"%{self.id} = {self.op.value}{target}({args}{kwargs}){site}"


@dataclasses.dataclass
class Graph:
    nodes: list[Node] = dataclasses.field(default_factory=list)

    def add(self, op: Op, target: str | None = None, args: tuple = (), kwargs: dict | None = None,
            site: Site | None = None, source: str = "") -> Node:
        node = Node(len(self.nodes), op, target, tuple(args), dict(kwargs or {}), site, source)
        self.nodes.append(node)
        return node

    def saved(self) -> list[int]:
        return [node.id for node in self.nodes if node.op is Op.SAVE]

    def users(self) -> dict[int, list[int]]:
        """Map each node id to the ids of the nodes that read it."""
        users: dict[int, list[int]] = {node.id: [] for node in self.nodes}
        for node in self.nodes:
            for ref in node.refs():
                users[ref].append(node.id)
        return users

    def __str__(self) -> str:
        return "\n".join(node.format() for node in self.nodes)


def iter_leaves(value: Any) -> Iterator[Any]:
    """Yield the leaves of nested tuples, lists and dicts."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_leaves(item)
    else:
        yield value


def map_leaves(value: Any, function: Callable[[Any], Any]) -> Any:
    """Rebuild nested tuples, lists and dicts with `function` applied to each leaf."""
    if isinstance(value, tuple):
        return tuple(map_leaves(item, function) for item in value)
    if isinstance(value, list):
        return [map_leaves(item, function) for item in value]
    if isinstance(value, dict):
        return {key: map_leaves(item, function) for key, item in value.items()}
    return function(value)


def _format_value(value: Any) -> str:
    if isinstance(value, Ref):
        return f"%{value.node}"
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_format_value(item) for item in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, slice):
        parts = ["" if part is None else _format_value(part) for part in (value.start, value.stop, value.step)]
        return ":".join(parts).rstrip(":") or ":"
    if value is Ellipsis:
        return "..."
    return repr(value)
