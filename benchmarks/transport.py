"""Transport benchmark: Swarm's QUIC and TCP against raw baselines and py-libp2p.

Usage::

    .venv/bin/python benchmarks/transport.py [--quick] [--only raw,swarm,pylibp2p] [--rounds N]

Each configuration runs its server and its client in one process and one event loop,
on 127.0.0.1 (py-libp2p, trio based, runs both its hosts in one subprocess of
``tests/interop/pylibp2p_peer.py bench``): every figure is the CPU cost of both ends on
one core, the same for every stack, and is not at the mercy of process wake-ups on a
busy 2-core machine. The machine is shared, so each raw baseline runs interleaved with
the Swarm configuration it is compared with: both are connected at once and measured in
alternating slices (connections one by one, round trips in 10 blocks, bulk transfers in
2 slices, 8 for a full run), so that the load of other programs hits both alike.
Per configuration:

* set-up: median time to open one new authenticated connection (Swarm: ``Transport.dial``,
  with the libp2p certificate check; TCP: multistream, TLS 1.3, multistream, yamux);
* round trip: median of ``round_trips`` (>= 500) exchanges of 64-byte messages on an
  open connection, after a 5% warm-up ("RTT CPU": mean CPU time of the process per
  exchange, both ends). Raw and py-libp2p: echo on one open stream.
  Swarm: ``Host.rpc_call`` (a new stream per call, lazily negotiated, framed), and, in
  the "stream RTT" column, echo on one open Host stream;
* bulk (and "MiB/CPU-s": bytes per CPU-second of the process, both ends, one stream):
  upload of ``bulk_bytes`` (256 MiB, 64 MiB with ``--quick``) to sinks that answer the
  byte count after reading end of stream, over one stream at a time and split over 4
  parallel streams (raw TLS: 4 TLS connections, having no multiplexer); 64 KiB writes;
  throughput = bytes / time from the first write to the counts' arrival. A transfer
  stops early once it has run ``bulk_cap_s`` (40 s, 6 s with ``--quick``, shared by its
  slices), so that slow stacks and a loaded machine still finish; the table shows the
  MiB moved. Raw TLS is never cut short (asyncio's TLS cannot half-close, so its sink is
  told the length up front); it takes about a second.

Baselines: raw aioquic (``aioquic.asyncio`` serve/connect with plain echo and sink stream
handlers, tuned as Swarm's QUIC is by ``QuicLimits``: flow-control windows, datagram size,
congestion controller, UDP buffer sizes, send-buffer back-pressure), raw asyncio TLS 1.3
over TCP with a throwaway self-signed certificate, and py-libp2p 0.8.1 (QUIC; TCP with TLS
and with noise; yamux).

The table goes to stdout; the LAST line is one JSON object with every figure and the
ratios, whose directions the legend above it states.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path and its name would
# shadow the ``transport`` package: look the project's packages up from the root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from aioquic.asyncio import QuicConnectionProtocol  # noqa: E402
from aioquic.asyncio import connect as quic_connect  # noqa: E402
from aioquic.asyncio import serve as quic_serve  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

from p2p import Host, RpcContext, RpcReply  # noqa: E402
from security import KeyPair, PeerId, make_tls_certificate  # noqa: E402
from transport import (  # noqa: E402
    Multiaddr,
    QuicLimits,
    QuicTransport,
    Stream,
    TcpTransport,
    Transport,
)

PYLIBP2P_PEER = ROOT / "tests" / "interop" / "pylibp2p_peer.py"
MIB = 1024 * 1024
MODE_ECHO = b"E"
MODE_SINK = b"S"
ECHO_PROTOCOL = "/swarm/echo/1.0.0"
SINK_PROTOCOL = "/swarm/sink/1.0.0"
RPC_ECHO_PROTOCOL = "/swarm/bench/rpc-echo/1.0.0"
LISTEN = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}
READ_CHUNK = 65536
COUNT_BYTES = 8

GOALS = {
    "quic_rtt_ratio": ("<=", 1.3),
    "quic_bulk_ratio": (">=", 0.8),
    "tcp_rtt_ratio": ("<=", 1.3),
    "tcp_bulk_ratio": (">=", 0.8),
    "quic_rtt_vs_pylibp2p": ("<=", 0.5),
    "quic_bulk_vs_pylibp2p": (">=", 4.0),
    "tcp_rtt_vs_pylibp2p": ("<=", 0.5),
    "tcp_bulk_vs_pylibp2p": (">=", 4.0),
}
"""The targets: Swarm within 30% of raw RTT and 80% of raw bulk; vs py-libp2p at least
2x lower RTT and 4x higher bulk."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures; ``--quick`` shrinks the bulk sizes and counts."""

    connects: int
    round_trips: int
    message_bytes: int
    bulk_bytes: int
    bulk_slices: int
    bulk_cap_s: float
    streams: int
    chunk_bytes: int
    pylibp2p_connects: int
    pylibp2p_timeout_s: float

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        return cls(
            connects=10 if quick else 20,
            round_trips=500 if quick else 2000,
            message_bytes=64,
            bulk_bytes=(64 if quick else 256) * MIB,
            bulk_slices=BULK_SLICES_QUICK if quick else BULK_SLICES_FULL,
            bulk_cap_s=6.0 if quick else 40.0,
            streams=4,
            chunk_bytes=64 * 1024,
            pylibp2p_connects=3,
            pylibp2p_timeout_s=300.0,
        )


