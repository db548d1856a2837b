"""Spot-check benchmark: how fast cheaters are caught, false positives, and what checks cost.

Usage::

    .venv/bin/python benchmarks/spotcheck.py [--quick] [--seeds N] [--honest-steps N]

One ``python -m swarm bootstrap`` process and one ``tests/model_shards/cheater.py`` process
holding ten shard servers of a tiny Llama (4 blocks, float32), each with its own identity,
DHT node and loopback /24: four honest ones (two of blocks 0:4, one of 0:2, one of 2:4)
and one cheater of blocks 0:2 per mode of the issue: (a) ``noise``, (b) ``zeros``, (c) ``scale``
x1.05, (d) ``flip`` of one hidden channel, (e) ``rare`` (noise on 10 % of the steps), (f)
``skip`` (the input returned). Cheaters lie in their inference steps only and answer the
checkers' forwards honestly. The client (this process) generates greedily, hop by hop,
over a chain of two hops (blocks 0:2, then 2:4 on an honest server), calling
``SpotChecker.after_step`` after every hop's step, with a ``ReputationBook``.

* Detection: per mode and per seed (the checker's random draws), steps of the cheater's
  hop until it is found cheating, at the default check rate; the bound is
  ``detection_bound(rate, cheat_rate)`` (probability >= 0.99). ``detection_steps_max`` is
  the most over modes and seeds, ``detection_bound`` the largest bound (mode ``rare``).
  The cheater and the honest second hop have left probation in the client's book (they
  passed ``probation_checks`` checks): a peer on probation is checked at every step
  (``SpotCheckSettings.probation_rate``), and the bound is stated for the default rate.
* Final tokens: per mode, ``DistributedModelForCausalLM.generate`` at the default rate
  (greedy, 90 new tokens a generation, a new prompt each) on a route through the
  cheater (left probation, the other cheaters banned), generation after generation until
  it is caught; the generation it is caught in must give the local model's tokens, the
  tokens it had corrupted before its check drawn again after a rewind.
  ``tokens_equal_default_rate`` says whether they did for every mode, ``rewinds`` counts
  the rewinds per mode.
* False positives: an honest chain checked at every step (paranoid) with a fresh book;
  every verdict accusing an honest server counts.
* Overhead: tokens per second of the honest chain through the client's inference
  sessions (``ChainSession``: push, signed answers, its spot-checks) with checks at the
  default rate against no checks at all, in generation sessions of 44 tokens alternating
  between the arms; the ``overhead_ratio`` is the ratio of the medians of the sessions'
  speeds (goal >= 0.9). The checked arm runs checks as a client does by default: those of
  servers off probation in the background (``SpotCheckSettings.background``), the token
  not waiting for them, and every one settled before the session ends;
  ``overhead_ratio_blocking`` is the same with every check blocking its step (as before
  background checks). Sessions are short and alternate because the machine is shared and
  its load (and the server process's own periodic DHT announcements) stall some sessions
  of either kind.

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

from model_shards import Checkpoint, ModelEnds, load_manifest, load_model_ends  # noqa: E402
from model_shards._client import DistributedModelForCausalLM  # noqa: E402
from model_shards._client_chain import Hop, RemoteChain  # noqa: E402
from model_shards._client_session import ChainSession, open_hops  # noqa: E402
from model_shards._server_limits import ClientLimits  # noqa: E402
from model_shards._spotcheck import (  # noqa: E402
    DEFAULT_RATE,
    SpotChecker,
    SpotCheckSettings,
    Verdict,
    detection_bound,
)
from security import Event, KeyPair, ReputationBook  # noqa: E402
from swarm._peer import start_peer, stop_peer  # noqa: E402
from tests.model_shards.cheater import (  # noqa: E402
    CHEAT_RATES,
    CORRUPTIONS,
    MAX_LENGTH,
    PROMPT,
    ServerProcess,
    generate,
)
from tests.model_shards.tiny import TinyModel, make_tiny, prompts  # noqa: E402
from tests.swarm.harness import ProcessSwarm  # noqa: E402

TCP = "/ip4/127.0.0.1/tcp/0"
STEPS = MAX_LENGTH - PROMPT
"""Tokens of one generation session."""
SERVERS = [
    "honest:0:4",
    "honest:0:4",
    "honest:0:2",
    "honest:2:4",
    *(f"{m}:0:2" for m in CORRUPTIONS),
]
NEW_TOKENS = 90
"""Tokens of one generation of the final-tokens check (the tiny model holds 256)."""
FAR_S = 5.0
"""The round trip the client believes it has to the honest servers of the cheater's span."""


def settled(peers: list) -> ReputationBook:
    """A book in which ``peers`` left probation (they passed the checks it takes)."""
    book = ReputationBook()
    for peer in peers:
        for _ in range(book.settings.probation_checks):
            book.record(peer, Event.CHECK_PASSED)
    return book


def settings(rate: float, *, background: bool = True) -> SpotCheckSettings:
    """Loopback addresses count as IP groups: each server sits in its own 127.0.x.0/24."""
    return SpotCheckSettings(rate=rate, exempt_private_addrs=False, background=background)


