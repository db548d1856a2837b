"""``swarm bootstrap``: a DHT node that serves no blocks, for others to join through.

It runs NAT traversal like ``join``: reachable from the internet, it relays for the
nodes that are not (and checks their reachability); mDNS, ``--pow-bits``, the kept
identity proof and the reputation book as in ``join``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._join import add_identity_arguments, add_mdns_argument
from ._peer import (
    say,
    start_node,
    stop_peer,
    stop_signal,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MADDR",
        help="a peer of the swarm to join through (repeatable); none: start a new swarm",
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="MADDR",
        help="address to listen on (repeatable); default: loopback TCP and QUIC, port 0",
    )
    add_identity_arguments(parser)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="swarm cache (reputation); default: $SWARM_CACHE_DIR or ~/.cache/swarm",
    )
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