@dataclass(slots=True)
class Result:
    """The figures of one configuration (seconds and bytes per second)."""

    name: str
    connect_s: float | None = None
    rtt_s: float | None = None
    rtt_cpu_s: float | None = None
    stream_rtt_s: float | None = None
    bulk_bps: dict[int, float] = field(default_factory=dict)
    bulk_cpu_bps: dict[int, float] = field(default_factory=dict)
    bulk_moved: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def merge_best(self, other: Result) -> None:
        """Keep the best of two rounds: fastest set-up and round trips, highest bulk."""
        self.connect_s = best(min, self.connect_s, other.connect_s)
        self.rtt_s = best(min, self.rtt_s, other.rtt_s)
        self.rtt_cpu_s = best(min, self.rtt_cpu_s, other.rtt_cpu_s)
        self.stream_rtt_s = best(min, self.stream_rtt_s, other.stream_rtt_s)
        for streams, bps in other.bulk_bps.items():
            if bps > self.bulk_bps.get(streams, 0.0):
                self.bulk_bps[streams] = bps
                self.bulk_moved[streams] = other.bulk_moved[streams]
        for streams, bps in other.bulk_cpu_bps.items():
            self.bulk_cpu_bps[streams] = max(bps, self.bulk_cpu_bps.get(streams, 0.0))
        self.notes += [note for note in other.notes if note not in self.notes]

    def as_json(self) -> dict[str, Any]:
        return {
            "connect_s": self.connect_s,
            "rtt_s": self.rtt_s,
            "rtt_cpu_s": self.rtt_cpu_s,
            "stream_rtt_s": self.stream_rtt_s,
            "bulk_mib_s": {str(k): v / MIB for k, v in self.bulk_bps.items()},
            "bulk_mib_per_cpu_s": {str(k): v / MIB for k, v in self.bulk_cpu_bps.items()},
            "bulk_mib_moved": {str(k): v / MIB for k, v in self.bulk_moved.items()},
            "notes": self.notes,
        }


