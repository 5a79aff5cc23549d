"""Scheduling: the event at which each node runs, and where that event happens.

A node runs at the first event at which all of its inputs exist: a READ at its
site, a WRITE at its site (its value must be ready by then), anything else at
the latest event among its inputs. An in-place SETITEM on a free tensor delays
the later users of that tensor to the SETITEM's event, so they see the edit.
"""

import dataclasses

from swarmlens.intervene.errors import OrderError
from swarmlens.intervene.graph import Graph, Node, Ref
from swarmlens.intervene.ops import Op
from swarmlens.intervene.sites import SiteOrder

# Ops whose result may share storage with their first argument.
_VIEW_OPS = (Op.GETITEM, Op.METHOD)


@dataclasses.dataclass
class Schedule:
    events: list[int]  # event number (counted across steps) at which node i runs
    locations: list[int]  # -1 client before the blocks, i block i, N client after
    steps: list[int]  # generation step at which node i runs


def schedule(graph: Graph, order: SiteOrder) -> Schedule:
    """Assign every node an event; raise OrderError when a value would arrive too late."""
    events: list[int] = []
    alias_root: list[int] = []
    delay: dict[int, int] = {}

    def ready(ref: int) -> int:
        return max(events[ref], delay.get(alias_root[ref], 0))

    for node in graph.nodes:
        inputs = [ready(ref) for ref in node.refs()]
        if node.op is Op.STOP:
            inputs = events  # after every earlier node
        latest = max(inputs, default=0)
        event = _event_of(node, latest, order, graph, events)
        events.append(event)
        alias_root.append(_alias_root(node, alias_root))

        if node.op is Op.SETITEM:
            _check_in_place_edit(node, event, order, graph, alias_root, events)
            root = alias_root[node.args[0].node]
            delay[root] = max(delay.get(root, 0), event)

    locations = [order.location_of_event(event) for event in events]
    _check_shared_tensor_edits(graph, order, events, alias_root)
    return Schedule(events, locations, [event // order.size for event in events])


def _event_of(node: Node, latest: int, order: SiteOrder, graph: Graph, events: list[int]) -> int:
    if node.op is Op.READ:
        return order.event_of(node.site)

    if node.op in (Op.WRITE, Op.SKIP):
        event = order.event_of(node.site)
        if latest > event:
            action = f"writes {node.site}" if node.op is Op.WRITE else f"skips {node.site.module}"
            _too_late(node, action, latest, order)
        return event

    if node.op is Op.CALL_MODULE:
        return _call_event(node, latest, order)

    return latest


def _call_event(node: Node, latest: int, order: SiteOrder) -> int:
    """Run a module call where the module lives, once its inputs exist."""
    home = order.location_of(node.target)
    step = latest // order.size
    if home == -1 or home >= order.num_blocks:
        if order.location_of_event(latest) == -1:
            return latest
        return max(latest, order.post_start_of(step))

    first = order.first_event_of_block(home, step)
    last = order.last_event_of_block(home, step)
    if latest > last:
        where = order.describe_location(order.location_of_event(latest))
        raise OrderError(
            f"node %{node.id} calls {node.target!r}, which lives on block {home}, but its input is computed "
            f"at {order.describe_event(latest)} on {where}, after block {home} has run. "
            f"Call a module only on values computed before or inside its own block",
            node.source,
        )
    return max(latest, first)


def _alias_root(node: Node, alias_root: list[int]) -> int:
    if node.op in _VIEW_OPS and node.args and isinstance(node.args[0], Ref):
        return alias_root[node.args[0].node]
    return node.id


def _check_in_place_edit(node: Node, event: int, order: SiteOrder, graph: Graph,
                         alias_root: list[int], events: list[int]) -> None:
    """An in-place edit of a site's value must happen while that site runs."""
    target = node.args[0]
    if not isinstance(target, Ref):
        raise OrderError(f"node %{node.id} assigns into a value that is not traced", node.source)

    root = graph.nodes[alias_root[target.node]]
    if root.op is Op.READ and event > events[root.id]:
        _too_late(node, f"edits {root.site} in place", event, order)


def _check_shared_tensor_edits(graph: Graph, order: SiteOrder, events: list[int], alias_root: list[int]) -> None:
    """Reject an in-place edit of a tensor that another location read earlier as another site.

    Locally, block k's output and block k + 1's input are one tensor, so editing one
    in place also changes a value read from the other. When the two sites run on
    different peers (or on the client), each side has its own copy and the edit
    would not reach the earlier value, so the two executors would disagree.
    """
    reads = [node for node in graph.nodes if node.op is Op.READ and node.site.kind != "inputs"]
    for node in graph.nodes:
        if node.op is not Op.SETITEM:
            continue
        root = graph.nodes[alias_root[node.args[0].node]]
        if root.op is not Op.READ or root.site.kind == "inputs":
            continue
        group = order.shared.get((root.site.module, root.site.event_kind))
        edit_location = order.location_of_event(events[node.id])
        if group is None:
            continue
        for read in reads:
            same_tensor = order.shared.get((read.site.module, read.site.event_kind)) == group
            if (same_tensor and read.site.step == root.site.step and events[read.id] < events[node.id]
                    and order.location_of_event(events[read.id]) != edit_location):
                raise OrderError(
                    f"node %{node.id} edits {root.site} in place, but that tensor is also {read.site}, read by "
                    f"node %{read.id} on {order.describe_location(order.location_of_event(events[read.id]))}; "
                    "the edit would change that value locally but not on the swarm. Assign the whole site "
                    f"instead (for example `{_site_attribute(root.site)} = new_value`), which leaves the read "
                    "value unchanged",
                    node.source,
                )


def _site_attribute(site) -> str:
    return f"{site.module}.{site.kind}"


def _too_late(node: Node, action: str, latest: int, order: SiteOrder) -> None:
    raise OrderError(
        f"node %{node.id} {action}, but it needs a value from {order.describe_event(latest)}, which runs later in the "
        "forward pass. Edits may only use values read at sites that run before the site they change",
        node.source,
    )
