"""``swarm bootstrap``: a DHT node that serves no blocks, for others to join through.

It runs NAT traversal like ``join``: reachable from the internet, it relays for the
nodes that are not (and checks their reachability); mDNS, ``--pow-bits``, the kept
identity proof and the reputation book as in ``join``.
"""

from __future__ import annotations

import argparse

from ._join import add_mdns_argument, add_node_arguments
from ._peer import (
    say,
    start_node,
    stop_peer,
    stop_signal,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_node_arguments(parser, cache_holds="reputation")
    add_mdns_argument(parser)


async def run(args: argparse.Namespace) -> int:
    stop = stop_signal()
    host, dht = await start_node(args)
    try:
        for addr in host.addrs:
            say(f"listening on {addr}")
        await stop.wait()
    finally:
        await stop_peer(host, dht)
    say("offline")
    return 0