def best(pick: Callable[[float, float], float], a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return a if b is None else b
    return pick(a, b)


class Pipe(Protocol):
    """The client side of one echo or sink stream."""

    async def write(self, data: bytes) -> None: ...

    async def readexactly(self, n: int) -> bytes: ...

    async def close_write(self) -> None: ...

    async def close(self) -> None: ...


Call = Callable[[bytes], Awaitable[bytes]]
"""One request/response exchange: send the bytes, return the answer."""


@dataclass(slots=True)
class Env:
    """One configuration, connected and ready to measure (server and client in this loop)."""

    key: str
    name: str
    connect_once: Callable[[], Awaitable[float]]
    """Opens and closes one new connection; returns the seconds it took to open."""
    call: Call
    """The round trip compared across stacks (Swarm: ``Host.rpc_call``)."""
    open_sink: Callable[[int], Awaitable[Pipe]]
    """Opens a sink stream for a transfer of the given length."""
    stream_call: Call | None = None
    """Swarm only: echo on one open Host stream."""
    cap_transfers: bool = True
    """False where the sink needs the length up front (raw TLS cannot half-close)."""


# ---------------------------------------------------------------- measurements
#
# The machine is shared: other programs' load comes and goes within seconds. Each
# baseline is therefore measured interleaved with the Swarm configuration it is compared
# with, in short alternating slices, so that a load spike hits both alike.

RTT_BLOCKS = 10
BULK_SLICES_QUICK = 2
BULK_SLICES_FULL = 8


async def measure_connects(envs: list[Env], plan: Plan, results: dict[str, Result]) -> None:
    samples: dict[str, list[float]] = {env.key: [] for env in envs}
    for i in range(plan.connects):
        for env in rotate(envs, i):
            samples[env.key].append(await env.connect_once())
    for env in envs:
        results[env.key].connect_s = statistics.median(samples[env.key])


def rotate(envs: list[Env], i: int) -> list[Env]:
    """The alternation order of slice ``i``: who goes first changes every slice."""
    k = i % len(envs)
    return envs[k:] + envs[:k]


async def round_trip_block(call: Call, payload: bytes, count: int) -> tuple[list[float], float]:
    """``count`` exchanges: their seconds each, and the CPU seconds all took."""
    rtts: list[float] = []
    cpu_start = time.process_time()
    for _ in range(count):
        start = time.perf_counter()
        answer = await call(payload)
        rtts.append(time.perf_counter() - start)
        if answer != payload:
            raise RuntimeError(f"echo answered {len(answer)} other bytes to {len(payload)}")
    return rtts, time.process_time() - cpu_start


async def measure_round_trips(envs: list[Env], plan: Plan, results: dict[str, Result]) -> None:
    """Median of ``plan.round_trips`` exchanges per call (after a 5% warm-up), in
    ``RTT_BLOCKS`` alternating blocks, and the mean CPU time of one exchange."""
    payload = secrets.token_bytes(plan.message_bytes)
    calls = [(env.key, "rtt", env.call) for env in envs]
    calls += [(env.key, "stream", env.stream_call) for env in envs if env.stream_call]
    samples: dict[tuple[str, str], list[float]] = {(k, w): [] for k, w, _ in calls}
    cpu: dict[tuple[str, str], float] = dict.fromkeys(samples, 0.0)
    for _, _, call in calls:
        await round_trip_block(call, payload, max(10, plan.round_trips // 20))
    per_block = max(1, plan.round_trips // RTT_BLOCKS)
    for i in range(RTT_BLOCKS):
        k = i % len(calls)
        for key, what, call in calls[k:] + calls[:k]:
            rtts, cpu_s = await round_trip_block(call, payload, per_block)
            samples[key, what] += rtts
            cpu[key, what] += cpu_s
    for key, what, _ in calls:
        median = statistics.median(samples[key, what])
        if what == "rtt":
            results[key].rtt_s = results[key].stream_rtt_s = median
            results[key].rtt_cpu_s = cpu[key, what] / len(samples[key, what])
    for key, what, _ in calls:
        if what == "stream":
            results[key].stream_rtt_s = statistics.median(samples[key, what])


async def bulk_slice(
    env: Env, total: int, streams: int, chunk: int, cap_s: float | None
) -> tuple[int, float, float]:
    """Upload ``total`` bytes split over ``streams`` parallel sink streams, each stopping
    early after ``cap_s`` seconds: bytes moved, wall seconds, CPU seconds (both ends)."""
    share = total // streams
    pipes = [await env.open_sink(share) for _ in range(streams)]
    block = secrets.token_bytes(chunk)
    start, cpu_start = time.perf_counter(), time.process_time()
    stop_at = None if cap_s is None or not env.cap_transfers else start + cap_s

    async def send(pipe: Pipe) -> int:
        sent = 0
        while sent < share and (stop_at is None or time.perf_counter() < stop_at):
            n = min(chunk, share - sent)
            await pipe.write(block if n == chunk else block[:n])
            sent += n
        await pipe.close_write()
        count = int.from_bytes(await pipe.readexactly(COUNT_BYTES), "big")
        if count != sent:
            raise RuntimeError(f"{env.name}: sink counted {count} bytes, {sent} were sent")
        await pipe.close()
        return sent

    moved = sum(await asyncio.gather(*(send(p) for p in pipes)))
    return moved, time.perf_counter() - start, time.process_time() - cpu_start


async def measure_bulk(envs: list[Env], plan: Plan, results: dict[str, Result]) -> None:
    """Bulk over 1 and ``plan.streams`` streams, each transfer cut in alternating slices;
    throughput = bytes of all slices / their time."""
    slices = plan.bulk_slices
    for streams in (1, plan.streams):
        moved = dict.fromkeys((env.key for env in envs), 0)
        wall = dict.fromkeys(moved, 0.0)
        cpu = dict.fromkeys(moved, 0.0)
        for i in range(slices):
            for env in rotate(envs, i):
                n, w, c = await bulk_slice(
                    env,
                    plan.bulk_bytes // slices,
                    streams,
                    plan.chunk_bytes,
                    plan.bulk_cap_s / slices,
                )
                moved[env.key] += n
                wall[env.key] += w
                cpu[env.key] += c
        for env in envs:
            result = results[env.key]
            result.bulk_moved[streams] = moved[env.key]
            result.bulk_bps[streams] = moved[env.key] / wall[env.key]
            result.bulk_cpu_bps[streams] = moved[env.key] / cpu[env.key]


async def measure_pair(envs: list[Env], plan: Plan) -> dict[str, Result]:
    results = {env.key: Result(env.name) for env in envs}
    await measure_connects(envs, plan, results)
    await measure_round_trips(envs, plan, results)
    await measure_bulk(envs, plan, results)
    return results


async def serve_stream(
    read: Callable[[int], Awaitable[bytes]],
    write: Callable[[bytes], Awaitable[None]],
    mode: bytes,
) -> None:
    """Server side: echo every byte back, or count bytes to end of stream and answer."""
    total = 0
    while chunk := await read(READ_CHUNK):
        if mode == MODE_ECHO:
            await write(chunk)
        else:
            total += len(chunk)
    if mode == MODE_SINK:
        await write(total.to_bytes(COUNT_BYTES, "big"))


class TaskSet:
    """Server tasks of one configuration, cancelled together at its end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            print(f"benchmark server task failed: {exc!r}", file=sys.stderr)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def echo_call(pipe: Pipe) -> Call:
    async def call(payload: bytes) -> bytes:
        await pipe.write(payload)
        return await pipe.readexactly(len(payload))

    return call


# ---------------------------------------------------------------- raw aioquic


def raw_quic_configuration(is_client: bool) -> QuicConfiguration:
    """aioquic with Swarm's QUIC tuning (``QuicLimits``), for a like-for-like baseline:
    the same flow-control windows, largest datagram and congestion controller."""
    limits = QuicLimits()
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=["swarm-bench"],
        verify_mode=ssl.CERT_NONE,
        max_data=limits.max_data_bytes,
        max_stream_data=limits.max_stream_data_bytes,
        max_datagram_size=limits.max_datagram_bytes,
        congestion_control_algorithm=limits.congestion_control,
    )
    if not is_client:
        cert = make_tls_certificate(KeyPair.generate())
        config.certificate = cert.certificate
        config.private_key = cert.private_key
    return config


def size_udp_buffers(sock: socket.socket) -> None:
    """Give an aioquic socket the UDP buffer sizes Swarm's QUIC sockets ask for (the
    kernel caps both at net.core.{r,w}mem_max)."""
    size = QuicLimits().udp_buffer_bytes
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def quic_socket(proto: Any) -> socket.socket:
    """The UDP socket of an aioquic server or client protocol (aioquic keeps it private)."""
    return proto._transport.get_extra_info("socket")


class AckedQuicProtocol(QuicConnectionProtocol):
    """aioquic's client protocol, with an event set whenever a datagram (ACKs) arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self.received.set()


class QuicPipe:
    """A ``Pipe`` over an aioquic stream, with Swarm's send-buffer back-pressure.

    aioquic's asyncio writer never pushes back: it would queue a whole bulk transfer at
    once. Like ``QuicLimits.stream_send_buffer_bytes`` in Swarm, a write waits while
    the stream holds that much unacknowledged data, until half of it is acknowledged
    (aioquic keeps the count private).
    """

    def __init__(self, proto: AckedQuicProtocol, reader: asyncio.StreamReader, writer: Any):
        self._proto = proto
        self._sender = proto._quic._streams[writer.get_extra_info("stream_id")].sender
        self._reader = reader
        self._writer = writer
        self._high = QuicLimits().stream_send_buffer_bytes

    def _buffered(self) -> int:
        return self._sender._buffer_stop - self._sender._buffer_start

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        if self._buffered() >= self._high:
            while self._buffered() > self._high // 2:
                self._proto.received.clear()
                await self._proto.received.wait()

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def close_write(self) -> None:
        self._writer.write_eof()

    async def close(self) -> None:
        self._writer.close()


class StreamPipe:
    """A ``Pipe`` over an asyncio reader and writer (raw TLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def close_write(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()


@contextlib.asynccontextmanager
async def raw_quic_env() -> AsyncIterator[Env]:
    tasks = TaskSet()

    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def run() -> None:
            async def write(data: bytes) -> None:
                writer.write(data)

            await serve_stream(reader.read, write, await reader.readexactly(1))
            writer.write_eof()

        tasks.spawn(run())

    server = await quic_serve(
        "127.0.0.1", 0, configuration=raw_quic_configuration(False), stream_handler=handler
    )
    size_udp_buffers(quic_socket(server))
    port = quic_socket(server).getsockname()[1]

    @contextlib.asynccontextmanager
    async def client() -> AsyncIterator[AckedQuicProtocol]:
        config = raw_quic_configuration(True)
        async with quic_connect(
            "127.0.0.1", port, configuration=config, create_protocol=AckedQuicProtocol
        ) as proto:
            size_udp_buffers(quic_socket(proto))
            yield proto

    async def connect_once() -> float:
        start = time.perf_counter()
        async with client():
            elapsed = time.perf_counter() - start
        return elapsed

    try:
        async with client() as proto:

            async def open_pipe(mode: bytes) -> QuicPipe:
                reader, writer = await proto.create_stream()
                writer.write(mode)
                return QuicPipe(proto, reader, writer)

            echo = await open_pipe(MODE_ECHO)
            yield Env(
                "raw_quic",
                "raw aioquic",
                connect_once,
                echo_call(echo),
                lambda length: open_pipe(MODE_SINK),
            )
            await echo.close()
    finally:
        server.close()
        await tasks.cancel()


# ---------------------------------------------------------------- raw TLS over TCP


@contextlib.contextmanager
def tls_contexts() -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    """A server context with a throwaway self-signed certificate, and a client context."""
    cert = make_tls_certificate(KeyPair.generate())
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert.cert_pem)
        key_path.write_bytes(cert.key_pem)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_3
        server.load_cert_chain(cert_path, key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    yield server, client


@contextlib.asynccontextmanager
async def raw_tls_env() -> AsyncIterator[Env]:
    """Each stream is a TLS connection whose header gives its mode and, for the sink
    (asyncio's TLS cannot half-close), the length to expect."""
    tasks = TaskSet()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        try:
            header = await reader.readexactly(1 + COUNT_BYTES)
        except asyncio.IncompleteReadError:
            writer.close()  # a set-up measurement's connection: nothing to serve
            return
        mode, length = header[:1], int.from_bytes(header[1:], "big")
        if mode == MODE_ECHO:
            await serve_stream(reader.read, write, mode)
        else:
            left = length
            while left > 0:
                left -= len(await reader.read(min(READ_CHUNK, left)))
            await write(length.to_bytes(COUNT_BYTES, "big"))
        writer.close()

    def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.spawn(handler(reader, writer))

    with tls_contexts() as (server_ctx, client_ctx):
        server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]

        async def connect_once() -> float:
            start = time.perf_counter()
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            elapsed = time.perf_counter() - start
            writer.close()
            return elapsed

        async def open_pipe(mode: bytes, length: int) -> StreamPipe:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            writer.write(mode + length.to_bytes(COUNT_BYTES, "big"))
            return StreamPipe(reader, writer)

        try:
            echo = await open_pipe(MODE_ECHO, 0)
            yield Env(
                "raw_tls",
                "raw TLS/TCP",
                connect_once,
                echo_call(echo),
                lambda length: open_pipe(MODE_SINK, length),
                cap_transfers=False,
            )
            await echo.close()
        finally:
            server.close()
            await tasks.cancel()


# ---------------------------------------------------------------- Swarm


def swarm_transport(kind: str, identity: KeyPair) -> Transport:
    return QuicTransport(identity) if kind == "quic" else TcpTransport(identity)


async def serve_host_stream(stream: Stream, peer: PeerId) -> None:
    """Echo and sink for Host streams; the negotiated protocol says which."""

    async def write(data: bytes) -> None:
        await stream.write(data)

    mode = MODE_ECHO if getattr(stream, "protocol", None) == ECHO_PROTOCOL else MODE_SINK
    await serve_stream(stream.read, write, mode)


async def rpc_echo(ctx: RpcContext, request: Any, payload: memoryview | None) -> RpcReply:
    return RpcReply(payload=payload)


@contextlib.asynccontextmanager
async def swarm_env(kind: str) -> AsyncIterator[Env]:
    """Two Hosts; set-up is measured with ``Transport.dial`` from a third identity."""
    server_id, client_id, dialer_id = (KeyPair.generate() for _ in range(3))
    server = Host(server_id, transports=[swarm_transport(kind, server_id)])
    server.set_stream_handler(ECHO_PROTOCOL, serve_host_stream)
    server.set_stream_handler(SINK_PROTOCOL, serve_host_stream)
    server.add_rpc_handler(RPC_ECHO_PROTOCOL, rpc_echo)
    await server.start([Multiaddr.from_string(LISTEN[kind])])
    addr = server.addrs[0]
    dialer = swarm_transport(kind, dialer_id)

    async def connect_once() -> float:
        start = time.perf_counter()
        conn = await dialer.dial(addr, server.peer_id)
        elapsed = time.perf_counter() - start
        await conn.close()
        return elapsed

    try:
        async with Host(client_id, transports=[swarm_transport(kind, client_id)]) as client:
            peer = await client.connect(addr)

            async def open_pipe(protocol: str) -> Pipe:
                stream, _ = await client.new_stream(peer, [protocol])
                return stream

            async def rpc(payload: bytes) -> bytes:
                reply = await client.rpc_call(peer, RPC_ECHO_PROTOCOL, None, payload)
                return bytes(reply.payload or b"")

            echo = await open_pipe(ECHO_PROTOCOL)
            yield Env(
                f"swarm_{kind}",
                f"Swarm {kind.upper()}",
                connect_once,
                rpc,
                lambda length: open_pipe(SINK_PROTOCOL),
                stream_call=echo_call(echo),
            )
            await echo.close()
    finally:
        await dialer.close()
        await server.stop()


# ---------------------------------------------------------------- py-libp2p


async def bench_pylibp2p(transport: str, security: str, plan: Plan) -> Result:
    name = "py-libp2p QUIC" if transport == "quic" else f"py-libp2p TCP+{security}"
    argv = [sys.executable, str(PYLIBP2P_PEER), "bench", "--transport", transport]
    argv += ["--security", security, "--connects", str(plan.pylibp2p_connects)]
    argv += ["--round-trips", str(plan.round_trips), "--message-bytes", str(plan.message_bytes)]
    argv += ["--bulk-bytes", str(plan.bulk_bytes), "--bulk-cap-s", str(plan.bulk_cap_s)]
    argv += ["--streams", str(plan.streams)]
    argv += ["--chunk-bytes", str(plan.chunk_bytes)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), plan.pylibp2p_timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = err.decode(errors="replace")[-1500:]
        raise RuntimeError(f"{name} bench exited with {proc.returncode}: {tail}")
    data = json.loads(lines[-1])
    result = Result(name)
    result.connect_s = statistics.median(data["connect_s"])
    result.rtt_s = result.stream_rtt_s = data["rtt_median_s"]
    result.rtt_cpu_s = data["rtt_cpu_s"]
    result.bulk_bps = {int(k): v for k, v in data["bulk_bytes_per_s"].items()}
    result.bulk_cpu_bps = {int(k): v for k, v in data["bulk_bytes_per_cpu_s"].items()}
    result.bulk_moved = {int(k): v for k, v in data["bulk_moved"].items()}
    result.notes += [f"x{k} lost {v} bytes" for k, v in data["bulk_lost"].items() if v]
    result.notes += [f"x{k} failed: {v}" for k, v in data["bulk_errors"].items()]
    result.notes.append("set-up includes its fixed 250 ms dial delay")
    return result


# ---------------------------------------------------------------- report


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def fmt_mib(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / MIB:.1f}"


def moved(result: Result, streams: int) -> str:
    return "/".join(str(result.bulk_moved.get(n, 0) // MIB) for n in (1, streams))


def print_table(results: dict[str, Result], streams: int) -> None:
    header = (
        f"{'configuration':<22} {'set-up ms':>9} {'RTT ms':>8} {'RTT CPU':>8} {'stream RTT':>10} "
        f"{'bulk MiB/s':>10} {f'x{streams} MiB/s':>10} {'MiB/CPU-s':>9} {'MiB moved':>9}  notes"
    )
    print(header)
    print("-" * len(header))
    for r in results.values():
        print(
            f"{r.name:<22} {fmt_ms(r.connect_s):>9} {fmt_ms(r.rtt_s):>8} {fmt_ms(r.rtt_cpu_s):>8} "
            f"{fmt_ms(r.stream_rtt_s):>10} {fmt_mib(r.bulk_bps.get(1)):>10} "
            f"{fmt_mib(r.bulk_bps.get(streams)):>10} {fmt_mib(r.bulk_cpu_bps.get(1)):>9} "
            f"{moved(r, streams):>9}  " + "; ".join(r.notes)
        )


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(results: dict[str, Result], streams: int) -> dict[str, float | None]:
    """Swarm over the baselines; against py-libp2p TCP, its best of TLS and noise."""

    def get(key: str) -> Result:
        return results.get(key) or Result(key)

    def bulk(key: str, n: int = 1) -> float | None:
        return get(key).bulk_bps.get(n)

    def cpu(key: str) -> float | None:
        return get(key).bulk_cpu_bps.get(1)

    def rtt_cpu(key: str) -> float | None:
        return get(key).rtt_cpu_s

    def best_of(values: list[float | None], pick: Callable[..., float]) -> float | None:
        present = [v for v in values if v is not None]
        return pick(present) if present else None

    py_tcp_rtt = best_of([get("pylibp2p_tcp_tls").rtt_s, get("pylibp2p_tcp_noise").rtt_s], min)
    py_tcp_bulk = best_of([bulk("pylibp2p_tcp_tls"), bulk("pylibp2p_tcp_noise")], max)
    py_tcp_cpu = best_of([cpu("pylibp2p_tcp_tls"), cpu("pylibp2p_tcp_noise")], max)
    py_tcp_rtt_cpu = best_of([rtt_cpu("pylibp2p_tcp_tls"), rtt_cpu("pylibp2p_tcp_noise")], min)
    return {
        "quic_rtt_ratio": ratio(get("swarm_quic").rtt_s, get("raw_quic").rtt_s),
        "quic_stream_rtt_ratio": ratio(get("swarm_quic").stream_rtt_s, get("raw_quic").rtt_s),
        "quic_bulk_ratio": ratio(bulk("swarm_quic"), bulk("raw_quic")),
        "quic_bulk4_ratio": ratio(bulk("swarm_quic", streams), bulk("raw_quic", streams)),
        "quic_setup_ratio": ratio(get("swarm_quic").connect_s, get("raw_quic").connect_s),
        "tcp_rtt_ratio": ratio(get("swarm_tcp").rtt_s, get("raw_tls").rtt_s),
        "tcp_stream_rtt_ratio": ratio(get("swarm_tcp").stream_rtt_s, get("raw_tls").rtt_s),
        "tcp_bulk_ratio": ratio(bulk("swarm_tcp"), bulk("raw_tls")),
        "tcp_bulk4_ratio": ratio(bulk("swarm_tcp", streams), bulk("raw_tls", streams)),
        "tcp_setup_ratio": ratio(get("swarm_tcp").connect_s, get("raw_tls").connect_s),
        "quic_rtt_vs_pylibp2p": ratio(get("swarm_quic").rtt_s, get("pylibp2p_quic").rtt_s),
        "quic_bulk_vs_pylibp2p": ratio(bulk("swarm_quic"), bulk("pylibp2p_quic")),
        "tcp_rtt_vs_pylibp2p": ratio(get("swarm_tcp").rtt_s, py_tcp_rtt),
        "tcp_bulk_vs_pylibp2p": ratio(bulk("swarm_tcp"), py_tcp_bulk),
        "quic_rtt_cpu_ratio": ratio(rtt_cpu("swarm_quic"), rtt_cpu("raw_quic")),
        "tcp_rtt_cpu_ratio": ratio(rtt_cpu("swarm_tcp"), rtt_cpu("raw_tls")),
        "quic_rtt_cpu_vs_pylibp2p": ratio(rtt_cpu("swarm_quic"), rtt_cpu("pylibp2p_quic")),
        "tcp_rtt_cpu_vs_pylibp2p": ratio(rtt_cpu("swarm_tcp"), py_tcp_rtt_cpu),
        "quic_bulk_cpu_ratio": ratio(cpu("swarm_quic"), cpu("raw_quic")),
        "tcp_bulk_cpu_ratio": ratio(cpu("swarm_tcp"), cpu("raw_tls")),
        "quic_bulk_cpu_vs_pylibp2p": ratio(cpu("swarm_quic"), cpu("pylibp2p_quic")),
        "tcp_bulk_cpu_vs_pylibp2p": ratio(cpu("swarm_tcp"), py_tcp_cpu),
    }


LEGEND = """\
ratios (Swarm / baseline, same run):
  *_rtt_ratio, *_stream_rtt_ratio, *_setup_ratio: time, LOWER is better (goal RTT <= 1.3)
  *_bulk_ratio, *_bulk4_ratio: throughput, HIGHER is better (goal >= 0.8)
  *_rtt_cpu_*: CPU time per round trip (both ends), LOWER is better
  *_bulk_cpu_*: bytes per CPU-second (both ends), HIGHER is better
  The CPU ratios do not move with the load other programs put on the machine; the
  wall-clock ones (which the goals name) do.
  *_rtt_vs_pylibp2p: time, LOWER is better (goal <= 0.5, i.e. 2x faster)
  *_bulk_vs_pylibp2p: throughput, HIGHER is better (goal >= 4)
  RTT is Host.rpc_call for Swarm, stream echo otherwise; vs py-libp2p TCP: its best of
  TLS and noise."""


def goal_report(values: dict[str, float | None]) -> dict[str, bool | None]:
    met: dict[str, bool | None] = {}
    for key, (op, target) in GOALS.items():
        value = values.get(key)
        met[key] = None if value is None else (value <= target if op == "<=" else value >= target)
    return met


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def progress(what: str) -> Iterator[None]:
    """Say on stderr what is measured and how long it took."""
    print(f"... {what}", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


async def run_round(only: set[str], plan: Plan) -> dict[str, Result]:
    """One pass: each transport's baseline interleaved with Swarm, then py-libp2p."""
    results: dict[str, Result] = {}
    pairs = [("quic", raw_quic_env), ("tcp", raw_tls_env)]
    for kind, raw_env in pairs:
        async with contextlib.AsyncExitStack() as stack:
            envs = []
            if "raw" in only:
                envs.append(await stack.enter_async_context(raw_env()))
            if "swarm" in only:
                envs.append(await stack.enter_async_context(swarm_env(kind)))
            if envs:
                with progress(" + ".join(env.name for env in envs)):
                    results.update(await measure_pair(envs, plan))
    if "pylibp2p" in only:
        for key, transport, security in (
            ("pylibp2p_quic", "quic", "tls"),
            ("pylibp2p_tcp_tls", "tcp", "tls"),
            ("pylibp2p_tcp_noise", "tcp", "noise"),
        ):
            with progress(key):
                results[key] = await bench_pylibp2p(transport, security, plan)
    return results


async def run_all(args: argparse.Namespace) -> int:
    plan = Plan.for_run(args.quick)
    only = set(args.only.split(","))
    started = time.perf_counter()
    results: dict[str, Result] = {}
    for _ in range(args.rounds):
        for key, result in (await run_round(only, plan)).items():
            if key in results:
                results[key].merge_best(result)
            else:
                results[key] = result
    print_table(results, plan.streams)
    values = ratios(results, plan.streams)
    print()
    print(LEGEND)
    for key, value in values.items():
        goal = GOALS.get(key)
        target = f"  (goal {goal[0]} {goal[1]})" if goal else ""
        print(f"  {key:<24} {'-' if value is None else f'{value:.3f}'}{target}")
    summary: dict[str, Any] = {
        "quick": args.quick,
        "rounds": args.rounds,
        "elapsed_s": round(time.perf_counter() - started, 1),
        **values,
        "goals_met": goal_report(values),
        "results": {k: v.as_json() for k, v in results.items()},
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB bulk instead of 256 MiB")
    parser.add_argument(
        "--only", default="raw,swarm,pylibp2p", help="comma-separated stacks to measure"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat everything, keep each figure's best"
    )
    args = parser.parse_args(argv)
    return asyncio.run(run_all(args))


if __name__ == "__main__":
    sys.exit(main())
