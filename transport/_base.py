"""The contracts every transport fulfils: ``Transport``, ``Listener``, ``Connection``, ``Stream``.

Implementations sit beside this module (``_quic.py``, ``_tcp.py``, ``_memory.py``) and
all of them pass one conformance suite (``tests/transport/test_conformance.py``).
A connection is always authenticated: ``remote_peer`` is the PeerID the remote proved
during the handshake, never a claim.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from security import PeerId

    from ._multiaddr import Multiaddr


@runtime_checkable
class ByteStream(Protocol):
    """The least a byte pipe offers; multistream-select runs over anything that has it."""

    async def readexactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes or raise ``StreamClosed`` at end of stream."""
        ...

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; waits while the peer's flow-control window is full."""
        ...


@runtime_checkable
class Stream(ByteStream, Protocol):
    """One bidirectional, flow-controlled stream of a multiplexed connection."""

    @property
    def connection(self) -> Connection: ...

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` (at least one), or ``b""`` once the remote closed."""
        ...

    async def close_write(self) -> None:
        """Half-close: the remote reads end of stream after what was written."""
        ...

    async def close(self) -> None:
        """Close our side and release the stream once the remote is done too."""
        ...

    def reset(self) -> None:
        """Abort both directions at once; pending reads and writes raise ``StreamReset``."""
        ...


@runtime_checkable
class Connection(Protocol):
    """An authenticated, multiplexed connection to one peer."""

    @property
    def transport_name(self) -> str:
        """``"quic"``, ``"tcp"`` or ``"memory"``."""
        ...

    @property
    def local_peer(self) -> PeerId: ...

    @property
    def remote_peer(self) -> PeerId: ...

    @property
    def local_addr(self) -> Multiaddr: ...

    @property
    def remote_addr(self) -> Multiaddr: ...

    @property
    def is_closed(self) -> bool: ...

    async def open_stream(self) -> Stream:
        """Open a new outbound stream."""
        ...

    async def accept_stream(self) -> Stream:
        """Wait for the next inbound stream; raises ``ConnectionClosed`` once closed."""
        ...

    async def close(self) -> None:
        """Close the connection and every stream on it."""
        ...

    async def wait_closed(self) -> None:
        """Return once the connection is closed, by either side."""
        ...


ConnectionHandler = Callable[[Connection], Awaitable[None]]
"""Called once per accepted inbound connection, after authentication."""


@runtime_checkable
class Listener(Protocol):
    """A bound listening endpoint of one transport."""

    @property
    def addrs(self) -> list[Multiaddr]:
        """The addresses actually bound (port 0 resolved), without ``/p2p/``."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """Dials and listens for one kind of address."""

    @property
    def name(self) -> str: ...

    def can_dial(self, addr: Multiaddr) -> bool: ...

    def can_listen(self, addr: Multiaddr) -> bool: ...

    async def listen(self, addr: Multiaddr, handler: ConnectionHandler) -> Listener: ...

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None = None, *, timeout: float | None = None
    ) -> Connection:
        """Connect and authenticate; ``PeerIdMismatch`` if ``expected_peer`` differs."""
        ...

    async def close(self) -> None:
        """Close every listener and connection of this transport."""
        ...
