"""A py-libp2p (0.8.1, trio) peer for interoperability tests and benchmarks.

Run as a standalone script in a subprocess; it prints JSON lines on stdout.

``listen --transport quic|tcp``
    Starts a host with a fresh Ed25519 key on 127.0.0.1, port 0, over QUIC
    (``/quic-v1``) or TCP secured with ``/tls/1.0.0`` (``--security noise``: ``/noise``)
    and multiplexed with ``/yamux/1.0.0``. It serves ping, identify,
    ``/swarm/echo/1.0.0`` (echoes every byte until end of stream) and
    ``/swarm/sink/1.0.0`` (reads to end of stream, then answers the byte count as 8
    bytes big-endian). The first line is
    ``{"event": "listening", "peer_id": ..., "addrs": [...]}``. For every inbound
    connection it prints ``{"event": "connected", "peer_id": ...}``, then identifies
    that peer and prints ``{"event": "identified", ...}`` (or ``identify_failed``).
    It serves until stdin closes, SIGTERM or SIGINT.

``dial --addr <multiaddr with /p2p/>``
    Connects, pings (``--pings`` round trips on one stream), runs identify and prints
    one ``{"event": "dialed", ...}`` line with both peer ids, the ping round trips and
    the identify fields; exits 0 (with ``--hold``: once stdin closes), or prints
    ``{"event": "error", "step": ..., "error": ...}`` and exits 1.

``bench --transport quic|tcp``
    The py-libp2p part of ``benchmarks/transport.py``: two hosts in this process (as
    the benchmark runs its other stacks), a ``listen``-like server and a client.
    It measures connection set-up (a fresh client host per connection), echo round
    trips of ``--message-bytes`` on one stream (after a 5% warm-up; with the mean CPU
    time of the process per round trip), and bulk upload
    of ``--bulk-bytes`` to the sink over 1 and over ``--streams`` parallel streams,
    each transfer stopping early after ``--bulk-cap-s`` seconds;
    prints one ``{"event": "bench"}`` line (times in seconds, throughput in bytes per
    second of what the sink counted; bytes py-libp2p QUIC loses on the way are listed
    under ``bulk_lost``, a transfer that fails under ``bulk_errors``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import ID as IDENTIFY_ID
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.tls.transport import PROTOCOL_ID as TLS_PROTOCOL_ID
from libp2p.security.tls.transport import TLSTransport

PING_ID = TProtocol("/ipfs/ping/1.0.0")
ECHO_ID = TProtocol("/swarm/echo/1.0.0")
SINK_ID = TProtocol("/swarm/sink/1.0.0")
PING_BYTES = 32
READ_CHUNK = 65536
IDENTIFY_TIMEOUT_S = 10.0
DIAL_TIMEOUT_S = 20.0


def emit(record: dict[str, Any]) -> None:
    """Write one JSON line to stdout and flush it (the parent reads line by line)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def listen_addr(transport: str) -> multiaddr.Multiaddr:
    if transport == "quic":
        return multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")
    return multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def make_host(key_pair: KeyPair, transport: str, security: str = "tls") -> IHost:
    """A host with exactly one TCP security transport and yamux as its only muxer.

    ``sec_opt`` replaces new_host's default map (noise, TLS, secio, plaintext), so TCP
    connections negotiate ``/tls/1.0.0`` (or ``/noise`` when asked); QUIC has TLS
    built in and ignores it.
    """
    sec_opt = (
        {TLS_PROTOCOL_ID: TLSTransport(key_pair)}
        if security == "tls"
        else {
            NOISE_PROTOCOL_ID: NoiseTransport(
                key_pair, noise_privkey=create_new_x25519_key_pair().private_key
            )
        }
    )
    return new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_opt=create_yamux_muxer_option(),
        listen_addrs=[listen_addr(transport)],
        enable_quic=transport == "quic",
        enable_tcp=transport == "tcp",
    )


