"""Routing as a pure function of peer records: no network."""

from __future__ import annotations

import pytest

from swarmlens.swarm.records import PeerSpanInfo
from swarmlens.swarm.routing import UNKNOWN_LATENCY_S, Hop, MissingBlocksError, choose_chain


def span(peer_id: str, start: int, end: int, throughput: float = 100.0, state: str = "online") -> PeerSpanInfo:
    return PeerSpanInfo(
        peer_id=peer_id, start=start, end=end, throughput=throughput,
        state=state, maddrs=(), version="0.1.0",
    )


def assert_exact_cover(chain: list[Hop], num_blocks: int) -> None:
    assert chain[0].start == 0
    assert chain[-1].end == num_blocks
    for previous, hop in zip(chain, chain[1:]):
        assert previous.end == hop.start
    for hop in chain:
        assert hop.start < hop.end


def test_single_peer_covers_all():
    chain = choose_chain([span("a", 0, 30)], 30)

    assert chain == [Hop("a", 0, 30)]


def test_two_disjoint_spans_in_order():
    chain = choose_chain([span("b", 15, 30), span("a", 0, 15)], 30)

    assert chain == [Hop("a", 0, 15), Hop("b", 15, 30)]


def test_overlapping_spans_cover_exactly_once():
    spans = [span("a", 0, 12), span("b", 8, 22), span("c", 20, 30)]

    chain = choose_chain(spans, 30)

    assert_exact_cover(chain, 30)
    assert [hop.peer_id for hop in chain] == ["a", "b", "c"]


def test_long_hop_saves_latency():
    spans = [span("a", 0, 10), span("b", 10, 20), span("c", 20, 30), span("whole", 0, 30)]

    chain = choose_chain(spans, 30)

    assert chain == [Hop("whole", 0, 30)]


def test_equal_cost_tie_goes_to_fewer_hops():
    # With zero latency both chains cost 30 / 100 s; the tie-break picks one hop.
    spans = [span("a", 0, 10), span("b", 10, 20), span("c", 20, 30), span("whole", 0, 30)]
    latency = {"a": 0.0, "b": 0.0, "c": 0.0, "whole": 0.0}

    chain = choose_chain(spans, 30, latency=latency)

    assert chain == [Hop("whole", 0, 30)]


def test_missing_blocks_error_names_ranges():
    spans = [span("a", 0, 10), span("b", 12, 20)]

    with pytest.raises(MissingBlocksError) as error:
        choose_chain(spans, 30)

    assert error.value.missing == [(10, 12), (20, 30)]
    message = str(error.value)
    assert "blocks 10:12, 20:30" in message
    assert "swarmlens peer --blocks 10:12" in message


def test_no_spans_missing_everything():
    with pytest.raises(MissingBlocksError) as error:
        choose_chain([], 5)

    assert error.value.missing == [(0, 5)]


def test_excluded_peer_not_used():
    spans = [span("fast", 0, 30, throughput=1000.0), span("slow", 0, 30, throughput=10.0)]

    chain = choose_chain(spans, 30, exclude={"fast"})

    assert chain == [Hop("slow", 0, 30)]


def test_excluding_only_server_raises_with_name():
    spans = [span("a", 0, 15), span("b", 15, 30)]

    with pytest.raises(MissingBlocksError) as error:
        choose_chain(spans, 30, exclude={"b"})

    assert error.value.missing == [(15, 30)]
    assert "excluded after failures: b" in str(error.value)


def test_lower_latency_preferred():
    spans = [span("far", 0, 30), span("near", 0, 30)]

    chain = choose_chain(spans, 30, latency={"far": 0.2, "near": 0.001})

    assert chain == [Hop("near", 0, 30)]


def test_measured_latency_beats_unknown():
    spans = [span("unknown", 0, 30), span("measured", 0, 30)]

    chain = choose_chain(spans, 30, latency={"measured": UNKNOWN_LATENCY_S / 2})

    assert chain == [Hop("measured", 0, 30)]


def test_throughput_outweighs_extra_hop():
    # "slow" alone costs 0.1 + 30/10 = 3.1 s; "a" then "b" cost 2 * (0.1 + 15/1000) = 0.23 s.
    spans = [span("slow", 0, 30, throughput=10.0), span("a", 0, 15, throughput=1000.0), span("b", 15, 30, throughput=1000.0)]

    chain = choose_chain(spans, 30)

    assert chain == [Hop("a", 0, 15), Hop("b", 15, 30)]


def test_latency_outweighs_small_speedup():
    # Two hops cost an extra 0.1 s of latency, which a 10% faster peer does not repay.
    spans = [span("whole", 0, 30, throughput=1000.0), span("a", 0, 15, throughput=1100.0), span("b", 15, 30, throughput=1100.0)]

    chain = choose_chain(spans, 30)

    assert chain == [Hop("whole", 0, 30)]


def test_offline_and_joining_ignored():
    spans = [span("off", 0, 30, state="offline"), span("join", 0, 30, state="joining"), span("on", 0, 30, throughput=1.0)]

    chain = choose_chain(spans, 30)

    assert chain == [Hop("on", 0, 30)]


def test_span_beyond_last_block_clipped():
    chain = choose_chain([span("a", 0, 40)], 30)

    assert chain == [Hop("a", 0, 30)]


def test_unmeasured_throughput_avoided():
    spans = [span("unmeasured", 0, 30, throughput=0.0), span("measured", 0, 30, throughput=50.0)]

    chain = choose_chain(spans, 30)

    assert chain == [Hop("measured", 0, 30)]


def test_unmeasured_throughput_used_when_alone():
    chain = choose_chain([span("unmeasured", 0, 30, throughput=0.0)], 30)

    assert chain == [Hop("unmeasured", 0, 30)]


def test_result_does_not_depend_on_input_order():
    spans = [span(name, start, end) for name, start, end in [("a", 0, 20), ("b", 10, 30), ("c", 0, 30), ("d", 5, 25)]]

    chains = {tuple(choose_chain(order, 30)) for order in (spans, spans[::-1], spans[1:] + spans[:1])}

    assert len(chains) == 1


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_invalid_num_blocks_rejected(num_blocks):
    with pytest.raises(ValueError, match="invalid num_blocks"):
        choose_chain([span("a", 0, 1)], num_blocks)


def test_many_peers_every_chain_is_exact_cover():
    spans = [span(f"p{i:02}", i % 25, i % 25 + 1 + i % 7, throughput=10.0 + i) for i in range(60)]

    chain = choose_chain(spans, 30, latency={f"p{i:02}": 0.001 * i for i in range(60)})

    assert_exact_cover(chain, 30)
    by_id = {record.peer_id: record for record in spans}
    for hop in chain:
        assert by_id[hop.peer_id].start <= hop.start
        assert hop.end <= by_id[hop.peer_id].end
