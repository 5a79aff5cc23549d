"""Exceptions of peer-to-peer calls, raised on the calling side of `transport.call`."""

from __future__ import annotations


class PeerError(Exception):
    """A call to a peer failed; `peer_id` is the peer that failed."""

    def __init__(self, message: str, peer_id: str) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class RemoteError(PeerError):
    """The remote handler raised `type_name(message)` on peer `peer_id` and sent it back.

    For a chain of peers, `peer_id` is the peer where the error was raised, which may be
    further along the chain than the peer that was called.
    """

    def __init__(self, type_name: str, message: str, peer_id: str) -> None:
        super().__init__(f"{type_name} on peer {peer_id}: {message}", peer_id)
        self.type_name = type_name
        self.message = message


class PeerUnreachableError(PeerError):
    """The stream to the peer could not be opened, or broke before a full response arrived."""

    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"peer {peer_id} is unreachable: {reason}", peer_id)
        self.reason = reason


class PeerTimeoutError(PeerError, TimeoutError):
    """The peer did not send a full response within the timeout (an `asyncio.TimeoutError`)."""

    def __init__(self, peer_id: str, timeout: float) -> None:
        super().__init__(f"peer {peer_id} did not respond within {timeout:.1f} s", peer_id)
        self.timeout = timeout


class InvalidResponseError(PeerError):
    """The peer sent bytes that are not a valid response frame."""


class RequestTooLargeError(ValueError):
    """A request exceeds the receiving peer's size limit; raised there, sent as an error frame."""


class PeerBusyError(RuntimeError):
    """The peer is at its admission limit and rejected the request; retry elsewhere or later."""