def transport_of(addr: multiaddr.Multiaddr) -> str:
    names = {p.name for p in addr.protocols()}
    return "quic" if "quic-v1" in names or "quic" in names else "tcp"


async def read_to_end(stream: INetStream) -> bytes:
    chunks: list[bytes] = []
    try:
        while True:
            chunk = await stream.read(READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
    except StreamEOF:
        pass
    return b"".join(chunks)


async def read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise StreamEOF(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def handle_echo(stream: INetStream) -> None:
    try:
        while True:
            chunk = await stream.read(READ_CHUNK)
            if not chunk:
                break
            await stream.write(chunk)
    except StreamEOF:
        pass
    await stream.close()


async def handle_sink(stream: INetStream) -> None:
    total = 0
    try:
        while True:
            chunk = await stream.read(READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
    except StreamEOF:
        pass
    await stream.write(total.to_bytes(8, "big"))
    await stream.close()


async def identify(host: IHost, peer: ID) -> dict[str, Any]:
    """Open ``/ipfs/id/1.0.0`` to ``peer`` and return the decoded fields."""
    stream = await host.new_stream(peer, [IDENTIFY_ID])
    with trio.fail_after(IDENTIFY_TIMEOUT_S):
        raw = await read_to_end(stream)
    await stream.close()
    msg = parse_identify_response(raw)
    key_peer = ID.from_pubkey(deserialize_public_key(msg.public_key))
    return {
        "protocol_version": msg.protocol_version,
        "agent_version": msg.agent_version,
        "protocols": list(msg.protocols),
        "listen_addrs": [str(multiaddr.Multiaddr(a)) for a in msg.listen_addrs],
        "observed_addr": str(multiaddr.Multiaddr(msg.observed_addr)) if msg.observed_addr else None,
        "public_key_peer_id": key_peer.to_base58(),
        "has_signed_peer_record": msg.HasField("signedPeerRecord"),
    }


async def ping(host: IHost, peer: ID, count: int) -> list[float]:
    """Round trips in seconds of ``count`` pings of 32 random bytes on one stream."""
    stream = await host.new_stream(peer, [PING_ID])
    rtts: list[float] = []
    for _ in range(count):
        payload = secrets.token_bytes(PING_BYTES)
        start = time.perf_counter()
        await stream.write(payload)
        answer = await read_exactly(stream, PING_BYTES)
        rtts.append(time.perf_counter() - start)
        if answer != payload:
            raise ValueError(f"ping answer {answer.hex()} differs from {payload.hex()}")
    await stream.close()
    return rtts


class InboundReporter(INotifee):
    """Reports each inbound connection, then identifies the remote peer."""

    def __init__(self, host: IHost, spawn: Callable[[Callable[[], Awaitable[None]]], None]):
        self._host = host
        self._spawn = spawn
        self._seen: set[ID] = set()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if peer in self._seen:
            return
        self._seen.add(peer)
        emit({"event": "connected", "peer_id": peer.to_base58()})

        async def identify_remote() -> None:
            try:
                fields = await identify(self._host, peer)
            except Exception as exc:
                emit(
                    {
                        "event": "identify_failed",
                        "peer_id": peer.to_base58(),
                        "error": describe(exc),
                    }
                )
                return
            emit({"event": "identified", "peer_id": peer.to_base58(), **fields})

        self._spawn(identify_remote)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._seen.discard(conn.muxed_conn.peer_id)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


async def wait_for_stop() -> None:
    """Return when stdin reaches end of file or on SIGTERM / SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            async def on_stdin_eof() -> None:
                stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
                while await stdin.receive_some(4096):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_stdin_eof)


async def run_listen(transport: str, security: str) -> int:
    key_pair = create_new_key_pair()
    host = make_host(key_pair, transport, security)
    host.set_stream_handler(ECHO_ID, handle_echo)
    host.set_stream_handler(SINK_ID, handle_sink)
    async with host.run(listen_addrs=[listen_addr(transport)]), trio.open_nursery() as nursery:
        host.get_network().register_notifee(
            InboundReporter(host, lambda fn: nursery.start_soon(fn))
        )
        emit(
            {
                "event": "listening",
                "peer_id": host.get_id().to_base58(),
                "addrs": [str(a) for a in host.get_addrs()],
            }
        )
        await wait_for_stop()
        nursery.cancel_scope.cancel()
    return 0


def describe(exc: BaseException) -> str:
    """The innermost errors of a (nested) trio exception group, as text."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    return repr(exc)


async def run_dial(addr_text: str, pings: int, security: str, hold: bool) -> int:
    addr = multiaddr.Multiaddr(addr_text)
    info = info_from_p2p_addr(addr)
    transport = transport_of(addr)
    key_pair = create_new_key_pair()
    host = make_host(key_pair, transport, security)
    step = "start"
    try:
        async with host.run(listen_addrs=[listen_addr(transport)]):
            with trio.fail_after(DIAL_TIMEOUT_S):
                step = "connect"
                start = time.perf_counter()
                await host.connect(info)
                connect_s = time.perf_counter() - start
                conns = host.get_network().get_connections(info.peer_id)
                remote = conns[0].muxed_conn.peer_id if conns else None
                step = "ping"
                rtts = await ping(host, info.peer_id, pings)
                step = "identify"
                fields = await identify(host, info.peer_id)
            emit(
                {
                    "event": "dialed",
                    "transport": transport,
                    "local_peer_id": host.get_id().to_base58(),
                    "remote_peer_id": remote.to_base58() if remote else None,
                    "connect_s": connect_s,
                    "ping_rtts_s": rtts,
                    "ping_median_s": statistics.median(rtts),
                    **fields,
                }
            )
            if hold:
                step = "hold"
                await wait_for_stop()
    except Exception as exc:
        emit({"event": "error", "step": step, "error": describe(exc)})
        return 1
    return 0


async def timed_connect(addr: multiaddr.Multiaddr, security: str) -> float:
    """Seconds ``connect`` takes from a fresh host (py-libp2p waits a 250 ms dial delay)."""
    info = info_from_p2p_addr(addr)
    transport = transport_of(addr)
    host = make_host(create_new_key_pair(), transport, security)
    async with host.run(listen_addrs=[listen_addr(transport)]):
        start = time.perf_counter()
        await host.connect(info)
        elapsed = time.perf_counter() - start
        await host.disconnect(info.peer_id)
    return elapsed


async def echo_round_trips(host: IHost, peer: ID, count: int, size: int) -> list[float]:
    stream = await host.new_stream(peer, [ECHO_ID])
    payload = secrets.token_bytes(size)
    rtts: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        await stream.write(payload)
        await read_exactly(stream, size)
        rtts.append(time.perf_counter() - start)
    await stream.close()
    return rtts


async def upload(
    host: IHost, peer: ID, total: int, streams: int, chunk: int, cap_s: float
) -> tuple[int, int, float, float]:
    """Bytes sent, bytes the sink counted, counted bytes per second and per CPU-second
    (this process: both hosts), of ``total``
    bytes split over ``streams`` parallel sink streams, each stopping early once
    ``cap_s`` seconds have passed. py-libp2p QUIC sometimes loses bytes: the sink's
    count is what arrived."""
    opened = [await host.new_stream(peer, [SINK_ID]) for _ in range(streams)]
    share = total // streams
    block = secrets.token_bytes(chunk)
    sent_counted: list[tuple[int, int]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    stop_at = start + cap_s

    async def send(stream: INetStream) -> None:
        sent = 0
        while sent < share and time.perf_counter() < stop_at:
            n = min(chunk, share - sent)
            await stream.write(block[:n])
            sent += n
        await stream.close_write()
        counted = int.from_bytes(await read_exactly(stream, 8), "big")
        await stream.close()
        sent_counted.append((sent, counted))

    async with trio.open_nursery() as nursery:
        for stream in opened:
            nursery.start_soon(send, stream)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    sent = sum(s for s, _ in sent_counted)
    counted = sum(c for _, c in sent_counted)
    return sent, counted, counted / elapsed, counted / cpu


async def run_bench(args: argparse.Namespace) -> int:
    server = make_host(create_new_key_pair(), args.transport, args.security)
    server.set_stream_handler(ECHO_ID, handle_echo)
    server.set_stream_handler(SINK_ID, handle_sink)
    async with server.run(listen_addrs=[listen_addr(args.transport)]):
        addr = server.get_addrs()[0]
        connects = [await timed_connect(addr, args.security) for _ in range(args.connects)]
        client = make_host(create_new_key_pair(), args.transport, args.security)
        async with client.run(listen_addrs=[listen_addr(args.transport)]):
            peer = server.get_id()
            await client.connect(info_from_p2p_addr(addr))
            warm_up = max(10, args.round_trips // 20)
            await echo_round_trips(client, peer, warm_up, args.message_bytes)
            cpu_start = time.process_time()
            rtts = await echo_round_trips(client, peer, args.round_trips, args.message_bytes)
            rtt_cpu_s = (time.process_time() - cpu_start) / args.round_trips
            bulk: dict[str, float] = {}
            bulk_cpu: dict[str, float] = {}
            bulk_moved: dict[str, int] = {}
            bulk_lost: dict[str, int] = {}
            bulk_errors: dict[str, str] = {}
            for n in sorted({1, args.streams}):
                try:
                    sent, counted, rate, cpu_rate = await upload(
                        client, peer, args.bulk_bytes, n, args.chunk_bytes, args.bulk_cap_s
                    )
                except Exception as exc:
                    bulk_errors[str(n)] = describe(exc)
                    continue
                bulk[str(n)], bulk_cpu[str(n)] = rate, cpu_rate
                bulk_moved[str(n)], bulk_lost[str(n)] = counted, sent - counted
    emit(
        {
            "event": "bench",
            "transport": args.transport,
            "security": args.security if args.transport == "tcp" else "quic",
            "connect_s": connects,
            "rtt_median_s": statistics.median(rtts),
            "rtt_cpu_s": rtt_cpu_s,
            "round_trips": len(rtts),
            "bulk_bytes_per_s": bulk,
            "bulk_bytes_per_cpu_s": bulk_cpu,
            "bulk_moved": bulk_moved,
            "bulk_lost": bulk_lost,
            "bulk_errors": bulk_errors,
        }
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--security", choices=("tls", "noise"), default="tls", help="TCP security transport"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listen = sub.add_parser("listen", parents=[common], help="serve ping, identify, echo, sink")
    listen.add_argument("--transport", choices=("quic", "tcp"), required=True)
    dial = sub.add_parser("dial", parents=[common], help="ping and identify a peer, print JSON")
    dial.add_argument("--addr", required=True, help="multiaddr ending in /p2p/<peer id>")
    dial.add_argument("--pings", type=int, default=5)
    dial.add_argument(
        "--hold", action="store_true", help="keep the connection open until stdin closes"
    )
    bench = sub.add_parser("bench", parents=[common], help="measure set-up, round trip, bulk")
    bench.add_argument("--transport", choices=("quic", "tcp"), required=True)
    bench.add_argument("--connects", type=int, default=3)
    bench.add_argument("--round-trips", type=int, default=500)
    bench.add_argument("--message-bytes", type=int, default=64)
    bench.add_argument("--bulk-bytes", type=int, default=16 * 1024 * 1024)
    bench.add_argument("--bulk-cap-s", type=float, default=10.0)
    bench.add_argument("--streams", type=int, default=4)
    bench.add_argument("--chunk-bytes", type=int, default=65536)
    args = parser.parse_args(argv)
    if args.command == "listen":
        return trio.run(run_listen, args.transport, args.security)
    if args.command == "bench":
        return trio.run(run_bench, args)
    return trio.run(run_dial, args.addr, args.pings, args.security, args.hold)


if __name__ == "__main__":
    sys.exit(main())
