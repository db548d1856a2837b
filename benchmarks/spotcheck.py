"""Spot-check benchmark: how fast cheaters are caught, false positives, and what checks cost.

Usage::

    .venv/bin/python benchmarks/spotcheck.py [--quick] [--seeds N] [--honest-steps N]

One ``python -m swarm bootstrap`` process and one ``tests/model_shards/cheater.py`` process
holding nine shard servers of a tiny Llama (4 blocks, float32), each with its own identity,
DHT node and loopback /24: three honest ones (two of blocks 0:4, one of 0:2) and one
cheater of blocks 0:2 per mode of the issue: (a) ``noise``, (b) ``zeros``, (c) ``scale``
x1.05, (d) ``flip`` of one hidden channel, (e) ``rare`` (noise on 10 % of the steps), (f)
``skip`` (the input returned). Cheaters lie in their inference steps only and answer the
checkers' forwards honestly. The client (this process) generates greedily, hop by hop,
over a chain of two hops (blocks 0:2, then 2:4 on an honest server), calling
``SpotChecker.after_step`` after every hop's step, with a ``ReputationBook``.

* Detection: per mode and per seed (the checker's random draws), steps of the cheater's
  hop until it is found cheating, at the default check rate; the bound is
  ``detection_bound(rate, cheat_rate)`` (probability >= 0.99). ``detection_steps_max`` is
  the most over modes and seeds, ``detection_bound`` the largest bound (mode ``rare``).
* False positives: an honest chain checked at every step (paranoid) with a fresh book;
  every verdict accusing an honest server counts.
* Overhead: tokens per second of the honest chain with the default rate against no checks
  at all, in generation sessions of 44 tokens alternating between the two; the
  ``overhead_ratio`` is the ratio of the medians of the sessions' speeds (goal >= 0.9).
  Sessions are short and alternate because the machine is shared and its load (and the
  server process's own periodic DHT announcements) stall some sessions of either kind.

The table goes to stdout; the LAST line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model_shards import Checkpoint, load_manifest, load_model_ends  # noqa: E402
from model_shards._client_chain import Hop, RemoteChain  # noqa: E402
from model_shards._spotcheck import (  # noqa: E402
    DEFAULT_RATE,
    SpotChecker,
    SpotCheckSettings,
    Verdict,
    detection_bound,
)
from security import KeyPair, ReputationBook  # noqa: E402
from swarm._peer import start_peer, stop_peer  # noqa: E402
from tests.model_shards.cheater import (  # noqa: E402
    CHEAT_RATES,
    CORRUPTIONS,
    MAX_LENGTH,
    PROMPT,
    ServerProcess,
    generate,
)
from tests.model_shards.tiny import make_tiny  # noqa: E402
from tests.swarm.harness import ProcessSwarm  # noqa: E402

TCP = "/ip4/127.0.0.1/tcp/0"
STEPS = MAX_LENGTH - PROMPT
"""Tokens of one generation session."""
SERVERS = ["honest:0:4", "honest:0:4", "honest:0:2", *(f"{m}:0:2" for m in CORRUPTIONS)]


def settings(rate: float) -> SpotCheckSettings:
    """Loopback addresses count as IP groups: each server sits in its own 127.0.x.0/24."""
    return SpotCheckSettings(rate=rate, exempt_private_addrs=False)


async def run(args: argparse.Namespace, bootstrap: str, model: Path, peers: dict) -> dict:
    model_id = load_manifest(Checkpoint.open(model)).model_id
    host, dht = await start_peer(KeyPair.generate(), [TCP], [bootstrap], server_mode=False)
    try:
        chain = RemoteChain(host, dht, model_id, 4)
        await chain.servers(refresh=True)
        ends = load_model_ends(model, dtype=torch.float32, device="cpu")

        def hop(role: str, start: int, end: int) -> Hop:
            return Hop(peers[role], start, end, torch.float32)

        second = hop("honest 0:4", 2, 4)
        honest = [hop("honest 0:2", 0, 2), second]
        honest_peers = {p for role, p in peers.items() if role.startswith("honest")}

        detection = {}
        for mode in CORRUPTIONS:
            cheater = peers[f"{mode} 0:2"]
            bound = detection_bound(DEFAULT_RATE, CHEAT_RATES[mode])
            steps = []
            for seed in range(args.seeds):
                checker = SpotChecker(
                    chain,
                    settings=settings(DEFAULT_RATE),
                    book=ReputationBook(),
                    rng=random.Random(f"{mode}/{seed}"),
                )
                outcome = await generate(
                    host,
                    ends,
                    model_id,
                    [hop(f"{mode} 0:2", 0, 2), second],
                    checker,
                    max_steps=2 * bound,
                    stop_when_caught=cheater,
                    seed=seed,
                )
                caught = any(
                    v is Verdict.CHEATER and cheater in accused
                    for _, v, accused in outcome.verdicts
                )
                steps.append(outcome.steps if caught else None)
            detection[mode] = {"bound": bound, "steps": steps}
            shown = ", ".join("-" if s is None else str(s) for s in steps)
            print(
                f"{mode:<6} cheat rate {CHEAT_RATES[mode]:>4}: caught after {shown} steps "
                f"(bound {bound})",
                flush=True,
            )

        checker = SpotChecker(
            chain, settings=settings(1.0), book=ReputationBook(), rng=random.Random(99)
        )
        outcome = await generate(
            host, ends, model_id, honest, checker, max_steps=args.honest_steps, seed=99
        )
        false_positives = sum(
            len(set(accused) & honest_peers) for _, _, accused in outcome.verdicts
        )
        honest_checks = checker.stats.checks
        print(
            f"honest chain, every step checked: {honest_checks} checks, "
            f"{false_positives} false positive(s), {checker.stats.inconclusive} inconclusive"
        )

        speeds: dict[float, list[float]] = {0.0: [], DEFAULT_RATE: []}
        checkers = {
            rate: SpotChecker(
                chain, settings=settings(rate), book=ReputationBook(), rng=random.Random(7)
            )
            for rate in speeds
        }
        for session in range(args.sessions):
            for rate, checker in checkers.items():
                began = time.perf_counter()
                out = await generate(
                    host, ends, model_id, honest, checker, max_steps=STEPS, seed=session
                )
                speeds[rate].append(out.steps / (time.perf_counter() - began))
        unchecked = statistics.median(speeds[0.0])
        checked = statistics.median(speeds[DEFAULT_RATE])
        print(
            f"{args.sessions} sessions each: {unchecked:.0f} tokens/s unchecked, {checked:.0f} "
            f"with checks at {DEFAULT_RATE:.0%} ({checkers[DEFAULT_RATE].stats.checks} checks): "
            f"ratio {checked / unchecked:.3f}",
            flush=True,
        )
    finally:
        await stop_peer(host, dht)
    caught_steps = [s for d in detection.values() for s in d["steps"]]
    return {
        "check_rate": DEFAULT_RATE,
        "detection": detection,
        "detection_steps_max": None if None in caught_steps else max(caught_steps),
        "detection_bound": max(d["bound"] for d in detection.values()),
        "within_bounds": all(
            s is not None and s <= d["bound"] for d in detection.values() for s in d["steps"]
        ),
        "false_positives": false_positives,
        "honest_checks": honest_checks,
        "overhead_ratio": checked / unchecked,
        "tokens_per_s_unchecked": unchecked,
        "tokens_per_s_checked": checked,
        "load_average_1min": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer steps")
    parser.add_argument("--seeds", type=int, default=5, help="detection runs per cheat mode")
    parser.add_argument("--honest-steps", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=30, help="overhead sessions per arm")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.honest_steps, args.sessions = 2, 100, 6
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = make_tiny("llama", directory / "llama").path
        processes = ProcessSwarm(directory)
        servers = None
        try:
            bootstrap = processes.start("bootstrap", ["bootstrap", "--listen", TCP]).addr(60)
            command = ["--model", str(model), "--bootstrap", bootstrap]
            command += ["--cache-dir", str(directory / "cache")]
            for spec in SERVERS:
                command += ["--server", spec]
            servers = ServerProcess(command, directory / "servers.log")
            peers = servers.servers(timeout=300)
            figures = asyncio.run(run(args, bootstrap, model, peers))
        finally:
            if servers is not None:
                servers.stop()
            processes.close(graceful=False)
    print(
        f"detection_steps_max {figures['detection_steps_max']} (bound "
        f"{figures['detection_bound']}), false positives {figures['false_positives']} over "
        f"{figures['honest_checks']} checks, overhead ratio {figures['overhead_ratio']:.3f}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
