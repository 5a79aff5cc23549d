"""Framed request/response calls between peers over hivemind binary streams.

Every call opens one libp2p stream to the protocol `name` on the remote peer (through the
local p2pd daemon of hivemind) and exchanges exactly one frame in each direction:

    request:  length (8 bytes, big-endian) | payload
    response: kind (1 byte) | length (8 bytes, big-endian) | body

`kind` is RESPONSE_OK, with the handler's bytes as the body, or RESPONSE_ERROR, with a
msgpack map {"type", "message", "peer_id"} that names the exception raised by the handler
and the peer where it was raised. The server checks the request length against its limit
before it reads the body, so an oversize request costs it 8 bytes of reading.

Addressing: a peer is called by its peer id only. Measured with hivemind 1.1.12 on
loopback, p2pd finds the address of a peer it has never connected to through its own
libp2p DHT, with about 10 ms for the first stream. Where that fails (peers that share no
bootstrap node), `connect` dials the multiaddrs that the peer announces in its record.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Iterable

import msgpack
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.utils.multiaddr import Multiaddr

from swarmlens.peer.errors import (
    InvalidResponseError,
    PeerBusyError,
    PeerTimeoutError,
    PeerUnreachableError,
    RemoteError,
    RequestTooLargeError,
)

logger = logging.getLogger(__name__)

FORWARD_PROTOCOL = "swarmlens.forward"

HEADER_LEN = 8
BYTEORDER = "big"
RESPONSE_OK = b"\x00"
RESPONSE_ERROR = b"\x01"

# A client rejects a response longer than this (1 GiB), so that a faulty or hostile peer
# cannot make it allocate unbounded memory.
DEFAULT_MAX_RESPONSE_BYTES = 2**30
# A server drops a stream whose request does not arrive within this many seconds, so that
# a slow or stalled client cannot hold a handler forever.
DEFAULT_READ_TIMEOUT_S = 60.0
# A server drops a stream whose caller does not read a response frame within this many
# seconds, so that a caller that never reads cannot hold the response's memory forever.
WRITE_TIMEOUT_S = 60.0
# After an early error frame, a server waits at most this many seconds for the caller to
# close the stream before it closes it itself.
DISCARD_GRACE_S = 5.0
# Error messages sent to the caller are cut to this many characters.
MAX_ERROR_MESSAGE_CHARS = 4000
# Error messages in a peer's log are cut to this many characters, because a hostile graph
# can make them tens of MB long.
LOGGED_MESSAGE_CHARS = 1000
# Error frames are small by construction; a larger one is a protocol violation.
MAX_ERROR_FRAME_BYTES = 64 * 1024

Handler = Callable[[bytes, str], Awaitable[bytes]]


class ByteBudget:
    """The request bytes that a server buffers at once, over all its streams and protocols.

    The size limit of one request does not bound many requests at once: a client that
    opens many streams and sends each body slowly would make the server buffer them all.
    Not thread-safe: use it from the event loop only.
    """

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError(f"invalid byte budget {limit}: it must be positive")
        self.limit = limit
        self.used = 0

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve `nbytes` if they fit; return whether they did."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes

    def busy_error(self, nbytes: int) -> PeerBusyError:
        return PeerBusyError(
            f"this peer already buffers {self.used} bytes of requests and cannot take {nbytes} more "
            f"(its limit is {self.limit} bytes); retry later or use another peer"
        )


async def serve(
    p2p: P2P,
    name: str,
    handler: Handler,
    *,
    max_request_bytes: int,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    budget: ByteBudget | None = None,
) -> None:
    """Register `handler` for protocol `name`: `await handler(payload, remote_peer_id)` -> bytes.

    Each incoming stream carries one request. Requests longer than `max_request_bytes` are
    rejected with a `RequestTooLargeError` frame before their body is read, and so are
    requests that do not fit in `budget`, with a `PeerBusyError` frame. Any exception
    from `handler` goes back to the caller as an error frame, so a bad request never stops
    the server. Returns once the handler is registered; p2p keeps serving in the background.
    """
    if max_request_bytes <= 0:
        raise ValueError(f"invalid max_request_bytes {max_request_bytes}: it must be positive")
    own_peer_id = p2p.peer_id.to_base58()

    async def handle_stream(stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote_peer_id = stream_info.peer_id.to_base58()
        try:
            await _serve_request(
                reader, writer, handler,
                remote_peer_id=remote_peer_id, own_peer_id=own_peer_id,
                max_request_bytes=max_request_bytes, read_timeout=read_timeout, budget=budget,
            )
        except asyncio.IncompleteReadError as error:
            logger.warning(
                "Dropped a truncated %s request from peer %s: the stream ended after %d of %s bytes",
                name, remote_peer_id, len(error.partial), error.expected,
            )
        except asyncio.TimeoutError:
            logger.warning("Dropped a %s request from peer %s: no full request within %.0f s", name, remote_peer_id, read_timeout)
        except (ConnectionError, OSError) as error:
            logger.warning("Lost the %s stream of peer %s: %s: %s", name, remote_peer_id, type(error).__name__, error)
        except Exception:  # noqa: BLE001 - the server must outlive any request
            logger.exception("Failed to serve a %s request from peer %s", name, remote_peer_id)
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(name, handle_stream)
    logger.debug("Serving protocol %s on peer %s (max request %d bytes)", name, own_peer_id, max_request_bytes)


async def _serve_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    *,
    remote_peer_id: str,
    own_peer_id: str,
    max_request_bytes: int,
    read_timeout: float,
    budget: ByteBudget | None,
) -> None:
    header = await asyncio.wait_for(reader.readexactly(HEADER_LEN), read_timeout)
    length = int.from_bytes(header, BYTEORDER)
    if length > max_request_bytes:
        logger.warning(
            "Rejected a request of %d bytes from peer %s: the limit is %d bytes",
            length, remote_peer_id, max_request_bytes,
        )
        error = RequestTooLargeError(
            f"request of {length} bytes exceeds the limit of {max_request_bytes} bytes of this peer; "
            "send fewer tokens per request or use a peer started with a larger request limit"
        )
        await _reject(reader, writer, error, own_peer_id)
        return
    if budget is not None and not budget.try_reserve(length):
        logger.warning("Rejected a request of %d bytes from peer %s: %d of %d bytes already buffered",
                       length, remote_peer_id, budget.used, budget.limit)
        await _reject(reader, writer, budget.busy_error(length), own_peer_id)
        return

    try:
        kind, body = await _read_and_handle(reader, handler, length, read_timeout, remote_peer_id, own_peer_id)
    finally:
        # Released before sending, so that a caller that never reads holds no budget.
        if budget is not None:
            budget.release(length)
    await _send_frame(writer, kind, body)
    del body
    # Closing at once can reset the stream before the caller has read the frame, so wait
    # for the caller to close its side first.
    await _discard_until_eof(reader, writer)


async def _read_and_handle(
    reader: asyncio.StreamReader, handler: Handler, length: int, read_timeout: float, remote_peer_id: str,
    own_peer_id: str,
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """Read the request body and run the handler; return the frame to send: its kind and body."""
    payload = await asyncio.wait_for(reader.readexactly(length), read_timeout)
    try:
        response = await handler(payload, remote_peer_id)
        if not isinstance(response, (bytes, bytearray, memoryview)):
            raise TypeError(f"handler returned {type(response).__name__}, expected bytes")
    except Exception as error:  # noqa: BLE001 - every handler error goes back to the caller
        logger.debug("Handler raised %s for peer %s", type(error).__name__, remote_peer_id, exc_info=True)
        return RESPONSE_ERROR, _error_body(error, own_peer_id)
    return RESPONSE_OK, response


async def _reject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: Exception,
                  own_peer_id: str) -> None:
    """Send an error frame before the request body is read, then drop the body."""
    await _send_error(writer, error, own_peer_id)
    await _discard_until_eof(reader, writer)


async def _discard_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Drop incoming bytes until the caller closes its side of the stream.

    With hivemind 1.1.12's p2pd, a close or even a half-close of the handler's side while the
    request body is still in flight reset the stream, and the caller lost the frame in about
    1 call of 20 with 300 KB bodies (measured on loopback). The caller closes as soon as it has the frame, so
    this waits about one round trip, at most DISCARD_GRACE_S seconds.
    """
    try:
        async with asyncio.timeout(DISCARD_GRACE_S):
            while await reader.read(2**16):
                pass
    except (TimeoutError, ConnectionError, OSError):
        pass


