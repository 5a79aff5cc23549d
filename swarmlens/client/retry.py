"""The one retry policy of the client: capped exponential backoff, failed peers excluded."""

import dataclasses
import logging
import random
import time

from swarmlens.intervene.errors import ExecutionError
from swarmlens.peer.errors import PeerError, RemoteError

logger = logging.getLogger(__name__)

# Remote error types that mean "this peer cannot serve now", so another chain may succeed.
# Every other remote error is deterministic (a bad graph, a failing op) and is raised at once.
TRANSIENT_REMOTE_ERRORS = frozenset({"PeerUnreachableError", "PeerTimeoutError", "InvalidResponseError",
                                     "PeerBusyError", "TimeoutError", "SessionCapacityError"})
# Of those, the ones where the peer is healthy but full: retry it later rather than exclude it.
BUSY_REMOTE_ERRORS = frozenset({"PeerBusyError", "SessionCapacityError"})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # one try plus three retries, each on a freshly chosen chain
    initial_delay_s: float = 0.1
    max_delay_s: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based), with 10% jitter."""
        delay = min(self.max_delay_s, self.initial_delay_s * 2 ** (attempt - 1))
        return delay * random.uniform(0.9, 1.1)

    def on_failure(self, error: PeerError, attempt: int, excluded: set[str], what: str) -> None:
        """Raise `error` if retrying cannot help; else note the failed peer, log and back off.

        A deterministic remote error becomes an ExecutionError with the remote type and peer.
        """
        if isinstance(error, RemoteError) and error.type_name not in TRANSIENT_REMOTE_ERRORS:
            raise ExecutionError(error.message, original_type=error.type_name, peer=error.peer_id) from None
        if not (isinstance(error, RemoteError) and error.type_name in BUSY_REMOTE_ERRORS):
            excluded.add(error.peer_id)
        logger.warning("%s attempt %d/%d failed on peer %s: %s", what, attempt, self.max_attempts,
                       error.peer_id[-8:], error)
        if attempt < self.max_attempts:
            time.sleep(self.delay(attempt))
