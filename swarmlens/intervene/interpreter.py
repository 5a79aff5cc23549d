"""The interpreter that runs graph nodes inline, through hooks, while modules execute.

The local executor, the client and every peer use this one class. Values live
in an environment keyed by node id. Given the schedule's event numbers, a value
is freed after its last use in execution order, unless it must be kept (saved
values and values carried to a later location).
"""

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from swarmlens.intervene import ops
from swarmlens.intervene.budget import Budget, HeldMemory, Limits
from swarmlens.intervene.errors import ExecutionError, InterventionError, StopForward
from swarmlens.intervene.graph import INPUT, INPUTS, Node, Ref, iter_leaves, map_leaves
from swarmlens.intervene.ops import Op



class Interpreter:
    """Runs a list of nodes, each at the (module, kind, step) event it was scheduled at.

    `step` is the generation step of the forward pass that runs now; the owner
    sets it before each forward.
    """

    def __init__(self, nodes: Iterable[Node], at: dict[int, tuple[str, str, int]], modules: dict[str, nn.Module],
                 values: dict[int, Any] | None = None, keep: Iterable[int] = (), limits: Limits = Limits(),
                 events: list[int] | dict[int, int] | None = None):
        self.nodes = list(nodes)
        self.modules = modules
        self.env: dict[int, Any] = {}
        self.keep = set(keep)
        self.limits = limits
        self.budget = Budget(limits)
        self.memory = HeldMemory(limits.max_held_bytes)
        self.add_values(values or {})
        self.pending: dict[tuple[str, str, int], list[Node]] = {}
        for node in self.nodes:
            self.pending.setdefault(tuple(at[node.id]), []).append(node)
        self.step = 0
        # Nodes run in (event, id) order, which can differ from trace order. Without the
        # event numbers of the schedule, values stay until the interpreter is dropped.
        self.last_user = _last_users(self.nodes, events) if events is not None else {}
        self._site_value: Any = None
        self._site_inputs: tuple[tuple, dict] | None = None  # (args, kwargs) during an input event
        self._suspended = False
        self._skip_outputs: dict[nn.Module, Any] = {}
        self.stopped = False

    # --- hooks -------------------------------------------------------------

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Attach hooks for every pending event on the modules this interpreter holds."""
        handles = []
        try:
            skipped = {node.site.module for nodes in self.pending.values() for node in nodes if node.op is Op.SKIP}
            for module_path in skipped:
                if module_path in self.modules:
                    handles.append(_SkippableForward(self.modules[module_path], self._skip_outputs,
                                                     lambda: self._suspended))
            for module_path, kind in {(module_path, kind) for module_path, kind, _ in self.pending}:
                module = self.modules.get(module_path)
                if module is None:
                    continue  # runs elsewhere, e.g. a client event seen by a peer's interpreter
                if kind == INPUT:
                    hook = self._make_input_hook(module_path)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    hook = self._make_output_hook(module_path)
                    handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _make_input_hook(self, module_path: str):
        def hook(module, args, kwargs):
            if self._suspended:
                return None
            self._site_inputs = (tuple(args), dict(kwargs))
            value = self.run_event(module_path, INPUT, args[0] if args else next(iter(kwargs.values())))
            args, kwargs = self._site_inputs
            self._site_inputs = None
            if args:
                return (value, *args[1:]), kwargs
            return args, {**kwargs, next(iter(kwargs)): value}

        return hook

    def _make_output_hook(self, module_path: str):
        def hook(module, args, output):
            if self._suspended:
                return None
            return self.run_event(module_path, "output", output)

        return hook

    # --- running -----------------------------------------------------------

    def run_event(self, module_path: str, kind: str, value: Any) -> Any:
        """Run the nodes scheduled at this event and return the (maybe replaced) site value."""
        nodes = self.pending.pop((module_path, kind, self.step), None)
        if not nodes:
            return value
        self._site_value = value
        for node in nodes:
            if node.op is Op.STOP:
                self.stopped = True
                raise StopForward()
            self._run_node(node)
        value, self._site_value = self._site_value, None
        return value

    def check_done(self, steps: int = 1) -> None:
        """Raise if an event of the first `steps` steps never happened, so no node is silently skipped."""
        missed = [(event, nodes) for event, nodes in self.pending.items() if event[2] < steps]
        if missed:
            (module_path, kind, step), nodes = missed[0]
            node = nodes[0]
            raise ExecutionError(
                f"node %{node.id} was scheduled at {module_path}.{kind} of step {step}, which never ran",
                node.source,
                original_type="ExecutionError",
            )

    def add_values(self, values: dict[int, Any]) -> None:
        """Add values computed elsewhere (carried from another location) to the environment."""
        for node_id, value in values.items():
            self.release([node_id])
            self.env[node_id] = value
            self.memory.hold(value)
        if self.memory.over_limit:
            raise self.memory.limit_error()

    def release(self, ids: Iterable[int]) -> None:
        """Drop these values, for example once they were sent on and are not needed again."""
        for node_id in ids:
            if node_id in self.env:
                self.memory.release(self.env.pop(node_id))

    def clear(self) -> None:
        """Drop every value, so that memory is freed even while a traceback still refers to this run."""
        self.release(list(self.env))
        self._site_value = None
        self._site_inputs = None

    def take(self, ids: Iterable[int], missing_ok: bool = False) -> dict[int, Any]:
        """Return the values of these ids; raise if one is missing, unless `missing_ok`."""
        missing = [node_id for node_id in ids if node_id not in self.env]
        if missing and not missing_ok:
            raise ExecutionError(f"values {missing} were never computed", original_type="ExecutionError")
        return {node_id: self.env[node_id] for node_id in ids if node_id in self.env}

    def _run_node(self, node: Node) -> None:
        self.budget.check_time(node)
        try:
            result = self._execute(node)
        except InterventionError:
            raise
        except Exception as error:
            raise ExecutionError(
                f"{type(error).__name__} in node %{node.id} ({node.format()}): {error}",
                node.source,
                original_type=type(error).__name__,
            ) from error

        if node.op not in (Op.WRITE, Op.SETITEM, Op.SKIP):
            self.budget.check_result(node, result)
            self.release([node.id])
            self.env[node.id] = result
            self.memory.hold(result)
            if self.memory.over_limit:
                # The traceback keeps this frame alive, so the value must not stay in it.
                error = self.memory.limit_error(node)
                self.release([node.id])
                del result
                raise error
        self._free_inputs(node)

    def _execute(self, node: Node) -> Any:
        args = self._resolve(node.args)
        kwargs = self._resolve(node.kwargs)
        op = node.op

        if op is Op.READ and node.site.kind == INPUTS:
            return self._read_inputs()
        if op is Op.READ:
            return self._site_value
        if op is Op.WRITE and node.site.kind == INPUTS:
            self._write_inputs(args[0])
            return None
        if op is Op.WRITE:
            _check_same_shape(self._site_value, args[0], node.site)
            self._site_value = args[0]
            return None
        if op is Op.SAVE:
            return map_leaves(args[0], _snapshot)
        if op is Op.SKIP:
            self._skip_outputs[self.modules[node.site.module]] = args[0]
            return None
        if op is Op.GETITEM:
            return args[0][args[1]]
        if op is Op.SETITEM:
            _require_tensor(args[0], "assign into")
            args[0][args[1]] = args[2]
            return None
        if op is Op.GETATTR:
            _require_tensor(args[0], f"read .{node.target} of")
            value = getattr(args[0], node.target)
            return tuple(value) if isinstance(value, torch.Size) else value
        if op is Op.OPERATOR:
            self.budget.check_operands(node, node.target, args)
            function = ops.OPERATORS[node.target]
            self.budget.check_call(node, "torch.matmul" if node.target == "matmul" else node.target, function, args, {})
            return function(*args)
        if op is Op.METHOD:
            _require_tensor(args[0], f"call .{node.target}() on")
            method = getattr(torch.Tensor, node.target)
            self.budget.check_call(node, node.target, method, args, kwargs)
            result = method(*args, **kwargs)
            return tuple(result) if isinstance(result, torch.Size) else result
        if op is Op.FUNCTION:
            function = ops.FUNCTIONS[node.target]
            self.budget.check_call(node, node.target, function, args, kwargs,
                                   creates=node.target in ops.CREATION_FUNCTIONS)
            return function(*args, **kwargs)
        if op is Op.CALL_MODULE:
            return self._call_module(node.target, args, kwargs, node)
        raise ExecutionError(f"node %{node.id} has unknown op {op!r}", node.source, original_type="ExecutionError")

    def _read_inputs(self) -> tuple:
        args, kwargs = self._site_inputs
        if args:
            args = (self._site_value, *args[1:])
        plain = {key: value for key, value in kwargs.items() if _is_plain(value)}
        return args, plain

    def _write_inputs(self, value: Any) -> None:
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], dict)):
            raise TypeError("assign .inputs a pair (args, kwargs); kwargs replace only the keys they name")
        args, kwargs = tuple(value[0]), {**self._site_inputs[1], **value[1]}
        self._site_inputs = (args, kwargs)
        self._site_value = args[0] if args else next(iter(kwargs.values()))

    def _call_module(self, module_path: str, args: tuple, kwargs: dict, node: Node | None = None) -> Any:
        module = self.modules.get(module_path)
        if module is None:
            raise ExecutionError(f"module {module_path!r} is not held here", original_type="ExecutionError")
        self._suspended = True
        try:
            if node is not None:
                self.budget.check_module_call(node, module, args, kwargs)
            return module(*args, **kwargs)
        finally:
            self._suspended = False

    def _resolve(self, value: Any) -> Any:
        def lookup(leaf: Any) -> Any:
            if not isinstance(leaf, Ref):
                return leaf
            if leaf.node not in self.env:
                raise ExecutionError(f"value %{leaf.node} is not available here", original_type="ExecutionError")
            return self.env[leaf.node]

        return map_leaves(value, lookup)

    def _free_inputs(self, node: Node) -> None:
        for ref in set(node.refs()):
            if self.last_user.get(ref) == node.id and ref not in self.keep:
                self.release([ref])

class _SkippableForward:
    """Replaces a module's forward for the length of a run, returning a SKIP node's value when set.

    Has the `remove()` of a hook handle, so `Interpreter.hooks` restores the module with its hooks.
    """

    def __init__(self, module: nn.Module, skip_outputs: dict[nn.Module, Any], in_module_call: Callable[[], bool]):
        self.module = module
        self.saved = module.__dict__.get("forward")
        original = module.forward

        def forward(*args, **kwargs):
            # A graph's own call of the module (CALL_MODULE) computes it for real: the skip
            # belongs to the call that the model's forward makes.
            if module in skip_outputs and not in_module_call():
                return skip_outputs.pop(module)
            return original(*args, **kwargs)

        module.forward = forward

    def remove(self) -> None:
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved


def _is_plain(value: Any) -> bool:
    """True for values a graph can hold: tensors, numbers, strings, None and nestings of them."""
    return all(isinstance(leaf, (torch.Tensor, int, float, bool, str, type(None))) for leaf in iter_leaves(value))


def _snapshot(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _check_same_shape(current: Any, new: Any, site) -> None:
    """The model computes on after a write, so a tensor must keep its shape."""
    if isinstance(current, torch.Tensor) and isinstance(new, torch.Tensor) and current.shape != new.shape:
        raise ValueError(f"the value assigned to {site} has shape {tuple(new.shape)}, but the model needs "
                         f"{tuple(current.shape)} there")
    if isinstance(current, torch.Tensor) != isinstance(new, torch.Tensor):
        raise TypeError(f"the value assigned to {site} is a {type(new).__name__}, but the model needs a "
                        f"{type(current).__name__} there")


def _require_tensor(value: Any, action: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"can only {action} a tensor, got {type(value).__name__}")


def _last_users(nodes: list[Node], events: list[int] | dict[int, int]) -> dict[int, int]:
    """Map each value to the node that reads it last in execution order: (event, id)."""
    last_user: dict[int, int] = {}
    for node in sorted(nodes, key=lambda node: (events[node.id], node.id)):
        for ref in node.refs():
            last_user[ref] = node.id
    return last_user
