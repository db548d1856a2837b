"""Cheating shard servers, for tests and benchmarks: a real server process whose span lies.

Run ``python -m tests.model_shards.cheater --model DIR --bootstrap MADDR --server
honest:0:4 --server noise:0:2 ...``: one process holding one shard server per ``--server``
(each its own identity, Host and DHT node, listening on its own loopback address, so that
each sits in its own /24 IP group), serving its blocks honestly (``honest``) or with the
outputs of its inference steps corrupted as ``CORRUPTIONS[mode]`` says; with ``:liar``, its
stateless forwards (what a spot-checker runs) are corrupted too. Prints ``online <mode>
<I>:<J> <peer id>`` per server once it serves, then ``all online``, and runs until
SIGINT/SIGTERM. Nothing in ``model_shards`` is edited: the server's span is swapped,
inside this process only, for a ``CheatingSpan`` sharing the same blocks.

For tests and benchmarks that drive such a swarm: ``ServerProcess`` starts this process
and reads which peer serves what; ``HopStream`` is one hop's session over the plain
lock-step inference protocol; ``generate`` runs greedy generation hop by hop through a
chain, calling ``SpotChecker.after_step`` after every hop's step and using the majority's
output in place of a step found cheating.

Modes, the issue's (a) to (f): ``noise`` (a), ``zeros`` (b), ``scale`` (c) outputs x 1.05,
``flip`` (d) one hidden channel negated, ``rare`` (e) noise on 10 % of the steps only,
``skip`` (f) the input handed back as the output. One more, not the issue's: ``late``,
honest for its first ``LATE_AFTER`` inference steps and noisy from then on (a cheater whose
first corrupted position is known: the rewind tests need one).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_shards import ModelEnds
from model_shards._client_chain import Hop
from model_shards._limits import WireLimits
from model_shards._server_protocol import INFERENCE_PROTOCOL, pack_tensors, unpack_tensors
from model_shards._spotcheck import SpotChecker, Verdict
from p2p import Host, RpcStream
from security import PeerId
from tests.model_shards.tiny import span_as

NOISE = 0.1
"""Noise standard deviation, as a share of each token's output RMS."""
SCALE = 1.05
FLIPPED_CHANNEL = 3
RARE_SHARE = 0.1
"""Mode ``rare``: the share of calls that are corrupted."""
LATE_AFTER = 3
"""Mode ``late``: the inference steps run honestly before every later one is noisy."""

Corruption = Callable[[torch.Tensor, torch.Tensor, random.Random], torch.Tensor]


