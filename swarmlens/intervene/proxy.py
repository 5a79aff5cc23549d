"""Proxies: stand-ins for values inside a trace; every operation on one records a node."""

import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from swarmlens.intervene import ops
from swarmlens.intervene.errors import TraceError
from swarmlens.intervene.graph import Ref, map_leaves
from swarmlens.intervene.ops import Op

if TYPE_CHECKING:
    from swarmlens.intervene.tracer import Tracer

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def user_source() -> str:
    """Return "file:line: code" of the innermost caller outside swarmlens and torch."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
            return _describe_frame(frame)
        frame = frame.f_back
    return ""


def _describe_frame(frame) -> str:
    import linecache

    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}: {line}"


class Proxy:
    """A value computed later, while the model runs; operations record graph nodes.

    After the trace exits, a proxy returned by `.save()` contains the result in
    `.value`.
    """

    __slots__ = ("tracer", "node", "_value", "_has_value")

    def __init__(self, tracer: "Tracer", node: int):
        self.tracer = tracer
        self.node = node
        self._has_value = False
        self._value = None

    # --- results -----------------------------------------------------------

    def save(self) -> "Proxy":
        """Return a proxy whose value is a snapshot of this one, sent back to the client."""
        return self.tracer.record(Op.SAVE, None, (self,))

    @property
    def value(self) -> Any:
        if not self._has_value:
            raise TraceError(
                f"proxy %{self.node} has no value: only values marked with .save() are returned, "
                "and only after the `with model.trace(...)` block exits"
            )
        return self._value

    def _set_value(self, value: Any) -> None:
        self._value = value
        self._has_value = True

    # --- recording ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ops.ATTRIBUTES:
            return self.tracer.record(Op.GETATTR, name, (self,))
        if name in ops.TENSOR_METHODS:
            return _BoundMethod(self, name)
        raise TraceError(
            f"tensor method or attribute {name!r} is not allowed in an intervention graph."
            f"{ops.suggest(name, ops.TENSOR_METHODS | ops.ATTRIBUTES)} "
            "Allowed methods are listed in swarmlens.intervene.ops.TENSOR_METHODS.",
            user_source(),
        )

    def __getitem__(self, index: Any) -> "Proxy":
        return self.tracer.record(Op.GETITEM, None, (self, index))

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.record(Op.SETITEM, None, (self, index, value))

    def __call__(self, *args, **kwargs):
        raise TraceError("a traced value cannot be called", user_source())

    def __bool__(self) -> bool:
        raise TraceError(
            "a traced value has no truth value while tracing: Python `if`, `and`, `or` and `while` "
            "cannot branch on it. Use torch.where(condition, a, b) to choose values instead",
            user_source(),
        )

    def __iter__(self):
        raise TraceError(
            "a traced value cannot be iterated while tracing because its length is not known; "
            "index it explicitly (value[0], value[1]) instead",
            user_source(),
        )

    def __len__(self) -> int:
        raise TraceError("len() of a traced value is unknown while tracing; use value.shape[0]", user_source())

    def __index__(self) -> int:
        raise TraceError("a traced value cannot be used as a Python int while tracing", user_source())

    def __repr__(self) -> str:
        if self._has_value:
            return f"Proxy(%{self.node}, value={self._value!r})"
        return f"Proxy(%{self.node})"

    @classmethod
    def __torch_function__(cls, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = _find_tracer((args, kwargs))
        dunder = ops.tensor_dunder_operator(function)
        if dunder is not None:
            name, reflected = dunder
            left, right = args
            return tracer.record(Op.OPERATOR, name, (right, left) if reflected else (left, right))

        name = ops.function_name(function)
        if name is None:
            allowed = list(ops.FUNCTIONS)
            described = ops.describe_callable(function)
            raise TraceError(
                f"function {described} is not allowed in an intervention graph."
                f"{ops.suggest(described, allowed)} Allowed functions are listed in "
                "swarmlens.intervene.ops.FUNCTIONS.",
                user_source(),
            )
        return tracer.record(Op.FUNCTION, name, args, kwargs)


class _BoundMethod:
    __slots__ = ("proxy", "name")

    def __init__(self, proxy: Proxy, name: str):
        self.proxy = proxy
        self.name = name

    def __call__(self, *args, **kwargs) -> Proxy:
        return self.proxy.tracer.record(Op.METHOD, self.name, (self.proxy, *args), kwargs)


def _find_tracer(value: Any) -> "Tracer":
    found = []
    map_leaves(value, lambda leaf: found.append(leaf.tracer) if isinstance(leaf, Proxy) else None)
    return found[0]


def _operator(name: str, reflected: bool = False):
    def method(self: Proxy, other: Any) -> Proxy:
        operands = (other, self) if reflected else (self, other)
        return self.tracer.record(Op.OPERATOR, name, operands)

    method.__name__ = f"__{'r' if reflected else ''}{name.rstrip('_')}__"
    return method


def _unary(name: str):
    def method(self: Proxy) -> Proxy:
        return self.tracer.record(Op.OPERATOR, name, (self,))

    return method


_BINARY = {
    "add": "add", "sub": "sub", "mul": "mul", "truediv": "truediv", "floordiv": "floordiv",
    "mod": "mod", "pow": "pow", "matmul": "matmul", "and": "and_", "or": "or_", "xor": "xor",
}
for _dunder, _name in _BINARY.items():
    setattr(Proxy, f"__{_dunder}__", _operator(_name))
    setattr(Proxy, f"__r{_dunder}__", _operator(_name, reflected=True))
    # `x += y` records an out-of-place add; assigning the result to a site records a WRITE.
    setattr(Proxy, f"__i{_dunder}__", _operator(_name))
for _dunder in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(Proxy, f"__{_dunder}__", _operator(_dunder))
for _dunder, _name in {"neg": "neg", "pos": "pos", "abs": "abs", "invert": "invert"}.items():
    setattr(Proxy, f"__{_dunder}__", _unary(_name))
Proxy.__hash__ = object.__hash__  # __eq__ records a node, so hash by identity


def to_graph_arguments(value: Any) -> Any:
    """Replace proxies by references and torch.Size by tuples in nested arguments."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, Proxy):
            return Ref(leaf.node)
        return leaf

    if isinstance(value, torch.Size):
        value = tuple(value)
    return map_leaves(value, convert)
