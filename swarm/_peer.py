"""What every command needs: an identity, a Host with TCP and QUIC, a DHT, and a clean stop.

Imports no torch: ``bootstrap`` runs on the core packages alone.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from dht import DHT
from p2p import Host
from security import KeyPair
from transport import Multiaddr, QuicTransport, TcpTransport

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1")
"""Loopback only by default: pass ``--listen`` with a LAN or public address to be reachable."""


def say(text: str) -> None:
    """One line on stdout, flushed: what scripts (and the demo) read."""
    print(text, flush=True)


def identity_from(path: str | None) -> KeyPair:
    """The key pair in ``path`` (created, mode 0600, if missing), or a fresh one."""
    return KeyPair.load_or_create(path) if path else KeyPair.generate()


def addrs_from(texts: Sequence[str]) -> list[Multiaddr]:
    return [Multiaddr.from_string(text) for text in texts]


async def start_peer(
    identity: KeyPair,
    listen: Sequence[str],
    bootstrap: Sequence[str],
    *,
    server_mode: bool,
) -> tuple[Host, DHT]:
    """A started Host (listening on ``listen``) and a DHT joined through ``bootstrap``.

    With no ``bootstrap`` the DHT starts a new swarm.
    """
    host = Host(identity, [TcpTransport(identity), QuicTransport(identity)])
    await host.start(addrs_from(listen))
    dht = DHT(host, server_mode=server_mode, identity=identity)
    try:
        await dht.start(bootstrap=addrs_from(bootstrap))
    except BaseException:
        await dht.stop()
        await host.stop()
        raise
    return host, dht


async def stop_peer(host: Host, dht: DHT) -> None:
    await dht.stop()
    await host.stop()


def stop_signal() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM; a second one interrupts at once."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def first(signum: int) -> None:
        event.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print(f"{signal.Signals(signum).name}: stopping (again to force)", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first, sig)
    return event
