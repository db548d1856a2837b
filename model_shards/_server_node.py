"""A shard server's life: pick a span, announce it, load it, serve it, rebalance, leave.

``ServerNode.start(host, dht, config)`` runs, in order: open the checkpoint and its
manifest (the model's name in the swarm), measure (or read the cached) throughput, choose
the span (``config.blocks``, or automatic placement), announce *joining*, load the span
checking every block against the manifest, serve it and announce *online*. Then, until
``stop()`` (which announces *offline* first, then drains the open sessions), three loops
run:

* the records are refreshed (``Announcer.run``);
* round trips to the model's other servers are measured (``Host.ping``) every
  ``PlacementLimits.ping_interval_s`` (jittered) and published in the records, those to
  the servers of the adjacent blocks first, then the nearest (``ServerRecord.rtts``);
* unless ``ServerConfig.rebalance`` is off, ``rebalance_once`` runs at jittered times
  (``scheduler.next_check_at``).

Automatic placement: ``scheduler.choose_span`` over what the DHT announces, announced as
joining; after ``PlacementLimits.settle_s`` (jittered) the swarm is read again and the
choice judged in ``scheduler.concurrent_view``: when a server of lower PeerID took the
same blocks at the same moment, this one chooses again (at most
``max_placement_rounds`` times).

A rebalancing move (``rebalance_once``): ``scheduler.should_move`` says where to (its
quality threshold is ``SchedulerSettings.quality_threshold``); after a random delay of up
to ``herd_delay_s`` the swarm is read again and the move goes on only if the decision
stands. The node then announces the move (its records keep the old span online and add
``moving_to``, which placement counts as joining), waits ``settle_s`` and checks the
decision again in ``concurrent_view`` (two servers that reacted to the same gap: the lower
PeerID goes). It loads only the blocks it lacks (``respan``: the overlap's modules are
kept) while the old span goes on serving, checks once more that every block it drops has
another online server (else it gives the move up: a server never uncovers a block),
announces *joining* on the new span, stops the old ``ShardServer`` (open sessions drain for
``ServerLimits.drain_timeout_s``, then get the typed shutting-down error so that their
clients fail over), serves the new span and announces *online*. The dropped blocks are
freed with the old server: memory follows the span.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dht import DHT, DHTError
from p2p import Host, P2PError
from scheduler import (
    DEFAULT_SETTINGS,
    MoveDecision,
    SchedulerSettings,
    ServerState,
    SwarmSnapshot,
    choose_span,
    concurrent_view,
    next_check_at,
    should_move,
)
from security import PeerId

from ._announce import Announcer, ModelRecord, ServerRecord, read_servers, snapshot_of
from ._checkpoint import Checkpoint
from ._dtypes import compute_dtype, dtype_name, resolve_device
from ._errors import ShardError
from ._manifest import Manifest, load_manifest
from ._progress import Progress
from ._quant import Quantization, resolve_quantization
from ._server import ShardServer
from ._server_limits import ServerLimits
from ._server_throughput import throughput_for
from ._span import Span, load_span, respan

_log = logging.getLogger("model_shards.node")

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PlacementLimits:
    """Timers and bounds of placement, rebalancing and round-trip measurement."""

    scheduler: SchedulerSettings = DEFAULT_SETTINGS
    """``quality_threshold`` of a move, and the period and jitter of rebalancing checks
    (``rebalance_period_s``, ``rebalance_jitter``)."""
    herd_delay_s: float = 5.0
    """After deciding to move: wait a random time up to this, read the swarm again, and
    move only if the decision stands (another server may have taken the gap)."""
    settle_s: float = 2.0
    """After announcing a span about to be loaded (joining, or a move): wait between this
    and twice this, then read the swarm again to see who chose at the same moment."""
    max_placement_rounds: int = 3
    """Most times a joining server chooses its span (others took the first choice)."""
    ping_interval_s: float = 60.0
    """Mean time between two rounds of round-trip measurements."""
    ping_jitter: float = 0.5
    """Each interval is drawn in ``ping_interval_s * (1 ± ping_jitter)``."""
    ping_peers: int = 16
    """Most servers pinged per round: those of the adjacent blocks first."""
    published_rtts: int = 8
    """Most round trips published in the records (adjacent blocks first, then nearest)."""

    def __post_init__(self) -> None:
        for name in ("herd_delay_s", "settle_s", "ping_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PlacementLimits.{name}={value} must be finite and >= 0")
        if self.ping_interval_s <= 0:
            raise ValueError(f"PlacementLimits.ping_interval_s={self.ping_interval_s} must be > 0")
        if not 0.0 <= self.ping_jitter < 1.0:
            raise ValueError(f"PlacementLimits.ping_jitter={self.ping_jitter} must be in [0, 1)")
        for name in ("max_placement_rounds", "ping_peers", "published_rtts"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlacementLimits.{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What a shard server serves and how."""

    model: str | os.PathLike[str]
    """Checkpoint directory, or a Hub name already in the local Hugging Face cache."""
    blocks: tuple[int, int] | None = None
    """The span ``(start, end)``; None picks one with ``scheduler.choose_span``."""
    num_blocks: int | None = None
    """With automatic placement: how many blocks to take (None: the whole model)."""
    quantization: str | None = None
    """``none``, ``int8``, ``nf4``; None: nf4 on CUDA, none on CPU."""
    dtype: str | None = None
    device: str | None = None
    torch_threads: int | None = None
    hf_cache_dir: Path | None = None
    swarm_cache_dir: Path | None = None
    """Where measured throughputs are cached (default ``~/.cache/swarm``)."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    rebalance: bool = True
    """Move to other blocks when the swarm needs it (``PlacementLimits`` times it)."""
    placement: PlacementLimits = field(default_factory=PlacementLimits)


@dataclass(frozen=True, slots=True)
class Move:
    """One rebalancing move a node made."""

    from_span: tuple[int, int]
    to_span: tuple[int, int]
    loaded: tuple[int, ...]
    """Blocks read from the checkpoint."""
    kept: tuple[int, ...]
    """Blocks already loaded and kept (the overlap of the two spans)."""
    seconds: float
    """From the decision to serving the new span."""


@dataclass(frozen=True, slots=True)
class _Model:
    """What a node serves and computes with, settled before the span is chosen."""

    checkpoint: Checkpoint
    manifest: Manifest
    record: ModelRecord
    throughput: float
    dtype: torch.dtype
    device: torch.device
    quantization: Quantization


class ServerNode:
    """A running shard server, its announcements and its loops; built by ``start``."""

    def __init__(
        self,
        host: Host,
        dht: DHT,
        config: ServerConfig,
        model: _Model,
        span: tuple[int, int],
        *,
        rng: random.Random,
        clock: Callable[[], float],
        sleep: Sleep,
        progress: Callable[[str], Progress] | None,
    ) -> None:
        self.host = host
        self.dht = dht
        self.config = config
        self.model = model
        self.moves: list[Move] = []
        """Every rebalancing move made, oldest first."""
        self.placements: list[tuple[int, int]] = []
        """Every span automatic placement announced, in order (the last one was taken)."""
        self.rtts: dict[PeerId, float] = {}
        """Last round trip (s) measured to each server of the model."""
        self.announcer = Announcer(dht, model.record, self._describe, config.limits)
        self._server: ShardServer | None = None
        self._span = span
        self._moving_to: tuple[int, int] | None = None
        self._adjacent: set[PeerId] = set()
        self._rng = rng
        self._clock = clock
        self._sleep = sleep
        self._progress = progress
        self._tasks: list[asyncio.Task[Any]] = []
        self._lock = asyncio.Lock()
        self._switching: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def server(self) -> ShardServer:
        """The ``ShardServer`` of the span served now (a move replaces it)."""
        assert self._server is not None, "the node serves no span yet"
        return self._server

    @property
    def span(self) -> tuple[int, int]:
        return self.server.span.start, self.server.span.end

    @classmethod
    async def start(
        cls,
        host: Host,
        dht: DHT,
        config: ServerConfig,
        *,
        progress: Callable[[str], Progress] | None = None,
        on_joining: Callable[[ServerRecord], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> ServerNode:
        """Load, serve and announce a span; ``progress(what)`` makes a progress callback.

        ``rng``, ``clock`` and ``sleep`` time the jittered waits and loops (tests pass
        their own).
        """
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        model = await _open_model(config, progress)
        num_blocks = model.manifest.num_blocks
        if config.blocks is not None:
            start, end = config.blocks
            if not 0 <= start < end <= num_blocks:
                raise ValueError(
                    f"blocks {start}:{end} are not inside the model's {num_blocks} blocks"
                )
        else:
            start, end = 0, min(config.num_blocks or num_blocks, num_blocks)
        node = cls(
            host,
            dht,
            config,
            model,
            (start, end),
            rng=rng or random.Random(),
            clock=clock,
            sleep=sleep,
            progress=progress,
        )
        try:
            if config.blocks is None:
                await node._place(on_joining)
            else:
                joining = await node.announcer.announce(ServerState.JOINING)
                if on_joining is not None:
                    on_joining(joining)
            start, end = node._span
            _log.info("loading blocks [%d, %d) of %s", start, end, model.manifest.display_name)
            span = await asyncio.to_thread(
                load_span,
                model.checkpoint,
                start,
                end,
                dtype=model.dtype,
                quantization=model.quantization,
                device=model.device,
                manifest=model.manifest,
                limits=config.limits.request,
                progress=node._progress_for(f"loading blocks {start}:{end}"),
            )
            node._server = node._shard_server(span)
            node._server.start()
            await node.announcer.announce(ServerState.ONLINE)
        except BaseException:
            # the blocks were announced as being loaded: take the announcement back
            await asyncio.shield(_withdraw(node.announcer))
            raise
        loop = asyncio.get_running_loop()
        node._tasks.append(loop.create_task(node.announcer.run()))
        node._tasks.append(loop.create_task(node._measure_loop()))
        if config.rebalance:
            node._tasks.append(loop.create_task(node._rebalance_loop()))
        return node

    async def stop(self) -> None:
        """Announce offline, drain the open sessions, stop serving (the Host keeps running)."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:  # a span switch in flight ends first
            self._moving_to = None
            await _withdraw(self.announcer)
            await self.server.stop()

    # -- records ---------------------------------------------------------------------------

    def _describe(self, state: ServerState) -> ServerRecord:
        """The record to announce: the span, the move under way, the round trips."""
        start, end = self._span
        server = self._server
        if server is not None and (server.span.start, server.span.end) == self._span:
            record = server.describe(state)
        else:
            model = self.model
            record = ServerRecord(
                peer_id=self.host.peer_id,
                state=state,
                start=start,
                end=end,
                throughput=model.throughput,
                cache_tokens_left=0,
                quantization=str(model.quantization),
                dtype=dtype_name(model.dtype),
                addrs=tuple(self.host.addrs),
            )
        return replace(record, rtts=self._published_rtts(), moving_to=self._moving_to)

    def _published_rtts(self) -> dict[PeerId, float]:
        """The round trips to publish: the adjacent blocks' servers first, then the nearest."""
        ranked = sorted(self.rtts.items(), key=lambda kv: (kv[0] not in self._adjacent, kv[1]))
        return dict(ranked[: self.config.placement.published_rtts])

    async def _read(self) -> dict[PeerId, ServerRecord]:
        return await read_servers(
            self.dht, self.model.manifest.model_id, self.model.record.num_blocks
        )

    def _planning(self, servers: dict[PeerId, ServerRecord]) -> SwarmSnapshot:
        """The swarm as placement sees it; this node online on the span it serves now (not
        as announced: a move it announced is judged from where it stands)."""
        me = self.host.peer_id
        snapshot = snapshot_of(
            self.model.record.num_blocks,
            servers.values(),
            keep=lambda s: s.peer_id != me and s.state is not ServerState.OFFLINE,
            planning=True,
        )
        if self._server is None:
            return snapshot
        serving = replace(self._describe(ServerState.ONLINE), moving_to=None)
        return snapshot.with_server(serving.planning_info())

    # -- placement -------------------------------------------------------------------------

    async def _place(self, on_joining: Callable[[ServerRecord], None] | None) -> None:
        """Choose the span, announce it as joining, and choose again while servers of
        lower PeerID took the same blocks at the same moment."""
        limits = self.config.placement
        me = str(self.host.peer_id)
        length = self._span[1] - self._span[0]
        try:
            earlier = self._planning(await self._read())
        except DHTError as e:
            _log.warning("could not read the swarm's servers, placing as if alone: %s", e)
            earlier = SwarmSnapshot(self.model.record.num_blocks)
        span = choose_span(earlier, length, self.model.throughput)
        for round_ in range(1, limits.max_placement_rounds + 1):
            self._span = span
            self.placements.append(span)
            record = await self.announcer.announce(ServerState.JOINING)
            if on_joining is not None:
                on_joining(record)
            _log.info(
                "automatic placement: blocks [%d, %d) of %d (%d other server(s) announced)",
                *span,
                earlier.num_blocks,
                len(earlier),
            )
            if round_ == limits.max_placement_rounds:
                break
            await self._sleep(limits.settle_s * (1.0 + self._rng.random()))
            try:
                now = self._planning(await self._read())
            except DHTError as e:
                _log.warning("could not read the swarm again, keeping blocks %s: %s", span, e)
                break
            again = choose_span(
                concurrent_view(now, earlier, me).without(me), length, self.model.throughput
            )
            if again == span:
                break
            _log.info("blocks [%d, %d) were taken at the same moment; choosing again", *span)
            earlier, span = now, again

    # -- rebalancing -----------------------------------------------------------------------

    async def _rebalance_loop(self) -> None:
        settings = self.config.placement.scheduler
        while True:
            at = next_check_at(self._clock(), self._rng, settings)
            await self._sleep(max(0.0, at - self._clock()))
            try:
                await self.rebalance_once()
            except (DHTError, ShardError) as e:
                _log.warning("rebalancing check failed, trying again later: %s", e)

    async def rebalance_once(self) -> Move | None:
        """One rebalancing check, and the move it calls for (None: the node stays)."""
        limits = self.config.placement
        settings = limits.scheduler
        me = str(self.host.peer_id)
        decision = should_move(self._planning(await self._read()), me, settings)
        if decision is None:
            return None
        started = self._clock()
        _log.info(
            "rebalancing: moving [%d, %d) -> [%d, %d) would raise the swarm's minimum "
            "per-block throughput from %.0f to %.0f",
            *decision.from_span,
            *decision.span,
            decision.min_before,
            decision.min_after,
        )
        await self._sleep(limits.herd_delay_s * self._rng.random())
        earlier = self._planning(await self._read())
        if not _same_move(should_move(earlier, me, settings), decision):
            _log.info("rebalancing: the swarm changed meanwhile; staying on [%d, %d)", *self.span)
            return None
        self._moving_to = decision.span
        try:
            await self.announcer.announce(ServerState.ONLINE)
            await self._sleep(limits.settle_s * (1.0 + self._rng.random()))
            view = concurrent_view(self._planning(await self._read()), earlier, me)
            if not _same_move(should_move(view, me, settings), decision):
                _log.info("rebalancing: another server took blocks [%d, %d) first", *decision.span)
                return None
            old = self.server.span
            new = await asyncio.to_thread(
                respan,
                old,
                self.model.checkpoint,
                *decision.span,
                manifest=self.model.manifest,
                progress=self._progress_for(f"loading blocks {decision.start}:{decision.end}"),
            )
            uncovered = _uncovered_if_left(self._planning(await self._read()), me, decision)
            if uncovered:
                _log.info(
                    "rebalancing: block(s) %s would have no other online server; staying",
                    uncovered,
                )
                return None
            self._switching = asyncio.ensure_future(self._switch(new))
            await asyncio.shield(self._switching)
        finally:
            if self._moving_to is not None and not self._stopped:
                self._moving_to = None
                await self._announce_quietly(ServerState.ONLINE)
        kept = tuple(b for b in range(new.start, new.end) if old.start <= b < old.end)
        move = Move(
            from_span=(old.start, old.end),
            to_span=(new.start, new.end),
            loaded=tuple(b for b in range(new.start, new.end) if b not in kept),
            kept=kept,
            seconds=self._clock() - started,
        )
        self.moves.append(move)
        _log.info(
            "rebalancing: now serving blocks [%d, %d) (%d loaded, %d kept) after %.1fs",
            *move.to_span,
            len(move.loaded),
            len(move.kept),
            move.seconds,
        )
        return move

    async def _switch(self, span: Span) -> None:
        """Serve ``span`` instead of the current one: announce it joining, drain and stop
        the old server, start the new one, announce online. Runs to the end once begun."""
        async with self._lock:
            if self._stopped:
                return
            old = self.server
            self._span, self._moving_to = (span.start, span.end), None
            await self._announce_quietly(ServerState.JOINING)
            new = self._shard_server(span)
            await old.stop()
            self._server = new
            new.start()
            await self._announce_quietly(ServerState.ONLINE)

    async def _announce_quietly(self, state: ServerState) -> None:
        """Announce ``state``; a failure is logged (the refresh loop stores it later)."""
        try:
            await self.announcer.announce(state)
        except DHTError as e:
            _log.warning("announcing %s failed, the next refresh will: %s", state.value, e)

    def _shard_server(self, span: Span) -> ShardServer:
        return ShardServer(
            self.host,
            span,
            self.model.manifest,
            throughput=self.model.throughput,
            limits=self.config.limits,
            torch_threads=self.config.torch_threads,
        )

    def _progress_for(self, what: str) -> Progress | None:
        return None if self._progress is None else self._progress(what)

    # -- round trips -----------------------------------------------------------------------

    async def _measure_loop(self) -> None:
        """Measure round trips now and then; announce at once when the set of servers
        published changes (a new neighbour), else let the refreshes carry new values."""
        limits = self.config.placement
        announced: set[PeerId] = set()
        while True:
            try:
                published = set(await self.measure_rtts())
                if published != announced:
                    await self.announcer.announce(self.announcer.state)
                    announced = published
            except DHTError as e:
                _log.warning("measuring round trips failed, trying again later: %s", e)
            spread = limits.ping_jitter * (2.0 * self._rng.random() - 1.0)
            await self._sleep(limits.ping_interval_s * (1.0 + spread))

    async def measure_rtts(self) -> dict[PeerId, float]:
        """Ping the model's other servers (adjacent blocks first, at most
        ``PlacementLimits.ping_peers``) and keep their round trips; the result is what
        the records publish next."""
        servers = await self._read()
        me = self.host.peer_id
        start, end = self.span
        others = [
            s for s in servers.values() if s.peer_id != me and s.state is not ServerState.OFFLINE
        ]
        adjacent = {
            s.peer_id for s in others if s.start <= start - 1 < s.end or s.start <= end < s.end
        }
        self._rng.shuffle(others)
        others.sort(key=lambda s: s.peer_id not in adjacent)
        chosen = others[: self.config.placement.ping_peers]

        async def ping(record: ServerRecord) -> None:
            self.host.peerstore.add_addrs(record.peer_id, record.addrs)
            try:
                self.rtts[record.peer_id] = await self.host.ping(record.peer_id)
            except P2PError as e:
                _log.debug("server %s did not answer a ping: %s", record.peer_id.short(), e)
                self.rtts.pop(record.peer_id, None)

        await asyncio.gather(*(ping(record) for record in chosen))
        for peer in [p for p in self.rtts if p not in servers]:
            del self.rtts[peer]
        self._adjacent = adjacent
        return self._published_rtts()


