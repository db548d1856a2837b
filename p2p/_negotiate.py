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
from transport._errors import HandshakeError, StreamClosed
from transport._limits import MultistreamLimits
from transport._multistream import (
    MultistreamDialer,
    MultistreamListener,
    NegotiationFailed,
    ProtocolSelected,
)

from ._errors import PeerProtocolError, ProtocolNotSupported


@dataclass(frozen=True, slots=True)
class Inbound:
    """An inbound stream whose protocol was agreed on."""

    protocol: str
    answer: bytes
    """Our negotiation answer not yet written: send it before (or with) the first reply."""
    leftover: bytes
    """What the dialer sent after its proposal: the start of the protocol's data."""


async def negotiate_inbound(
    stream: Stream, supported: frozenset[str], limits: MultistreamLimits
) -> Inbound:
    """Answer the dialer's proposals until it proposes one of ``supported``.

    Raises ``PeerProtocolError`` for a malformed negotiation (or too many refused
    proposals), ``TimeoutError`` after ``MultistreamLimits.timeout_s``; transport errors
    pass through.
    """
    core = MultistreamListener(supported, limits=limits)
    async with asyncio.timeout(limits.timeout_s):
        while core.outcome is None:
            chunk = await stream.read()
            if not chunk:
                raise StreamClosed("the dialer closed the stream during negotiation")
            core.feed(chunk)
            if core.outcome is None:
                out = core.pop_output()
                if out:
                    await stream.write(out)
    outcome = core.outcome
    if isinstance(outcome, NegotiationFailed):
        raise PeerProtocolError(f"multistream negotiation failed: {outcome.error}")
    assert isinstance(outcome, ProtocolSelected)
    answer = core.pop_output()
    if not core.leftover:
        await stream.write(answer)
        answer = b""
    return Inbound(outcome.protocol, answer, core.leftover)


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