async def _send_frame(writer: asyncio.StreamWriter, kind: bytes, body: bytes | bytearray | memoryview) -> None:
    """Send one frame; raise ConnectionError if the caller does not take it within WRITE_TIMEOUT_S."""
    writer.write(kind + len(body).to_bytes(HEADER_LEN, BYTEORDER))
    writer.write(body)
    try:
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
    except TimeoutError:
        raise ConnectionError(f"the caller did not read a {len(body)}-byte frame within {WRITE_TIMEOUT_S:.0f} s") from None


async def _send_error(writer: asyncio.StreamWriter, error: BaseException, own_peer_id: str) -> None:
    await _send_frame(writer, RESPONSE_ERROR, _error_body(error, own_peer_id))


def _error_body(error: BaseException, own_peer_id: str) -> bytes:
    """Return the msgpack body of an error frame for `error`."""
    if isinstance(error, RemoteError):
        # Pass on an error from further down the chain with the peer where it was raised.
        type_name, message, peer_id = error.type_name, error.message, error.peer_id
    else:
        type_name, message, peer_id = type(error).__name__, str(error), own_peer_id
    return msgpack.packb({"type": type_name, "message": message[:MAX_ERROR_MESSAGE_CHARS], "peer_id": peer_id})


async def call(
    p2p: P2P,
    peer_id: str,
    name: str,
    payload: bytes,
    *,
    timeout: float,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> bytes:
    """Send `payload` to protocol `name` on `peer_id` and return the response body.

    Raises `RemoteError` if the remote handler raised, `PeerUnreachableError` if the stream
    cannot be opened or breaks, `InvalidResponseError` for a malformed response, and
    `PeerTimeoutError` (an `asyncio.TimeoutError`) if the full call takes over `timeout` s.
    """
    try:
        remote = PeerID.from_base58(peer_id)
    except Exception as error:  # base58 and multihash raise several types
        raise ValueError(f"invalid peer id {peer_id!r}: {error}; expected a base58 libp2p peer id") from None

    try:
        async with asyncio.timeout(timeout):
            return await _call(p2p, remote, peer_id, name, payload, max_response_bytes)
    except TimeoutError as error:
        if isinstance(error, PeerTimeoutError):
            raise
        raise PeerTimeoutError(peer_id, timeout) from None


async def _call(
    p2p: P2P, remote: PeerID, peer_id: str, name: str, payload: bytes, max_response_bytes: int
) -> bytes:
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(remote, name)
    except (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, asyncio.IncompleteReadError) as error:
        raise PeerUnreachableError(peer_id, f"cannot open a {name} stream: {error}") from error

    # Send and receive at the same time, because a server that rejects a request early
    # sends its error frame before it reads the body, and the send may then fail.
    send_task = asyncio.create_task(_send_request(writer, payload))
    try:
        kind, body = await _read_response(reader, peer_id, max_response_bytes, send_task)
    finally:
        if not send_task.done():
            send_task.cancel()
        await asyncio.gather(send_task, return_exceptions=True)
        writer.close()

    if kind == RESPONSE_OK:
        return body
    raise _parse_error_frame(body, peer_id)


async def _send_request(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(len(payload).to_bytes(HEADER_LEN, BYTEORDER))
    writer.write(payload)
    await writer.drain()


async def _read_response(
    reader: asyncio.StreamReader, peer_id: str, max_response_bytes: int, send_task: asyncio.Task | None = None
) -> tuple[bytes, bytes]:
    try:
        header = await reader.readexactly(1 + HEADER_LEN)
        kind, length = header[:1], int.from_bytes(header[1:], BYTEORDER)
        if kind not in (RESPONSE_OK, RESPONSE_ERROR):
            raise InvalidResponseError(f"peer {peer_id} sent an unknown response kind {kind!r}", peer_id)
        limit = max_response_bytes if kind == RESPONSE_OK else MAX_ERROR_FRAME_BYTES
        if length > limit:
            raise InvalidResponseError(
                f"peer {peer_id} announced a response of {length} bytes, over the limit of {limit} bytes", peer_id
            )
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as error:
        reason = "the stream closed before a full response arrived"
        if send_task is not None and send_task.done() and not send_task.cancelled() and send_task.exception():
            reason += f" (sending the request failed: {send_task.exception()})"
        raise PeerUnreachableError(peer_id, reason) from error
    return kind, body


def _parse_error_frame(body: bytes, peer_id: str) -> RemoteError | InvalidResponseError:
    try:
        error = msgpack.unpackb(body)
    except Exception as parse_error:  # msgpack raises several types for invalid input
        return InvalidResponseError(f"peer {peer_id} sent an unreadable error frame: {parse_error}", peer_id)
    if not isinstance(error, dict) or not all(isinstance(error.get(key), str) for key in ("type", "message", "peer_id")):
        return InvalidResponseError(f"peer {peer_id} sent an error frame without type, message and peer_id", peer_id)
    return RemoteError(error["type"], error["message"], error["peer_id"])


async def connect(p2p: P2P, peer_id: str, maddrs: Iterable[str]) -> None:
    """Dial `peer_id` at `maddrs` (multiaddrs from its DHT record) so that later calls find it.

    hivemind 1.1.12 exposes no public method for this, so it uses the daemon client's
    `connect` request (`P2P._client`). Raises `PeerUnreachableError` if no address works.
    """
    try:
        remote = PeerID.from_base58(peer_id)
        # p2pd rejects addresses that still end in /p2p/<peer id>, so that part is removed.
        addresses = [Multiaddr(maddr).decapsulate(Multiaddr(f"/p2p/{peer_id}")) for maddr in maddrs]
    except Exception as error:  # base58, multihash and multiaddr raise several types
        raise ValueError(f"invalid peer id {peer_id!r} or multiaddrs: {error}") from None
    try:
        await p2p._client.connect(remote, addresses)
    except (P2PDaemonError, ConnectionError, OSError) as error:
        raise PeerUnreachableError(peer_id, f"cannot connect to {', '.join(map(str, addresses))}: {error}") from error
