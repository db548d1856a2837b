"""What a shard server announces in the DHT, and reading it back.

Keys (the model is named by its manifest's ``model_id``, so servers of different weights
never share a key)::

    swarm/v1/models                     sub-key per server: ModelRecord (which model it serves)
    swarm/v1/<model_id>/block/<i>       sub-key per server: ServerRecord (one per block served)

Sub-keys are the servers' PeerIDs, so each entry is signed by its server and nobody else
can write or forge it (``dht._records``). Records expire after ``ServerLimits.record_ttl_s``
and are refreshed every ``announce_interval_s``; a newer announcement always carries a
later expiry, which is how the DHT picks it over an older copy.

A ``ServerRecord`` may carry two optional fields, written only when set (records without
them parse as before): ``rtts``, the round trips the server measured to other servers of
the model (routing uses them between hops), and ``moving_to``, the span a rebalancing
server is loading while it still serves its own (stored under the blocks of both).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import msgpack

from dht import DHT, DHTError, Record
from scheduler import ServerInfo, ServerState, SwarmSnapshot
from security import InvalidPeerId, PeerId
from transport import Multiaddr, MultiaddrError

from ._server_limits import ServerLimits

_log = logging.getLogger("model_shards.announce")

RECORD_VERSION = 1
MODELS_KEY = b"swarm/v1/models"
_MAX_ADDRS = 16
MAX_RTTS = 32
"""Most round trips a record carries (a reader keeps the first ``MAX_RTTS``)."""


def block_key(model_id: str, index: int) -> bytes:
    """The DHT key listing the servers of block ``index`` of model ``model_id``."""
    return f"swarm/v1/{model_id}/block/{index}".encode()


class InvalidRecord(ValueError):
    """A DHT value that is not a well-formed announcement (skipped by readers)."""


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """One server of one model as it announces itself, per block it serves."""

    peer_id: PeerId
    state: ServerState
    start: int
    end: int
    throughput: float
    """Block-tokens per second (``scheduler`` units)."""
    cache_tokens_left: int
    """Token slots (batch x length) a new session could still reserve over the whole span."""
    quantization: str
    dtype: str
    addrs: tuple[Multiaddr, ...]
    rtts: Mapping[PeerId, float] = field(default_factory=dict, hash=False)
    """Round trips (seconds) this server measured to other servers of the model, nearest
    or adjacent first (at most ``MAX_RTTS``); on the wire in milliseconds, optional."""
    moving_to: tuple[int, int] | None = None
    """While the server loads another span to move to (rebalancing): that span. It still
    serves ``[start, end)`` meanwhile; placement counts it on ``moving_to`` already."""

    def to_bytes(self) -> bytes:
        raw: dict[str, object] = {
            "v": RECORD_VERSION,
            "state": self.state.value,
            "span": [self.start, self.end],
            "throughput": float(self.throughput),
            "cache_tokens_left": self.cache_tokens_left,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "addrs": [addr.to_bytes() for addr in self.addrs[:_MAX_ADDRS]],
        }
        if self.rtts:
            rtts = list(self.rtts.items())[:MAX_RTTS]
            raw["rtts"] = {peer.to_bytes(): round(rtt * 1e3, 3) for peer, rtt in rtts}
        if self.moving_to is not None:
            raw["moving"] = list(self.moving_to)
        return msgpack.packb(raw)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Every block this record is stored under: its span, and the one it moves to."""
        blocks = set(range(self.start, self.end))
        if self.moving_to is not None:
            blocks.update(range(*self.moving_to))
        return tuple(sorted(blocks))

    @classmethod
    def from_bytes(cls, peer_id: PeerId, data: bytes) -> ServerRecord:
        """Parse an announcement (``InvalidRecord`` for anything malformed)."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if raw["v"] != RECORD_VERSION:
                raise InvalidRecord(f"record version {raw['v']!r}")
            start, end = raw["span"]
            record = cls(
                peer_id=peer_id,
                state=ServerState(raw["state"]),
                start=_int(start),
                end=_int(end),
                throughput=float(raw["throughput"]),
                cache_tokens_left=_int(raw["cache_tokens_left"]),
                quantization=str(raw["quantization"]),
                dtype=str(raw["dtype"]),
                addrs=tuple(Multiaddr.from_bytes(a) for a in raw["addrs"][:_MAX_ADDRS]),
                rtts=_rtts(raw.get("rtts", {})),
                moving_to=_span(raw["moving"]) if "moving" in raw else None,
            )
        except (
            ValueError,
            TypeError,
            KeyError,
            MultiaddrError,
            InvalidPeerId,
            msgpack.UnpackException,
        ) as e:
            raise InvalidRecord(f"announcement of {peer_id} is malformed: {e!r}") from e
        if not 0 <= record.start < record.end or not math.isfinite(record.throughput):
            raise InvalidRecord(f"announcement of {peer_id} has span/throughput out of range")
        if record.moving_to is not None and not 0 <= record.moving_to[0] < record.moving_to[1]:
            raise InvalidRecord(f"announcement of {peer_id} moves to an empty span")
        return record

    def server_info(self) -> ServerInfo:
        """This server as the scheduler sees it (peer key: the base58 PeerID)."""
        return ServerInfo(
            peer_id=str(self.peer_id),
            start=self.start,
            end=self.end,
            throughput=max(0.0, self.throughput),
            state=self.state,
            cache_tokens_left=max(0, self.cache_tokens_left),
            quantization=self.quantization,
            dtype=self.dtype,
            rtts={str(peer): rtt for peer, rtt in self.rtts.items()},
        )

    def planning_info(self) -> ServerInfo:
        """This server as placement and rebalancing see it: a server that is moving
        counts as joining its new span (its blocks are taken), no longer on its old one."""
        if self.moving_to is None:
            return self.server_info()
        start, end = self.moving_to
        return replace(self.server_info(), start=start, end=end, state=ServerState.JOINING)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """Which model a server serves: its id (manifest hash), display name and shape."""

    model_id: str
    short_name: str
    model_type: str
    num_blocks: int

    @property
    def display_name(self) -> str:
        return f"{self.short_name}@{self.model_id[:12]}"

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "v": RECORD_VERSION,
                "model": self.model_id,
                "name": self.short_name,
                "type": self.model_type,
                "blocks": self.num_blocks,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelRecord:
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if raw["v"] != RECORD_VERSION:
                raise InvalidRecord(f"record version {raw['v']!r}")
            record = cls(
                model_id=str(raw["model"]),
                short_name=str(raw["name"]),
                model_type=str(raw["type"]),
                num_blocks=_int(raw["blocks"]),
            )
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise InvalidRecord(f"model announcement is malformed: {e!r}") from e
        if record.num_blocks < 1:
            raise InvalidRecord(f"model announcement with {record.num_blocks} blocks")
        return record


def _int(value: object) -> int:
    if type(value) is not int:
        raise InvalidRecord(f"{value!r} is not an integer")
    return value


def _span(value: object) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise InvalidRecord(f"{value!r} is not a span [start, end]")
    return _int(value[0]), _int(value[1])


def _rtts(value: object) -> dict[PeerId, float]:
    """Round trips in milliseconds by PeerID bytes, as seconds by PeerID (first MAX_RTTS)."""
    if not isinstance(value, dict):
        raise InvalidRecord(f"rtts must be a map, got {type(value).__name__}")
    rtts = {}
    for peer, ms in list(value.items())[:MAX_RTTS]:
        if not isinstance(peer, bytes) or type(ms) not in (int, float):
            raise InvalidRecord(f"rtts entry {peer!r}: {ms!r} is not PeerID bytes: milliseconds")
        if not (math.isfinite(ms) and ms >= 0):
            raise InvalidRecord(f"rtt of {ms!r} ms is out of range")
        rtts[PeerId.from_bytes(peer)] = ms / 1e3
    return rtts


def _owned(found: Record | dict[bytes, Record] | None) -> dict[PeerId, Record]:
    if not isinstance(found, dict):
        return {}
    owned = {}
    for subkey, record in found.items():
        try:
            owned[PeerId.from_bytes(subkey)] = record
        except InvalidPeerId:
            continue
    return owned


async def read_servers(dht: DHT, model_id: str, num_blocks: int) -> dict[PeerId, ServerRecord]:
    """Every server announced for any block of the model, by PeerID (newest record each)."""
    found = await asyncio.gather(
        *(dht.get(block_key(model_id, index), latest=True) for index in range(num_blocks))
    )
    newest: dict[PeerId, Record] = {}
    for answer in found:
        for peer, record in _owned(answer).items():
            if peer not in newest or record.expiry > newest[peer].expiry:
                newest[peer] = record
    servers = {}
    for peer, record in newest.items():
        try:
            servers[peer] = ServerRecord.from_bytes(peer, record.value)
        except InvalidRecord as e:
            _log.debug("skipping %s", e)
    return servers


async def read_models(dht: DHT) -> dict[str, ModelRecord]:
    """Every model some server announced, by model id."""
    models = {}
    for record in _owned(await dht.get(MODELS_KEY, latest=True)).values():
        try:
            model = ModelRecord.from_bytes(record.value)
        except InvalidRecord as e:
            _log.debug("skipping %s", e)
            continue
        models[model.model_id] = model
    return models


def snapshot_of(
    num_blocks: int,
    servers: Iterable[ServerRecord],
    *,
    keep: Callable[[ServerRecord], bool],
    planning: bool = False,
) -> SwarmSnapshot:
    """The scheduler's view of the servers ``keep`` accepts (spans beyond the model dropped).

    Routing sees what each server serves now (``server_info``); with ``planning=True``,
    placement and rebalancing see a moving server on its new span (``planning_info``).
    """
    infos = [
        s.planning_info() if planning else s.server_info()
        for s in servers
        if max(s.blocks) < num_blocks and keep(s)
    ]
    return SwarmSnapshot(num_blocks, tuple(infos))


class Announcer:
    """Keeps one server's records in the DHT: every block of its span, and its model.

    ``announce(state)`` stores them now; ``run()`` refreshes them every
    ``ServerLimits.announce_interval_s`` with the state last announced. ``describe(state)``
    gives the record to store (it reads the server's live figures, e.g. cache room).
    """

    def __init__(
        self,
        dht: DHT,
        model: ModelRecord,
        describe: Callable[[ServerState], ServerRecord],
        limits: ServerLimits,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht = dht
        self.model = model
        self.limits = limits
        self.state = ServerState.JOINING
        self._describe = describe
        self._clock = clock
        self._last_expiry = 0.0

    async def announce(self, state: ServerState) -> ServerRecord:
        """Store the server's records with ``state`` (StoreFailed/DHTError when none stuck)."""
        self.state = state
        record = self._describe(state)
        expiry = max(self._clock() + self.limits.record_ttl_s, self._last_expiry + 1e-3)
        self._last_expiry = expiry
        value = record.to_bytes()
        me = self.dht.peer_id
        await asyncio.gather(
            self.dht.store(MODELS_KEY, self.model.to_bytes(), expiry, subkey=me),
            *(
                self.dht.store(block_key(self.model.model_id, i), value, expiry, subkey=me)
                for i in record.blocks
            ),
        )
        moving = "" if record.moving_to is None else f" moving to {list(record.moving_to)}"
        _log.info(
            "announced %s blocks [%d, %d)%s of %s",
            state.value,
            record.start,
            record.end,
            moving,
            self.model.display_name,
        )
        return record

    async def run(self) -> None:
        """Refresh the records until cancelled; a failed refresh is logged and retried."""
        while True:
            await asyncio.sleep(self.limits.announce_interval_s)
            try:
                await self.announce(self.state)
            except DHTError as e:
                _log.warning("refreshing the DHT records failed, retrying later: %s", e)


def describe_servers(servers: Mapping[PeerId, ServerRecord]) -> list[ServerRecord]:
    """Servers sorted by span, then PeerID (for tables)."""
    return sorted(servers.values(), key=lambda s: (s.start, s.end, str(s.peer_id)))
