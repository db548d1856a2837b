"""A Swarm peer for the network lab, run as ``ip netns exec NS python tests/netlab/peer.py``.

It starts a Host listening on QUIC (``0.0.0.0``, port from ``--port``), prints one JSON
line ``{"peer_id", "port"}`` and then answers one JSON line per request line on stdin
(see ``OPS``). It serves ``/netlab/echo/1`` so that tests can check a connection carries
RPC. It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from p2p import Host, HostLimits, P2PError, RpcContext
from p2p.discovery import MdnsDiscovery
from p2p.nat import Autonat, HolePuncher, NatLimits, NatTraversal, Relay, RelayLimits
from security import KeyPair, PeerId
from transport import Multiaddr, QuicTransport, TransportLimits

ECHO = "/netlab/echo/1"

Op = Callable[["Peer", dict[str, Any]], Awaitable[Any]]


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.identity = KeyPair.generate()
        self.quic = QuicTransport(self.identity)
        transport_limits = replace(TransportLimits(), dial_timeout_s=args.dial_timeout)
        self.host = Host(self.identity, [self.quic], HostLimits(transport=transport_limits))
        self.mdns = MdnsDiscovery(self.host, interfaces=[args.ip]) if args.mdns else None
        self.traversal: NatTraversal | None = None
        if args.auto:
            self.traversal = NatTraversal(
                self.host,
                self.identity,
                limits=NatLimits(check_interval_s=0.5),
                relay_limits=_relay_limits(args),
            )
            self.autonat = self.traversal.autonat
            self.relay = self.traversal.relay
            assert self.traversal.puncher is not None
            self.puncher = self.traversal.puncher
        else:
            self.autonat = Autonat(self.host, self.identity, serve=args.autonat_server)
            self.relay = Relay(
                self.host, self.identity, serve=args.relay_server, limits=_relay_limits(args)
            )
            self.puncher = HolePuncher(self.host, self.quic, self.relay)

    async def start(self) -> dict[str, Any]:
        await self.host.start([Multiaddr.for_quic("0.0.0.0", self.args.port)])
        self.host.add_rpc_handler(ECHO, _echo)
        port = self.host.listen_addrs[0].host_port()[1]
        if self.traversal is not None:
            await self.traversal.start()
        else:
            await self.autonat.start()
            await self.relay.start()
            if not self.args.no_punch:
                await self.puncher.start()
        if self.mdns is not None:
            await self.mdns.start()
        return {"peer_id": str(self.host.peer_id), "port": port}

    async def stop(self) -> None:
        if self.mdns is not None:
            await self.mdns.stop()
        if self.traversal is not None:
            await self.traversal.stop()
        else:
            await self.puncher.stop()
            await self.relay.stop()
            await self.autonat.stop()
        await self.host.stop()


def _relay_limits(args: argparse.Namespace) -> RelayLimits:
    limits = RelayLimits()
    return replace(
        limits,
        circuit_max_bytes=args.relay_max_bytes or limits.circuit_max_bytes,
        circuit_max_duration_s=args.relay_max_seconds or limits.circuit_max_duration_s,
        max_reservations_per_ip=args.relay_per_ip or limits.max_reservations_per_ip,
    )


async def _echo(ctx: RpcContext, request: Any, payload: Any) -> Any:
    return {"echo": request, "from": str(ctx.peer)}


def _target(value: str) -> PeerId | Multiaddr:
    return Multiaddr.from_string(value) if value.startswith("/") else PeerId.from_base58(value)


async def op_connect(peer: Peer, req: dict[str, Any]) -> str:
    return str(await peer.host.connect(_target(req["addr"])))


async def op_peers(peer: Peer, req: dict[str, Any]) -> list[str]:
    return sorted(str(p) for p in peer.host.connected_peers())


async def op_wait_peers(peer: Peer, req: dict[str, Any]) -> list[str]:
    want = {PeerId.from_base58(p) for p in req["peers"]}
    async with asyncio.timeout(req.get("timeout", 10.0)):
        while not want <= set(peer.host.connected_peers()):  # noqa: ASYNC110 - polls the Host
            await asyncio.sleep(0.05)
    return sorted(str(p) for p in peer.host.connected_peers())


async def op_echo(peer: Peer, req: dict[str, Any]) -> Any:
    text = req["text"] * req.get("repeat", 1)
    reply = await peer.host.rpc_call(
        _target(req["peer"]), ECHO, text, timeout=req.get("timeout", 10.0)
    )
    return reply.value


async def op_connections(peer: Peer, req: dict[str, Any]) -> list[dict[str, str]]:
    target = PeerId.from_base58(req["peer"])
    return [
        {"transport": conn.transport_name, "remote": str(conn.remote_addr)}
        for conn in peer.host.connections(target)
    ]


async def op_addrs(peer: Peer, req: dict[str, Any]) -> dict[str, Any]:
    return {
        "addrs": [str(a) for a in peer.host.addrs],
        "observed": {str(a): n for a, n in peer.host.observed_addrs.items()},
    }


async def op_reachability(peer: Peer, req: dict[str, Any]) -> dict[str, Any]:
    servers = [PeerId.from_base58(p) for p in req["servers"]]
    result = await peer.autonat.check(servers)
    addr = None if result.addr is None else str(result.addr)
    return {"status": str(result.status), "addr": addr, "answered": result.answered}


async def op_nat(peer: Peer, req: dict[str, Any]) -> dict[str, Any]:
    """What automatic NAT traversal decided: reachability, relays held, relaying or not."""
    return {
        "reachability": str(peer.autonat.result.status),
        "relays": [str(r.relay) for r in peer.relay.reservations],
        "serving": peer.relay.serving,
    }


async def op_reserve(peer: Peer, req: dict[str, Any]) -> str:
    return str((await peer.relay.reserve(_target(req["relay"]))).addr)


async def op_reserve_flood(peer: Peer, req: dict[str, Any]) -> dict[str, int]:
    """``n`` fresh identities from this IP each ask ``relay`` for a reservation."""
    granted = refused = 0
    held: list[tuple[Relay, Host]] = []
    try:
        for _ in range(req["n"]):
            identity = KeyPair.generate()
            host = Host(identity, [QuicTransport(identity)])
            await host.start([Multiaddr.for_quic("0.0.0.0", 0)])
            relay = Relay(host, identity)
            held.append((relay, host))
            await relay.start()
            try:
                await relay.reserve(_target(req["relay"]))
                granted += 1
            except P2PError:
                refused += 1
    finally:
        for relay, host in held:
            await relay.stop()
            await host.stop()
    return {"granted": granted, "refused": refused}


async def op_wait_direct(peer: Peer, req: dict[str, Any]) -> float:
    """Seconds until the only connection to ``peer`` is a direct QUIC one."""
    target = PeerId.from_base58(req["peer"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(req.get("timeout", 10.0)):
        while [c.transport_name for c in peer.host.connections(target)] != ["quic"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return loop.time() - started


async def op_punch_results(peer: Peer, req: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"peer": str(r.peer), "direct": r.direct, "attempts": r.attempts, "rtt_s": r.rtt_s}
        for r in peer.puncher.results
    ]


OPS: dict[str, Op] = {
    "addrs": op_addrs,
    "connect": op_connect,
    "connections": op_connections,
    "echo": op_echo,
    "nat": op_nat,
    "peers": op_peers,
    "punch_results": op_punch_results,
    "reachability": op_reachability,
    "reserve": op_reserve,
    "reserve_flood": op_reserve_flood,
    "wait_direct": op_wait_direct,
    "wait_peers": op_wait_peers,
}


async def _serve(peer: Peer) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        req = json.loads(line)
        try:
            answer: dict[str, Any] = {"result": await OPS[req["op"]](peer, req)}
        except Exception as exc:
            logging.getLogger("netlab").debug("op %s failed", req["op"], exc_info=True)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ip", required=True, help="this namespace's address")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dial-timeout", type=float, default=3.0)
    parser.add_argument("--autonat-server", action="store_true", help="dial others back")
    parser.add_argument("--mdns", action="store_true", help="discover LAN peers on --ip")
    parser.add_argument("--relay-server", action="store_true", help="relay for others")
    parser.add_argument("--no-punch", action="store_true", help="stay relayed")
    parser.add_argument("--auto", action="store_true", help="NatTraversal decides it all")
    parser.add_argument("--relay-max-bytes", type=int, default=0)
    parser.add_argument("--relay-max-seconds", type=float, default=0.0)
    parser.add_argument("--relay-per-ip", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    peer = Peer(args)
    hello = await peer.start()
    print(json.dumps(hello), flush=True)
    try:
        await _serve(peer)
    finally:
        await peer.stop()


if __name__ == "__main__":
    asyncio.run(main())
