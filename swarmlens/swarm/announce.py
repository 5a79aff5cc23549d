"""Announce a peer's span on the DHT with a heartbeat thread."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, Sequence

import hivemind
from hivemind.utils import get_dht_time

from swarmlens.swarm.records import PeerSpanInfo, block_key

logger = logging.getLogger(__name__)

# A record lives for DEFAULT_TTL_S seconds and is renewed every DEFAULT_HEARTBEAT_S seconds,
# so a live peer survives two missed heartbeats, and a crashed peer drops out of routing
# within DEFAULT_TTL_S seconds.
DEFAULT_TTL_S = 30.0
DEFAULT_HEARTBEAT_S = 10.0
# hivemind keeps, per key and subkey, the record with the latest expiration time. So the
# "offline" record written by stop() must expire after the last "online" one; it expires
# this many seconds later than that one.
OFFLINE_MARGIN_S = 1.0
# The maximum time one round of DHT stores may take before it counts as failed.
STORE_TIMEOUT_S = 10.0


class Announcer:
    """Store the record of a peer for every block of its span, again every `heartbeat` seconds.

    `throughput` is in block-tokens per second (see `PeerSpanInfo`); pass a callable to
    read a fresh value before each heartbeat.

    `start()` stores the first round synchronously, so when it returns the peer is
    discoverable, then continues in a daemon thread. `stop()` ends the thread and stores
    state "offline" so that clients stop routing to the peer at once instead of waiting for
    the "online" records to expire. The "offline" records expire OFFLINE_MARGIN_S after them.

    NOTE: the heartbeat thread calls the DHT while other threads may use it too. hivemind's
    DHT sends each call as one small pickled message over a pipe, and pipe writes of less
    than PIPE_BUF bytes do not interleave on Linux.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        model_id: str,
        start: int,
        end: int,
        *,
        peer_id: str,
        maddrs: Sequence[str],
        throughput: float | Callable[[], float],
        version: str,
        ttl: float = DEFAULT_TTL_S,
        heartbeat: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        if not 0 < heartbeat < ttl:
            raise ValueError(
                f"invalid heartbeat {heartbeat} s for ttl {ttl} s: the heartbeat must be "
                "positive and shorter than the ttl, or records expire between heartbeats"
            )
        self.dht = dht
        self.model_id = model_id
        self.ttl = ttl
        self.heartbeat = heartbeat
        self._throughput_source = throughput if callable(throughput) else None
        self._record = PeerSpanInfo(
            peer_id=peer_id,
            start=start,
            end=end,
            throughput=float(throughput() if callable(throughput) else throughput),
            state="online",
            maddrs=tuple(maddrs),
            version=version,
        )
        self._keys = [block_key(model_id, index) for index in range(start, end)]
        self._last_expiration = 0.0
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"announcer-{start}:{end}", daemon=True)

    @property
    def record(self) -> PeerSpanInfo:
        with self._lock:
            return self._record

    def set_throughput(self, throughput: float) -> None:
        """Change the throughput sent with the next heartbeat (block-tokens per second)."""
        with self._lock:
            self._record = dataclasses.replace(self._record, throughput=float(throughput))

    def _refresh_throughput(self) -> None:
        if self._throughput_source is None:
            return
        try:
            self.set_throughput(self._throughput_source())
        except (TypeError, ValueError) as error:
            logger.warning("Kept the previous throughput: the throughput source failed: %s", error)

    def start(self) -> None:
        """Announce the span now (raises `RuntimeError` on failure), then keep it alive."""
        if not self._announce(self.record, get_dht_time() + self.ttl):
            raise RuntimeError(
                f"failed to announce blocks {self._record.start}:{self._record.end} of "
                f"{self.model_id!r} on the DHT; check that the initial peers are reachable"
            )
        logger.info(
            "Announced blocks %d:%d of %s as online (ttl %.0f s, heartbeat %.0f s)",
            self._record.start, self._record.end, self.model_id, self.ttl, self.heartbeat,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat and announce the peer as offline."""
        self._stop_event.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._record = dataclasses.replace(self._record, state="offline")
        expiration_time = max(get_dht_time(), self._last_expiration) + OFFLINE_MARGIN_S
        if self._announce(self._record, expiration_time):
            logger.info("Announced blocks %d:%d as offline", self._record.start, self._record.end)

    def _run(self) -> None:
        while not self._stop_event.wait(self.heartbeat):
            self._refresh_throughput()
            self._announce(self.record, get_dht_time() + self.ttl)

    def _announce(self, record: PeerSpanInfo, expiration_time: float) -> bool:
        """Store `record` under every block key; return whether all stores succeeded."""
        value = record.to_wire()
        try:
            futures = [
                self.dht.store(
                    key,
                    subkey=record.peer_id,
                    value=value,
                    expiration_time=expiration_time,
                    return_future=True,
                )
                for key in self._keys
            ]
            stored = [future.result(timeout=STORE_TIMEOUT_S) for future in futures]
        except Exception as error:  # noqa: BLE001 - a failed heartbeat must not kill the thread
            logger.warning(
                "Failed to announce blocks %d:%d as %s: %s: %s",
                record.start, record.end, record.state, type(error).__name__, error,
            )
            return False

        if not all(stored):
            failed = [key for key, ok in zip(self._keys, stored) if not ok]
            logger.warning("DHT rejected the announcement for keys %s", failed)
            return False
        self._last_expiration = max(self._last_expiration, expiration_time)
        logger.debug("Announced %s for blocks %d:%d", record.state, record.start, record.end)
        return True

