"""Hidden states through a chain of servers: routing, forward and backward, bans.

Runs on the client's event loop (``SwarmClient``). ``RemoteChain`` reads the servers of a
model from the DHT (at most once per ``ClientLimits.route_ttl_s``, never per token),
measures its round trip to each (``Host.ping``, once per server) and asks ``scheduler``
for a route: the chain of lowest expected latency for generation
(``route_min_latency``), a chain drawn by throughput for batch forward and backward
(``route_for_throughput``: a server ten times as fast gets ten times the calls), and,
when a server of an inference chain fails, a replacement for exactly its blocks
(``replace_span``). A server that failed is banned for ``ClientLimits.ban_s``: a hard ban
(lost connection, error) keeps it out of every route; a soft ban (it only missed a
deadline, the connection still open) keeps it out of routes that can do without it, so a
slow server that alone serves some blocks is still used.

With a reputation book (``security.ReputationBook``, ``book=``), routing consults it too:
peers it bans are left out; peers on probation are avoided (used only where nothing else
serves) while their share of this client's recent traffic is at its cap (``eligible``,
fed by ``note_request`` for every hop routed); and its ``routing_weights`` (score, IP
group crowding) bias the choice: divided into a hop's cost for least latency, multiplied
into the chance of a draw by throughput (where probation peers' weights are capped too).
Every stateless call's outcome is recorded in it (``SUCCESS``, ``FAILURE``, ``TIMEOUT``),
and so is every ``ban`` (a failure, a timeout for a soft ban).
Inference sessions (``ChainSession``) live in ``_client_session``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dht import DHT
from p2p import Host, P2PError, RemoteError, RpcReply
from scheduler import Hop as RouteHop
from scheduler import (
    MissingBlocksError,
    Route,
    ServerState,
    SwarmSnapshot,
    replace_span,
    route_for_throughput,
    route_min_latency,
)
from security import Event, PeerId, ReputationBook, SignedAnswer, digest

from ._announce import ServerRecord, read_servers, snapshot_of
from ._client_errors import PeerBanned
from ._dtypes import DTYPES
from ._errors import BadRequest, ShardError
from ._evidence_wire import BACKWARD_SESSION, answer_of
from ._server_errors import BlockNotServed, ServerError, UnknownSession, remote_error
from ._server_limits import ClientLimits
from ._server_protocol import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    pack_tensors,
    unpack_tensors,
)
from ._wire import Compression

_log = logging.getLogger("model_shards.client")


@dataclass(frozen=True, slots=True)
class Hop:
    """Blocks ``[start, end)`` run by one server, in that server's dtype."""

    peer_id: PeerId
    start: int
    end: int
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.peer_id.short()}[{self.start}:{self.end}]"


@dataclass(frozen=True, slots=True)
class ChainTrace:
    """A stateless forward through a chain: the hops, each hop's input, and the output."""

    hops: tuple[Hop, ...]
    states: tuple[torch.Tensor, ...]
    attention_mask: torch.Tensor | None

    @property
    def output(self) -> torch.Tensor:
        return self.states[-1]


@dataclass(frozen=True, slots=True)
class Steering:
    """What a route leaves out, avoids and prefers, as the scheduler's peer keys."""

    banned: set[str]
    """Never routed to: hard bans of this chain, peers the book bans."""
    avoid: set[str] = field(default_factory=set)
    """Used only where nothing else serves: soft bans, probation peers past their share."""
    weights: dict[str, float] | None = None
    """The book's routing weights (None: no book)."""


LAST_RESORT_WEIGHT = 0.01
"""The routing weight of a server the book banned for failures and timeouts alone (the
book weighs it 0): used only for blocks nobody else serves, at a hundredfold cost."""


