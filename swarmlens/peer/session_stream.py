"""Frames of a long-lived session stream, in the framing of `transport`.

A session stream carries many frames in each direction: the caller sends
`length | payload` frames, the callee replies to each with `kind | length | body`,
where kind RESPONSE_ERROR carries the same error map as a unary call.
"""

import asyncio

from swarmlens.peer.errors import RequestTooLargeError
from swarmlens.peer.transport import (
    BYTEORDER,
    DEFAULT_READ_TIMEOUT_S,
    ByteBudget,
    HEADER_LEN,
    RESPONSE_ERROR,
    RESPONSE_OK,
    _parse_error_frame,
    _read_response,
    _send_error,
    _send_frame,
)

SESSION_PROTOCOL = "swarmlens.session"


async def read_request(reader: asyncio.StreamReader, max_bytes: int, budget: ByteBudget | None = None) -> bytes | None:
    """Read one request frame; return None when the caller closed the stream.

    With `budget`, the frame's length is reserved in it before the body is read (or
    PeerBusyError is raised), and the caller releases `len(frame)` once done with it.
    """
    try:
        header = await reader.readexactly(HEADER_LEN)
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None
    length = int.from_bytes(header, BYTEORDER)
    if length > max_bytes:
        raise RequestTooLargeError(f"session frame of {length} bytes exceeds the limit of {max_bytes} bytes")
    # Once the header is in, the body must follow within the read timeout, not the longer
    # idle timeout between steps, so that a header alone keeps its budget only that long.
    if budget is None:
        return await asyncio.wait_for(reader.readexactly(length), DEFAULT_READ_TIMEOUT_S)

    if not budget.try_reserve(length):
        raise budget.busy_error(length)
    try:
        return await asyncio.wait_for(reader.readexactly(length), DEFAULT_READ_TIMEOUT_S)
    except BaseException:
        budget.release(length)
        raise


async def write_request(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(len(payload).to_bytes(HEADER_LEN, BYTEORDER))
    writer.write(payload)
    await writer.drain()


async def write_response(writer: asyncio.StreamWriter, body: bytes) -> None:
    await _send_frame(writer, RESPONSE_OK, body)


async def write_error(writer: asyncio.StreamWriter, error: BaseException, own_peer_id: str) -> None:
    await _send_error(writer, error, own_peer_id)


async def read_response(reader: asyncio.StreamReader, peer_id: str, max_bytes: int) -> bytes:
    """Read one response frame; raise RemoteError for an error frame."""
    kind, body = await _read_response(reader, peer_id, max_bytes)
    if kind == RESPONSE_ERROR:
        raise _parse_error_frame(body, peer_id)
    return body
