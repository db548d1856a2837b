"""``swarm join``: serve blocks of a model until Ctrl-C, then leave gracefully.

Prints, on stdout, one ``listening on <multiaddr>`` line per address as soon as the node
listens (others bootstrap from it), ``joining: blocks I:J of NAME`` once the span is
chosen and announced, and ``online: blocks I:J of NAME`` once it serves; ``offline`` after
a graceful stop. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from ._peer import DEFAULT_LISTEN, identity_from, say, start_peer, stop_peer, stop_signal

_log = logging.getLogger("swarm.join")


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
    parser.add_argument("--device", help="e.g. cpu, cuda:0 (default: first CUDA device, else cpu)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
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
    parser.add_argument("--identity", help="key file (created if missing); default: a new key")
    parser.add_argument("--cache-dir", type=Path, help="swarm cache (throughputs)")


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
    )
    stop = stop_signal()
    identity = identity_from(args.identity)
    host, dht = await start_peer(
        identity, args.listen or DEFAULT_LISTEN, args.bootstrap, server_mode=True
    )
    try:
        for addr in host.addrs:
            say(f"listening on {addr}")
        if not args.bootstrap:
            _log.info("no --bootstrap: this node starts a new swarm")

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
