"""multistream-select 1.0: agreeing on one protocol at the start of a stream.

Every message is a uvarint length, then UTF-8 text, then ``\\n`` (the length counts the
newline). Both sides first send the header ``/multistream/1.0.0``; the dialer then
proposes protocols one at a time and the listener echoes the one it accepts or answers
``na``. This listener answers ``ls`` with ``na`` as well, which the specification
allows.

``MultistreamDialer`` and ``MultistreamListener`` are sans-IO cores: ``feed(data)``,
``pop_output()``, ``outcome``. They never raise on the peer's input: a bad message
becomes a ``NegotiationFailed`` outcome carrying a ``RemoteProtocolError``.
``next_read_size`` says how many bytes complete the next message, which lets a shell
read exactly the negotiation and nothing of the application data behind it.

The asyncio helpers run the cores over a ``ByteStream``: ``select_protocol`` (dialer),
``handle_protocols`` (listener) and ``select_protocol_lazy``, which proposes a single
protocol and returns a ``LazyStream`` at once: the caller writes its first payload
without waiting a round trip, and the listener's echo is checked before the first read.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import HandshakeError, LimitExceeded, RemoteProtocolError, TransportError
from ._limits import MultistreamLimits
from ._varint import decode_uvarint, encode_uvarint

if TYPE_CHECKING:
    from ._base import ByteStream, Connection, Stream

PROTOCOL_ID = "/multistream/1.0.0"
NOT_AVAILABLE = "na"


@dataclass(frozen=True, slots=True)
class ProtocolSelected:
    """Both sides agreed on ``protocol``; the stream now carries it."""

    protocol: str


@dataclass(frozen=True, slots=True)
class NegotiationFailed:
    """Negotiation ended without agreement; ``error`` says why."""

    error: TransportError


Outcome = ProtocolSelected | NegotiationFailed


def encode_message(text: str, *, limits: MultistreamLimits) -> bytes:
    """Frame ``text`` as one multistream message, checking it is sendable."""
    if "\n" in text or not text:
        raise ValueError(f"multistream message {text!r} must be non-empty and hold no newline")
    body = text.encode() + b"\n"
    if len(body) > limits.max_message_bytes:
        raise LimitExceeded(
            f"multistream message {text[:64]!r} of {len(body)} bytes exceeds "
            f"MultistreamLimits.max_message_bytes={limits.max_message_bytes}",
            value=len(body),
            limit=limits.max_message_bytes,
        )
    return encode_uvarint(len(body)) + body


def _shorten(text: str) -> str:
    return repr(text if len(text) <= 64 else text[:64] + "...")


class _MessageDecoder:
    """Cuts a byte stream into multistream messages, bounded by the limits."""

    def __init__(self, limits: MultistreamLimits) -> None:
        self._limits = limits
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_read_size(self) -> int:
        """Bytes that complete the next message (at least 1)."""
        decoded = decode_uvarint(self._buf)
        if decoded is None:
            return 1
        length, consumed = decoded
        return max(1, consumed + length - len(self._buf))

    def next_message(self) -> str | None:
        """Pop one complete message; ``None`` while incomplete. Raises ``RemoteProtocolError``."""
        decoded = decode_uvarint(self._buf)
        if decoded is None:
            return None
        length, consumed = decoded
        limit = self._limits.max_message_bytes
        if length > limit:
            raise RemoteProtocolError(
                f"multistream message of {length} bytes exceeds "
                f"MultistreamLimits.max_message_bytes={limit}"
            )
        if len(self._buf) < consumed + length:
            return None
        body = bytes(self._buf[consumed : consumed + length])
        del self._buf[: consumed + length]
        if not body.endswith(b"\n"):
            raise RemoteProtocolError(
                f"multistream message of {length} bytes does not end with a newline"
            )
        try:
            text = body[:-1].decode()
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(
                f"multistream message of {length} bytes is not valid UTF-8"
            ) from exc
        if "\n" in text:
            raise RemoteProtocolError(f"multistream message {_shorten(text)} holds a newline")
        return text

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class _Negotiator(ABC):
    """What both roles share: input decoding, output, outcome and leftover bytes."""

    def __init__(self, limits: MultistreamLimits) -> None:
        self._limits = limits
        self._decoder = _MessageDecoder(limits)
        self._output = bytearray(encode_message(PROTOCOL_ID, limits=limits))
        self._header_seen = False
        self.outcome: Outcome | None = None
        self.leftover = b""
        """Bytes fed after the final negotiation message: the peer's application data."""

    @property
    def next_read_size(self) -> int:
        """Bytes to read to complete the next message without reading past it (0 once done)."""
        return 0 if self.outcome is not None else self._decoder.next_read_size()

    def pop_output(self) -> bytes:
        out = bytes(self._output)
        self._output.clear()
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.outcome is not None:
            self.leftover += data
            return
        self._decoder.feed(data)
        try:
            while self.outcome is None:
                message = self._decoder.next_message()
                if message is None:
                    return
                if not self._header_seen:
                    if message != PROTOCOL_ID:
                        raise RemoteProtocolError(
                            f"expected multistream header {PROTOCOL_ID!r}, got {_shorten(message)}"
                        )
                    self._header_seen = True
                else:
                    self._on_message(message)
        except RemoteProtocolError as exc:
            self.outcome = NegotiationFailed(exc)
        self.leftover = self._decoder.take_rest()

    def _send(self, text: str) -> None:
        self._output += encode_message(text, limits=self._limits)

    @abstractmethod
    def _on_message(self, message: str) -> None:
        """Act on one message after the header; raise ``RemoteProtocolError`` on nonsense."""