async def chain_tokens(
    chain: RemoteChain, ends: ModelEnds, hops: list[Hop], checker: SpotChecker | None, seed: int
) -> int:
    """Greedy generation of ``STEPS`` tokens of a random prompt in one inference session
    on ``hops``, each hop's steps spot-checked by ``checker`` (None: no checks), its
    background checks settled before it closes; the tokens drawn."""
    sessions = await open_hops(chain, hops, batch_size=1, max_length=MAX_LENGTH)
    session = ChainSession(chain, sessions, batch_size=1, max_length=MAX_LENGTH, checker=checker)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, ends.vocab_size, (1, PROMPT), generator=generator)
    try:
        for _ in range(STEPS):
            with torch.no_grad():
                hidden = await session.step(ends.embed(ids))
                ids = ends.logits(hidden)[:, -1].argmax(-1, keepdim=True)
        await session.settle()
    finally:
        await session.close()
    return STEPS


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
                    book=settled([cheater, second.peer_id]),
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

        arms: dict[str, SpotChecker | None] = {
            arm: SpotChecker(
                chain,
                settings=settings(DEFAULT_RATE, background=arm == "background"),
                book=settled([h.peer_id for h in honest]),
                rng=random.Random(7),
            )
            for arm in ("background", "blocking")
        }
        arms = {"unchecked": None, **arms}
        speeds: dict[str, list[float]] = {arm: [] for arm in arms}
        for session in range(args.sessions):
            for arm, checker in arms.items():
                began = time.perf_counter()
                steps = await chain_tokens(chain, ends, honest, checker, seed=session)
                speeds[arm].append(steps / (time.perf_counter() - began))
        unchecked, checked, blocking = (
            statistics.median(speeds[arm]) for arm in ("unchecked", "background", "blocking")
        )
        checks = {arm: c.stats.checks for arm, c in arms.items() if c is not None}
        print(
            f"{args.sessions} sessions each: {unchecked:.0f} tokens/s unchecked, {checked:.0f} "
            f"with checks at {DEFAULT_RATE:.0%} in the background ({checks['background']} "
            f"checks): ratio {checked / unchecked:.3f}; {blocking:.0f} with every check "
            f"blocking ({checks['blocking']} checks): ratio {blocking / unchecked:.3f}",
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
        "overhead_ratio_blocking": blocking / unchecked,
        "tokens_per_s_unchecked": unchecked,
        "tokens_per_s_checked": checked,
        "tokens_per_s_blocking": blocking,
        "load_average_1min": os.getloadavg()[0],
    }


def final_tokens(bootstrap: str, tiny: TinyModel, peers: dict) -> dict:
    """Per mode: whether the generation that caught the cheater at the default rate gave
    the local model's tokens, its rewinds, and the generations it took."""
    found = {}
    limits = ClientLimits(ban_s=3600.0)
    for mode in CORRUPTIONS:
        cheater = peers[f"{mode} 0:2"]
        with DistributedModelForCausalLM.from_pretrained(
            tiny.path, initial_peers=[bootstrap], limits=limits
        ) as model:
            assert model.checker is not None
            model.checker.rng = random.Random(f"tokens/{mode}")
            for peer in [cheater, *(p for r, p in peers.items() if r.startswith("honest"))]:
                for _ in range(model.book.settings.probation_checks):
                    model.book.record(peer, Event.CHECK_PASSED)
            model.client.run(model.chain.servers(refresh=True))
            for role, peer in peers.items():
                if role.startswith("honest") and not role.startswith("honest 2:4"):
                    model.chain._rtts[peer] = FAR_S
                elif peer != cheater and not role.startswith("honest"):
                    model.chain.ban(peer)
            generations = 0
            bound = detection_bound(DEFAULT_RATE, CHEAT_RATES[mode])
            while generations * NEW_TOKENS < bound:
                ids = prompts(1, PROMPT, seed=100 + generations)
                generations += 1
                with model.inference_session(max_length=PROMPT + NEW_TOKENS) as session:
                    got = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
                    caught, rewinds = session.caught, session.rewinds
                if caught:
                    break
        expected = tiny.model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        equal = bool(caught) and torch.equal(got, expected)
        found[mode] = {"equal": equal, "rewinds": len(rewinds), "generations": generations}
        print(
            f"{mode:<6} through generate: caught in generation {generations}, "
            f"{len(rewinds)} rewind(s), tokens {'equal' if equal else 'DIFFERENT'}",
            flush=True,
        )
    return found


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
        tiny = make_tiny("llama", directory / "llama")
        model = tiny.path
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
            tokens = final_tokens(bootstrap, tiny, peers)
            figures["final_tokens"] = tokens
            figures["tokens_equal_default_rate"] = all(t["equal"] for t in tokens.values())
            figures["rewinds"] = {mode: t["rewinds"] for mode, t in tokens.items()}
        finally:
            if servers is not None:
                servers.stop()
            processes.close(graceful=False)
    print(
        f"detection_steps_max {figures['detection_steps_max']} (bound "
        f"{figures['detection_bound']}), false positives {figures['false_positives']} over "
        f"{figures['honest_checks']} checks, overhead ratio {figures['overhead_ratio']:.3f}, "
        f"final tokens equal at the default rate: {figures['tokens_equal_default_rate']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
