"""Choose a chain of peers that runs every block of a model once, in order.

`choose_chain` is a pure function of the peer records, so it is tested without a network.
It finds the cheapest chain with a shortest-path search over block boundaries: node `b`
means "blocks 0..b-1 are done", and a peer whose span contains blocks b..e-1 adds an edge
b -> e with cost

    latency(peer) + (e - b) * num_tokens / throughput(peer)

that is, one network round trip to the peer plus its estimated compute time. Because every
hop pays a latency, the cheapest chain uses few, long hops on fast peers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Collection, Iterable, Mapping

from swarmlens.swarm.records import PeerSpanInfo

# Latency in seconds assumed for a peer that the client has not measured. It is a pessimistic
# guess for a peer across the internet (measured loopback calls take about 1 ms), so that
# peers with a measured latency are preferred over unknown ones.
UNKNOWN_LATENCY_S = 0.1
# Throughput in block-tokens per second assumed for a peer that announces 0 (not measured
# yet). It is low on purpose, so such a peer is used only where no measured peer serves
# the same blocks.
UNMEASURED_THROUGHPUT = 1.0


@dataclasses.dataclass(frozen=True)
class Hop:
    """One step of a chain: the peer `peer_id` runs blocks `start` to `end - 1`."""

    peer_id: str
    start: int
    end: int


class MissingBlocksError(RuntimeError):
    """No usable peer serves some blocks of the model, so no chain covers it."""

    def __init__(self, missing: list[tuple[int, int]], num_blocks: int, excluded: Collection[str]) -> None:
        self.missing = missing
        self.num_blocks = num_blocks
        ranges = ", ".join(f"{start}:{end}" for start, end in missing)
        message = f"no online peer serves blocks {ranges} (of blocks 0:{num_blocks})"
        if excluded:
            message += f"; peers excluded after failures: {', '.join(sorted(excluded))}"
        first_start, first_end = missing[0]
        message += (
            ". Start a peer that serves them, for example "
            f"`swarmlens peer --blocks {first_start}:{first_end} --initial-peers MADDR`, "
            "or wait until one joins"
        )
        super().__init__(message)


def choose_chain(
    spans: Iterable[PeerSpanInfo],
    num_blocks: int,
    *,
    exclude: Collection[str] = frozenset(),
    latency: Mapping[str, float] | None = None,
    num_tokens: int = 1,
) -> list[Hop]:
    """Return the cheapest chain of hops that covers blocks 0..num_blocks-1 exactly once.

    `spans` are peer records (only "online" ones are used, parts beyond `num_blocks` are
    ignored). `exclude` lists peer ids not to use, such as peers that just failed.
    `latency` maps peer ids to measured round-trip times in seconds. `num_tokens` is the
    number of tokens in the request, which weights compute time against latency.
    Ties go to the chain with fewer hops. Raises `MissingBlocksError` when some blocks have
    no usable peer. The search takes O(num_blocks**2 * len(spans)) steps.
    """
    if num_blocks <= 0:
        raise ValueError(f"invalid num_blocks {num_blocks}: a model has at least one block")
    if num_tokens <= 0:
        raise ValueError(f"invalid num_tokens {num_tokens}: a request has at least one token")
    latency = latency or {}

    usable = sorted(
        (
            span
            for span in spans
            if span.state == "online" and span.peer_id not in exclude and span.start < num_blocks
        ),
        key=lambda span: span.peer_id,
    )

    # best[b] is (cost, hops, previous boundary, peer) of the cheapest chain that finishes
    # blocks 0..b-1. Edges only go forward, so one pass in order of b is a shortest path.
    best: list[tuple[float, int, int, PeerSpanInfo | None] | None] = [None] * (num_blocks + 1)
    best[0] = (0.0, 0, -1, None)
    for boundary in range(num_blocks):
        if best[boundary] is None:
            continue
        cost_so_far, hops_so_far, _, _ = best[boundary]
        for span in usable:
            if not span.start <= boundary < span.end:
                continue
            hop_latency = latency.get(span.peer_id, UNKNOWN_LATENCY_S)
            throughput = span.throughput if span.throughput > 0 else UNMEASURED_THROUGHPUT
            for end in range(boundary + 1, min(span.end, num_blocks) + 1):
                compute_s = (end - boundary) * num_tokens / throughput
                candidate = (cost_so_far + hop_latency + compute_s, hops_so_far + 1, boundary, span)
                if _is_better(candidate, best[end]):
                    best[end] = candidate

    if best[num_blocks] is None:
        raise MissingBlocksError(_missing_ranges(usable, num_blocks), num_blocks, exclude)

    chain: list[Hop] = []
    end = num_blocks
    while end > 0:
        _, _, start, span = best[end]
        chain.append(Hop(peer_id=span.peer_id, start=start, end=end))
        end = start
    chain.reverse()
    return chain


def _is_better(candidate: tuple, current: tuple | None) -> bool:
    if current is None:
        return True
    cost, hops = candidate[0], candidate[1]
    if math.isclose(cost, current[0], rel_tol=1e-9, abs_tol=1e-12):
        return hops < current[1]
    return cost < current[0]


def _missing_ranges(usable: list[PeerSpanInfo], num_blocks: int) -> list[tuple[int, int]]:
    """Return maximal ranges (start, end) of blocks that no usable span contains."""
    covered = [False] * num_blocks
    for span in usable:
        for index in range(span.start, min(span.end, num_blocks)):
            covered[index] = True

    ranges: list[tuple[int, int]] = []
    index = 0
    while index < num_blocks:
        if covered[index]:
            index += 1
            continue
        start = index
        while index < num_blocks and not covered[index]:
            index += 1
        ranges.append((start, index))
    return ranges

