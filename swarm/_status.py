"""``swarm status``: which servers serve which blocks of which model, read from the DHT."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._peer import identity_from, say, start_peer, stop_peer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap",
        action="append",
        required=True,
        metavar="MADDR",
        help="a peer of the swarm (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line instead of tables")


def coverage_line(num_blocks: int, spans: list[tuple[int, int]]) -> str:
    """``blocks 0-5 served by >= 1 online server`` or the blocks nobody serves."""
    counts = [0] * num_blocks
    for start, end in spans:
        for block in range(start, min(end, num_blocks)):
            counts[block] += 1
    missing = [b for b, c in enumerate(counts) if c == 0]
    if missing:
        return f"blocks not served by any online server: {', '.join(map(str, missing))}"
    return f"every block served (at least {min(counts)} online server(s) per block)"


async def run(args: argparse.Namespace) -> int:
    from model_shards._announce import describe_servers, read_models, read_servers

    host, dht = await start_peer(identity_from(None), [], args.bootstrap, server_mode=False)
    try:
        models = await read_models(dht)
        report: list[dict[str, Any]] = []
        for model in sorted(models.values(), key=lambda m: m.display_name):
            servers = describe_servers(await read_servers(dht, model.model_id, model.num_blocks))
            report.append(
                {
                    "model": model.display_name,
                    "model_id": model.model_id,
                    "model_type": model.model_type,
                    "num_blocks": model.num_blocks,
                    "servers": [
                        {
                            "peer_id": str(s.peer_id),
                            "blocks": [s.start, s.end],
                            "state": s.state.value,
                            "throughput": round(s.throughput, 1),
                            "cache_tokens_left": s.cache_tokens_left,
                            "quantization": s.quantization,
                            "dtype": s.dtype,
                        }
                        for s in servers
                    ],
                }
            )
    finally:
        await stop_peer(host, dht)
    if args.json:
        say(json.dumps({"models": report}))
        return 0
    if not report:
        say("no model is announced in this swarm")
    for entry in report:
        say(f"model {entry['model']} ({entry['model_type']}, {entry['num_blocks']} blocks)")
        say(
            f"  {'server':<20} {'blocks':>7} {'state':<8} {'tok/s/blk':>10} "
            f"{'cache tok':>9} {'quant':<5} dtype"
        )
        for s in entry["servers"]:
            start, end = s["blocks"]
            say(
                f"  {s['peer_id'][:8] + '..' + s['peer_id'][-8:]:<20} {f'{start}:{end}':>7} "
                f"{s['state']:<8} {s['throughput']:>10.0f} {s['cache_tokens_left']:>9} "
                f"{s['quantization']:<5} {s['dtype']}"
            )
        online = [tuple(s["blocks"]) for s in entry["servers"] if s["state"] == "online"]
        say(f"  {coverage_line(entry['num_blocks'], online)}")
    return 0
