"""Transport benchmark: Swarm's QUIC and TCP against raw baselines and py-libp2p.

Usage::

    .venv/bin/python benchmarks/transport.py [--quick] [--only raw,pylibp2p,swarm]

Every configuration runs its server in a subprocess (this script with ``--serve KIND``,
or the py-libp2p peer of ``tests/interop/pylibp2p_peer.py``) and its client in this
process (py-libp2p: in a second subprocess, it is trio based), all on 127.0.0.1, so each
side has a core of its own on a 2-core machine. What is measured, per configuration:

* set-up: median time to open one new authenticated connection;
* round trip: median of ``--round-trips`` (>= 500) request/response exchanges of 64-byte
  messages on one open connection (an echo stream; for Swarm the Host RPC call);
* bulk: upload of ``--bulk-bytes`` to a sink that answers the byte count once it read
  end of stream, over one stream and split over 4 parallel streams (raw TLS: 4 TLS
  connections); throughput = bytes / time from the first write to the count's arrival.

Baselines: raw aioquic (``aioquic.asyncio`` serve/connect with plain echo and sink stream
handlers, tuned as Swarm's QUIC is by ``QuicLimits``: flow-control windows, datagram size,
congestion controller, UDP buffer sizes), raw asyncio TLS 1.3 over TCP with a throwaway
self-signed certificate, and two py-libp2p 0.8.1 hosts.

The table is printed on stdout; the LAST line is one JSON object with the figures and
ratios (directions in the legend above the JSON).
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's directory comes first on sys.path and its name would
# shadow the ``transport`` package: look the project's packages up from the root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from aioquic.asyncio import connect as quic_connect  # noqa: E402
from aioquic.asyncio import serve as quic_serve  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

from security import KeyPair, make_tls_certificate  # noqa: E402
from transport._limits import QuicLimits  # noqa: E402

PYLIBP2P_PEER = ROOT / "tests" / "interop" / "pylibp2p_peer.py"
MIB = 1024 * 1024
MODE_ECHO = b"E"
MODE_SINK = b"S"
READ_CHUNK = 65536
COUNT_BYTES = 8
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures; ``--quick`` shrinks the bulk sizes and repetitions."""

    connects: int
    round_trips: int
    message_bytes: int
    bulk_bytes: int
    streams: int
    chunk_bytes: int
    pylibp2p_quic_bulk_bytes: int
    pylibp2p_tcp_bulk_bytes: int
    pylibp2p_connects: int

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        return cls(
            connects=10 if quick else 20,
            round_trips=500 if quick else 2000,
            message_bytes=64,
            bulk_bytes=(64 if quick else 256) * MIB,
            streams=4,
            chunk_bytes=64 * 1024,
            pylibp2p_quic_bulk_bytes=(4 if quick else 16) * MIB,
            pylibp2p_tcp_bulk_bytes=(32 if quick else 128) * MIB,
            pylibp2p_connects=3,
        )


@dataclass(slots=True)
class Result:
    """The figures of one configuration (seconds and bytes per second)."""

    name: str
    transport: str
    connect_s: float | None = None
    rtt_s: float | None = None
    bulk_bps: dict[int, float] = field(default_factory=dict)
    bulk_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "connect_s": self.connect_s,
            "rtt_s": self.rtt_s,
            "bulk_bytes": self.bulk_bytes,
            "bulk_mib_s": {str(k): v / MIB for k, v in self.bulk_bps.items()},
            "notes": self.notes,
        }


class Pipe(Protocol):
    """The client side of one echo or sink stream."""

    async def write(self, data: bytes) -> None: ...

    async def readexactly(self, n: int) -> bytes: ...

    async def close_write(self) -> None: ...

    async def close(self) -> None: ...


OpenPipe = Callable[[bytes], Awaitable[Pipe]]
"""Opens a new stream in the given mode (``MODE_ECHO`` or ``MODE_SINK``)."""


# ---------------------------------------------------------------- measurements


