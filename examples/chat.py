"""A tiny chat that embeds the ``p2p`` Host (no torch, no numpy).

One terminal listens and prints its address::

    python examples/chat.py --listen /ip4/127.0.0.1/tcp/0

another connects to that address::

    python examples/chat.py --peer /ip4/127.0.0.1/tcp/40213/p2p/12D3KooW...

Each line typed is sent, as one RPC call, to every connected peer, which prints it.
End with Ctrl-D.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from p2p import Host, P2PError, RpcContext
from security import KeyPair
from transport._multiaddr import Multiaddr
from transport._quic import QuicTransport
from transport._tcp import TcpTransport

CHAT_PROTOCOL = "/swarm-chat/1.0.0"


def say(text: str) -> None:
    print(text, flush=True)


async def receive(ctx: RpcContext, message: Any, payload: memoryview | None) -> str:
    say(f"[{ctx.peer.short()}] {message}")
    return "ok"


async def send_to_all(host: Host, line: str) -> None:
    async def send(peer: Any) -> None:
        try:
            await host.rpc_call(peer, CHAT_PROTOCOL, line, timeout=10)
        except P2PError as exc:
            say(f"! could not reach {peer.short()}: {exc}")

    peers = host.connected_peers()
    if not peers:
        say("! nobody is connected yet")
    await asyncio.gather(*(send(peer) for peer in peers))


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def chat(listen: list[str], peers: list[str], key: str | None) -> None:
    identity = KeyPair.load_or_create(key) if key else KeyPair.generate()
    host = Host(identity, [TcpTransport(identity), QuicTransport(identity)])
    host.add_rpc_handler(CHAT_PROTOCOL, receive)
    await host.start([Multiaddr.from_string(addr) for addr in listen])
    async with host:
        for addr in host.addrs:
            say(f"listening on {addr}")
        for addr in peers:
            peer = await host.connect(Multiaddr.from_string(addr))
            say(f"connected to {peer}")
        lines = await stdin_lines()
        while raw := await lines.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            if line:
                await send_to_all(host, line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", action="append", default=[], help="multiaddr to listen on")
    parser.add_argument("--peer", action="append", default=[], help="multiaddr to connect to")
    parser.add_argument("--key", help="identity key file (created if missing)")
    args = parser.parse_args()
    if not args.listen and not args.peer:
        parser.error("give --listen, --peer or both")
    try:
        asyncio.run(chat(args.listen, args.peer, args.key))
    except KeyboardInterrupt:
        pass
    except P2PError as exc:
        sys.exit(f"chat: {exc}")


if __name__ == "__main__":
    main()
