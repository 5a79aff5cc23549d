"""Parsing of DHT announcement records: no network."""

from __future__ import annotations

import math

import pytest

from swarmlens.swarm.discovery import merge_block_entries
from swarmlens.swarm.records import InvalidRecordError, PeerSpanInfo, block_key
from hivemind.utils import ValueWithExpiration

VALID = {
    "peer_id": "peerA",
    "start": 0,
    "end": 3,
    "throughput": 12.5,
    "state": "online",
    "maddrs": ["/ip4/127.0.0.1/tcp/1234/p2p/peerA"],
    "version": "0.1.0",
}


def with_field(**changes):
    return {**VALID, **changes}


def test_record_round_trip():
    record = PeerSpanInfo.from_wire(VALID)

    assert record.to_wire() == VALID
    assert record.num_blocks == 3


def test_unknown_fields_ignored():
    record = PeerSpanInfo.from_wire(with_field(extra="from a newer peer"))

    assert record.peer_id == "peerA"


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("not a dict", "expected a dict"),
        ({"peer_id": "x"}, "lacks fields"),
        (with_field(peer_id=""), "peer_id is empty"),
        (with_field(peer_id=7), "peer_id is a int"),
        (with_field(peer_id="x" * 1000), "maximum"),
        (with_field(start=True), "start is a bool"),
        (with_field(start="0"), "start is a str"),
        (with_field(start=-1), "invalid span"),
        (with_field(start=3, end=3), "invalid span"),
        (with_field(end=2.5), "end is a float"),
        (with_field(throughput=math.nan), "invalid throughput"),
        (with_field(throughput=-1.0), "invalid throughput"),
        (with_field(throughput="fast"), "throughput is a str"),
        (with_field(state="busy"), "invalid state"),
        (with_field(maddrs="/ip4/127.0.0.1"), "expected a list"),
        (with_field(maddrs=[1]), "maddrs item is a int"),
        (with_field(maddrs=["/ip4/127.0.0.1"] * 100), "maximum is 16"),
        (with_field(version=None), "version is a NoneType"),
    ],
)
def test_invalid_record_rejected(value, fragment):
    with pytest.raises(InvalidRecordError, match=fragment):
        PeerSpanInfo.from_wire(value)


def test_block_key_format():
    assert block_key("SmolLM2-135M-Instruct", 7) == "SmolLM2-135M-Instruct.block7"


@pytest.mark.parametrize("model_id", ["", "a b", "a/b", "é"])
def test_block_key_rejects_bad_model_id(model_id):
    with pytest.raises(ValueError, match="invalid model id"):
        block_key(model_id, 0)


def entry(records: dict, expiration_time: float = 100.0) -> ValueWithExpiration:
    return ValueWithExpiration(
        {subkey: ValueWithExpiration(value, expiration_time) for subkey, value in records.items()},
        expiration_time,
    )


def test_merge_one_record_per_peer():
    entries = [entry({"peerA": VALID}) for _ in range(3)] + [None]

    records = merge_block_entries(entries, 4, now=0.0)

    assert records == [PeerSpanInfo.from_wire(VALID)]


def test_merge_skips_invalid_and_foreign_records():
    entries = [
        entry({
            "peerA": VALID,
            "wrong-subkey": VALID,
            "peerB": with_field(peer_id="peerB", state="maybe"),
            "peerC": with_field(peer_id="peerC", start=1, end=3),  # does not contain block 0
            "peerD": with_field(peer_id="peerD", end=9),  # ends after the last block
            7: with_field(peer_id="7"),
        }),
        ValueWithExpiration("a plain value without subkeys", 100.0),
        None,
    ]

    records = merge_block_entries(entries, 3, now=0.0)

    assert [record.peer_id for record in records] == ["peerA"]


def test_merge_drops_expired_and_offline():
    entries = [
        entry({"peerA": VALID}, expiration_time=5.0),
        entry({"peerB": with_field(peer_id="peerB", state="offline")}),
    ]

    assert merge_block_entries(entries, 3, now=10.0) == []
    offline = merge_block_entries(entries, 3, now=10.0, states=("offline",))
    assert [record.peer_id for record in offline] == ["peerB"]


def test_merge_latest_record_wins():
    older = entry({"peerA": with_field(throughput=1.0)}, expiration_time=50.0)
    newer = entry({"peerA": with_field(throughput=2.0)}, expiration_time=60.0)

    records = merge_block_entries([older, newer], 3, now=0.0)

    assert records[0].throughput == 2.0
