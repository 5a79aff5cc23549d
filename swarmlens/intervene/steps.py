"""Generation steps: unroll nodes recorded inside `tracer.all()` or `tracer.iter[...]`.

Such a node is a template that runs once per step of its range. Unrolling
copies it for every step, with its sites moved to that step and its references
to other templates pointing at their copies of the same step. The result is an
ordinary graph whose sites carry explicit steps, so scheduling, partition,
wire format and interpreter need no notion of templates.
"""

import dataclasses

from swarmlens.intervene.errors import TraceError
from swarmlens.intervene.graph import Graph, Ref, map_leaves


@dataclasses.dataclass
class Unrolled:
    graph: Graph
    single: dict[int, int]  # recorded id -> unrolled id, for nodes outside step blocks
    per_step: dict[int, dict[int, int]]  # recorded id -> step -> unrolled id, for templates


def unroll(graph: Graph, templates: dict[int, range]) -> Unrolled:
    """Return the graph with every template node copied once per step of its range."""
    result = Unrolled(Graph(), {}, {})
    for node in graph.nodes:
        steps = templates.get(node.id)
        if steps is None:
            args, kwargs = _remap((node.args, node.kwargs), result, None, node.source)
            copy = result.graph.add(node.op, node.target, args, kwargs, node.site, node.source)
            result.single[node.id] = copy.id
            continue

        result.per_step[node.id] = {}
        for step in steps:
            args, kwargs = _remap((node.args, node.kwargs), result, step, node.source)
            site = dataclasses.replace(node.site, step=step) if node.site is not None else None
            copy = result.graph.add(node.op, node.target, args, kwargs, site, node.source)
            result.per_step[node.id][step] = copy.id
    return result


def _remap(value, result: Unrolled, step: int | None, source: str):
    def remap(leaf):
        if not isinstance(leaf, Ref):
            return leaf
        if leaf.node in result.single:
            return Ref(result.single[leaf.node])

        copies = result.per_step[leaf.node]
        if step in copies:
            return Ref(copies[step])
        if len(copies) == 1:
            # A value of a single step can be used at any step; scheduling rejects a use
            # at a step that runs before it.
            return Ref(next(iter(copies.values())))
        if step is None:
            raise TraceError(
                f"a value computed inside a step block (%{leaf.node}) is used outside it; "
                "use it inside the same block, or .save() it there to get one value per step",
                source,
            )
        raise TraceError(f"value %{leaf.node} does not exist at step {step}: its step block covers "
                         f"steps {min(copies)} to {max(copies)}", source)

    return map_leaves(value, remap)
