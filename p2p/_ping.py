"""libp2p ping (``/ipfs/ping/1.0.0``): the dialer sends 32 random bytes, the listener echoes them.

The listener echoes every whole 32-byte block until the dialer closes the stream; the
dialer times one round trip. Randomness and the clock are arguments, so tests can fix
them.
"""

from __future__ import annotations

from collections.abc import Callable

from transport._base import Stream
from transport._limits import MultistreamLimits

from ._errors import PeerProtocolError
from ._negotiate import Inbound, confirm_lazy

PROTOCOL_ID = "/ipfs/ping/1.0.0"
PING_BYTES = 32


async def serve_ping(stream: Stream, inbound: Inbound) -> None:
    """Echo 32-byte blocks until the dialer closes its side."""
    answer = inbound.answer
    pending = bytearray(inbound.leftover)
    while True:
        whole = len(pending) - len(pending) % PING_BYTES
        if whole:
            await stream.write(answer + pending[:whole])
            answer = b""
            del pending[:whole]
        chunk = await stream.read()
        if not chunk:
            if answer:
                await stream.write(answer)
            await stream.close()
            return
        pending += chunk


async def ping(
    stream: Stream,
    prefix: bytes,
    negotiation: MultistreamLimits,
    *,
    random_bytes: Callable[[int], bytes],
    clock: Callable[[], float],
) -> float:
    """One ping on a fresh stream; ``prefix`` is the lazy negotiation. Returns seconds."""
    probe = random_bytes(PING_BYTES)
    start = clock()
    await stream.write(prefix + probe)
    echo = bytes(await confirm_lazy(stream, prefix, PROTOCOL_ID, negotiation))
    while len(echo) < PING_BYTES:
        chunk = await stream.read()
        if not chunk:
            raise PeerProtocolError(
                f"ping stream ended after {len(echo)} of {PING_BYTES} echoed bytes"
            )
        echo += chunk
    elapsed = clock() - start
    if echo != probe:
        raise PeerProtocolError("the ping echo differs from the bytes sent")
    return elapsed
