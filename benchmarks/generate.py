"""Generation benchmark: a chain of three server processes against the same model run locally.

Usage::

    .venv/bin/python benchmarks/generate.py [--quick] [--shapes small,medium] [--threads N]
        [--skip-memory] [--skip-push] [--skip-failover] [--push-tokens N]

Per shape, in the same run: greedy generation of 64 tokens from a 16-token prompt
(``generate``, float32, no quantization) through three ``python -m swarm join`` processes
on loopback TCP, each serving a third of the blocks, and with the same model loaded
locally by transformers in this process. Swarm and local runs alternate, ``--repeats``
times each after one warm-up; the figures are medians. Every process (this one included)
runs torch with ``--threads`` threads. Shapes are Llamas with random weights (seed 0), so
that figures compare with other systems measured the same way:

* small: hidden 512, intermediate 1376, 8 layers, 8 heads, vocabulary 32,000 (per-token
  overhead dominates: ``overhead_ms_per_token_per_hop``, the added time per generated
  token divided by the three hops);
* medium: hidden 1024, intermediate 2816, 16 layers, 16 heads (compute dominates:
  ``tokens_per_s_ratio``, swarm / local).

Swarm and local runs alternate, so each swarm run is paired with the local run after it:
the ratio and the overhead are medians of the pairs' figures (the machine is shared, and
its load drifts between pairs more than within one). ``overhead_cpu_ms_per_token_per_hop``
is the same difference in CPU time (this process plus the three servers, against this
process alone), which the load does not inflate: it is the work a hop adds, where the
wall-clock figure adds the time spent waiting for a core.

Memory: a server of a quarter of the blocks of a 24-layer model (the small shape with 24
layers) must peak at no more than a quarter of the full model's weight bytes plus a fixed
overhead. Its peak resident memory once online (``VmHWM``: the process's own ``ru_maxrss``)
is compared with that of a process that only imports what a server imports (the fixed
overhead), plus a ``--memory-slack-mb`` allowance for what serving adds whatever the span's
size (the throughput probe's block, buffers, allocator slack).

Push vs relay (``push_latency_reduction``, goal >= 0.30): four server processes, one block
each of a tiny Llama (hidden 256, 4 layers, vocabulary 4,096), in a chain whose every link
adds a 20 ms one-way delay (``transport.DelayTransport``: the servers read
``SWARM_LINK_DELAY_MS``, the client is built with it; a round trip to a server must measure
at least 1.6 x 2 x 20 ms or the run stops). The same client generates with
``ClientLimits.push`` on and off in turn; the figure compares the median time between two
generated tokens: 1 - push / relay. With push a token crosses five links (client, four
servers, client), relayed by the client it crosses eight.

Failover (``failover_stall_s``, goal <= 2 s): four servers of the tiny Llama, two per half
of its blocks, no delay. Twice, one uninterrupted 64-token greedy generation, then the
same with a server of the chain SIGKILLed when the 20th token comes out: first the first
hop's, the client reaching servers over TCP (the kernel resets a killed process's
connections), then the last hop's, a new client reaching them over QUIC (a killed peer
sends nothing; its loss is found by the step deadline). A run's figure is the longest time
between two tokens (``failover_tcp_stall_s``, ``failover_quic_stall_s``);
``failover_stall_s`` is the larger. Tokens must equal the uninterrupted ones.

Every process starts at once, before anything is timed: the two shapes' swarms, the memory
probe, and the push and failover swarms (about twenty ``python -m swarm`` processes whose
imports and loading overlap); the timed runs begin once every server is online, and each
swarm stops as soon as its figures are taken. Servers waiting for their turn sit idle on
their sockets. ``wall_s`` is the whole run.

The machine is shared: ``load_average_1min`` (at the start, after the generation runs) says
how busy it was; ``load_average_timed_start`` is taken when the timed runs begin (it counts
this run's own start-ups). The table goes to stdout; the LAST line is one JSON object with
every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from model_shards._client import DistributedModelForCausalLM  # noqa: E402
from model_shards._client_runtime import SwarmClient  # noqa: E402
from model_shards._client_timing import TokenClock  # noqa: E402
from model_shards._server_limits import ClientLimits  # noqa: E402
from p2p import ConnectionLimits, HostLimits  # noqa: E402
from security import KeyPair, PeerId  # noqa: E402
from swarm._procs import NodeProcess, stop_all  # noqa: E402
from transport import DelayTransport, Multiaddr, QuicTransport, TcpTransport  # noqa: E402
from transport._delay import LINK_DELAY_ENV  # noqa: E402

TCP = "/ip4/127.0.0.1/tcp/0"
SERVERS = 3
PUSH_SERVERS = 4
LINK_DELAY_MS = 20.0
FAILOVER_SPANS = 2
KILL_AT_TOKEN = 20
PROMPT_TOKENS = 16
NEW_TOKENS = 64
VOCAB = 32_000


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = VOCAB

    def config(self) -> transformers.LlamaConfig:
        return transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=2048,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )


SHAPES = {
    "small": Shape("small", 512, 1376, 8, 8),
    "medium": Shape("medium", 1024, 2816, 16, 16),
}
MEMORY_SHAPE = Shape("memory24", 512, 1376, 24, 8)
TINY_SHAPE = Shape("tiny4", 256, 688, 4, 4, vocab=4096)
"""For push vs relay and failover: one block per server and a small head, so that the
links and the recovery, not the compute, make the figures (and the processes start fast)."""


def log(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def checkpoint(shape: Shape, cache: Path) -> Path:
    """The shape's random-weight checkpoint (seed 0), saved once in ``cache``."""
    path = cache / f"llama-{shape.name}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    log(f"creating the {shape.name} model in {path}")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(shape.config()).eval()
    model.generation_config.eos_token_id = None
    partial = cache / f"llama-{shape.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    partial.rename(path)
    return path