async def measure_round_trips(call: Callable[[bytes], Awaitable[bytes]], plan: Plan) -> float:
    """Median seconds of ``plan.round_trips`` exchanges after 5% warm-up."""
    payload = secrets.token_bytes(plan.message_bytes)
    for _ in range(max(10, plan.round_trips // 20)):
        await call(payload)
    rtts: list[float] = []
    for _ in range(plan.round_trips):
        start = time.perf_counter()
        answer = await call(payload)
        rtts.append(time.perf_counter() - start)
        if len(answer) != len(payload):
            raise RuntimeError(f"echo answered {len(answer)} bytes to {len(payload)}")
    return statistics.median(rtts)


async def measure_bulk(open_pipe: OpenPipe, total: int, streams: int, chunk: int) -> float:
    """Bytes per second of ``total`` bytes split over ``streams`` parallel sink streams."""
    pipes = [await open_pipe(MODE_SINK) for _ in range(streams)]
    share = total // streams
    block = secrets.token_bytes(chunk)

    async def send(pipe: Pipe) -> None:
        left = share
        while left > 0:
            n = min(chunk, left)
            await pipe.write(block if n == chunk else block[:n])
            left -= n
        await pipe.close_write()
        count = int.from_bytes(await pipe.readexactly(COUNT_BYTES), "big")
        if count != share:
            raise RuntimeError(f"sink counted {count} bytes, {share} were sent")
        await pipe.close()

    start = time.perf_counter()
    await asyncio.gather(*(send(p) for p in pipes))
    return share * streams / (time.perf_counter() - start)


async def measure_connects(connect_once: Callable[[], Awaitable[float]], count: int) -> float:
    return statistics.median([await connect_once() for _ in range(count)])


# ---------------------------------------------------------------- shared servers


async def serve_stream(
    read: Callable[[int], Awaitable[bytes]],
    write: Callable[[bytes], Awaitable[None]],
    mode: bytes,
) -> None:
    """Echo every byte back, or count bytes to end of stream and answer the count."""
    total = 0
    while chunk := await read(READ_CHUNK):
        if mode == MODE_ECHO:
            await write(chunk)
        else:
            total += len(chunk)
    if mode == MODE_SINK:
        await write(total.to_bytes(COUNT_BYTES, "big"))


async def wait_for_stdin_eof() -> None:
    """Serve until the parent closes our stdin (the benchmark's stop signal)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while await reader.read(4096):
            pass
    finally:
        transport.close()


def announce(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- raw aioquic


def raw_quic_configuration(is_client: bool) -> QuicConfiguration:
    """aioquic's configuration with Swarm's QUIC tuning (``QuicLimits``), for fairness:
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


def size_udp_buffers(transport: asyncio.BaseTransport) -> None:
    """Give an aioquic socket the UDP buffer sizes Swarm's QUIC sockets get."""
    sock = transport.get_extra_info("socket")
    size = QuicLimits().udp_buffer_bytes
    for forced, plain in (
        ("SO_RCVBUFFORCE", socket.SO_RCVBUF),
        ("SO_SNDBUFFORCE", socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, forced, plain), size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class QuicPipe:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def close_write(self) -> None:
        self._writer.write_eof()

    async def close(self) -> None:
        self._writer.close()


async def serve_raw_quic() -> None:
    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def run() -> None:
            async def write(data: bytes) -> None:
                writer.write(data)

            mode = await reader.readexactly(1)
            await serve_stream(reader.read, write, mode)
            writer.write_eof()

        tasks.add(task := asyncio.ensure_future(run()))
        task.add_done_callback(tasks.discard)

    tasks: set[asyncio.Future[None]] = set()
    server = await quic_serve(
        "127.0.0.1", 0, configuration=raw_quic_configuration(False), stream_handler=handler
    )
    size_udp_buffers(server._transport)  # aioquic keeps its transport private
    sock = server._transport.get_extra_info("socket")
    announce({"host": "127.0.0.1", "port": sock.getsockname()[1]})
    try:
        await wait_for_stdin_eof()
    finally:
        server.close()


async def client_raw_quic(addr: dict[str, Any], plan: Plan) -> Result:
    result = Result("raw aioquic", "quic")
    host, port = addr["host"], addr["port"]

    async def connect_once() -> float:
        start = time.perf_counter()
        async with quic_connect(host, port, configuration=raw_quic_configuration(True)):
            elapsed = time.perf_counter() - start
        return elapsed

    result.connect_s = await measure_connects(connect_once, plan.connects)
    async with quic_connect(host, port, configuration=raw_quic_configuration(True)) as proto:
        size_udp_buffers(proto._transport)

        async def open_pipe(mode: bytes) -> Pipe:
            reader, writer = await proto.create_stream()
            writer.write(mode)
            return QuicPipe(reader, writer)

        echo = await open_pipe(MODE_ECHO)

        async def call(payload: bytes) -> bytes:
            await echo.write(payload)
            return await echo.readexactly(len(payload))

        result.rtt_s = await measure_round_trips(call, plan)
        await echo.close()
        await measure_bulk_all(result, open_pipe, plan, plan.bulk_bytes)
    return result


async def measure_bulk_all(result: Result, open_pipe: OpenPipe, plan: Plan, total: int) -> None:
    result.bulk_bytes = total
    for streams in (1, plan.streams):
        result.bulk_bps[streams] = await measure_bulk(open_pipe, total, streams, plan.chunk_bytes)


# ---------------------------------------------------------------- raw TLS over TCP


@contextlib.contextmanager
def tls_contexts() -> Any:
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


class TlsPipe:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def close_write(self) -> None:
        """asyncio's TLS transport cannot half-close; the sink knows the length instead."""
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self._writer.wait_closed()


async def serve_raw_tls() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        header = await reader.readexactly(1 + COUNT_BYTES)
        mode, length = header[:1], int.from_bytes(header[1:], "big")
        if mode == MODE_ECHO:
            await serve_stream(reader.read, write, mode)
        else:
            left = length
            while left > 0:
                left -= len(await reader.read(min(READ_CHUNK, left)))
            await write(length.to_bytes(COUNT_BYTES, "big"))
        writer.close()

    with tls_contexts() as (server_ctx, _):
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        announce({"host": "127.0.0.1", "port": port})
        try:
            await wait_for_stdin_eof()
        finally:
            server.close()


async def client_raw_tls(addr: dict[str, Any], plan: Plan) -> Result:
    result = Result("raw TLS/TCP", "tcp")
    host, port = addr["host"], addr["port"]
    with tls_contexts() as (_, client_ctx):

        async def open_conn() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(host, port, ssl=client_ctx)

        async def connect_once() -> float:
            start = time.perf_counter()
            _, writer = await open_conn()
            elapsed = time.perf_counter() - start
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            return elapsed

        result.connect_s = await measure_connects(connect_once, plan.connects)

        async def open_pipe(mode: bytes, length: int = 0) -> Pipe:
            reader, writer = await open_conn()
            writer.write(mode + length.to_bytes(COUNT_BYTES, "big"))
            return TlsPipe(reader, writer)

        echo = await open_pipe(MODE_ECHO)

        async def call(payload: bytes) -> bytes:
            await echo.write(payload)
            return await echo.readexactly(len(payload))

        result.rtt_s = await measure_round_trips(call, plan)
        await echo.close()
        total = plan.bulk_bytes
        result.bulk_bytes = total
        for streams in (1, plan.streams):

            async def open_sink(mode: bytes, share: int = total // streams) -> Pipe:
                return await open_pipe(mode, share)

            result.bulk_bps[streams] = await measure_bulk(
                open_sink, total, streams, plan.chunk_bytes
            )
    return result


# ---------------------------------------------------------------- subprocess servers


@contextlib.asynccontextmanager
async def server_process(argv: list[str]) -> AsyncIterator[dict[str, Any]]:
    """Start a server subprocess, yield its first JSON line, stop it by closing stdin."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = await asyncio.wait_for(proc.stdout.readline(), SERVER_START_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"server {argv} exited before announcing its address")
        yield json.loads(line)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(BrokenPipeError, ConnectionError):
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), SERVER_STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def own_server(kind: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve", kind]


# ---------------------------------------------------------------- py-libp2p


async def run_pylibp2p(transport: str, security: str, plan: Plan, limit_s: float) -> Result:
    name = f"py-libp2p {'QUIC' if transport == 'quic' else 'TCP+' + security}"
    bulk = plan.pylibp2p_quic_bulk_bytes if transport == "quic" else plan.pylibp2p_tcp_bulk_bytes
    listen = [sys.executable, str(PYLIBP2P_PEER), "listen", "--transport", transport]
    listen += ["--security", security]
    async with server_process(listen) as info:
        bench = [sys.executable, str(PYLIBP2P_PEER), "bench", "--addr", info["addrs"][0]]
        bench += ["--security", security, "--connects", str(plan.pylibp2p_connects)]
        bench += ["--round-trips", str(plan.round_trips), "--bulk-bytes", str(bulk)]
        bench += ["--streams", str(plan.streams), "--chunk-bytes", str(plan.chunk_bytes)]
        proc = await asyncio.create_subprocess_exec(
            *bench, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} bench exited {proc.returncode}")
    data = json.loads(lines[-1])
    result = Result(name, transport, bulk_bytes=bulk)
    result.connect_s = statistics.median(data["connect_s"]) if data["connect_s"] else None
    result.rtt_s = data["rtt_median_s"]
    result.bulk_bps = {int(k): v for k, v in data["bulk_bytes_per_s"].items()}
    result.notes += [f"{k} streams failed: {v}" for k, v in data["bulk_errors"].items()]
    result.notes.append("set-up includes py-libp2p's fixed 250 ms dial delay")
    return result


# ---------------------------------------------------------------- report


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def fmt_mib(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / MIB:.1f}"


def print_table(results: list[Result], streams: int) -> None:
    header = (
        f"{'configuration':<24} {'set-up ms':>10} {'RTT ms':>9} "
        f"{'bulk MiB/s':>11} {f'x{streams} MiB/s':>11}  notes"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<24} {fmt_ms(r.connect_s):>10} {fmt_ms(r.rtt_s):>9} "
            f"{fmt_mib(r.bulk_bps.get(1)):>11} {fmt_mib(r.bulk_bps.get(streams)):>11}  "
            + "; ".join(r.notes)
        )


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ---------------------------------------------------------------- main


SERVERS: dict[str, Callable[[], Awaitable[None]]] = {
    "raw-quic": serve_raw_quic,
    "raw-tls": serve_raw_tls,
}


async def run_all(args: argparse.Namespace) -> int:
    plan = Plan.for_run(args.quick)
    only = set(args.only.split(","))
    results: dict[str, Result] = {}
    started = time.perf_counter()
    if "raw" in only:
        async with server_process(own_server("raw-quic")) as addr:
            results["raw_quic"] = await client_raw_quic(addr, plan)
        async with server_process(own_server("raw-tls")) as addr:
            results["raw_tls"] = await client_raw_tls(addr, plan)
    if "pylibp2p" in only:
        results["pylibp2p_quic"] = await run_pylibp2p("quic", "tls", plan, args.pylibp2p_timeout)
        results["pylibp2p_tcp_tls"] = await run_pylibp2p("tcp", "tls", plan, args.pylibp2p_timeout)
        results["pylibp2p_tcp_noise"] = await run_pylibp2p(
            "tcp", "noise", plan, args.pylibp2p_timeout
        )
    print_table(list(results.values()), plan.streams)
    summary: dict[str, Any] = {
        "quick": args.quick,
        "elapsed_s": time.perf_counter() - started,
        "results": {k: v.as_json() for k, v in results.items()},
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB bulk instead of 256 MiB")
    parser.add_argument("--only", default="raw,pylibp2p,swarm", help="stacks to measure")
    parser.add_argument("--pylibp2p-timeout", type=float, default=300.0)
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(SERVERS[args.serve]())
        return 0
    return asyncio.run(run_all(args))


if __name__ == "__main__":
    sys.exit(main())
