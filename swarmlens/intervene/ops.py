"""The closed set of operations an intervention graph may contain.

Every node has one `Op`. Ops that call something (`OPERATOR`, `METHOD`,
`FUNCTION`, `GETATTR`, `CALL_MODULE`) name their target by a string, and the
string must be in the allow-list below. Constants (numbers, strings, slices,
dtypes, tensors) appear inline in `args`. A peer looks targets up in these
tables and nowhere else, so a graph can never name arbitrary Python code.

| op          | target                 | args                      |
| ----------- | ---------------------- | ------------------------- |
| READ        | -                      | () with a site            |
| WRITE       | -                      | (value,) with a site      |
| SAVE        | -                      | (value,)                  |
| SKIP        | -                      | (output,) with an input site: the module does not run |
| STOP        | -                      | (): end the forward pass once all earlier nodes ran |
| GETITEM     | -                      | (container, index)        |
| SETITEM     | -                      | (tensor, index, value)    |
| GETATTR     | attribute name         | (value,)                  |
| OPERATOR    | name in OPERATORS      | operands                  |
| METHOD      | name in TENSOR_METHODS | (self, *args), **kwargs   |
| FUNCTION    | name in FUNCTIONS      | args, **kwargs            |
| CALL_MODULE | module path            | args, **kwargs            |
"""

import difflib
import enum
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F


class Op(str, enum.Enum):
    READ = "read"  # the value at a site: a module's input or output
    WRITE = "write"  # replace the value at a site
    SAVE = "save"  # snapshot a value and return it to the client
    SKIP = "skip"  # do not run a module; use the given value as its output
    STOP = "stop"  # end the forward pass early
    GETITEM = "getitem"  # container[index]
    SETITEM = "setitem"  # tensor[index] = value, in place
    GETATTR = "getattr"  # a read-only attribute such as .shape
    OPERATOR = "operator"  # a Python operator such as + or <
    METHOD = "method"  # a tensor method such as .softmax()
    FUNCTION = "function"  # a torch or torch.nn.functional function
    CALL_MODULE = "call_module"  # call a module of the model on values


OPERATORS: dict[str, Callable[..., Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "matmul": operator.matmul,
    "neg": operator.neg,
    "pos": operator.pos,
    "abs": operator.abs,
    "invert": operator.invert,
    "and_": operator.and_,
    "or_": operator.or_,
    "xor": operator.xor,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}

# Tensor methods that return a new value and never mutate their input.
TENSOR_METHODS: frozenset[str] = frozenset(
    {
        # shape and layout
        "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
        "permute", "transpose", "contiguous", "expand", "expand_as", "chunk",
        "split", "narrow", "size", "dim", "numel",
        # element-wise math
        "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu",
        "clamp", "pow", "sign", "add", "sub", "mul", "div", "neg",
        # reductions
        "sum", "mean", "std", "var", "max", "min", "amax", "amin", "argmax",
        "argmin", "norm", "softmax", "log_softmax", "topk", "cumsum",
        # copies and types
        "clone", "detach", "float", "half", "bfloat16", "to", "type_as",
        "masked_fill", "where", "eq", "ne", "lt", "le", "gt", "ge",
    }
)

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "torch.cat": torch.cat,
    "torch.stack": torch.stack,
    "torch.einsum": torch.einsum,
    "torch.where": torch.where,
    "torch.matmul": torch.matmul,
    "torch.softmax": torch.softmax,
    "torch.zeros_like": torch.zeros_like,
    "torch.ones_like": torch.ones_like,
    "torch.full_like": torch.full_like,
    "torch.mean": torch.mean,
    "torch.sum": torch.sum,
    "torch.norm": torch.norm,
    "torch.topk": torch.topk,
    "torch.argmax": torch.argmax,
    "torch.abs": torch.abs,
    "torch.exp": torch.exp,
    "torch.log": torch.log,
    "torch.tanh": torch.tanh,
    "torch.sigmoid": torch.sigmoid,
    "torch.clamp": torch.clamp,
    "torch.zeros": torch.zeros,
    "torch.ones": torch.ones,
    "torch.full": torch.full,
    "torch.arange": torch.arange,
    "torch.nn.functional.softmax": F.softmax,
    "torch.nn.functional.log_softmax": F.log_softmax,
    "torch.nn.functional.relu": F.relu,
    "torch.nn.functional.gelu": F.gelu,
    "torch.nn.functional.silu": F.silu,
    "torch.nn.functional.normalize": F.normalize,
    "torch.nn.functional.cosine_similarity": F.cosine_similarity,
    "torch.nn.functional.layer_norm": F.layer_norm,
}

# Functions that allocate a tensor whose size comes from their arguments:
# a peer checks the requested size before calling them.
CREATION_FUNCTIONS: frozenset[str] = frozenset({"torch.zeros", "torch.ones", "torch.full", "torch.arange"})

ATTRIBUTES: frozenset[str] = frozenset({"shape", "dtype", "ndim", "T", "mT", "real"})

# torch.dtype values that may appear as constants, by name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

_FUNCTION_NAMES: dict[Callable[..., Any], str] = {function: name for name, function in FUNCTIONS.items()}

# torch.Tensor dunder methods that reach __torch_function__ when a tensor is
# the left operand and a proxy the right one.
_TENSOR_DUNDERS: dict[str, str] = {
    "__add__": "add", "__radd__": "add", "__sub__": "sub", "__rsub__": "sub",
    "__mul__": "mul", "__rmul__": "mul", "__truediv__": "truediv", "__rtruediv__": "truediv",
    "__matmul__": "matmul", "__rmatmul__": "matmul", "__pow__": "pow", "__rpow__": "pow",
    "__eq__": "eq", "__ne__": "ne", "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge",
}


def function_name(function: Callable[..., Any]) -> str | None:
    """Return the allow-list name of a torch function, or None if it is not allowed."""
    try:
        return _FUNCTION_NAMES.get(function)
    except TypeError:  # unhashable callables are never allowed
        return None


def tensor_dunder_operator(function: Callable[..., Any]) -> tuple[str, bool] | None:
    """Map `torch.Tensor.__add__` and friends to (operator name, reflected)."""
    name = getattr(function, "__name__", "")
    if getattr(function, "__qualname__", "").startswith("Tensor.") or name.startswith("__r"):
        target = _TENSOR_DUNDERS.get(name)
        if target is not None:
            return target, name.startswith("__r") and name not in ("__rshift__",)
    return None


def describe_callable(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", None) or "torch"
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", repr(function))
    if module.startswith("torch._C") or module == "torch._VariableFunctions" or module == "torch":
        return f"torch.{name.removeprefix('_VariableFunctionsClass.')}"
    return f"{module}.{name}"


def suggest(name: str, allowed: Any) -> str:
    """Return ' Did you mean X?' for the nearest allowed name, or ''."""
    matches = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""
