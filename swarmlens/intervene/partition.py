"""Partition: one subgraph per location, and the values carried between them.

Locations are ordered: the client before the blocks (-1), blocks 0..N-1, the
client after the blocks (N). Within one step, values travel forward only, with
the hidden states: after location L the message keeps every value that a later
location of the same step reads, plus the values the client must get back.

Across generation steps, the client and every peer keep their values for the
whole session, so a value that a later step uses at the same location stays
where it is. A value from a peer that a later step needs elsewhere returns to
the client at the end of its step ("returned") and rides along with the
later step's request from the client ("injected").
"""

import dataclasses

from swarmlens.intervene.graph import Graph, Node
from swarmlens.intervene.ops import Op
from swarmlens.intervene.schedule import Schedule
from swarmlens.intervene.sites import SiteOrder


@dataclasses.dataclass
class Partition:
    num_blocks: int
    num_steps: int
    nodes: dict[int, list[Node]]  # location -> its nodes, in id order
    keep_after: dict[int, dict[int, list[int]]]  # step -> location -> ids carried past it
    at: dict[int, tuple[str, str, int]]  # node id -> (module, kind, step) of the event it runs at
    locations: list[int]  # node id -> location
    steps: list[int]  # node id -> step
    events: list[int]  # node id -> event number it runs at; with the id, the execution order

    def nodes_for_span(self, start: int, end: int) -> list[Node]:
        return [node for block in range(start, end) for node in self.nodes.get(block, [])]

    def client_keep(self) -> set[int]:
        """Ids the client must keep for the whole session: everything it sends or returns."""
        return {node_id for by_location in self.keep_after.values() for ids in by_location.values() for node_id in ids}


def partition(graph: Graph, schedule: Schedule, order: SiteOrder) -> Partition:
    num_blocks = order.num_blocks
    num_steps = max(schedule.steps, default=0) + 1
    nodes: dict[int, list[Node]] = {}
    for node in graph.nodes:
        nodes.setdefault(schedule.locations[node.id], []).append(node)

    consumers = _consumers(graph, schedule)
    returned = {node.id for node in graph.nodes if _is_returned(node, schedule, consumers, num_blocks)}
    keep_after = {
        step: _keep_after_step(graph, schedule, consumers, returned, step, num_blocks)
        for step in range(num_steps)
    }

    at = {node.id: order.site_of_event(schedule.events[node.id]) for node in graph.nodes}
    return Partition(num_blocks, num_steps, nodes, keep_after, at, schedule.locations, schedule.steps,
                     schedule.events)


def _consumers(graph: Graph, schedule: Schedule) -> dict[int, set[tuple[int, int]]]:
    """Map each node id to the (step, location) pairs where it is read."""
    consumers: dict[int, set[tuple[int, int]]] = {node.id: set() for node in graph.nodes}
    for node in graph.nodes:
        for ref in node.refs():
            consumers[ref].add((schedule.steps[node.id], schedule.locations[node.id]))
    return consumers


def _is_returned(node: Node, schedule: Schedule, consumers: dict, num_blocks: int) -> bool:
    """True if the client needs this value back at the end of its step."""
    step, location = schedule.steps[node.id], schedule.locations[node.id]
    if node.op is Op.SAVE:
        return True
    if not 0 <= location < num_blocks:
        return False  # computed on the client, which keeps it
    return any(later_step > step and later_location != location for later_step, later_location in consumers[node.id])


def _keep_after_step(graph: Graph, schedule: Schedule, consumers: dict, returned: set[int], step: int,
                     num_blocks: int) -> dict[int, list[int]]:
    keep_after: dict[int, list[int]] = {location: [] for location in range(-1, num_blocks)}
    for node in graph.nodes:
        node_step, node_location = schedule.steps[node.id], schedule.locations[node.id]
        uses = [location for use_step, location in consumers[node.id] if use_step == step]

        if node_step == step:
            last_use = max(uses, default=-2)
            for location in range(node_location, num_blocks):
                if node.id in returned or last_use > location:
                    keep_after[location].append(node.id)
        elif node_step < step:
            # Injected by the client when a peer of this step needs it and does not hold it already.
            needed = [location for location in uses if 0 <= location < num_blocks and location != node_location]
            for location in range(-1, max(needed, default=-2)):
                keep_after[location].append(node.id)
    return keep_after
