"""Hidden states through a chain of servers: routing, sessions, forward and backward.

Runs on the client's event loop (``SwarmClient``). ``RemoteChain`` reads the servers of a
model from the DHT (at most once per ``ClientLimits.route_ttl_s``, never per token),
measures its round trip to each (``Host.ping``, once per server), and asks ``scheduler``
for the chain of lowest expected latency. A ``ChainSession`` holds one inference stream
per hop: a step is one message each way per hop, hidden states travelling as raw payloads
in each hop's dtype, over connections the Host keeps open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dht import DHT
from p2p import Host, P2PError, RemoteError, RpcReply, RpcStream
from scheduler import MissingBlocksError, ServerState, route_min_latency
from security import PeerId

from ._announce import ServerRecord, read_servers, snapshot_of
from ._dtypes import DTYPES
from ._errors import ShardError
from ._server_errors import ServerError, remote_error
from ._server_limits import ClientLimits
from ._server_protocol import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
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
    ) -> None:
        self.host = host
        self.dht = dht
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.limits = limits or ClientLimits()
        self.compression = Compression(compression)
        self._clock = clock
        self._servers: dict[PeerId, ServerRecord] = {}
        self._read_at: float | None = None
        self._rtts: dict[PeerId, float] = {}

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

    async def _measure(self, peers: Sequence[PeerId]) -> None:
        """Round trips to the servers not measured yet (unreachable ones stay unmeasured)."""

        async def ping(peer: PeerId) -> None:
            try:
                self._rtts[peer] = await self.host.ping(peer)
            except P2PError as e:
                _log.info("server %s did not answer a ping: %s", peer.short(), e)

        await asyncio.gather(*(ping(p) for p in peers if p not in self._rtts))

    async def route(self, *, min_cache_tokens: int = 0) -> list[Hop]:
        """The chain of lowest expected latency; ``MissingBlocksError`` when none exists.

        Servers that did not answer a ping, and (for a session) servers announcing less
        cache room than ``min_cache_tokens``, are left out. With
        ``ClientLimits.route_wait_s``, missing blocks are waited for (the DHT read again
        every ``route_poll_s``) before giving up.
        """
        deadline = self._clock() + self.limits.route_wait_s
        refresh = False
        while True:
            servers = await self.servers(refresh=refresh)
            online = [s.peer_id for s in servers.values() if s.state == ServerState.ONLINE]
            await self._measure(online)
            try:
                return self._plan(servers, min_cache_tokens)
            except MissingBlocksError:
                if self._clock() >= deadline:
                    raise
            await asyncio.sleep(self.limits.route_poll_s)
            refresh = True

    def _plan(self, servers: dict[PeerId, ServerRecord], min_cache_tokens: int) -> list[Hop]:
        by_key = {str(peer): record for peer, record in servers.items()}
        rtts = {str(peer): rtt for peer, rtt in self._rtts.items()}
        snapshot = snapshot_of(self.num_blocks, servers.values(), keep=lambda s: True)
        reachable = snapshot.where(lambda s: s.peer_id in rtts)
        route = route_min_latency(reachable, rtts, min_cache_tokens=min_cache_tokens)
        hops = []
        for hop in route.hops:
            record = by_key[str(hop.peer_id)]
            hops.append(Hop(record.peer_id, hop.start, hop.end, DTYPES[record.dtype]))
        _log.debug("route: %s", " -> ".join(map(str, hops)))
        return hops

    # -- stateless calls -------------------------------------------------------------------

    async def _unary(self, protocol: str, hop: Hop, tensors: list[torch.Tensor]) -> torch.Tensor:
        sizes, payload = pack_tensors(tensors, self.compression)
        request = {
            "model": self.model_id,
            "start": hop.start,
            "end": hop.end,
            "tensors": sizes,
            "compression": self.compression.value,
        }
        try:
            reply = await self.host.rpc_call(
                hop.peer_id, protocol, request, payload, timeout=self.limits.call_timeout_s
            )
        except RemoteError as e:
            raise remote_error({"error": e.code, "message": e.message}, hop.peer_id) from None
        return _output(reply, hop, self.limits)

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All blocks on a whole sequence, without caches."""
        return (await self.trace(hidden, attention_mask)).output

    async def trace(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ChainTrace:
        """A forward that keeps every hop's input, for ``backward``."""
        hops = await self.route()
        mask = _wire_mask(attention_mask)
        extra = [] if mask is None else [mask]
        states = [hidden]
        for hop in hops:
            output = await self._unary(FORWARD_PROTOCOL, hop, [hidden.to(hop.dtype), *extra])
            hidden = output.to(hidden.dtype)
            states.append(hidden)
        return ChainTrace(tuple(hops), tuple(states), attention_mask)

    async def backward(self, trace: ChainTrace, grad_output: torch.Tensor) -> torch.Tensor:
        """Gradient of ``(output * grad_output).sum()`` for the traced input, hop by hop
        backwards, each server recomputing its own activations."""
        mask = _wire_mask(trace.attention_mask)
        extra = [] if mask is None else [mask]
        grad = grad_output
        for hop, state in zip(reversed(trace.hops), reversed(trace.states[:-1]), strict=True):
            tensors = [state.to(hop.dtype), grad.to(hop.dtype), *extra]
            grad = (await self._unary(BACKWARD_PROTOCOL, hop, tensors)).to(state.dtype)
        return grad

    # -- inference -------------------------------------------------------------------------

    async def open_session(self, *, batch_size: int, max_length: int) -> ChainSession:
        """Open one inference session per hop of a fresh route, all at once."""
        hops = await self.route(min_cache_tokens=batch_size * max_length)
        opened = await asyncio.gather(
            *(
                HopSession.open(self, hop, batch_size=batch_size, max_length=max_length)
                for hop in hops
            ),
            return_exceptions=True,
        )
        sessions = [s for s in opened if isinstance(s, HopSession)]
        failures = [e for e in opened if isinstance(e, BaseException)]
        if failures:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
            raise failures[0]
        return ChainSession(sessions, max_length=max_length)


class HopSession:
    """One server's inference session: a streaming call kept open for the whole generation."""

    def __init__(self, chain: RemoteChain, hop: Hop, call: RpcStream) -> None:
        self.chain = chain
        self.hop = hop
        self.position = 0
        self._call = call
        self._request: dict[str, Any] = {
            "op": "step",
            "tensors": [],
            "compression": chain.compression.value,
        }

    @classmethod
    async def open(
        cls, chain: RemoteChain, hop: Hop, *, batch_size: int, max_length: int
    ) -> HopSession:
        limits = chain.limits
        async with asyncio.timeout(limits.connect_timeout_s):
            call = await chain.host.rpc_open(hop.peer_id, INFERENCE_PROTOCOL)
            session = cls(chain, hop, call)
            try:
                await session._exchange(
                    {
                        "op": "open",
                        "model": chain.model_id,
                        "start": hop.start,
                        "end": hop.end,
                        "batch": batch_size,
                        "max_length": max_length,
                    }
                )
            except BaseException:
                call.cancel()
                raise
        return session

    async def _exchange(self, message: dict[str, Any], payload: bytes | None = None) -> RpcReply:
        """Send one request and read its answer (typed errors for an error answer)."""
        call = self._call
        async with asyncio.timeout(self.chain.limits.call_timeout_s):
            await call.send(message, payload)
            reply = await call.recv()
        if reply is None:
            raise ServerError(f"{self.hop.peer_id} ended the session", remote_code="session_ended")
        if isinstance(reply.value, dict) and "error" in reply.value:
            raise remote_error(reply.value, self.hop.peer_id)
        return reply

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tensors = [hidden.to(self.hop.dtype)] if mask is None else [hidden.to(self.hop.dtype), mask]
        sizes, payload = pack_tensors(tensors, self.chain.compression)
        request = self._request
        request["tensors"] = sizes
        reply = await self._exchange(request, payload)
        self.position = reply.value.get("position", -1)
        return _output(reply, self.hop, self.chain.limits).to(hidden.dtype)

    async def rollback(self, position: int) -> None:
        await self._exchange({"op": "rollback", "position": position})
        self.position = position

    async def close(self) -> None:
        """End the session (its cache is freed on the server)."""
        try:
            await self._call.aclose()
        except P2PError as e:
            _log.debug("closing the session with %s: %s", self.hop.peer_id.short(), e)


class ChainSession:
    """Inference sessions along a whole chain: ``step`` new tokens, ``rollback``, ``close``."""

    def __init__(self, hops: list[HopSession], *, max_length: int) -> None:
        self.hops = hops
        self.max_length = max_length
        self.position = 0

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    async def step(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run new tokens' hidden states through every hop; the last hop's output."""
        mask = _wire_mask(attention_mask)
        done: list[HopSession] = []
        try:
            for hop in self.hops:
                hidden = await hop.step(hidden, mask)
                done.append(hop)
        except ShardError:
            # the hops that ran the step forget it, so that the chain stays consistent
            position = self.position
            await asyncio.gather(*(h.rollback(position) for h in done), return_exceptions=True)
            raise
        self.position += hidden.shape[1]
        return hidden.clone()

    async def rollback(self, position: int) -> None:
        """Forget every token after the first ``position`` ones, on every hop."""
        await asyncio.gather(*(h.rollback(position) for h in self.hops))
        self.position = position

    async def close(self) -> None:
        await asyncio.gather(*(h.close() for h in self.hops))


def _wire_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as sent: booleans, and nothing at all when every token is real."""
    if attention_mask is None:
        return None
    mask = attention_mask.detach().cpu() != 0
    return None if bool(mask.all()) else mask


def _output(reply: RpcReply, hop: Hop, limits: ClientLimits) -> torch.Tensor:
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