def _noise(inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    noise = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
    rms = output.float().square().mean(dim=-1, keepdim=True).sqrt().to(output.dtype)
    return output + NOISE * rms * noise


def _zeros(inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return torch.zeros_like(output)


def _scale(inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return output * SCALE


def _flip(inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
    flipped = output.clone()
    flipped[..., FLIPPED_CHANNEL] = -flipped[..., FLIPPED_CHANNEL]
    return flipped


def _rare(inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return _noise(inputs, output, rng) if rng.random() < RARE_SHARE else output


def _skip(inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return inputs.clone()


CORRUPTIONS: dict[str, Corruption] = {
    "noise": _noise,
    "zeros": _zeros,
    "scale": _scale,
    "flip": _flip,
    "rare": _rare,
    "skip": _skip,
}
CHEAT_RATES: dict[str, float] = {
    mode: RARE_SHARE if mode == "rare" else 1.0 for mode in CORRUPTIONS
}
"""Share of a cheater's steps that are wrong, per mode."""
MODES = (*CORRUPTIONS, "late")
"""Every mode a cheating server can have: the issue's, and ``late``."""


def _late() -> Corruption:
    """Mode ``late``'s corruption, counting the steps of the span it is made for."""
    steps = itertools.count(1)

    def corrupt(inputs: torch.Tensor, output: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return _noise(inputs, output, rng) if next(steps) > LATE_AFTER else output

    return corrupt


def cheating_span(span: Any, mode: str, rng: random.Random, *, liar: bool) -> Any:
    """A span running ``span``'s blocks whose inference steps are corrupted by ``mode``;
    its stateless forwards and checkers' replays too when ``liar`` (a cheater that also
    lies when it checks others), else they stay honest (a cheater that passes for honest
    as a checker)."""
    from model_shards import Span

    corrupt = _late() if mode == "late" else CORRUPTIONS[mode]

    checking = threading.local()
    """``active`` while this thread runs a checker's replay (``forward_steps``): its
    temporary cache is not a real session."""

    class CheatingSpan(Span):
        def _run(self, hidden: torch.Tensor, geometry: Any, cache: Any) -> torch.Tensor:
            output = super()._run(hidden, geometry, cache)
            in_session = cache is not None and not getattr(checking, "active", False)
            return corrupt(hidden, output, rng) if in_session or liar else output

        def forward_steps(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            checking.active = True
            try:
                return super().forward_steps(*args, **kwargs)
            finally:
                checking.active = False

    return span_as(span, CheatingSpan)


def install(server: Any, mode: str, seed: int, *, liar: bool) -> None:
    """Make ``server`` (a ``ShardServer``) cheat: its span, and every sub-span it builds."""
    rng = random.Random(seed)
    honest_span_for = server._span_for
    built: dict[tuple[int, int], Any] = {}

    def span_for(request: dict[str, Any]) -> Any:
        span = honest_span_for(request)
        key = (span.start, span.end)
        if key not in built:
            built[key] = cheating_span(span, mode, rng, liar=liar)
        return built[key]

    server._span_for = span_for
    server.span = cheating_span(server.span, mode, rng, liar=liar)


# -- launching this process, and a client for its servers (tests, benchmarks) -----------

ROOT = Path(__file__).resolve().parents[2]
TCP = "/ip4/127.0.0.1/tcp/0"
MAX_LENGTH = 48
"""Tokens per generation session of ``generate`` (then a new session starts)."""
PROMPT = 4


class ServerProcess:
    """``python -m tests.model_shards.cheater`` as a child process (stdout read by a thread)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.model_shards.cheater", *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def servers(self, timeout: float) -> dict[str, PeerId]:
        """``role I:J`` -> peer id of every server, once all are online."""
        found: dict[str, PeerId] = {}
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
                raise RuntimeError(
                    f"the server process exited with {self.popen.wait()}; its log ends:\n"
                    + "\n".join(tail)
                )
            if line == "all online":
                return found
            _, role, blocks, peer = line.split(" ")
            key = f"{role} {blocks}"
            found[key if key not in found else f"{key} #2"] = PeerId.from_base58(peer)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


@contextmanager
def cheating_swarm(
    model: Path, specs: Sequence[str], work: Path, *, timeout: float = 240.0
) -> Iterator[tuple[str, dict[str, PeerId]]]:
    """A ``swarm bootstrap`` process and one ``ServerProcess`` holding the servers of
    ``specs`` (``--server`` values) for ``model``, once all are online: the bootstrap's
    address and every server's peer id by ``role I:J``. Logs and caches go in ``work``."""
    from tests.swarm.harness import ProcessSwarm  # the child process needs none of it

    processes = ProcessSwarm(work)
    servers: ServerProcess | None = None
    try:
        bootstrap = processes.start("bootstrap", ["bootstrap", "--listen", TCP]).addr(60)
        args = ["--model", str(model), "--bootstrap", bootstrap, "--cache-dir", str(work)]
        for spec in specs:
            args += ["--server", spec]
        servers = ServerProcess(args, work / "servers.log")
        yield bootstrap, servers.servers(timeout=timeout)
    finally:
        if servers is not None:
            servers.stop()
        processes.close(graceful=False)


class HopStream:
    """One hop's inference session over the plain lock-step protocol."""

    def __init__(self, hop: Hop, call: RpcStream) -> None:
        self.hop = hop
        self.call = call

    @classmethod
    async def open(cls, host: Host, model_id: str, hop: Hop, max_length: int) -> HopStream:
        call = await host.rpc_open(hop.peer_id, INFERENCE_PROTOCOL)
        request = {
            "op": "open",
            "model": model_id,
            "start": hop.start,
            "end": hop.end,
            "batch": 1,
            "max_length": max_length,
        }
        await call.send(request)
        reply = await call.recv()
        assert reply is not None and reply.value.get("op") == "opened", reply
        return cls(hop, call)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        sizes, payload = pack_tensors([hidden.to(self.hop.dtype)])
        await self.call.send({"op": "step", "tensors": sizes}, payload)
        reply = await self.call.recv()
        assert reply is not None and "error" not in reply.value, reply
        (out,) = unpack_tensors(
            reply.value["tensors"], reply.payload, WireLimits(), count=range(1, 2)
        )
        return out.to(torch.float32).clone()

    async def close(self) -> None:
        await self.call.aclose()


@dataclass
class Outcome:
    steps: int
    """Steps of the first hop run until the end (or until its cheater was caught)."""
    verdicts: list[tuple[PeerId, Verdict, tuple[PeerId, ...]]]
    tokens: list[int]
    corrected_lengths: list[tuple[int, int]]
    """Per step caught cheating: (prefix length the hop had run, length corrected)."""


async def generate(
    host: Host,
    ends: ModelEnds,
    model_id: str,
    hops: list[Hop],
    checker: SpotChecker,
    *,
    max_steps: int,
    stop_when_caught: PeerId | None = None,
    seed: int = 0,
) -> Outcome:
    """Greedy generation, session after session (a random prompt each), through ``hops``,
    each hop's step spot-checked; stops once ``stop_when_caught`` is found cheating."""
    generator = torch.Generator().manual_seed(seed)
    verdicts: list[tuple[PeerId, Verdict, tuple[PeerId, ...]]] = []
    tokens: list[int] = []
    corrected_lengths: list[tuple[int, int]] = []
    steps = 0
    while steps < max_steps:
        streams = [await HopStream.open(host, model_id, hop, MAX_LENGTH) for hop in hops]
        histories: list[list[torch.Tensor]] = [[] for _ in hops]
        try:
            ids = torch.randint(3, ends.vocab_size, (1, PROMPT), generator=generator)
            for _ in range(MAX_LENGTH - PROMPT):
                with torch.no_grad():
                    hidden = ends.embed(ids)
                for stream, history in zip(streams, histories, strict=True):
                    history.append(hidden)
                    output = await stream.step(hidden)
                    result = await checker.after_step(stream.hop, history, output)
                    if result is not None:
                        verdicts.append((stream.hop.peer_id, result.verdict, result.accused))
                        if result.verdict is Verdict.CHEATER:
                            assert result.corrected is not None and result.replacement is not None
                            ran = sum(h.shape[1] for h in history)
                            corrected_lengths.append((ran, result.corrected.shape[1]))
                            output = result.replacement
                    hidden = output
                steps += 1
                if stop_when_caught is not None and any(
                    verdict is Verdict.CHEATER and stop_when_caught in accused
                    for _, verdict, accused in verdicts
                ):
                    return Outcome(steps, verdicts, tokens, corrected_lengths)
                with torch.no_grad():
                    token = ends.logits(hidden)[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
                ids = token
                if steps >= max_steps:
                    break
        finally:
            await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
    return Outcome(steps, verdicts, tokens, corrected_lengths)


# -- the server process ---------------------------------------------------------------


def parse_server(text: str) -> tuple[str, int, int, bool]:
    """``MODE:I:J[:liar]`` -> (mode, I, J, liar); mode ``honest`` serves without cheating."""
    mode, start, end, *rest = text.split(":")
    if rest not in ([], ["liar"]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODE:I:J or MODE:I:J:liar")
    if mode != "honest" and mode not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r}; use honest or {', '.join(MODES)}")
    return mode, int(start), int(end), rest == ["liar"]


async def serve(args: argparse.Namespace) -> None:
    from model_shards._server_node import ServerConfig, ServerNode
    from security import KeyPair
    from swarm._peer import say, start_peer, stop_peer, stop_signal

    stop = stop_signal()
    base = ipaddress.IPv4Address(args.listen_base)
    peers = []
    nodes = []
    try:
        for index, (mode, start, end, liar) in enumerate(args.server):
            config = ServerConfig(
                model=args.model,
                blocks=(start, end),
                quantization=args.quant,
                dtype=args.dtype,
                torch_threads=args.threads,
                swarm_cache_dir=args.cache_dir,
            )
            address = base + 256 * index
            host, dht = await start_peer(
                KeyPair.generate(), [f"/ip4/{address}/tcp/0"], args.bootstrap, server_mode=True
            )
            peers.append((host, dht))
            node = await ServerNode.start(host, dht, config)
            nodes.append(node)
            if mode != "honest":
                install(node.server, mode, seed=args.seed + index, liar=liar)
            role = f"{mode}:liar" if liar else mode
            say(f"online {role} {start}:{end} {host.peer_id}")
        say("all online")
        await stop.wait()
    finally:
        for node in nodes:
            await node.stop()
        for host, dht in peers:
            await stop_peer(host, dht)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        action="append",
        type=parse_server,
        required=True,
        metavar="MODE:I:J[:liar]",
        help=f"a server of blocks I..J-1 (repeatable); MODE: honest, {', '.join(MODES)}; "
        "liar: its forwards (what checkers run) lie too",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument(
        "--listen-base",
        default="127.0.100.1",
        help="the first server's address; each next "
        "server listens 256 addresses further (its own /24)",
    )
    parser.add_argument("--quant", choices=["none", "int8", "nf4"], default="none")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