def spans(layers: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def join_args(
    path: Path, start: int, end: int, bootstrap: str | None, args: argparse.Namespace
) -> list[str]:
    """``swarm join`` of blocks ``[start, end)`` on the CPU in float32, unquantized
    (``bootstrap`` None: a swarm of its own)."""
    joining = [] if bootstrap is None else ["--bootstrap", bootstrap]
    return [
        "join",
        "--model",
        str(path),
        "--blocks",
        f"{start}:{end}",
        *joining,
        "--listen",
        TCP,
        "--threads",
        str(args.threads),
        "--device",
        "cpu",
        "--quant",
        "none",
        "--dtype",
        "float32",
        "--cache-dir",
        str(args.cache_dir),
    ]


@dataclass(frozen=True)
class Run:
    """One timed generation: wall seconds and CPU seconds of every process involved."""

    wall_s: float
    cpu_s: float
    ids: torch.Tensor


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Any, pids: list[int]) -> Run:
    """Run ``fn``; its wall time, and the CPU time of this process and of ``pids``."""
    before = [process_cpu_s(pid) for pid in pids]
    cpu = time.process_time()
    started = time.perf_counter()
    ids = fn()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    cpu += sum(process_cpu_s(pid) - b for pid, b in zip(pids, before, strict=True))
    return Run(wall, cpu, ids)


def shape_swarm(shape: Shape, args: argparse.Namespace, logs: Path) -> Swarm:
    """A bootstrap node and three servers, each of a third of the shape's blocks."""
    path = checkpoint(shape, args.cache_dir)
    return Swarm(shape.name, path, spans(shape.layers, SERVERS), args, logs)


def bench_shape(shape: Shape, swarm: Swarm, repeats: int) -> dict[str, Any]:
    """Swarm and local generation alternating on ``swarm`` (online), then the swarm stops."""
    path = swarm.path
    try:
        local = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = torch.randint(
            3, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)
        )
        options = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        limits = ClientLimits(route_wait_s=60.0)
        with (
            DistributedModelForCausalLM.from_pretrained(
                path, initial_peers=[swarm.bootstrap], limits=limits, device="cpu"
            ) as remote,
            torch.no_grad(),
        ):
            remote.generate(prompt, do_sample=False, max_new_tokens=8)
            local.generate(prompt, do_sample=False, max_new_tokens=8)
            pids = [node.popen.pid for node in swarm.servers.values()]
            runs: list[tuple[Run, Run]] = []
            for repeat in range(repeats):
                swarm_run = timed(lambda: remote.generate(prompt, **options), pids)
                local_run = timed(lambda: local.generate(prompt, **options), [])
                runs.append((swarm_run, local_run))
                log(
                    f"{shape.name} run {repeat + 1}/{repeats}: swarm {swarm_run.wall_s:.3f}s "
                    f"({swarm_run.cpu_s:.3f} CPU-s), local {local_run.wall_s:.3f}s "
                    f"({local_run.cpu_s:.3f} CPU-s)"
                )
    finally:
        swarm.stop()
    per_hop = 1000 / NEW_TOKENS / SERVERS
    swarm_s = statistics.median(sw.wall_s for sw, _ in runs)
    local_s = statistics.median(lo.wall_s for _, lo in runs)
    return {
        "shape": shape.name,
        "swarm_tokens_per_s": NEW_TOKENS / swarm_s,
        "local_tokens_per_s": NEW_TOKENS / local_s,
        "tokens_per_s_ratio": statistics.median(lo.wall_s / sw.wall_s for sw, lo in runs),
        "swarm_ms_per_token": 1000 * swarm_s / NEW_TOKENS,
        "local_ms_per_token": 1000 * local_s / NEW_TOKENS,
        "overhead_ms_per_token_per_hop": statistics.median(
            (sw.wall_s - lo.wall_s) * per_hop for sw, lo in runs
        ),
        "overhead_cpu_ms_per_token_per_hop": statistics.median(
            (sw.cpu_s - lo.cpu_s) * per_hop for sw, lo in runs
        ),
        "identical": all(torch.equal(sw.ids, lo.ids) for sw, lo in runs),
    }