def _same_move(decision: MoveDecision | None, expected: MoveDecision) -> bool:
    return decision is not None and decision.span == expected.span


def _uncovered_if_left(snapshot: SwarmSnapshot, me: str, move: MoveDecision) -> list[int]:
    """Blocks ``move`` drops that no other online server serves in ``snapshot``."""
    dropped = [b for b in range(move.from_start, move.from_end) if not move.start <= b < move.end]
    return [
        block
        for block in dropped
        if not any(
            s.state is ServerState.ONLINE and s.covers(block) and s.peer_id != me
            for s in snapshot.servers
        )
    ]


async def _open_model(config: ServerConfig, progress: Callable[[str], Progress] | None) -> _Model:
    """Open the checkpoint, its manifest, and the throughput of this device on it."""
    checkpoint = await asyncio.to_thread(
        Checkpoint.open, config.model, cache_dir=config.hf_cache_dir
    )
    manifest = await asyncio.to_thread(
        load_manifest,
        checkpoint,
        progress=None if progress is None else progress("hashing the checkpoint"),
    )
    device = resolve_device(config.device)
    dtype = compute_dtype(config.dtype, device)
    quantization = resolve_quantization(config.quantization, device)
    throughput = await asyncio.to_thread(
        throughput_for,
        checkpoint,
        manifest.model_id,
        dtype=dtype,
        device=device,
        quantization=quantization,
        cache_dir=config.swarm_cache_dir,
    )
    record = ModelRecord(
        model_id=manifest.model_id,
        short_name=manifest.short_name,
        model_type=manifest.model_type,
        num_blocks=manifest.num_blocks,
    )
    return _Model(checkpoint, manifest, record, throughput, dtype, device, quantization)


async def _withdraw(announcer: Announcer) -> None:
    try:
        await announcer.announce(ServerState.OFFLINE)
    except DHTError as e:
        _log.warning("could not announce going offline: %s", e)
