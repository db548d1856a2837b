"""multistream-select as the Host runs it, on the cores of ``transport._multistream``.

Inbound, the listener reads whole chunks (not byte by byte) and hands on what the
dialer sent after its proposal. When a lazy dialer already sent its request, the
listener's answer is held back so the handler can send it together with its reply:
the call then costs one flight each way. Outbound, ``lazy_prefix`` is what a lazy
dialer writes ahead of its request and ``check_echo`` verifies the listener's answer,
which is byte for byte the same prefix when the protocol is accepted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from transport._base import Stream
from transport._errors import HandshakeError, RemoteProtocolError, StreamClosed
from transport._limits import MultistreamLimits
from transport._multistream import (
    PROTOCOL_ID,
    MultistreamDialer,
    MultistreamListener,
    NegotiationFailed,
    ProtocolSelected,
    encode_message,
)
from transport._varint import decode_uvarint

from ._errors import PeerProtocolError, ProtocolNotSupported


@dataclass(frozen=True, slots=True)
class Inbound:
    """An inbound stream whose protocol was agreed on."""

    protocol: str
    answer: bytes
    """Our negotiation answer not yet written: send it before (or with) the first reply."""
    leftover: bytes
    """What the dialer sent after its proposal: the start of the protocol's data."""


_HEADER = encode_message(PROTOCOL_ID, limits=MultistreamLimits())


def _accept_at_once(
    chunk: bytes, supported: frozenset[str], limits: MultistreamLimits
) -> Inbound | None:
    """The common case in one step: ``chunk`` opens with the header and a supported proposal.

    The answer is then those very bytes (header, echo). Anything else returns None and
    goes through the full listener core.
    """
    if not chunk.startswith(_HEADER):
        return None
    start = len(_HEADER)
    try:
        decoded = decode_uvarint(chunk, start)
    except RemoteProtocolError:
        return None
    if decoded is None:
        return None
    length, used = decoded
    end = start + used + length
    if length > limits.max_message_bytes or len(chunk) < end or chunk[end - 1] != 0x0A:
        return None
    try:
        protocol = chunk[start + used : end - 1].decode()
    except UnicodeDecodeError:
        return None
    if protocol not in supported:
        return None
    return Inbound(protocol, chunk[:end], chunk[end:])


async def _negotiate(
    stream: Stream, first: bytes, supported: frozenset[str], limits: MultistreamLimits
) -> Inbound:
    core = MultistreamListener(supported, limits=limits)
    core.feed(first)
    while core.outcome is None:
        out = core.pop_output()
        if out:
            await stream.write(out)
        chunk = await stream.read()
        if not chunk:
            raise StreamClosed("the dialer closed the stream during negotiation")
        core.feed(chunk)
    outcome = core.outcome
    if isinstance(outcome, NegotiationFailed):
        refusals = core.pop_output()
        if refusals:
            await stream.write(refusals)
        raise PeerProtocolError(f"multistream negotiation failed: {outcome.error}")
    return Inbound(outcome.protocol, core.pop_output(), core.leftover)


async def negotiate_inbound(
    stream: Stream, supported: frozenset[str], limits: MultistreamLimits
) -> Inbound:
    """Answer the dialer's proposals until it proposes one of ``supported``.

    Raises ``PeerProtocolError`` for a malformed negotiation (or too many refused
    proposals), after writing the refusals made so far: a lazy dialer whose data
    followed an unsupported proposal learns of the refusal that way. Raises
    A negotiation longer than ``MultistreamLimits.timeout_s`` has its stream reset (a
    ``StreamReset`` raised here). Transport errors pass through.
    """
    loop = asyncio.get_running_loop()
    guard = loop.call_at(loop.time() + limits.timeout_s, stream.reset)
    try:
        first = await stream.read()
        if not first:
            raise StreamClosed("the dialer closed the stream during negotiation")
        inbound = _accept_at_once(first, supported, limits)
        if inbound is None:
            inbound = await _negotiate(stream, first, supported, limits)
    finally:
        guard.cancel()
    if inbound.leftover:
        return inbound
    await stream.write(inbound.answer)
    return Inbound(inbound.protocol, b"", b"")


def lazy_prefix(protocol: str, limits: MultistreamLimits) -> bytes:
    """The header and single proposal a lazy dialer writes before its first data."""
    return MultistreamDialer([protocol], limits=limits).pop_output()


async def confirm_lazy(
    stream: Stream, prefix: bytes, protocol: str, limits: MultistreamLimits
) -> memoryview:
    """Read the listener's answer to ``lazy_prefix(protocol)``; return what followed it.

    Raises ``ProtocolNotSupported``, ``PeerProtocolError`` (also when the stream ends
    first) or a transport error; the caller bounds the time it takes.
    """
    buf = b""
    while True:
        chunk = await stream.read()
        if not chunk:
            raise PeerProtocolError(f"the peer closed the {protocol} stream during negotiation")
        buf = buf + chunk if buf else chunk
        used = check_echo(prefix, buf, protocol, limits)
        if used is not None:
            return memoryview(buf)[used:]


def check_echo(
    expected: bytes, received: bytes | bytearray, protocol: str, limits: MultistreamLimits
) -> int | None:
    """How many bytes of ``received`` the listener's answer takes, once it accepted.

    ``expected`` is ``lazy_prefix(protocol)``. Returns None while more bytes are needed;
    raises ``ProtocolNotSupported`` when the listener refused and ``PeerProtocolError``
    when its answer is malformed.
    """
    size = len(expected)
    if received[:size] == expected[: len(received)]:
        return size if len(received) >= size else None
    core = MultistreamDialer([protocol], limits=limits)
    core.pop_output()
    core.feed(received)
    outcome = core.outcome
    if outcome is None:
        return None
    if isinstance(outcome, ProtocolSelected):
        return len(received) - len(core.leftover)
    if isinstance(outcome.error, HandshakeError):
        raise ProtocolNotSupported(f"peer does not support {protocol}", protocols=(protocol,))
    raise PeerProtocolError(f"negotiating {protocol}: {outcome.error}")
