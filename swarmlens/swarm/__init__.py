"""Everything about the DHT: announcement records, heartbeats, discovery and routing."""

from swarmlens.swarm.announce import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S, Announcer
from swarmlens.swarm.dht import loopback_dht_kwargs, start_dht, visible_maddrs
from swarmlens.swarm.discovery import fetch_spans, fetch_spans_async, merge_block_entries
from swarmlens.swarm.records import InvalidRecordError, PeerSpanInfo, PeerState, block_key
from swarmlens.swarm.routing import Hop, MissingBlocksError, choose_chain

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_TTL_S",
    "Announcer",
    "Hop",
    "InvalidRecordError",
    "MissingBlocksError",
    "PeerSpanInfo",
    "PeerState",
    "block_key",
    "choose_chain",
    "fetch_spans",
    "fetch_spans_async",
    "loopback_dht_kwargs",
    "merge_block_entries",
    "start_dht",
    "visible_maddrs",
]
