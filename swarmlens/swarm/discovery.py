"""Find which peers serve which blocks of a model, from the DHT records of its blocks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Collection

import hivemind
from hivemind.utils import get_dht_time

from swarmlens.swarm.records import InvalidRecordError, PeerSpanInfo, block_key

logger = logging.getLogger(__name__)

# The maximum time to wait for the DHT lookups of all blocks of a model.
FETCH_TIMEOUT_S = 10.0
ONLINE: tuple[str, ...] = ("online",)


def fetch_spans(
    dht: hivemind.DHT,
    model_id: str,
    num_blocks: int,
    *,
    states: Collection[str] = ONLINE,
    timeout: float = FETCH_TIMEOUT_S,
) -> list[PeerSpanInfo]:
    """Return the unexpired records of peers that serve blocks of `model_id` in `states`.

    Blocking; use `fetch_spans_async` inside an event loop. Invalid records are skipped and
    logged at DEBUG. Returns one record per peer, sorted by (start, peer_id).
    """
    futures = _get_block_records(dht, model_id, num_blocks)
    entries = [future.result(timeout=timeout) for future in futures]
    return merge_block_entries(entries, num_blocks, states=states)


async def fetch_spans_async(
    dht: hivemind.DHT,
    model_id: str,
    num_blocks: int,
    *,
    states: Collection[str] = ONLINE,
    timeout: float = FETCH_TIMEOUT_S,
) -> list[PeerSpanInfo]:
    """Do what `fetch_spans` does without blocking the running event loop."""
    futures = _get_block_records(dht, model_id, num_blocks)
    entries = await asyncio.wait_for(asyncio.gather(*futures), timeout)
    return merge_block_entries(entries, num_blocks, states=states)


def _get_block_records(dht: hivemind.DHT, model_id: str, num_blocks: int) -> list[Any]:
    if num_blocks <= 0:
        raise ValueError(f"invalid num_blocks {num_blocks}: a model has at least one block")
    return [
        dht.get(block_key(model_id, index), latest=True, return_future=True)
        for index in range(num_blocks)
    ]


def merge_block_entries(
    entries: list[Any],
    num_blocks: int,
    *,
    states: Collection[str] = ONLINE,
    now: float | None = None,
) -> list[PeerSpanInfo]:
    """Parse `DHT.get` results for blocks 0..num_blocks-1 into one record per peer.

    `entries[index]` is what `DHT.get` returned for block `index`: None, or a
    `ValueWithExpiration` whose value maps subkeys (peer ids) to `ValueWithExpiration`
    records. A record is kept if it parses, its subkey is its peer id, it covers the block it
    is stored under, it ends at or before `num_blocks`, it has not expired and its state is in
    `states`. For each peer the record with the latest expiration wins.
    """
    now = get_dht_time() if now is None else now
    best: dict[str, tuple[float, PeerSpanInfo]] = {}
    skipped = 0

    for index, entry in enumerate(entries):
        for subkey, expiration_time, raw_value in _iter_subkey_values(entry):
            try:
                record = _parse_entry(subkey, raw_value, index, num_blocks)
            except InvalidRecordError as error:
                skipped += 1
                logger.debug("Skipped record %r of block %d: %s", subkey, index, error)
                continue

            if expiration_time <= now or record.state not in states:
                continue
            previous = best.get(record.peer_id)
            if previous is None or expiration_time > previous[0]:
                best[record.peer_id] = (expiration_time, record)

    if skipped:
        logger.debug("Skipped %d invalid records in %d blocks", skipped, len(entries))
    records = [record for _, record in best.values()]
    return sorted(records, key=lambda record: (record.start, record.peer_id))


def _iter_subkey_values(entry: Any):
    """Yield (subkey, expiration_time, value) from one `DHT.get` result, skipping other shapes."""
    if entry is None:
        return
    dictionary = getattr(entry, "value", None)
    if not isinstance(dictionary, dict):
        # Someone stored a plain value (without subkey) under the block key.
        logger.debug("Skipped a block entry of type %s", type(dictionary).__name__)
        return
    for subkey, item in dictionary.items():
        value = getattr(item, "value", None)
        expiration_time = getattr(item, "expiration_time", None)
        if not isinstance(expiration_time, (int, float)):
            logger.debug("Skipped record %r without an expiration time", subkey)
            continue
        yield subkey, float(expiration_time), value


def _parse_entry(subkey: Any, raw_value: Any, index: int, num_blocks: int) -> PeerSpanInfo:
    record = PeerSpanInfo.from_wire(raw_value)
    if subkey != record.peer_id:
        raise InvalidRecordError(f"subkey {subkey!r} differs from the record's peer_id {record.peer_id!r}")
    if not record.start <= index < record.end:
        raise InvalidRecordError(f"span {record.start}:{record.end} does not contain block {index}")
    if record.end > num_blocks:
        raise InvalidRecordError(f"span {record.start}:{record.end} ends after the last block {num_blocks - 1}")
    return record