class Swarm:
    """A bootstrap node and one server per span, as child processes; two swarms start
    side by side (``start_servers`` then ``wait_online`` on each)."""

    def __init__(
        self,
        name: str,
        path: Path,
        bounds: list[tuple[int, int]],
        args: argparse.Namespace,
        logs: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.bounds = bounds
        self._args = args
        self._logs = logs
        self._env = env
        self.bootstrap = ""
        self.servers: dict[PeerId, NodeProcess] = {}
        """The servers by PeerID, once online."""
        self.nodes = [
            NodeProcess(["bootstrap", "--listen", TCP], log_path=logs / f"{name}-boot.log", env=env)
        ]

    def start_servers(self) -> None:
        self.bootstrap = self.nodes[0].addr(120)
        for index, (start, end) in enumerate(self.bounds):
            self.nodes.append(
                NodeProcess(
                    join_args(self.path, start, end, self.bootstrap, self._args),
                    log_path=self._logs / f"{self.name}-server{index}.log",
                    env=self._env,
                )
            )

    def wait_online(self) -> None:
        for node in self.nodes[1:]:
            peer = Multiaddr.from_string(node.addr(120)).peer_id
            assert peer is not None
            self.servers[peer] = node
        for node in self.nodes[1:]:
            node.wait_for("online", 600)
        log(f"{self.name}: {len(self.bounds)} servers online")

    def stop(self) -> None:
        stop_all(self.nodes)


def delayed_client(bootstrap: str, delay_s: float) -> SwarmClient:
    """A swarm client whose links add ``delay_s`` one way, as the servers' do."""
    identity = KeyPair.generate()
    transports = [
        DelayTransport(TcpTransport(identity), delay_s),
        DelayTransport(QuicTransport(identity), delay_s),
    ]
    return SwarmClient(
        [bootstrap],
        identity=identity,
        limits=ClientLimits(route_wait_s=60.0),
        transports=transports,
    )


def check_delayed(runtime: SwarmClient, servers: list[PeerId], delay_s: float) -> float:
    """The median round trip to the servers; an error if the servers add no delay."""

    async def pings() -> list[float]:
        return [await runtime.host.ping(peer) for peer in servers for _ in range(3)]

    rtt = statistics.median(runtime.run(pings(), timeout=60))
    if rtt < 1.6 * delay_s:
        raise RuntimeError(
            f"round trip to the servers is {rtt * 1000:.1f} ms, under twice the "
            f"{delay_s * 1000:g} ms link delay: the servers ignore {LINK_DELAY_ENV} "
            "(swarm/_peer.py must build its transports with transport.link_delay_from_env)"
        )
    return rtt


def push_swarm(args: argparse.Namespace, logs: Path) -> Swarm:
    """Four servers of one block each, behind 20 ms links."""
    path = checkpoint(TINY_SHAPE, args.cache_dir)
    env = {LINK_DELAY_ENV: f"{LINK_DELAY_MS:g}"}
    return Swarm("push", path, spans(TINY_SHAPE.layers, PUSH_SERVERS), args, logs, env)


def bench_push(swarm: Swarm, args: argparse.Namespace) -> dict[str, Any]:
    """Per-token latency over a chain of four servers behind 20 ms links, push on and off."""
    shape = TINY_SHAPE
    path = swarm.path
    bootstrap = swarm.bootstrap
    delay_s = LINK_DELAY_MS / 1000
    try:
        prompt = torch.randint(
            3, shape.vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(2)
        )
        tokens = args.push_tokens
        options = {"do_sample": False, "max_new_tokens": tokens, "min_new_tokens": tokens}
        with delayed_client(bootstrap, delay_s) as runtime, torch.no_grad():
            rtt = check_delayed(runtime, list(swarm.servers), delay_s)
            models = {
                push: DistributedModelForCausalLM.from_pretrained(
                    path,
                    initial_peers=[bootstrap],
                    limits=ClientLimits(route_wait_s=60.0, push=push),
                    client=runtime,
                    device="cpu",
                )
                for push in (True, False)
            }
            per_token: dict[bool, list[float]] = {True: [], False: []}
            outputs: dict[bool, list[torch.Tensor]] = {True: [], False: []}
            for model in models.values():
                model.generate(prompt, do_sample=False, max_new_tokens=4)
            for repeat in range(args.repeats):
                for push, model in models.items():
                    clock = TokenClock()
                    outputs[push].append(model.generate(prompt, streamer=clock, **options))
                    per_token[push].append(statistics.median(clock.gaps_s[1:]))
                log(
                    f"push run {repeat + 1}/{args.repeats}: push {per_token[True][-1] * 1000:.1f}"
                    f" ms/token, relay {per_token[False][-1] * 1000:.1f} ms/token"
                )
    finally:
        swarm.stop()
    push_s = statistics.median(per_token[True])
    relay_s = statistics.median(per_token[False])
    return {
        "push_link_delay_ms": LINK_DELAY_MS,
        "push_servers": PUSH_SERVERS,
        "push_rtt_ms": 1000 * rtt,
        "push_ms_per_token": 1000 * push_s,
        "relay_ms_per_token": 1000 * relay_s,
        "push_latency_reduction": 1 - push_s / relay_s,
        "push_identical": all(
            torch.equal(a, b) for a, b in zip(outputs[True], outputs[False], strict=True)
        ),
    }


def failover_swarm(args: argparse.Namespace, logs: Path) -> Swarm:
    """Two servers for each half of the blocks, on plain loopback."""
    path = checkpoint(TINY_SHAPE, args.cache_dir)
    bounds = [b for b in spans(TINY_SHAPE.layers, FAILOVER_SPANS) for _ in range(2)]
    return Swarm("failover", path, bounds, args, logs)


def failover_run(
    swarm: Swarm, model: DistributedModelForCausalLM, hop: int, prompt: torch.Tensor
) -> dict[str, Any]:
    """One uninterrupted 64-token generation, then one where the server of ``hop`` is
    SIGKILLed at token ``KILL_AT_TOKEN``: the slowest token of each, whether they agree."""
    options = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    model.generate(prompt, do_sample=False, max_new_tokens=4)
    steady = TokenClock()
    expected = model.generate(prompt, streamer=steady, **options)
    killed: list[PeerId] = []

    def kill(token: int) -> None:
        session = model.session
        if token == KILL_AT_TOKEN and session is not None:
            peer = session.hops[hop].peer_id
            swarm.servers[peer].kill()
            killed.append(peer)

    clock = TokenClock(kill)
    started = time.perf_counter()
    got = model.generate(prompt, streamer=clock, **options)
    wall_s = time.perf_counter() - started
    if not killed:
        raise RuntimeError(f"no server was killed at token {KILL_AT_TOKEN}")
    log(
        f"failover: killed {killed[0].short()} (hop {hop}) at token {KILL_AT_TOKEN}: "
        f"{clock.stall_s:.3f}s"
    )
    return {
        "stall_s": clock.stall_s,
        "steady_max_gap_s": steady.stall_s,
        "median_gap_s": statistics.median(clock.gaps_s[1:]),
        "wall_s": wall_s,
        "identical": torch.equal(expected, got),
    }


def bench_failover(swarm: Swarm) -> dict[str, Any]:
    """Two SIGKILLs on the failover swarm (two servers per span): the first hop's server
    under a client that reaches servers over TCP (the kernel resets the connections of a
    killed process: the loss shows at once), then the last hop's under a client that
    reaches them over QUIC (a killed peer sends nothing: found by the step deadline)."""
    prompt = torch.randint(
        3, TINY_SHAPE.vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(3)
    )
    runs: dict[str, dict[str, Any]] = {}
    try:
        for name, hop, preference in (("tcp", 0, ("tcp", "quic")), ("quic", -1, ("quic", "tcp"))):
            host_limits = HostLimits(connections=ConnectionLimits(transport_preference=preference))
            limits = ClientLimits(route_wait_s=60.0)
            client = SwarmClient([swarm.bootstrap], limits=limits, host_limits=host_limits)
            model = DistributedModelForCausalLM.from_pretrained(
                swarm.path,
                initial_peers=[swarm.bootstrap],
                limits=limits,
                client=client,
                device="cpu",
            )
            model._owns_client = True
            with model, torch.no_grad():
                runs[name] = failover_run(swarm, model, hop, prompt)
    finally:
        swarm.stop()
    figures = {
        "failover_stall_s": max(run["stall_s"] for run in runs.values()),
        "failover_steady_max_gap_s": max(run["steady_max_gap_s"] for run in runs.values()),
        "failover_identical": all(run["identical"] for run in runs.values()),
    }
    for name, run in runs.items():
        figures.update({f"failover_{name}_{key}": value for key, value in run.items()})
    return figures


def bench_churn(swarms: dict[str, Swarm], args: argparse.Namespace) -> dict[str, Any]:
    """Push vs relay and failover on their (online) swarms."""
    figures: dict[str, Any] = {}
    if "push" in swarms:
        figures.update(bench_push(swarms["push"], args))
    if "failover" in swarms:
        figures.update(bench_failover(swarms["failover"]))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def print_churn(figures: dict[str, Any]) -> None:
    """A line each for push vs relay and failover, where measured."""
    if "push_ms_per_token" in figures:
        print()
        print(
            f"push over {PUSH_SERVERS} servers, {LINK_DELAY_MS:g} ms links (round trip "
            f"{figures['push_rtt_ms']:.1f} ms): push {figures['push_ms_per_token']:.1f} "
            f"ms/token, client relay {figures['relay_ms_per_token']:.1f} ms/token, reduction "
            f"{figures['push_latency_reduction']:.2f}, identical "
            f"{'yes' if figures['push_identical'] else 'NO'}"
        )
    if "failover_stall_s" in figures:
        print()
        for name, hop in (("tcp", "first"), ("quic", "last")):
            print(
                f"failover over {name} (SIGKILL of the {hop} hop's server at token "
                f"{KILL_AT_TOKEN} of {NEW_TOKENS}): slowest token "
                f"{figures[f'failover_{name}_stall_s']:.3f}s (steady run "
                f"{figures[f'failover_{name}_steady_max_gap_s']:.3f}s), identical "
                f"{'yes' if figures[f'failover_{name}_identical'] else 'NO'}"
            )


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a live process (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


BASELINE = """
import model_shards, model_shards._server_node, swarm._join, swarm._peer, transformers
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(status.split()[0])
"""
"""What a server imports, no more; prints its peak resident KiB (``VmHWM``: unlike
``ru_maxrss``, it does not inherit the parent's peak across fork and exec)."""


@dataclass
class MemoryProbe:
    """A server of a quarter of ``MEMORY_SHAPE``'s blocks and a process that only imports
    what a server imports, started together (peaks do not depend on the machine's load)."""

    node: NodeProcess
    baseline: subprocess.Popen[str]
    full_bytes: int


def start_memory(args: argparse.Namespace, logs: Path) -> MemoryProbe:
    shape = MEMORY_SHAPE
    path = checkpoint(shape, args.cache_dir)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(shape.config())
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    baseline = subprocess.Popen(
        [sys.executable, "-c", BASELINE], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    node = NodeProcess(
        join_args(path, 0, shape.layers // 4, None, args),
        log_path=logs / "memory-server.log",
    )
    return MemoryProbe(node, baseline, full_bytes)


def bench_memory(probe: MemoryProbe, args: argparse.Namespace) -> dict[str, Any]:
    """The server's peak once online against the bound; stops the server."""
    try:
        probe.node.wait_for("online", 600)
        server_mb = peak_rss_mb(probe.node.popen.pid)
        out, _ = probe.baseline.communicate(timeout=600)
    finally:
        stop_all([probe.node])
        if probe.baseline.poll() is None:
            probe.baseline.kill()
            probe.baseline.wait()
    if probe.baseline.returncode != 0:
        raise RuntimeError(
            f"the import-only baseline process exited with {probe.baseline.returncode}"
        )
    baseline_mb = int(out.split()[-1]) / 1024
    full_mb = probe.full_bytes / 2**20
    quarter_mb = full_mb / 4
    bound_mb = quarter_mb + baseline_mb + args.memory_slack_mb
    return {
        "memory_full_weights_mb": full_mb,
        "memory_quarter_weights_mb": quarter_mb,
        "memory_fixed_overhead_mb": baseline_mb,
        "memory_server_peak_mb": server_mb,
        "memory_bound_mb": bound_mb,
        "memory_ok": server_mb <= bound_mb,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats (under five minutes)")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5, quick 3)")
    parser.add_argument("--shapes", default="small,medium")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every process")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-push", action="store_true")
    parser.add_argument("--skip-failover", action="store_true")
    parser.add_argument(
        "--push-tokens", type=int, help="tokens per push/relay run (default 32, quick 16)"
    )
    parser.add_argument("--memory-slack-mb", type=float, default=64.0)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm")) / "bench",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.push_tokens = args.push_tokens or (16 if args.quick else 32)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    logs = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    log(f"node logs in {logs}")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    names = [name for name in args.shapes.split(",") if name]
    swarms: dict[str, Swarm] = {}
    probe: MemoryProbe | None = None
    try:
        for name in names:
            swarms[name] = shape_swarm(SHAPES[name], args, logs)
        if not args.skip_push:
            swarms["push"] = push_swarm(args, logs)
        if not args.skip_failover:
            swarms["failover"] = failover_swarm(args, logs)
        if not args.skip_memory:
            probe = start_memory(args, logs)
        for swarm in swarms.values():
            swarm.start_servers()
        memory = None if probe is None else bench_memory(probe, args)
        for swarm in swarms.values():
            swarm.wait_online()
        log(f"every process started in {time.perf_counter() - started:.0f}s")
        load_timed = os.getloadavg()[0]
        results = [bench_shape(SHAPES[name], swarms[name], args.repeats) for name in names]
        load_after = os.getloadavg()[0]
        churn = bench_churn(swarms, args)
    finally:
        for swarm in swarms.values():
            swarm.stop()
        if probe is not None:
            stop_all([probe.node])
    summary: dict[str, Any] = {
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "load_average_timed_start": round(load_timed, 2),
    }
    header = (
        f"{'shape':<8} {'swarm tok/s':>11} {'local tok/s':>11} {'ratio':>6} "
        f"{'ms/token/hop':>12} {'CPU ms/token/hop':>16} identical"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['shape']:<8} {r['swarm_tokens_per_s']:>11.1f} {r['local_tokens_per_s']:>11.1f} "
            f"{r['tokens_per_s_ratio']:>6.2f} {r['overhead_ms_per_token_per_hop']:>12.2f} "
            f"{r['overhead_cpu_ms_per_token_per_hop']:>16.2f} "
            f"{'yes' if r['identical'] else 'NO'}"
        )
        for key, value in r.items():
            if key != "shape":
                summary[f"{r['shape']}_{key}"] = (
                    round(value, 4) if isinstance(value, float) else value
                )
    by_shape = {r["shape"]: r for r in results}
    if "medium" in by_shape:
        summary["tokens_per_s_ratio"] = round(by_shape["medium"]["tokens_per_s_ratio"], 4)
    if "small" in by_shape:
        for key in ("overhead_ms_per_token_per_hop", "overhead_cpu_ms_per_token_per_hop"):
            summary[key] = round(by_shape["small"][key], 4)
    if memory is not None:
        print()
        print(
            f"server of {MEMORY_SHAPE.layers // 4}/{MEMORY_SHAPE.layers} blocks: peak "
            f"{memory['memory_server_peak_mb']:.0f} MiB <= quarter of the weights "
            f"{memory['memory_quarter_weights_mb']:.0f} + fixed "
            f"{memory['memory_fixed_overhead_mb']:.0f} + slack {args.memory_slack_mb:.0f} = "
            f"{memory['memory_bound_mb']:.0f} MiB: {'yes' if memory['memory_ok'] else 'NO'} "
            f"(full model weights {memory['memory_full_weights_mb']:.0f} MiB)"
        )
        summary.update({k: round(v, 1) if isinstance(v, float) else v for k, v in memory.items()})
    print_churn(churn)
    summary.update(churn)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))
    ok = (
        all(r["identical"] for r in results)
        and summary.get("memory_ok", True)
        and summary.get("push_identical", True)
        and summary.get("failover_identical", True)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
