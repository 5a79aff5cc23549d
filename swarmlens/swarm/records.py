"""Typed DHT records that announce which blocks a peer serves.

Schema: one DHT key per block, `f"{model_id}.block{index}"`. Under it, each peer stores its
record with its peer id (base58 string) as the subkey, and hivemind drops the record at its
expiration time. The value is a msgpack-able dict made by `PeerSpanInfo.to_wire()`.

Values come from other machines, so `PeerSpanInfo.from_wire` checks every field and raises
`InvalidRecordError` instead of trusting the sender.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, get_args

PeerState = Literal["joining", "online", "offline"]
PEER_STATES: tuple[str, ...] = get_args(PeerState)

# Limits on fields of a record read from the DHT. They bound the memory one bad record can
# make discovery hold, and are far above what an honest peer sends.
MAX_PEER_ID_CHARS = 128
MAX_MADDRS = 16
MAX_MADDR_CHARS = 512
MAX_VERSION_CHARS = 64

_MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")


class InvalidRecordError(ValueError):
    """A DHT value that is not a valid `PeerSpanInfo`."""


def block_key(model_id: str, index: int) -> str:
    """Return the DHT key under which peers announce block `index` of `model_id`."""
    if not _MODEL_ID_PATTERN.match(model_id):
        raise ValueError(
            f"invalid model id {model_id!r}: use only letters, digits, '.', '_' and '-'"
        )
    if index < 0:
        raise ValueError(f"invalid block index {index}: it must be >= 0")
    return f"{model_id}.block{index}"


@dataclasses.dataclass(frozen=True)
class PeerSpanInfo:
    """The announcement of one peer: it serves blocks `start` to `end - 1` of a model.

    `throughput` is in block-tokens per second: how many tokens the peer can pass through
    one of its blocks per second, so a request of T tokens costs about
    `(end - start) * T / throughput` seconds of compute there. 0 means not measured yet.
    `maddrs` are the multiaddrs (with /p2p/<peer id>) at which the peer accepts connections.
    `version` is the swarmlens version of the peer, for compatibility checks.
    """

    peer_id: str
    start: int
    end: int
    throughput: float
    state: PeerState
    maddrs: tuple[str, ...]
    version: str

    def __post_init__(self) -> None:
        _check_record(self)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def to_wire(self) -> dict[str, Any]:
        """Return the msgpack-able dict stored in the DHT."""
        return {
            "peer_id": self.peer_id,
            "start": self.start,
            "end": self.end,
            "throughput": self.throughput,
            "state": self.state,
            "maddrs": list(self.maddrs),
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, value: Any) -> PeerSpanInfo:
        """Parse a DHT value; raise `InvalidRecordError` that names the bad field."""
        if not isinstance(value, dict):
            raise InvalidRecordError(f"record is a {type(value).__name__}, expected a dict")

        expected = {field.name for field in dataclasses.fields(cls)}
        missing = expected - value.keys()
        if missing:
            raise InvalidRecordError(f"record lacks fields {sorted(missing)}")

        maddrs = value["maddrs"]
        if not isinstance(maddrs, (list, tuple)):
            raise InvalidRecordError(f"maddrs is a {type(maddrs).__name__}, expected a list")

        # Unknown extra fields are ignored so that newer peers can add fields.
        return cls(
            peer_id=value["peer_id"],
            start=value["start"],
            end=value["end"],
            throughput=value["throughput"],
            state=value["state"],
            maddrs=tuple(maddrs),
            version=value["version"],
        )


def _check_record(record: PeerSpanInfo) -> None:
    _check_str("peer_id", record.peer_id, MAX_PEER_ID_CHARS)
    if not record.peer_id:
        raise InvalidRecordError("peer_id is empty")

    for name in ("start", "end"):
        value = getattr(record, name)
        # bool is a subclass of int, but True is not a block index.
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRecordError(f"{name} is a {type(value).__name__}, expected an int")
    if not 0 <= record.start < record.end:
        raise InvalidRecordError(
            f"invalid span {record.start}:{record.end}: expected 0 <= start < end"
        )

    throughput = record.throughput
    if not isinstance(throughput, (int, float)) or isinstance(throughput, bool):
        raise InvalidRecordError(f"throughput is a {type(throughput).__name__}, expected a float")
    if not math.isfinite(throughput) or throughput < 0:
        raise InvalidRecordError(f"invalid throughput {throughput}: expected a finite value >= 0")

    if record.state not in PEER_STATES:
        raise InvalidRecordError(f"invalid state {record.state!r}: expected one of {PEER_STATES}")

    if len(record.maddrs) > MAX_MADDRS:
        raise InvalidRecordError(f"record has {len(record.maddrs)} maddrs, the maximum is {MAX_MADDRS}")
    for maddr in record.maddrs:
        _check_str("maddrs item", maddr, MAX_MADDR_CHARS)

    _check_str("version", record.version, MAX_VERSION_CHARS)


def _check_str(name: str, value: Any, max_chars: int) -> None:
    if not isinstance(value, str):
        raise InvalidRecordError(f"{name} is a {type(value).__name__}, expected a str")
    if len(value) > max_chars:
        raise InvalidRecordError(f"{name} has {len(value)} characters, the maximum is {max_chars}")