class RemoteChain:
    """The blocks of one model, as the swarm serves them (use on the client's loop)."""

    def __init__(
        self,
        host: Host,
        dht: DHT,
        model_id: str,
        num_blocks: int,
        *,
        limits: ClientLimits | None = None,
        compression: Compression = Compression.NONE,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        book: ReputationBook | None = None,
    ) -> None:
        self.host = host
        self.dht = dht
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.limits = limits or ClientLimits()
        self.compression = Compression(compression)
        self._clock = clock
        self._rng = rng or random.Random()
        self._servers: dict[PeerId, ServerRecord] = {}
        self._read_at: float | None = None
        self._rtts: dict[PeerId, float] = {}
        self._banned: dict[PeerId, tuple[float, bool]] = {}
        """Per banned peer: until when, and whether the ban is soft."""
        self.book = book
        """The client's reputation book, consulted by routing and fed every call's outcome
        (None: routing on this chain's bans alone, nothing recorded)."""

    # -- routing ---------------------------------------------------------------------------

    async def servers(self, *, refresh: bool = False) -> dict[PeerId, ServerRecord]:
        """The model's announced servers, read from the DHT when the last read is stale."""
        now = self._clock()
        stale = self._read_at is None or now - self._read_at > self.limits.route_ttl_s
        if refresh or stale:
            self._servers = await read_servers(self.dht, self.model_id, self.num_blocks)
            self._read_at = now
            for peer, record in self._servers.items():
                self.host.peerstore.add_addrs(peer, record.addrs)
        return self._servers

    def record(self, peer: PeerId) -> ServerRecord | None:
        """What ``peer`` announced at the last read of the DHT (None: not announced)."""
        return self._servers.get(peer)

    def ban(self, peer: PeerId, *, soft: bool = False) -> None:
        """Route nothing to ``peer`` for ``ClientLimits.ban_s``; with ``soft`` (it was only
        slow) routes still use it where nothing else covers its blocks. A soft ban never
        weakens a hard one. The book (if any) records a ``TIMEOUT`` for a soft ban, a
        ``FAILURE`` for a hard one."""
        self._record(peer, Event.TIMEOUT if soft else Event.FAILURE)
        self._ban(peer, soft=soft)

    def _ban(self, peer: PeerId, *, soft: bool) -> None:
        until = self._clock() + self.limits.ban_s
        current = self._banned.get(peer)
        hard_now = current is not None and not current[1] and current[0] > self._clock()
        self._banned[peer] = (until, soft and not hard_now)
        if not soft:
            self._rtts.pop(peer, None)
        _log.info("banned %s for %gs%s", peer.short(), self.limits.ban_s, " (soft)" * soft)

    def banned(self, *, soft: bool = True) -> set[str]:
        """The peers banned now, as the scheduler's peer keys (without the soft bans when
        ``soft`` is false)."""
        now = self._clock()
        for peer in [p for p, (until, _) in self._banned.items() if until <= now]:
            del self._banned[peer]
        return {str(peer) for peer, (_, is_soft) in self._banned.items() if soft or not is_soft}

    def is_banned(self, peer: PeerId) -> bool:
        """Whether ``peer`` is banned now, softly or not, by this chain or by the book."""
        return str(peer) in self.banned() or (self.book is not None and self.book.is_banned(peer))

    def _record(self, peer: PeerId, event: Event) -> None:
        if self.book is not None:
            self.book.record(peer, event)

    @contextmanager
    def _judged(self, peer: PeerId) -> Iterator[None]:
        """Record in the book how a call to ``peer`` inside ends: ``SUCCESS``, ``TIMEOUT``,
        or ``FAILURE`` for an error of the server's making (``is_lost``; a request of ours
        it rejected counts for nothing)."""
        try:
            yield
        except TimeoutError:
            self._record(peer, Event.TIMEOUT)
            raise
        except (P2PError, ShardError, ConnectionError) as e:
            if is_lost(e):
                self._record(peer, Event.FAILURE)
            raise
        self._record(peer, Event.SUCCESS)

    def steering(self, snapshot: SwarmSnapshot, *, draw: bool = False) -> Steering:
        """What routing over ``snapshot`` must leave out, should avoid and prefers now:
        this chain's bans, and with a book its bans (peers banned after a failed check or
        verified evidence are left out; peers banned for failures and timeouts alone are
        avoided, so that a loaded server that alone serves some blocks still serves them),
        its probation cap (``eligible``) and its ``routing_weights`` (the probation cap in
        them only for a ``draw``)."""
        banned = self.banned(soft=False)
        avoid = self.banned() - banned
        book = self.book
        if book is None:
            return Steering(banned, avoid)
        peers = [peer for peer in self._servers if str(peer) in snapshot]
        unreliable = set()
        for peer in [p for p in peers if book.is_banned(p)]:
            # caught computing wrong: never routed; only unreliable: a last resort
            (banned if book.standing(peer).checks_failed else unreliable).add(str(peer))
        allowed = set(book.eligible(peers))
        avoid |= unreliable | {str(peer) for peer in peers if peer not in allowed} - banned
        weights = {str(p): w for p, w in book.routing_weights(peers, cap_probation=draw).items()}
        weights.update(dict.fromkeys(unreliable, LAST_RESORT_WEIGHT))
        return Steering(banned, avoid, weights)

    async def _measure(self, peers: Sequence[PeerId]) -> None:
        """Round trips to the servers not measured yet (unreachable ones stay unmeasured)."""

        async def ping(peer: PeerId) -> None:
            try:
                async with asyncio.timeout(self.limits.ping_timeout_s):
                    self._rtts[peer] = await self.host.ping(peer)
            except (P2PError, TimeoutError) as e:
                _log.info("server %s did not answer a ping: %s", peer.short(), e)
                return
            if self.book is not None:
                self.book.note_address(peer, self._observed_ip(peer))

        banned = self.banned(soft=False)
        await asyncio.gather(
            *(ping(p) for p in peers if p not in self._rtts and str(p) not in banned)
        )

    def _observed_ip(self, peer: PeerId) -> str | None:
        """The IP our connection to ``peer`` reaches (its IP group is what the book's
        crowding penalty counts; an announced address could be anyone's)."""
        for conn in self.host.connections(peer):
            ip = conn.remote_addr.value_for("ip4") or conn.remote_addr.value_for("ip6")
            if ip:
                return ip
        return None

    async def _snapshot(self, *, refresh: bool) -> SwarmSnapshot:
        """The online servers answering pings, as the scheduler sees them."""
        servers = await self.servers(refresh=refresh)
        online = [s.peer_id for s in servers.values() if s.state == ServerState.ONLINE]
        await self._measure(online)
        measured = {str(peer) for peer in self._rtts}
        snapshot = snapshot_of(self.num_blocks, servers.values(), keep=lambda s: True)
        return snapshot.where(lambda s: s.peer_id in measured)

    async def _routed(
        self,
        plan: Callable[[SwarmSnapshot, Steering], Route],
        wait_s: float,
        *,
        tokens: int,
        draw: bool = False,
    ) -> list[Hop]:
        """``plan``'s route over the current view, steered (``steering``: soft bans and
        probation peers past their share used only where nothing else serves), waiting
        up to ``wait_s`` (the DHT read again every ``route_poll_s``) while blocks are
        missing. Each hop is noted in the book as ``tokens`` times its blocks of traffic."""
        deadline = self._clock() + wait_s
        refresh = False
        while True:
            snapshot = await self._snapshot(refresh=refresh)
            try:
                hops = self._hops(plan(snapshot, self.steering(snapshot, draw=draw)))
            except MissingBlocksError:
                if self._clock() >= deadline:
                    raise
            else:
                if self.book is not None:
                    for hop in hops:
                        self.book.note_request(hop.peer_id, tokens * (hop.end - hop.start))
                return hops
            if refresh:
                await asyncio.sleep(self.limits.route_poll_s)
            refresh = True

    async def route(self, *, min_cache_tokens: int = 0) -> list[Hop]:
        """The chain of lowest expected latency; ``MissingBlocksError`` when none exists.

        Servers that did not answer a ping, banned servers, and (for a session) servers
        announcing less cache room than ``min_cache_tokens`` are left out. With
        ``ClientLimits.route_wait_s``, missing blocks are waited for (the DHT read again
        every ``route_poll_s``) before giving up.
        """

        def plan(snapshot: SwarmSnapshot, steer: Steering) -> Route:
            rtts = {str(peer): rtt for peer, rtt in self._rtts.items()}
            return route_min_latency(
                snapshot,
                rtts,
                banned=steer.banned,
                min_cache_tokens=min_cache_tokens,
                push=self.limits.push,
                weights=steer.weights,
                avoid=steer.avoid,
            )

        return await self._routed(plan, self.limits.route_wait_s, tokens=max(1, min_cache_tokens))

    async def route_for_batch(self, *, tokens: int = 1) -> list[Hop]:
        """A chain drawn so that load follows throughput (batch forward and backward) and
        the book's weights; ``tokens`` (batch x length) is the traffic noted per block."""

        def plan(snapshot: SwarmSnapshot, steer: Steering) -> Route:
            return route_for_throughput(
                snapshot,
                self._rng,
                banned=steer.banned,
                weights=steer.weights,
                avoid=steer.avoid,
            )

        return await self._routed(plan, self.limits.route_wait_s, tokens=tokens, draw=True)

    async def replace(
        self,
        hops: Sequence[Hop],
        index: int,
        *,
        num_tokens: int,
        min_cache_tokens: int,
        wait_s: float | None = None,
    ) -> list[Hop]:
        """A sub-route over exactly the blocks of ``hops[index]``, without its server or
        any banned one (soft-banned ones where nothing else serves them): from the current
        view of the swarm when it has one (a lookup in the DHT may wait on the very server
        that failed), else from the DHT, read again every ``route_poll_s``;
        ``MissingBlocksError`` once ``wait_s`` (default ``ClientLimits.failover_wait_s``)
        passed with some of those blocks unserved."""
        route = Route(tuple(RouteHop(str(h.peer_id), h.start, h.end) for h in hops))

        def plan(snapshot: SwarmSnapshot, steer: Steering) -> Route:
            rtts = {str(peer): rtt for peer, rtt in self._rtts.items()}
            return replace_span(
                snapshot,
                route,
                index,
                steer.banned,
                client_rtts=rtts,
                num_tokens=num_tokens,
                min_cache_tokens=min_cache_tokens,
                push=self.limits.push,
                weights=steer.weights,
                avoid=steer.avoid,
            )

        return await self._routed(
            plan,
            self.limits.failover_wait_s if wait_s is None else wait_s,
            tokens=max(1, min_cache_tokens),
        )

    async def spare(self, hops: Sequence[Hop], index: int, *, min_cache_tokens: int) -> bool:
        """Whether the current view of the swarm has servers for exactly the blocks of
        ``hops[index]`` other than its own and any banned one (soft bans and the book's
        bans count here)."""
        route = Route(tuple(RouteHop(str(h.peer_id), h.start, h.end) for h in hops))
        snapshot = await self._snapshot(refresh=False)
        try:
            replace_span(
                snapshot,
                route,
                index,
                self.steering(snapshot).banned | self.banned(),
                min_cache_tokens=min_cache_tokens,
                push=self.limits.push,
            )
        except MissingBlocksError:
            return False
        return True

    def _hops(self, route: Route) -> list[Hop]:
        by_key = {str(peer): record for peer, record in self._servers.items()}
        hops = []
        for hop in route.hops:
            record = by_key[str(hop.peer_id)]
            hops.append(Hop(record.peer_id, hop.start, hop.end, DTYPES[record.dtype]))
        _log.debug("route: %s", " -> ".join(map(str, hops)))
        return hops

    def deadline_s(self, hop: Hop, tokens: int) -> float:
        """How long ``tokens`` (batch x tokens) may take at ``hop``: ``step_timeout_base_s``
        plus ``step_timeout_factor`` times the compute they need at the server's announced
        throughput, at most ``call_timeout_s``."""
        limits = self.limits
        record = self.record(hop.peer_id)
        throughput = 0.0 if record is None else record.throughput
        expected = tokens * (hop.end - hop.start) / throughput if throughput > 0 else 0.0
        deadline = limits.step_timeout_base_s + limits.step_timeout_factor * expected
        return min(limits.call_timeout_s, deadline)

    # -- stateless calls -------------------------------------------------------------------

    async def forward_on(
        self, hop: Hop, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``hidden`` (a whole sequence, no cache) through ``hop``'s blocks on ``hop``'s
        server alone, within the deadline its size calls for (``deadline_s``); the
        server's errors as typed ``ShardError``, ``TimeoutError`` past the deadline;
        ``PeerBanned`` at once, sending nothing, for a server banned now (even softly: a
        server that just missed a deadline may be dead, and would stall the caller)."""
        return (await self.forward_signed(hop, hidden, attention_mask))[0]

    async def forward_signed(
        self, hop: Hop, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SignedAnswer]:
        """``forward_on``, with the server's signed answer (checked against the bytes sent
        and received: ``BadAnswer`` when it does not hold, ``UnsignedAnswer`` when the
        server signs nothing; both are ``ServerError``)."""
        if self.is_banned(hop.peer_id):
            raise PeerBanned(f"{hop.peer_id} is banned by this client for now; use another")
        mask = wire_mask(attention_mask)
        tensors = [hidden.to(hop.dtype), *([] if mask is None else [mask])]
        deadline = self.deadline_s(hop, hidden.shape[0] * hidden.shape[1])
        sizes, payload = pack_tensors(tensors, self.compression)
        with self._judged(hop.peer_id):
            reply = await self._call(FORWARD_PROTOCOL, hop, sizes, payload, timeout=deadline)
            output = output_of(reply, hop, self.limits)
            answer = answer_of(
                reply.value,
                hop,
                self.model_id,
                reply.payload,
                input_digest=digest(payload),
            )
        return output, answer

    async def _unary(
        self,
        protocol: str,
        hop: Hop,
        tensors: list[torch.Tensor],
        *,
        timeout: float | None = None,
    ) -> torch.Tensor:
        sizes, payload = pack_tensors(tensors, self.compression)
        with self._judged(hop.peer_id):
            reply = await self._call(protocol, hop, sizes, payload, timeout=timeout)
            output = output_of(reply, hop, self.limits)
            backward = protocol == BACKWARD_PROTOCOL
            answer_of(
                reply.value,
                hop,
                self.model_id,
                reply.payload,
                session=BACKWARD_SESSION if backward else b"",
                input_digest=digest(payload),
            )
        return output

    async def _call(
        self,
        protocol: str,
        hop: Hop,
        sizes: list[int],
        payload: bytes,
        *,
        timeout: float | None = None,
    ) -> RpcReply:
        request = {
            "model": self.model_id,
            "start": hop.start,
            "end": hop.end,
            "tensors": sizes,
            "compression": self.compression.value,
        }
        try:
            reply = await self.host.rpc_call(
                hop.peer_id,
                protocol,
                request,
                payload,
                timeout=self.limits.call_timeout_s if timeout is None else timeout,
            )
        except RemoteError as e:
            raise remote_error({"error": e.code, "message": e.message}, hop.peer_id) from None
        return reply

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All blocks on a whole sequence, without caches."""
        return (await self.trace(hidden, attention_mask)).output

    async def trace(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ChainTrace:
        """A forward that keeps every hop's input, for ``backward``, along a chain drawn by
        throughput. A server that fails is banned and the forward runs again on another
        chain, up to ``ClientLimits.max_failovers`` times."""
        mask = wire_mask(attention_mask)
        extra = [] if mask is None else [mask]
        attempt = 0
        while True:
            hops = await self.route_for_batch(tokens=hidden.shape[0] * hidden.shape[1])
            states = [hidden]
            state = hidden
            try:
                for hop in hops:
                    failed = hop.peer_id
                    output = await self._unary(FORWARD_PROTOCOL, hop, [state.to(hop.dtype), *extra])
                    state = output.to(hidden.dtype)
                    states.append(state)
            except (P2PError, TimeoutError, ShardError) as e:
                if not is_lost(e) or attempt >= self.limits.max_failovers:
                    raise
                attempt += 1
                _log.info("forward through %s failed (%s); drawing another chain", failed, e)
                self._ban(failed, soft=isinstance(e, TimeoutError))
                continue
            return ChainTrace(tuple(hops), tuple(states), attention_mask)

    async def backward(self, trace: ChainTrace, grad_output: torch.Tensor) -> torch.Tensor:
        """Gradient of ``(output * grad_output).sum()`` for the traced input, hop by hop
        backwards, each server recomputing its own activations."""
        mask = wire_mask(trace.attention_mask)
        extra = [] if mask is None else [mask]
        grad = grad_output
        for hop, state in zip(reversed(trace.hops), reversed(trace.states[:-1]), strict=True):
            tensors = [state.to(hop.dtype), grad.to(hop.dtype), *extra]
            grad = (await self._unary(BACKWARD_PROTOCOL, hop, tensors)).to(state.dtype)
        return grad


def is_lost(error: BaseException) -> bool:
    """Whether ``error`` means the server (or its session) is gone, rather than that the
    request was wrong: a lost connection, a timeout, a session the server no longer
    holds, blocks it no longer serves, or any error of the server's own making."""
    if isinstance(error, P2PError | TimeoutError | ConnectionError):
        return True
    if isinstance(error, BadRequest):
        return isinstance(error, UnknownSession | BlockNotServed)
    return isinstance(error, ShardError)


def wire_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as sent: booleans, and nothing at all when every token is real."""
    if attention_mask is None:
        return None
    mask = attention_mask.detach().cpu() != 0
    return None if bool(mask.all()) else mask


def output_of(reply: RpcReply, hop: Hop, limits: ClientLimits) -> torch.Tensor:
    value = reply.value
    try:
        if not isinstance(value, dict):
            raise ShardError(f"answer is a {type(value).__name__}, not a map")
        (tensor,) = unpack_tensors(
            value.get("tensors"), _view(reply), limits.wire, count=range(1, 2)
        )
    except ShardError as e:
        raise ServerError(f"{hop.peer_id} answered badly: {e}", remote_code="bad_answer") from e
    return tensor


def _view(reply: RpcReply) -> memoryview | None:
    return None if reply.payload is None else memoryview(reply.payload)
