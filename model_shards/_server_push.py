"""Server-to-server push: the pieces of a hop session that link it into a chain.

A session opened with a ``session_id`` may name its neighbours (``prev``: the only peer
allowed to push into it; ``next``: where to push its outputs). Inputs reach the session
through one ``Inbox``, fed by its client's stream and by ``PUSH`` calls; the session's
worker takes them in order. ``StepLog`` recognises a step already run (a push and the
client's relay of the same step may both arrive), and ``push_step`` sends one output to
the next server. The wire forms are in ``_server_protocol`` (``PUSH_PROTOCOL``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from p2p import Host, P2PError, RpcReply
from security import PeerId
from transport import Multiaddr

from ._errors import BadRequest
from ._server_protocol import PUSH_PROTOCOL
from ._wire import Compression

_log = logging.getLogger("model_shards.server")

T = TypeVar("T")

MAX_SESSION_ID_BYTES = 64
MAX_NEXT_ADDRS = 16


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where a session pushes its outputs: a server, its addresses, its session there."""

    peer: PeerId
    addrs: tuple[Multiaddr, ...]
    session_id: bytes


@dataclass(frozen=True, slots=True)
class PushedStep:
    """A step pushed by the previous server, decoded and checked, waiting in an inbox."""

    step: int
    push: bool
    hidden: torch.Tensor
    mask: torch.Tensor | None
    compression: Compression
    input_digest: bytes
    """The sha256 of the hidden states' bytes as pushed (what the step's answer signs)."""


def session_id_of(request: Mapping[str, Any], field: str = "session_id") -> bytes | None:
    """The session id a request names (None when it names none)."""
    value = request.get(field)
    if value is None:
        return None
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_SESSION_ID_BYTES:
        raise BadRequest(
            f"{field!r} must be 1 to {MAX_SESSION_ID_BYTES} bytes (16 random bytes), got {value!r}"
        )
    return value


def step_id_of(request: Mapping[str, Any]) -> int | None:
    """A step's id (None for a client that numbers no steps)."""
    value = request.get("step")
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise BadRequest(f"'step' must be a non-negative integer, got {value!r}")
    return value


def push_flag_of(request: Mapping[str, Any]) -> bool:
    value = request.get("push", False)
    if not isinstance(value, bool):
        raise BadRequest(f"'push' must be true or false, got {value!r}")
    return value


def prev_of(request: Mapping[str, Any]) -> PeerId | None:
    """The peer a session accepts pushes from (``prev``: a base58 PeerID, or None)."""
    value = request.get("prev")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'prev' must be a PeerID string or null, got {value!r}")
    try:
        return PeerId.from_base58(value)
    except ValueError as e:
        raise BadRequest(f"'prev' is no PeerID: {e}") from None


def next_of(request: Mapping[str, Any]) -> NextHop | None:
    """Where a session pushes (``next``: {"peer", "addrs", "session_id"}, or None)."""
    value = request.get("next")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"'next' must be a map with peer, addrs, session_id, got {value!r}")
    peer = value.get("peer")
    addrs = value.get("addrs", [])
    if not isinstance(peer, str):
        raise BadRequest(f"'next.peer' must be a PeerID string, got {peer!r}")
    if not isinstance(addrs, list) or len(addrs) > MAX_NEXT_ADDRS:
        raise BadRequest(f"'next.addrs' must list at most {MAX_NEXT_ADDRS} multiaddrs")
    try:
        peer_id = PeerId.from_base58(peer)
        parsed = tuple(Multiaddr.from_string(a) for a in addrs if isinstance(a, str))
    except ValueError as e:
        raise BadRequest(f"'next' names a bad peer or address: {e}") from None
    if len(parsed) != len(addrs):
        raise BadRequest("'next.addrs' must hold multiaddr strings")
    session_id = session_id_of(value)
    if session_id is None:
        raise BadRequest("'next.session_id' is missing: the next server's session id")
    return NextHop(peer_id, parsed, session_id)


class StepLog:
    """The last step a session ran and its answer: a step at or below it is a duplicate."""

    __slots__ = ("last_out", "last_step")

    def __init__(self) -> None:
        self.last_step: int | None = None
        self.last_out: RpcReply | None = None

    def is_duplicate(self, step: int | None) -> bool:
        return step is not None and self.last_step is not None and step <= self.last_step

    def record(self, step: int | None, out: RpcReply) -> None:
        if step is not None:
            self.last_step = step
        self.last_out = out


class Inbox(Generic[T]):
    """A session's inputs in arrival order, bounded, with a final item that jumps the queue.

    ``put`` waits for room (the client's stream: back-pressure), ``offer`` does not (a
    push: refused when full); ``finish`` makes every later ``get`` return its item, ahead
    of what is still queued (the server leaving, the client gone).
    """

    def __init__(self, max_items: int) -> None:
        self._items: deque[T] = deque()
        self._max_items = max_items
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._final: T | None = None

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T) -> bool:
        """Queue ``item`` if there is room; False if the inbox is full or finished."""
        if self._final is not None or len(self._items) >= self._max_items:
            return False
        self._items.append(item)
        self._ready.set()
        return True

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting for room (dropped once the inbox is finished)."""
        while len(self._items) >= self._max_items and self._final is None:
            self._room.clear()
            await self._room.wait()
        if self._final is None:
            self._items.append(item)
            self._ready.set()

    def finish(self, item: T) -> None:
        """From now on ``get`` returns ``item`` (the first call wins)."""
        if self._final is None:
            self._final = item
            self._ready.set()
            self._room.set()

    async def get(self) -> T:
        """The next item (the final one once ``finish`` was called)."""
        while not self._items and self._final is None:
            self._ready.clear()
            await self._ready.wait()
        if self._final is not None:
            return self._final
        item = self._items.popleft()
        self._room.set()
        return item


async def push_step(
    host: Host,
    target: NextHop,
    request: dict[str, Any],
    payload: bytes | memoryview,
    *,
    timeout: float,
) -> bool:
    """Push one step's output to the next server; True once it acknowledged queueing it."""
    try:
        reply = await host.rpc_call(target.peer, PUSH_PROTOCOL, request, payload, timeout=timeout)
    except P2PError as e:
        _log.debug("push of step %s to %s failed: %s", request.get("step"), target.peer.short(), e)
        return False
    return isinstance(reply.value, dict) and reply.value.get("ok") is True


async def warm_connection(host: Host, target: NextHop, timeout: float) -> None:
    """Learn the next server's addresses and connect ahead of the first push."""
    host.peerstore.add_addrs(target.peer, list(target.addrs))
    try:
        async with asyncio.timeout(timeout):
            await host.connect(target.peer)
    except (P2PError, TimeoutError) as e:
        _log.debug("could not connect ahead to %s: %s", target.peer.short(), e)
