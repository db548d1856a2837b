"""The Host: the embeddable peer-to-peer node.

A Host owns its transports, listens, dials (one connection per peer, reused, with
concurrent dials to one peer sharing a single attempt), negotiates a protocol on
every stream with multistream-select and dispatches inbound streams to handlers.
On every new connection it runs identify, filling its peer store and learning how
others see it. It answers ping and identify, and carries Swarm's RPC.

Failures stay local: a handler's exception resets its stream and is logged once; a
peer's bad input ends that peer's stream; nothing a peer does stops the Host.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from types import TracebackType
from typing import Any

from security import KeyPair, PeerId
from transport._base import Connection, Listener, Stream, Transport
from transport._errors import HandshakeError, RemoteProtocolError, TransportError
from transport._errors import PeerIdMismatch as TransportPeerIdMismatch
from transport._multiaddr import Multiaddr
from transport._multistream import select_protocol

from ._bootstrap import BootstrapResult, backoff_delays, bootstrap
from ._connmgr import ConnectionManager, ConnectionRecord, order_addrs
from ._errors import (
    ConnectionLost,
    DialFailed,
    LimitExceeded,
    P2PError,
    P2PTimeout,
    PeerIdMismatch,
    PeerProtocolError,
    PeerUnreachable,
    ProtocolNegotiationFailed,
    ProtocolNotSupported,
    RpcCancelled,
    RpcTimeout,
    StreamFailed,
    from_transport,
)
from ._identify import (
    PROTOCOL_ID as IDENTIFY_PROTOCOL,
)
from ._identify import (
    PROTOCOL_VERSION,
    IdentifyInfo,
    ObservedAddrs,
    frame_identify,
    normalize_observed,
    request_identify,
    serve_identify,
)
from ._interfaces import expand_wildcards
from ._limits import HostLimits
from ._negotiate import Inbound, lazy_prefix, negotiate_inbound
from ._peerstore import PeerStore
from ._ping import PROTOCOL_ID as PING_PROTOCOL
from ._ping import ping, serve_ping
from ._rpc import Payload, RpcReply, RpcStream, StreamHandler, UnaryHandler
from ._rpc_client import RpcClient
from ._rpc_server import RpcServer
from ._stream import HostStream

_log = logging.getLogger("p2p.host")

AGENT_VERSION = "swarm/0.1.0"

StreamHandlerFn = Callable[[Stream, PeerId], Awaitable[None]]
"""``async def handler(stream, peer_id)``: serves one inbound stream; it is closed after."""

_Route = Callable[[Stream, ConnectionRecord, Inbound], Coroutine[Any, Any, None]]

_PEER_FAULTS = (TransportError, ConnectionLost, StreamFailed, RpcCancelled, PeerProtocolError)
"""Exceptions a handler may end with because of the peer, logged at debug level only."""

Target = PeerId | Multiaddr


class Host:
    """A peer: transports, connections, protocol handlers, peer store, RPC.

    ``Host(identity, transports, limits)``, then ``await host.start(listen_addrs)``
    (or ``async with host``) and ``await host.stop()``. Addresses of a peer are tried
    in ``ConnectionLimits.transport_preference`` order: TCP first where a peer has
    both, since Python's QUIC stack is CPU-bound and TCP moves bulk data faster;
    QUIC otherwise.
    """

    def __init__(
        self,
        identity: KeyPair,
        transports: Sequence[Transport],
        limits: HostLimits = HostLimits(),  # noqa: B008 - frozen value
        *,
        agent_version: str = AGENT_VERSION,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not transports:
            raise ValueError("a Host needs at least one transport")
        self._identity = identity
        self._transports = tuple(transports)
        self.limits = limits
        self.agent_version = agent_version
        self._random_bytes = random_bytes
        self.peerstore = PeerStore(limits.peerstore)
        self._connmgr = ConnectionManager(limits.connections)
        self._observed = ObservedAddrs(limits.identify)
        negotiation = limits.transport.multistream
        self._negotiation = negotiation
        self._rpc_client = RpcClient(limits.rpc, negotiation)
        self._rpc_server = RpcServer(limits.rpc)
        self._ping_prefix = lazy_prefix(PING_PROTOCOL, negotiation)
        self._identify_prefix = lazy_prefix(IDENTIFY_PROTOCOL, negotiation)
        self._routes: dict[str, _Route] = {
            PING_PROTOCOL: self._serve_ping,
            IDENTIFY_PROTOCOL: self._serve_identify,
        }
        self._supported = frozenset(self._routes)
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dials: dict[Target, asyncio.Task[ConnectionRecord]] = {}
        self._running = False
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Host {self.peer_id}>"

    # -- identity and addresses ----------------------------------------------------------

    @property
    def identity(self) -> KeyPair:
        """The key pair this Host runs as (its PeerID, and what it signs with)."""
        return self._identity

    @property
    def peer_id(self) -> PeerId:
        return self._identity.peer_id

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        """The addresses bound by ``start`` (ports resolved), without ``/p2p/``."""
        return [addr for listener in self._listeners for addr in listener.addrs]

    @property
    def observed_addrs(self) -> dict[Multiaddr, int]:
        """Our addresses as peers reported them (identify), with how many peers did."""
        return self._observed.counts()

    def _advertised(self) -> list[Multiaddr]:
        """Listen addresses (a wildcard IP replaced by this machine's interface addresses),
        then confirmed observed ones of a transport we listen on."""
        listen = expand_wildcards(self.listen_addrs)
        kinds = {addr.transport_kind for addr in listen}
        return listen + [
            addr
            for addr in self._observed.confirmed()
            if addr not in listen and addr.transport_kind in kinds
        ]

    @property
    def addrs(self) -> list[Multiaddr]:
        """Where others can dial us, each ending in ``/p2p/<our id>``: the listen addresses
        (``0.0.0.0`` and ``::`` replaced by the interfaces' addresses, relayed ones
        included), then observed ones that several peers confirmed."""
        return [addr.with_p2p(self.peer_id) for addr in self._advertised()]

    @property
    def transports(self) -> tuple[Transport, ...]:
        """The transports this Host dials and listens with."""
        return self._transports

    @property
    def protocols(self) -> frozenset[str]:
        """The protocols this Host answers."""
        return self._supported

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, listen_addrs: Sequence[Multiaddr] = ()) -> None:
        """Listen on ``listen_addrs`` (port 0 picks a free port) and start serving."""
        if self._running or self._stopped:
            raise P2PError("a Host starts once; make a new Host to start again")
        self._running = True
        try:
            for addr in listen_addrs:
                transport = next((t for t in self._transports if t.can_listen(addr)), None)
                if transport is None:
                    raise P2PError(f"no transport of this Host can listen on {addr}")
                try:
                    self._listeners.append(await transport.listen(addr, self._on_inbound))
                except TransportError as exc:
                    raise P2PError(f"cannot listen on {addr}: {exc}") from exc
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._prune_idle())

    async def add_transport(self, transport: Transport, listen: Multiaddr | None = None) -> None:
        """Add a transport to the running Host (NAT traversal adds relay circuits this way)
        and, with ``listen``, accept its inbound connections; ``stop`` closes it."""
        self._check_running()
        self._transports = (*self._transports, transport)
        if listen is not None:
            try:
                self._listeners.append(await transport.listen(listen, self._on_inbound))
            except TransportError as exc:
                raise P2PError(f"cannot listen on {listen}: {exc}") from exc

    async def stop(self) -> None:
        """Close listeners, connections and transports; cancel every task of this Host."""
        if self._stopped:
            return
        self._stopped = True
        self._running = False
        for listener in self._listeners:
            await listener.close()
        records = self._connmgr.records()
        await asyncio.gather(*(r.conn.close() for r in records), return_exceptions=True)
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in self._transports:
            await transport.close()

    async def __aenter__(self) -> Host:
        if not self._running:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("a task of %r failed unexpectedly", self, exc_info=exc)

    def _check_running(self) -> None:
        if not self._running:
            raise P2PError(
                "the Host is stopped" if self._stopped else "call `await host.start()` first"
            )

    # -- connections ---------------------------------------------------------------------

    async def _on_inbound(self, conn: Connection) -> None:
        if not self._running:
            await conn.close()
            return
        try:
            self._adopt(conn, outbound=False)
        except LimitExceeded as exc:
            _log.debug("refused inbound connection from %s: %s", conn.remote_peer, exc)
            await conn.close()

    def _adopt(self, conn: Connection, *, outbound: bool) -> ConnectionRecord:
        now = asyncio.get_running_loop().time()
        peer = conn.remote_peer
        record = self._connmgr.admit(conn, peer, outbound=outbound, now=now)
        if isinstance(record, str):
            raise LimitExceeded(record)
        self.peerstore.seen(peer, now)
        self._spawn(self._serve_connection(record))
        self._spawn(self._identify_quietly(record))
        return record

    async def _serve_connection(self, record: ConnectionRecord) -> None:
        """Accept the connection's inbound streams until it closes."""
        try:
            loop = asyncio.get_running_loop()
            while True:
                stream = await record.conn.accept_stream()
                task = loop.create_task(self._serve_stream(stream, record))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except TransportError as exc:
            _log.debug("connection to %s ended: %r", record.peer, exc)
        finally:
            self._connmgr.remove(record)
            if self._connmgr.get(record.peer) is None:
                self._rpc_client.forget(record.peer)
            if not record.conn.is_closed:
                await record.conn.close()

    async def _prune_idle(self) -> None:
        limits = self._connmgr.limits
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(limits.idle_timeout_s / 2)
            for record in self._connmgr.idle(loop.time()):
                record.closing = True
                _log.debug("closing idle connection to %s", record.peer)
                self._spawn(record.conn.close())

    def add_connection(self, conn: Connection) -> None:
        """Serve an outbound connection made outside ``connect`` (a hole-punched one) as
        any other; raises ``LimitExceeded`` when the connection limits refuse it."""
        self._check_running()
        self._adopt(conn, outbound=True)

    def retire(self, conn: Connection) -> None:
        """Open no new stream on ``conn`` and close it once the streams on it have ended
        (hole punching retires the relayed connection its direct one replaces)."""
        for record in self._connmgr.records(conn.remote_peer):
            if record.conn is conn and not record.closing:
                record.closing = True
                self._spawn(self._close_when_idle(record))

    async def _close_when_idle(self, record: ConnectionRecord) -> None:
        while record.streams and not record.conn.is_closed:  # noqa: ASYNC110 - counts change
            await asyncio.sleep(self.limits.connections.retire_poll_s)
        await record.conn.close()

    def connections(self, peer: PeerId | None = None) -> list[Connection]:
        """Open connections, to ``peer`` or to everyone."""
        return [record.conn for record in self._connmgr.records(peer)]

    def connected_peers(self) -> list[PeerId]:
        return self._connmgr.peers()

    async def disconnect(self, peer: PeerId) -> None:
        """Close every connection to ``peer``."""
        records = self._connmgr.records(peer)
        await asyncio.gather(*(r.conn.close() for r in records), return_exceptions=True)

    async def connect(self, target: Target) -> PeerId:
        """Connect to a multiaddr (``/p2p/<id>`` makes the dial check the remote's PeerID)
        or to a known peer; an open connection to the peer is reused. Returns its PeerID.

        Raises ``DialFailed`` (``PeerIdMismatch`` for the wrong peer) for a multiaddr,
        ``PeerUnreachable`` listing every address tried for a PeerID.
        """
        return (await self._connection(target)).peer

    async def _connection(self, target: Target) -> ConnectionRecord:
        self._check_running()
        peer = target if isinstance(target, PeerId) else target.peer_id
        if peer is not None:
            record = self._connmgr.get(peer)
            if record is not None:
                return record
            if peer == self.peer_id:
                raise DialFailed(f"{peer} is this Host itself", addr=target)
        key: Target = peer if peer is not None else target
        task = self._dials.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._dial(target, peer))
            self._dials[key] = task
            self._tasks.add(task)
            task.add_done_callback(partial(self._dial_done, key))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise DialFailed(f"the Host stopped while dialing {target}", addr=target) from None
            raise

    def _dial_done(self, key: Target, task: asyncio.Task[ConnectionRecord]) -> None:
        """Forget a finished dial; its error reaches every caller, none is logged here."""
        self._tasks.discard(task)
        if self._dials.get(key) is task:
            del self._dials[key]
        if not task.cancelled():
            task.exception()

    async def _dial(self, target: Target, peer: PeerId | None) -> ConnectionRecord:
        if isinstance(target, Multiaddr):
            return await self._dial_addr(target, peer)
        addrs = order_addrs(
            self.peerstore.addrs(target), self.limits.connections.transport_preference
        )
        if not addrs:
            raise PeerUnreachable(
                f"no address known for {target}; connect to one of its multiaddrs first",
                peer=target,
            )
        return await self._dial_staggered(target, addrs)

    async def _dial_staggered(self, target: PeerId, addrs: list[Multiaddr]) -> ConnectionRecord:
        """Dial ``addrs`` in order, each ``dial_stagger_s`` after the previous one unless it
        failed sooner; the first connection wins, the other attempts are cancelled (or
        their connections closed)."""
        loop = asyncio.get_running_loop()
        stagger = self.limits.connections.dial_stagger_s
        remaining = list(addrs)
        running: set[asyncio.Task[ConnectionRecord]] = set()
        failures: list[DialFailed] = []
        won: ConnectionRecord | None = None
        try:
            while won is None and (remaining or running):
                if remaining:
                    running.add(loop.create_task(self._dial_addr(remaining.pop(0), target)))
                done, running = await asyncio.wait(
                    running,
                    timeout=stagger if remaining else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    exc = task.exception()
                    if exc is None and won is None:
                        won = task.result()
                    elif exc is None:
                        await task.result().conn.close()
                    elif isinstance(exc, DialFailed):
                        failures.append(exc)
                    else:
                        raise exc
        finally:
            for task in running:
                task.cancel()
            for result in await asyncio.gather(*running, return_exceptions=True):
                if isinstance(result, ConnectionRecord):
                    await result.conn.close()
        if won is not None:
            return won
        lines = "\n".join(f"  {exc}" for exc in failures)
        raise PeerUnreachable(
            f"could not reach {target} at any of its {len(addrs)} addresses:\n{lines}",
            peer=target,
            failures=failures,
        )

    async def _dial_addr(self, addr: Multiaddr, peer: PeerId | None) -> ConnectionRecord:
        transport = next((t for t in self._transports if t.can_dial(addr)), None)
        if transport is None:
            raise DialFailed(f"no transport of this Host can dial {addr}", addr=addr)
        self._connmgr.check_dial()
        try:
            conn = await transport.dial(addr, peer, timeout=self.limits.transport.dial_timeout_s)
        except TransportPeerIdMismatch as exc:
            raise PeerIdMismatch(expected=exc.expected, actual=exc.actual, addr=addr) from exc
        except (TransportError, OSError) as exc:
            raise DialFailed(f"dialing {addr} failed: {exc}", addr=addr, cause=exc) from exc
        if not self._running:
            await conn.close()
            raise DialFailed(f"the Host stopped while dialing {addr}", addr=addr)
        try:
            record = self._adopt(conn, outbound=True)
        except LimitExceeded:
            await conn.close()
            raise
        self.peerstore.add_addrs(record.peer, [addr])
        return record

    async def _stream_to(self, record: ConnectionRecord, what: str) -> Stream:
        try:
            stream = await record.conn.open_stream()
        except TransportError as exc:
            raise from_transport(exc, what) from exc
        record.stream_opened()
        return stream

    # -- inbound streams -----------------------------------------------------------------

    async def _serve_stream(self, stream: Stream, record: ConnectionRecord) -> None:
        loop = asyncio.get_running_loop()
        record.stream_opened()
        try:
            try:
                inbound = await negotiate_inbound(stream, self._supported, self._negotiation)
            except PeerProtocolError as exc:
                _log.debug("inbound stream from %s: %s", record.peer, exc)
                await stream.close()
                return
            route = self._routes.get(inbound.protocol)
            if route is None:
                stream.reset()
                return
            await route(stream, record, inbound)
        except (TransportError, P2PError, TimeoutError) as exc:
            _log.debug("inbound stream from %s ended: %r", record.peer, exc)
            stream.reset()
        except Exception:
            _log.exception("serving an inbound stream from %s failed", record.peer)
            stream.reset()
        finally:
            record.stream_closed(loop.time())

    def _add_route(self, protocol: str, route: _Route, *, replace: bool) -> None:
        lazy_prefix(protocol, self._negotiation)
        if not replace and protocol in self._routes:
            raise ValueError(f"a handler for {protocol} is already registered")
        self._routes[protocol] = route
        self._supported = frozenset(self._routes)

    def set_stream_handler(self, protocol_id: str, handler: StreamHandlerFn) -> None:
        """Serve inbound ``protocol_id`` streams with ``await handler(stream, peer_id)``.

        The stream is closed when the handler returns; an exception resets it and is
        logged once. Replaces an earlier handler for the protocol.
        """
        self._add_route(protocol_id, partial(self._serve_user, handler), replace=True)

    def remove_handler(self, protocol_id: str) -> None:
        """Stop serving ``protocol_id`` (of any kind)."""
        self._routes.pop(protocol_id, None)
        self._supported = frozenset(self._routes)

    async def _serve_user(
        self, handler: StreamHandlerFn, stream: Stream, record: ConnectionRecord, inbound: Inbound
    ) -> None:
        if inbound.answer:
            await stream.write(inbound.answer)
        try:
            await handler(
                HostStream(stream, inbound.protocol, leftover=inbound.leftover), record.peer
            )
        except _PEER_FAULTS as exc:
            _log.debug("%s handler for %s ended: %r", inbound.protocol, record.peer, exc)
            stream.reset()
            return
        except Exception:
            _log.exception("%s stream handler failed for %s", inbound.protocol, record.peer)
            stream.reset()
            return
        await stream.close()

    async def new_stream(self, target: Target, protocols: Sequence[str]) -> tuple[Stream, str]:
        """Open a stream and negotiate the first of ``protocols`` the peer speaks.

        Returns the stream and the protocol agreed on; close the stream when done.
        Raises ``ProtocolNotSupported`` when the peer speaks none of them.
        """
        record = await self._connection(target)
        loop = asyncio.get_running_loop()
        stream = await self._stream_to(record, f"stream to {record.peer}")
        try:
            protocol = await select_protocol(stream, protocols, limits=self._negotiation)
        except BaseException as exc:
            stream.reset()
            record.stream_closed(loop.time())
            if isinstance(exc, HandshakeError):
                if isinstance(exc.__cause__, TimeoutError):
                    raise ProtocolNegotiationFailed(f"{record.peer}: {exc}") from exc
                raise ProtocolNotSupported(
                    f"{record.peer} supports none of {', '.join(protocols)}", protocols=protocols
                ) from exc
            if isinstance(exc, RemoteProtocolError):
                raise PeerProtocolError(f"{record.peer} broke multistream-select: {exc}") from exc
            if isinstance(exc, TransportError):
                raise from_transport(exc, f"stream to {record.peer}") from exc
            raise

        def done() -> None:
            record.stream_closed(loop.time())

        return HostStream(stream, protocol, on_done=done), protocol

    # -- ping and identify ---------------------------------------------------------------

    async def _serve_ping(self, stream: Stream, record: ConnectionRecord, inbound: Inbound) -> None:
        await serve_ping(stream, inbound)

    async def ping(self, target: Target) -> float:
        """Round-trip time to the peer in seconds (``/ipfs/ping/1.0.0``)."""
        record = await self._connection(target)
        loop = asyncio.get_running_loop()
        stream = await self._stream_to(record, f"ping of {record.peer}")
        try:
            async with asyncio.timeout(self.limits.ping_timeout_s):
                seconds = await ping(
                    stream,
                    self._ping_prefix,
                    self._negotiation,
                    random_bytes=self._random_bytes,
                    clock=loop.time,
                )
        except BaseException as exc:
            stream.reset()
            if isinstance(exc, TimeoutError):
                raise P2PTimeout(
                    f"ping of {record.peer} took longer than "
                    f"HostLimits.ping_timeout_s={self.limits.ping_timeout_s:g}"
                ) from None
            if isinstance(exc, TransportError):
                raise from_transport(exc, f"ping of {record.peer}") from exc
            raise
        finally:
            record.stream_closed(loop.time())
        await stream.close()
        self.peerstore.record_latency(record.peer, seconds)
        self.peerstore.seen(record.peer, loop.time())
        return seconds

    def _identify_message(self, record: ConnectionRecord) -> bytes:
        return frame_identify(
            IdentifyInfo(
                peer_id=self.peer_id,
                listen_addrs=tuple(self._advertised()),
                protocols=tuple(sorted(self._supported)),
                observed_addr=record.conn.remote_addr,
                protocol_version=PROTOCOL_VERSION,
                agent_version=self.agent_version,
            )
        )

    async def _serve_identify(
        self, stream: Stream, record: ConnectionRecord, inbound: Inbound
    ) -> None:
        await serve_identify(stream, inbound, self._identify_message(record))

    async def identify(self, target: Target) -> IdentifyInfo:
        """Ask the peer who it is (``/ipfs/id/1.0.0``) and record the answer."""
        return await self._identify(await self._connection(target))

    async def _identify(self, record: ConnectionRecord) -> IdentifyInfo:
        loop = asyncio.get_running_loop()
        limits = self.limits.identify
        stream = await self._stream_to(record, f"identify of {record.peer}")
        try:
            async with asyncio.timeout(limits.timeout_s):
                info = await request_identify(
                    stream, self._identify_prefix, self._negotiation, limits
                )
        except BaseException as exc:
            stream.reset()
            if isinstance(exc, TimeoutError):
                raise P2PTimeout(
                    f"identify of {record.peer} took longer than "
                    f"IdentifyLimits.timeout_s={limits.timeout_s:g}"
                ) from None
            if isinstance(exc, TransportError):
                raise from_transport(exc, f"identify of {record.peer}") from exc
            raise
        finally:
            record.stream_closed(loop.time())
        await stream.close()
        if info.peer_id is not None and info.peer_id != record.peer:
            raise PeerProtocolError(
                f"{record.peer} sent an identify message with the key of {info.peer_id}"
            )
        self._learn(record, info, loop.time())
        return info

    async def _identify_quietly(self, record: ConnectionRecord) -> None:
        try:
            await self._identify(record)
        except P2PError as exc:
            _log.debug("identify of %s failed: %s", record.peer, exc)

    def _learn(self, record: ConnectionRecord, info: IdentifyInfo, now: float) -> None:
        peer = record.peer
        store = self.peerstore
        store.add_addrs(peer, info.listen_addrs)
        store.set_protocols(peer, info.protocols)
        store.set_agent(peer, info.agent_version, info.protocol_version)
        store.seen(peer, now)
        if info.observed_addr is not None:
            observed = normalize_observed(info.observed_addr, record.conn.transport_name)
            if observed is not None:
                self._observed.record(peer, observed)

    # -- RPC -----------------------------------------------------------------------------

    def add_rpc_handler(self, protocol_id: str, handler: UnaryHandler) -> None:
        """Serve unary calls: ``async def handler(ctx, request, payload) -> value | RpcReply``.

        Raise ``RpcError(code, message)`` to answer with an error; any other exception
        answers ``RpcCode.INTERNAL`` and is logged. The handler is cancelled when the
        caller cancels or its deadline (``ctx.deadline``) passes.
        """
        route = partial(self._rpc_server.serve, handler, False)
        self._add_route(protocol_id, route, replace=False)

    def add_rpc_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve streaming calls: ``async def handler(ctx, call: RpcStream)``.

        The call's stream is closed when the handler returns.
        """
        route = partial(self._rpc_server.serve, handler, True)
        self._add_route(protocol_id, route, replace=False)

    async def rpc_call(
        self,
        peer: Target,
        protocol_id: str,
        request: Any,
        payload: Payload | None = None,
        *,
        timeout: float | None = None,
    ) -> RpcReply:
        """Call ``protocol_id`` on ``peer``: one round trip on the call stream shared per
        peer and protocol.

        ``timeout`` (default ``RpcLimits.default_timeout_s``) travels to the server,
        which gives up too. Raises ``RemoteError`` for the handler's error,
        ``RpcTimeout``, ``ProtocolNotSupported``, ``ConnectionLost`` when the peer goes
        away mid-call, ``RpcCancelled`` when it resets the call.
        """
        loop = asyncio.get_running_loop()
        budget = self.limits.rpc.default_timeout_s if timeout is None else timeout
        deadline = loop.time() + budget
        try:
            async with asyncio.timeout_at(deadline):
                record = await self._connection(peer)
                return await self._rpc_client.call(record, protocol_id, request, payload, deadline)
        except TimeoutError as exc:
            if isinstance(exc, P2PError):
                raise
            raise RpcTimeout(
                f"{protocol_id} call to {peer} took longer than its {budget:g}s deadline"
            ) from None

    async def rpc_open(
        self, peer: Target, protocol_id: str, *, timeout: float | None = None
    ) -> RpcStream:
        """Open a streaming call; use it as ``async with await host.rpc_open(...) as call``.

        ``timeout`` (default ``RpcLimits.default_stream_timeout_s``, None: no deadline)
        bounds the whole call and travels to the server. The protocol is negotiated
        lazily: a refusal surfaces as ``ProtocolNotSupported`` from the first ``recv``.
        """
        loop = asyncio.get_running_loop()
        budget = self.limits.rpc.default_stream_timeout_s if timeout is None else timeout
        deadline = None if budget is None else loop.time() + budget
        try:
            async with asyncio.timeout_at(deadline):
                record = await self._connection(peer)
        except TimeoutError as exc:
            if isinstance(exc, P2PError):
                raise
            raise RpcTimeout(
                f"connecting to {peer} for {protocol_id} passed the deadline"
            ) from None
        return await self._rpc_client.open(record, protocol_id, deadline)

    # -- bootstrap -----------------------------------------------------------------------

    async def bootstrap(
        self,
        addrs: Sequence[Multiaddr],
        *,
        retries: int | None = None,
        backoff: float | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> BootstrapResult:
        """Join the swarm through ``addrs``: connect to all, retrying failures.

        A failing address is retried ``retries`` times (default
        ``BootstrapLimits.retries``) after ``backoff`` seconds, doubling each time up to
        ``BootstrapLimits.max_backoff_s``. Succeeds when one address works (the result
        lists the others' errors); raises ``BootstrapError`` naming every address and
        its last error when none does. ``sleep`` lets tests run the schedule instantly.
        """
        policy = self.limits.bootstrap
        delays = backoff_delays(
            policy.retries if retries is None else retries,
            policy.backoff_s if backoff is None else backoff,
            policy.max_backoff_s,
        )
        result = await bootstrap(self.connect, addrs, delays=delays, sleep=sleep)
        for addr, exc in result.failures:
            _log.warning("bootstrap address %s failed: %s", addr, exc)
        return result
