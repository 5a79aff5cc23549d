"""Announcement and discovery with real DHT nodes on 127.0.0.1."""

from __future__ import annotations

import time

import hivemind
import pytest
from hivemind.utils import get_dht_time

from swarmlens.swarm import Announcer, block_key, fetch_spans, fetch_spans_async, start_dht, visible_maddrs

pytestmark = pytest.mark.network

NUM_BLOCKS = 6


@pytest.fixture(scope="module")
def bootstrap_node():
    dht = start_dht()
    yield dht
    dht.shutdown()


@pytest.fixture(scope="module")
def client_node(bootstrap_node):
    dht = start_dht(visible_maddrs(bootstrap_node), client_mode=True)
    yield dht
    dht.shutdown()


@pytest.fixture
def peer_node(bootstrap_node):
    dht = start_dht(visible_maddrs(bootstrap_node))
    yield dht
    dht.shutdown()


def make_announcer(dht: hivemind.DHT, model_id: str, start: int, end: int, **kwargs) -> Announcer:
    return Announcer(
        dht, model_id, start, end,
        peer_id=dht.peer_id.to_base58(), maddrs=visible_maddrs(dht),
        throughput=kwargs.pop("throughput", 50.0), version="0.1.0", **kwargs,
    )


def test_announced_span_is_discovered(peer_node, client_node):
    announcer = make_announcer(peer_node, "announce-model", 2, 5)
    announcer.start()
    try:
        spans = fetch_spans(client_node, "announce-model", NUM_BLOCKS)
    finally:
        announcer.stop()

    assert len(spans) == 1
    assert spans[0].peer_id == peer_node.peer_id.to_base58()
    assert (spans[0].start, spans[0].end) == (2, 5)
    assert spans[0].state == "online"
    assert spans[0].throughput == 50.0
    assert spans[0].maddrs == tuple(visible_maddrs(peer_node))


def test_other_model_not_discovered(peer_node, client_node):
    announcer = make_announcer(peer_node, "model-one", 0, 3)
    announcer.start()
    try:
        spans = fetch_spans(client_node, "model-two", NUM_BLOCKS)
    finally:
        announcer.stop()

    assert spans == []


def test_stop_announces_offline(peer_node, client_node):
    announcer = make_announcer(peer_node, "stop-model", 0, 3)
    announcer.start()
    announcer.stop()

    online = fetch_spans(client_node, "stop-model", NUM_BLOCKS)
    offline = fetch_spans(client_node, "stop-model", NUM_BLOCKS, states=("offline",))

    assert online == []
    assert [span.peer_id for span in offline] == [peer_node.peer_id.to_base58()]


def test_record_expires_after_peer_crash(bootstrap_node, client_node):
    # The peer's DHT node dies without stop(): its records stay on the bootstrap node
    # until they expire.
    crashed = start_dht(visible_maddrs(bootstrap_node))
    announcer = make_announcer(crashed, "crash-model", 0, 2, ttl=2.0, heartbeat=1.0)
    announcer.start()
    try:
        assert len(fetch_spans(client_node, "crash-model", NUM_BLOCKS)) == 1

        crashed.shutdown()
        time.sleep(2.5)

        assert fetch_spans(client_node, "crash-model", NUM_BLOCKS) == []
    finally:
        # Ends the heartbeat thread, which would otherwise log a failed store every second
        # until the test session exits.
        announcer.stop()


def test_heartbeat_keeps_record_alive(peer_node, client_node):
    announcer = make_announcer(peer_node, "heartbeat-model", 0, 2, ttl=1.5, heartbeat=0.5)
    announcer.start()
    try:
        time.sleep(3.0)
        spans = fetch_spans(client_node, "heartbeat-model", NUM_BLOCKS)
    finally:
        announcer.stop()

    assert len(spans) == 1


def test_heartbeat_sends_new_throughput(peer_node, client_node):
    throughput = {"value": 10.0}
    announcer = make_announcer(
        peer_node, "throughput-model", 0, 2, ttl=5.0, heartbeat=0.3, throughput=lambda: throughput["value"]
    )
    announcer.start()
    try:
        throughput["value"] = 99.0
        time.sleep(1.0)
        spans = fetch_spans(client_node, "throughput-model", NUM_BLOCKS)
    finally:
        announcer.stop()

    assert spans[0].throughput == 99.0


def test_malformed_records_ignored(peer_node, client_node):
    model_id = "malformed-model"
    expiration_time = get_dht_time() + 30
    peer_id = peer_node.peer_id.to_base58()
    valid = make_announcer(peer_node, model_id, 0, 2).record.to_wire()
    junk = [
        (block_key(model_id, 0), "junk-subkey", b"\x00\xff binary junk"),
        (block_key(model_id, 0), "wrong-subkey", valid),
        (block_key(model_id, 1), "peerB", {**valid, "peer_id": "peerB", "start": "zero"}),
        (block_key(model_id, 2), "peerC", {**valid, "peer_id": "peerC", "start": 0, "end": 2}),
        (block_key(model_id, 3), "peerD", {**valid, "peer_id": "peerD", "start": 3, "end": 99}),
    ]
    for key, subkey, value in junk:
        assert peer_node.store(key, subkey=subkey, value=value, expiration_time=expiration_time)
    # A plain value without subkey under a block key.
    assert peer_node.store(block_key(model_id, 4), value=[1, 2, 3], expiration_time=expiration_time)
    for index in (0, 1):
        assert peer_node.store(block_key(model_id, index), subkey=peer_id, value=valid, expiration_time=expiration_time)

    spans = fetch_spans(client_node, model_id, NUM_BLOCKS)

    assert [(span.peer_id, span.start, span.end) for span in spans] == [(peer_id, 0, 2)]


def test_fetch_spans_async_in_event_loop(peer_node, client_node, loop_thread):
    announcer = make_announcer(peer_node, "async-model", 1, 3)
    announcer.start()
    try:
        spans = loop_thread.run(fetch_spans_async(client_node, "async-model", NUM_BLOCKS))
    finally:
        announcer.stop()

    assert [(span.start, span.end) for span in spans] == [(1, 3)]


def test_two_peers_discovered_sorted(bootstrap_node, client_node, peer_node):
    second = start_dht(visible_maddrs(bootstrap_node))
    announcers = [make_announcer(peer_node, "pair-model", 3, 6), make_announcer(second, "pair-model", 0, 3)]
    try:
        for announcer in announcers:
            announcer.start()
        spans = fetch_spans(client_node, "pair-model", NUM_BLOCKS)
    finally:
        for announcer in announcers:
            announcer.stop()
        second.shutdown()

    assert [(span.start, span.end) for span in spans] == [(0, 3), (3, 6)]


def test_invalid_heartbeat_rejected(peer_node):
    with pytest.raises(ValueError, match="shorter than the ttl"):
        make_announcer(peer_node, "m", 0, 1, ttl=5.0, heartbeat=10.0)