class MultistreamDialer(_Negotiator):
    """Proposes ``protocols`` in order until the listener accepts one.

    The header and the first proposal are queued at once (pipelined), so with a single
    protocol the dialer may write application data right behind them.
    """

    def __init__(self, protocols: Sequence[str], *, limits: MultistreamLimits) -> None:
        if not protocols:
            raise ValueError("multistream dialer needs at least one protocol to propose")
        if len(protocols) > limits.max_proposals:
            raise LimitExceeded(
                f"{len(protocols)} protocols to propose exceed "
                f"MultistreamLimits.max_proposals={limits.max_proposals}",
                value=len(protocols),
                limit=limits.max_proposals,
            )
        super().__init__(limits)
        self.protocols = tuple(protocols)
        for protocol in self.protocols:
            encode_message(protocol, limits=limits)
        self._index = 0
        self._send(self.protocols[0])

    def _on_message(self, message: str) -> None:
        proposed = self.protocols[self._index]
        if message == proposed:
            self.outcome = ProtocolSelected(proposed)
        elif message == NOT_AVAILABLE:
            self._index += 1
            if self._index == len(self.protocols):
                self.outcome = NegotiationFailed(
                    HandshakeError(
                        f"peer refused all {len(self.protocols)} proposed protocols: "
                        + ", ".join(self.protocols)
                    )
                )
            else:
                self._send(self.protocols[self._index])
        else:
            raise RemoteProtocolError(
                f"peer answered {_shorten(message)} to the proposal {proposed!r}"
            )


class MultistreamListener(_Negotiator):
    """Accepts the first proposal found in ``supported``; refuses others with ``na``."""

    def __init__(self, supported: Collection[str], *, limits: MultistreamLimits) -> None:
        super().__init__(limits)
        self.supported = frozenset(supported)
        self._refusals = 0

    def _on_message(self, message: str) -> None:
        if message in self.supported:
            self._send(message)
            self.outcome = ProtocolSelected(message)
            return
        self._refusals += 1
        if self._refusals > self._limits.max_proposals:
            raise RemoteProtocolError(
                f"peer made {self._refusals} unsupported proposals, more than "
                f"MultistreamLimits.max_proposals={self._limits.max_proposals}"
            )
        self._send(NOT_AVAILABLE)


async def _exchange(stream: ByteStream, core: _Negotiator, limits: MultistreamLimits) -> str:
    """Write the core's output and read exactly its input until it has an outcome."""
    try:
        async with asyncio.timeout(limits.timeout_s):
            while True:
                out = core.pop_output()
                if out:
                    await stream.write(out)
                if core.outcome is not None:
                    break
                core.feed(await stream.readexactly(core.next_read_size))
    except TimeoutError as exc:
        raise HandshakeError(
            "multistream negotiation took longer than "
            f"MultistreamLimits.timeout_s={limits.timeout_s}"
        ) from exc
    if isinstance(core.outcome, NegotiationFailed):
        raise core.outcome.error
    return core.outcome.protocol


async def select_protocol(
    stream: ByteStream, protocols: Sequence[str], *, limits: MultistreamLimits
) -> str:
    """Propose ``protocols`` in order; return the one the listener accepted.

    Raises ``HandshakeError`` when all are refused or the limits' timeout passes,
    ``RemoteProtocolError`` when the listener breaks the protocol.
    """
    return await _exchange(stream, MultistreamDialer(protocols, limits=limits), limits)


async def handle_protocols(
    stream: ByteStream, supported: Collection[str], *, limits: MultistreamLimits
) -> str:
    """Answer the dialer's proposals; return the protocol agreed on."""
    return await _exchange(stream, MultistreamListener(supported, limits=limits), limits)


async def select_protocol_lazy(
    stream: Stream, protocol: str, *, limits: MultistreamLimits
) -> LazyStream:
    """Propose ``protocol`` and return at once, without waiting for the listener.

    The caller writes its request immediately; the first read through the returned
    ``LazyStream`` checks the listener's answer first and raises (after resetting the
    stream) if ``protocol`` was refused.
    """
    dialer = MultistreamDialer([protocol], limits=limits)
    await stream.write(dialer.pop_output())
    return LazyStream(stream, dialer, limits)


class LazyStream:
    """A ``Stream`` whose protocol was proposed but whose echo is read on first use."""

    def __init__(self, stream: Stream, dialer: MultistreamDialer, limits: MultistreamLimits):
        self._stream = stream
        self._dialer = dialer
        self._limits = limits
        self._confirming = asyncio.Lock()
        self.protocol = dialer.protocols[0]

    @property
    def connection(self) -> Connection:
        return self._stream.connection

    async def _confirm(self) -> None:
        if isinstance(self._dialer.outcome, ProtocolSelected):
            return
        async with self._confirming:
            try:
                await _exchange(self._stream, self._dialer, self._limits)
            except TransportError:
                self._stream.reset()
                raise

    async def read(self, max_bytes: int = 65536) -> bytes:
        await self._confirm()
        return await self._stream.read(max_bytes)

    async def readexactly(self, n: int) -> bytes:
        await self._confirm()
        return await self._stream.readexactly(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.write(data)

    async def close_write(self) -> None:
        await self._stream.close_write()

    async def close(self) -> None:
        await self._stream.close()

    def reset(self) -> None:
        self._stream.reset()
