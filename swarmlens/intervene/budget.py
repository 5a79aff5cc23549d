"""Compute budget of one graph run: memory, FLOPs and time, checked before ops allocate.

A peer runs graphs from strangers, so an op's output size is predicted on the
meta device (shapes only, no data) before the op runs, and matrix products
are priced in FLOPs. The tensor memory that the run's values hold at once is
counted, and a clock bounds the whole run, checked between nodes.
"""

import dataclasses
import math
import time
from typing import Any, Callable

import torch

from swarmlens.intervene.errors import BudgetError
from swarmlens.intervene.graph import Node, iter_leaves, map_leaves

_PRICED_FUNCTIONS = {"torch.matmul", "torch.einsum"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Compute limits a graph must stay within; peers set them for strangers' graphs."""

    max_numel: int = 2**28  # elements in any one value: 1 GiB of float32
    max_int_exponent: int = 64  # largest exponent for ** on two Python ints
    max_flops_per_node: int = 2**36  # about 69 GFLOP; estimated at tens of seconds on a two-core CPU
    max_seconds: float = 60.0  # wall time of the graph's nodes in one run (one step of a session)
    max_held_bytes: int = 2**32  # tensor memory the run's values hold at once: 4 GiB


# Limits of graphs that run in the user's own process (the local executor and the client's
# part of a swarm run): the same per-value checks as on peers, but no cap on held memory,
# which is the user's to spend. Set `model.limits` to change them.
USER_LIMITS = Limits(max_held_bytes=2**62)


class Budget:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds

    def restart_clock(self) -> None:
        self.deadline = time.monotonic() + self.limits.max_seconds

    def check_time(self, node: Node) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetError(f"the graph ran longer than {self.limits.max_seconds:.0f} s and was stopped at "
                              f"node %{node.id}; split the study into smaller traces", node.source)

    def check_call(self, node: Node, name: str, function: Callable, args: tuple, kwargs: dict,
                   creates: bool = False) -> None:
        """Predict the result of `function` on the meta device and reject it if it is too large.

        NOTE: an op without a meta kernel skips this prediction; its result is still
        checked by `check_result`, but only after it was allocated.
        """
        meta_args = map_leaves(args, _to_meta)
        meta_kwargs = map_leaves(kwargs, _to_meta)
        if creates:
            meta_kwargs["device"] = "meta"
        try:
            predicted = function(*meta_args, **meta_kwargs)
        except Exception:  # noqa: BLE001 - the real call raises the same error with the user's line
            return
        self.check_result(node, predicted)
        if name in _PRICED_FUNCTIONS:
            self._check_flops(node, name, meta_args, predicted)

    def check_result(self, node: Node, value: Any) -> None:
        for leaf in iter_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.limits.max_numel:
                raise BudgetError(f"node %{node.id} would produce {leaf.numel()} elements, above the limit of "
                                  f"{self.limits.max_numel}", node.source)

    def check_module_call(self, node: Node, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Predict a module call on the meta device, with meta copies of its weights, and reject
        it if an output is too large (attention weights of a long sequence, for example).

        NOTE: module calls are not priced in FLOPs, so a very long sequence can keep the
        compute thread past the clock, which is only checked between nodes.
        """
        weights = {name: tensor.to("meta") for name, tensor in
                   [*module.named_parameters(), *module.named_buffers()]}
        try:
            predicted = torch.func.functional_call(module, weights, map_leaves(args, _to_meta),
                                                   map_leaves(kwargs, _to_meta))
        except Exception:  # noqa: BLE001 - the real call raises the same error with the user's line
            return
        self.check_result(node, predicted)

    def check_operands(self, node: Node, name: str, args: tuple) -> None:
        for arg in args:
            if not isinstance(arg, (torch.Tensor, int, float, bool)):
                raise TypeError(f"operator {name} takes tensors and numbers, got {type(arg).__name__}")
        if name == "pow" and len(args) == 2 and all(isinstance(arg, int) for arg in args):
            if abs(args[1]) > self.limits.max_int_exponent:
                raise BudgetError(f"integer power with exponent {args[1]} is above the limit of "
                                  f"{self.limits.max_int_exponent}", node.source)

    def _check_flops(self, node: Node, name: str, meta_args: tuple, predicted: Any) -> None:
        if not isinstance(predicted, torch.Tensor):
            return
        if name == "torch.einsum":
            flops = _einsum_flops(meta_args, predicted)
        else:
            first = meta_args[0]
            flops = predicted.numel() * (first.shape[-1] if isinstance(first, torch.Tensor) and first.dim() else 1)
        if flops > self.limits.max_flops_per_node:
            raise BudgetError(f"node %{node.id} needs about {flops:.2e} FLOPs, above the limit of "
                              f"{self.limits.max_flops_per_node:.2e}", node.source)


class HeldMemory:
    """The tensor memory that a run's values hold, with each storage counted once.

    Views share their base's storage, so a slice of a block's output counts as the whole
    output: holding the slice keeps that memory alive.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.nbytes = 0
        self._storages: dict[int, list[int]] = {}  # data pointer -> [bytes, values that use it]

    def hold(self, value: Any) -> None:
        """Count the storages of `value`; the caller checks `over_limit` afterwards."""
        for key, nbytes in _storages_of(value):
            entry = self._storages.setdefault(key, [nbytes, 0])
            if entry[1] == 0:
                self.nbytes += nbytes
            entry[1] += 1

    @property
    def over_limit(self) -> bool:
        return self.nbytes > self.limit

    def limit_error(self, node: Node | None = None) -> BudgetError:
        """Return the error for a run whose values went above the limit, at `node` if known."""
        where = f"after node %{node.id}, " if node is not None else ""
        return BudgetError(
            f"{where}the graph's values hold {format_bytes(self.nbytes)}, above the limit of "
            f"{format_bytes(self.limit)}; save fewer or smaller values, or split the study into smaller traces",
            node.source if node is not None else "",
        )

    def release(self, value: Any) -> None:
        """Stop counting the storages of `value`, once no other held value uses them."""
        for key, _ in _storages_of(value):
            entry = self._storages.get(key)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                self.nbytes -= entry[0]
                del self._storages[key]


def format_bytes(nbytes: int) -> str:
    """Format a byte count with a binary unit, e.g. 1.5 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


def _storages_of(value: Any) -> list[tuple[int, int]]:
    storages = {}
    for leaf in iter_leaves(value):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            storage = leaf.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return [(key, nbytes) for key, nbytes in storages.items() if nbytes > 0]


def _to_meta(leaf: Any) -> Any:
    return leaf.to("meta") if isinstance(leaf, torch.Tensor) else leaf


def _einsum_flops(meta_args: tuple, predicted: torch.Tensor) -> int:
    """Output elements times the sizes of the contracted indices: an upper bound of the work."""
    equation, *operands = meta_args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    if not arrow:  # implicit output: the letters that appear once, in order
        letters = inputs.replace(",", "").replace(".", "")
        output = "".join(sorted(letter for letter in set(letters) if letters.count(letter) == 1))
    sizes: dict[str, int] = {}
    for subscripts, operand in zip(inputs.split(","), operands):
        letters = subscripts.replace("...", "")
        if "..." in subscripts:
            offset = subscripts.index("...")
            dims = list(operand.shape[:offset]) + list(operand.shape[operand.dim() - len(letters) + offset:])
        else:
            dims = list(operand.shape)
        for letter, size in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), size)
    contracted = [size for letter, size in sizes.items() if letter not in output]
    return predicted.numel() * math.prod(contracted)
