"""Structural checks of a graph: ops, targets, sites, references and argument types.

The client runs these checks before sending, and every peer runs them again
on what it receives, because a peer never trusts a graph from the network.
"""

from typing import Collection

import torch

from swarmlens.intervene import ops
from swarmlens.intervene.errors import BudgetError, InvalidGraphError
from swarmlens.intervene.graph import SITE_KINDS, Graph, Node, Ref, iter_leaves
from swarmlens.intervene.ops import Op

MAX_NODES = 20_000  # far above hand-written studies (a 30-block logit lens is about 100 nodes)

_ARITY = {Op.READ: 0, Op.WRITE: 1, Op.SAVE: 1, Op.GETITEM: 2, Op.SETITEM: 3, Op.GETATTR: 1, Op.SKIP: 1,
          Op.STOP: 0}
_NO_VALUE = (Op.WRITE, Op.SETITEM, Op.SKIP, Op.STOP)
_SITE_OPS = (Op.READ, Op.WRITE, Op.SKIP)
_FORBIDDEN_KWARGS = {
    "out": "it writes into an existing tensor in place; assign the result instead",
    "device": "values stay on the device of the peer that computes them",
}
_LEAF_TYPES = (type(None), bool, int, float, str, Ref, slice, type(Ellipsis), torch.dtype, torch.Tensor)


def validate(graph: Graph, sites: Collection[tuple[str, str]], modules: Collection[str],
             known: Collection[int] = (), max_nodes: int = MAX_NODES) -> None:
    """Raise InvalidGraphError for the first node that breaks a rule.

    `sites` are the (module, kind) pairs that exist, `modules` the paths that
    CALL_MODULE may name, and `known` the ids of values that arrive from
    elsewhere (a partition's carried values).
    """
    if len(graph.nodes) > max_nodes:
        raise BudgetError(f"graph has {len(graph.nodes)} nodes, more than the limit of {max_nodes}")

    produced: dict[int, Op] = {}
    known = set(known)
    stopped = False
    for node in graph.nodes:
        if stopped:
            _fail(node, "nothing may follow tracer.stop(); move this line before it")
        stopped = node.op is Op.STOP
        _check_node(node, sites, modules)
        _check_arguments(node, produced, known)
        produced[node.id] = node.op


def _fail(node: Node, message: str) -> None:
    raise InvalidGraphError(f"node %{node.id} ({_name(node)}): {message}", node.source)


def _name(node: Node) -> str:
    op = getattr(node.op, "value", node.op)
    return f"{op} {node.target}" if node.target else str(op)


def _check_node(node: Node, sites: Collection[tuple[str, str]], modules: Collection[str]) -> None:
    if not isinstance(node.op, Op):
        _fail(node, f"unknown op {node.op!r}; ops are {', '.join(op.value for op in Op)}")

    allowed = {
        Op.OPERATOR: ops.OPERATORS,
        Op.METHOD: ops.TENSOR_METHODS,
        Op.FUNCTION: ops.FUNCTIONS,
        Op.GETATTR: ops.ATTRIBUTES,
        Op.CALL_MODULE: modules,
    }.get(node.op)
    if allowed is None and node.target is not None:
        _fail(node, "this op takes no target")
    if allowed is not None and (not isinstance(node.target, str) or node.target not in allowed):
        hint = ops.suggest(str(node.target), allowed)
        what = "module" if node.op is Op.CALL_MODULE else "target"
        _fail(node, f"{what} {node.target!r} is not allowed here.{hint}")

    if node.op in _SITE_OPS:
        if node.site is None:
            _fail(node, "a read, write or skip needs a site")
        if node.op is Op.SKIP and node.site.kind != "input":
            _fail(node, "a skip is placed at its module's input site")
        if node.site.kind not in SITE_KINDS or (node.site.module, node.site.event_kind) not in sites:
            _fail(node, f"unknown site {node.site}: no module {node.site.module!r} with an {node.site.kind} here")
    elif node.site is not None:
        _fail(node, "only read, write and skip nodes have a site")

    arity = _ARITY.get(node.op)
    if arity is not None and (len(node.args) != arity or node.kwargs):
        _fail(node, f"takes exactly {arity} positional arguments, got {len(node.args)} and {len(node.kwargs)} keyword")
    if node.op is Op.METHOD and (not node.args or not isinstance(node.args[0], Ref)):
        _fail(node, "a method call needs the traced value it is called on as its first argument")
    if node.op is Op.OPERATOR and not 1 <= len(node.args) <= 2:
        _fail(node, "an operator takes one or two operands")


def _check_arguments(node: Node, produced: dict[int, Op], known: set[int]) -> None:
    if not all(isinstance(key, str) for key in node.kwargs):
        _fail(node, "keyword argument names must be strings")
    for key in _FORBIDDEN_KWARGS.keys() & node.kwargs.keys():
        if node.kwargs[key] is not None:  # torch's Python functions pass out=None on their own
            _fail(node, f"keyword argument {key!r} is not allowed: {_FORBIDDEN_KWARGS[key]}")
    for leaf in iter_leaves((node.args, node.kwargs)):
        if not isinstance(leaf, _LEAF_TYPES):
            _fail(node, f"argument of type {type(leaf).__name__} cannot appear in a graph")
        if isinstance(leaf, slice):
            for part in (leaf.start, leaf.stop, leaf.step):
                if not isinstance(part, (type(None), int)) or isinstance(part, bool):
                    _fail(node, f"slice bounds must be ints or None, got {type(part).__name__}")
        if not isinstance(leaf, Ref):
            continue
        if leaf.node in known:
            continue
        if leaf.node not in produced:
            _fail(node, f"refers to %{leaf.node}, which is not an earlier node of this graph")
        if produced[leaf.node] in _NO_VALUE:
            _fail(node, f"refers to %{leaf.node}, a {produced[leaf.node].value} node, which has no value")
