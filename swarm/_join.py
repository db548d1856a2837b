"""``swarm join``: serve blocks of a model until Ctrl-C, then leave gracefully.

Prints, on stdout, one ``listening on <multiaddr>`` line per address as soon as the node
listens (others bootstrap from it; a wildcard listen address is shown as the interface
addresses it stands for), ``joining: blocks I:J of NAME`` once the span is
chosen and announced, and ``online: blocks I:J of NAME`` once it serves; ``offline`` after
a graceful stop. Logs go to stderr.

NAT traversal is always on (``swarm._peer``): a node that learns it cannot be reached
from the internet joins the DHT as a client and serves its blocks through a relay. mDNS
is on unless ``--no-mdns``, on the private LAN addresses the node listens on; with no
``--bootstrap`` the node first waits up to ``LAN_WAIT_S`` for a LAN peer, so that the
blocks it picks complement those its home cluster serves already.

Trust (``swarm._peer``): ``--pow-bits`` is the swarm's identity proof-of-work difficulty;
with ``--identity`` the solved proof is kept in ``<key file>.pow`` and reused at restarts;
the node's reputation book lives in the swarm cache (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dht import DHT
from p2p.discovery import lan_interfaces
from security import DEFAULT_POW_DIFFICULTY

from ._peer import (
    DEFAULT_POW_BITS,
    say,
    start_node,
    stop_peer,
    stop_signal,
)

if TYPE_CHECKING:
    from model_shards._server_limits import ServerLimits

_log = logging.getLogger("swarm.join")

LAN_WAIT_S = 3.0
"""With mDNS and no ``--bootstrap``: how long to wait for a LAN peer before picking blocks."""


def parse_blocks(text: str) -> tuple[int, int] | None:
    """``auto`` -> None; ``I:J`` -> (I, J)."""
    if text == "auto":
        return None
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes auto or I:J, not {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= I < J")
    return start, end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or cached Hub name")
    parser.add_argument(
        "--blocks", type=parse_blocks, default=None, help="auto (default) or I:J (blocks I..J-1)"
    )
    parser.add_argument(
        "--num-blocks", type=int, help="with --blocks auto: how many blocks (default: all)"
    )
    parser.add_argument("--quant", choices=["none", "int8", "nf4"], help="default: nf4 on CUDA")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--device", default="auto", help="auto (first CUDA device, else cpu), cpu, cuda or cuda:N"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    add_node_arguments(parser, cache_holds="throughputs, reputation")
    parser.add_argument(
        "--no-rebalance",
        action="store_true",
        help="stay on the chosen blocks (default: move when the swarm needs it elsewhere)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="on shutdown, seconds open sessions may finish before they are handed back "
        "(default: ServerLimits.drain_timeout_s)",
    )
    add_mdns_argument(parser)


def parse_pow_bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pow-bits takes a number, not {text!r}") from None
    if not 0 <= bits <= 64:
        raise argparse.ArgumentTypeError(f"--pow-bits {bits}: need 0 <= N <= 64")
    return bits


def add_node_arguments(parser: argparse.ArgumentParser, *, cache_holds: str) -> None:
    """The options of a node of the swarm (``join`` and ``bootstrap``): where it listens,
    whom it joins through, its identity and its cache (which holds ``cache_holds``)."""
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
        help=f"swarm cache ({cache_holds}); default: $SWARM_CACHE_DIR or ~/.cache/swarm",
    )


def add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--identity",
        metavar="KEY_FILE",
        help="key file (created if missing; its solved proof-of-work is kept in KEY_FILE.pow "
        "and reused at restarts); default: a new key",
    )
    parser.add_argument(
        "--pow-bits",
        type=parse_pow_bits,
        default=DEFAULT_POW_BITS,
        metavar="N",
        help="identity proof-of-work difficulty in bits (default: %(default)s). Every node "
        "of a swarm must use the same value (a node refuses peers with weaker proofs); a "
        f"public swarm should use security.DEFAULT_POW_DIFFICULTY ({DEFAULT_POW_DIFFICULTY})",
    )


def add_mdns_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-mdns",
        action="store_true",
        help="do not announce or discover peers on the LAN (mDNS runs only on private LAN "
        "addresses the node listens on: never with the default loopback --listen)",
    )


async def wait_for_lan_peers(dht: DHT, timeout: float) -> None:
    """Return once the DHT knows a peer, or after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not len(dht.routing_table) and loop.time() < deadline:  # noqa: ASYNC110 - polls
        await asyncio.sleep(0.1)


def server_limits(drain_timeout_s: float | None) -> ServerLimits:
    """The server's limits, with the drain time given on the command line."""
    from model_shards._server_limits import ServerLimits

    limits = ServerLimits()
    if drain_timeout_s is None:
        return limits
    return dataclasses.replace(limits, drain_timeout_s=drain_timeout_s)


async def run(args: argparse.Namespace) -> int:
    from model_shards._announce import ServerRecord
    from model_shards._progress import tqdm_progress
    from model_shards._server_node import ServerConfig, ServerNode

    config = ServerConfig(
        model=args.model,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        quantization=args.quant,
        dtype=args.dtype,
        device=args.device,
        torch_threads=args.threads,
        swarm_cache_dir=args.cache_dir,
        limits=server_limits(args.drain_timeout),
        rebalance=not args.no_rebalance,
    )
    stop = stop_signal()
    host, dht = await start_node(args)
    try:
        for addr in host.addrs:
            say(f"listening on {addr}")
        if not args.bootstrap:
            if not args.no_mdns and lan_interfaces(host.listen_addrs):
                await wait_for_lan_peers(dht, LAN_WAIT_S)
            if not len(dht.routing_table):
                _log.info("no --bootstrap and no LAN peer: this node starts a new swarm")

        def joining(record: ServerRecord) -> None:
            say(f"joining: blocks {record.start}:{record.end}")

        starting = asyncio.ensure_future(
            ServerNode.start(host, dht, config, progress=tqdm_progress, on_joining=joining)
        )
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            say("offline")
            return 130
        stopping.cancel()
        node = starting.result()
        start, end = node.span
        say(f"online: blocks {start}:{end} of {node.server.manifest.display_name}")
        await stop.wait()
        await node.stop()
        say("offline")
        return 0
    finally:
        await stop_peer(host, dht)
