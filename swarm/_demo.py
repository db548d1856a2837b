"""``swarm demo``: a whole swarm on this machine, compared with the model run locally.

Makes the demo model if missing (``_demo_model``), starts a bootstrap node and three
servers as separate processes on loopback QUIC, the servers placing themselves
(``--blocks auto``), generates from a prompt through them, runs the same prompt through the
whole model in this process, prints what happened, and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ._peer import default_cache_dir, say
from ._procs import NodeProcess, stop_all

QUIC_LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument(
        "--cache-dir", type=Path, help="default: $SWARM_CACHE_DIR or ~/.cache/swarm"
    )
    parser.add_argument("--prompt", default="A swarm of ordinary computers")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=180.0, help="for each node to start")


def run(args: argparse.Namespace) -> int:
    logs = Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    # the bootstrap node imports no torch: it starts while this process loads the model
    bootstrap = NodeProcess(
        ["bootstrap", "--listen", QUIC_LOOPBACK], log_path=logs / "bootstrap.log"
    )
    nodes: list[NodeProcess] = [bootstrap]
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from model_shards._client import DistributedModelForCausalLM
        from model_shards._server_limits import ClientLimits

        from ._demo_model import demo_model

        torch.set_num_threads(args.threads)
        cache_dir = args.cache_dir or default_cache_dir()
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = demo_model(cache_dir)
        say(f"demo model: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        per_server = math.ceil(local.config.num_hidden_layers / args.servers)
        bootstrap_addr = bootstrap.addr(args.timeout)
        say(f"bootstrap: {bootstrap_addr}")
        servers = []
        for index in range(args.servers):
            server = NodeProcess(
                [
                    "join",
                    "--model",
                    str(path),
                    "--blocks",
                    "auto",
                    "--num-blocks",
                    str(per_server),
                    "--bootstrap",
                    bootstrap_addr,
                    "--listen",
                    QUIC_LOOPBACK,
                    "--threads",
                    str(args.threads),
                    "--cache-dir",
                    str(cache_dir),
                ],
                log_path=logs / f"server{index}.log",
            )
            nodes.append(server)
            servers.append(server)
            say(f"server {index}: {server.wait_for('joining', args.timeout)}")
        for index, server in enumerate(servers):
            say(f"server {index}: {server.wait_for('online', args.timeout)}")

        inputs = tokenizer(args.prompt, return_tensors="pt")
        generation = {
            "max_new_tokens": args.new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
        }
        limits = ClientLimits(route_wait_s=args.timeout)
        with DistributedModelForCausalLM.from_pretrained(
            path, initial_peers=[bootstrap_addr], limits=limits
        ) as model:
            started = time.perf_counter()
            swarm_ids = model.generate(**inputs, **generation)
            swarm_s = time.perf_counter() - started
            records = sorted(model.servers().values(), key=lambda s: (s.start, str(s.peer_id)))
        with torch.no_grad():
            started = time.perf_counter()
            local_ids = local.generate(**inputs, **generation)
            local_s = time.perf_counter() - started
    finally:
        stop_all(nodes)
    new_tokens = swarm_ids.shape[1] - inputs["input_ids"].shape[1]
    identical = torch.equal(swarm_ids, local_ids)
    table = [
        {
            "peer_id": str(r.peer_id),
            "blocks": f"{r.start}:{r.end}",
            "state": r.state.value,
            "throughput": round(r.throughput, 1),
        }
        for r in records
    ]
    report: dict[str, Any] = {
        "identical": identical,
        "servers": table,
        "new_tokens": int(new_tokens),
        "swarm_tokens_per_s": round(new_tokens / swarm_s, 2),
        "local_tokens_per_s": round(new_tokens / local_s, 2),
    }
    say("")
    say(f"{'server':<14} {'blocks':>6}  {'block-tokens/s':>14}")
    for row in table:
        say(f"{row['peer_id'][-12:]:<14} {row['blocks']:>6}  {row['throughput']:>14.0f}")
    say("")
    say(f"prompt:    {args.prompt!r}")
    text = tokenizer.decode(swarm_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    say(f"generated: {text!r}")
    say(
        f"swarm: {report['swarm_tokens_per_s']} tokens/s, "
        f"local: {report['local_tokens_per_s']} tokens/s, "
        f"{new_tokens} new tokens, identical: {'yes' if identical else 'NO'}"
    )
    say(f"node logs: {logs}")
    if args.json:
        say(json.dumps(report))
    return 0 if identical else 1
