"""Generation benchmark: a chain of three server processes against the same model run locally.

Usage::

    .venv/bin/python benchmarks/generate.py [--quick] [--shapes small,medium] [--threads N]

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

The machine is shared: ``load_average_1min`` (before, after the generation runs) says how
busy it was. The table goes to stdout; the LAST line is one JSON object with every figure.
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
from model_shards._server_limits import ClientLimits  # noqa: E402
from swarm._procs import NodeProcess, stop_all  # noqa: E402

TCP = "/ip4/127.0.0.1/tcp/0"
SERVERS = 3
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

    def config(self) -> transformers.LlamaConfig:
        return transformers.LlamaConfig(
            vocab_size=VOCAB,
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
    path: Path, start: int, end: int, bootstrap: str, args: argparse.Namespace
) -> list[str]:
    return [
        "join",
        "--model",
        str(path),
        "--blocks",
        f"{start}:{end}",
        "--bootstrap",
        bootstrap,
        "--listen",
        TCP,
        "--threads",
        str(args.threads),
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


def bench_shape(shape: Shape, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    path = checkpoint(shape, args.cache_dir)
    nodes: list[NodeProcess] = []
    try:
        bootstrap_node = NodeProcess(
            ["bootstrap", "--listen", TCP], log_path=logs / "bootstrap.log"
        )
        nodes.append(bootstrap_node)
        bootstrap = bootstrap_node.addr(120)
        servers = []
        for index, (start, end) in enumerate(spans(shape.layers, SERVERS)):
            node = NodeProcess(
                join_args(path, start, end, bootstrap, args),
                log_path=logs / f"{shape.name}-server{index}.log",
            )
            nodes.append(node)
            servers.append(node)
        for node in servers:
            node.wait_for("online", 600)
        log(f"{shape.name}: {SERVERS} servers online")
        local = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = torch.randint(
            3, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)
        )
        options = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        limits = ClientLimits(route_wait_s=60.0)
        with (
            DistributedModelForCausalLM.from_pretrained(
                path, initial_peers=[bootstrap], limits=limits
            ) as remote,
            torch.no_grad(),
        ):
            remote.generate(prompt, do_sample=False, max_new_tokens=8)
            local.generate(prompt, do_sample=False, max_new_tokens=8)
            pids = [node.popen.pid for node in servers]
            runs: list[tuple[Run, Run]] = []
            for repeat in range(args.repeats):
                swarm = timed(lambda: remote.generate(prompt, **options), pids)
                local_run = timed(lambda: local.generate(prompt, **options), [])
                runs.append((swarm, local_run))
                log(
                    f"{shape.name} run {repeat + 1}/{args.repeats}: swarm {swarm.wall_s:.3f}s "
                    f"({swarm.cpu_s:.3f} CPU-s), local {local_run.wall_s:.3f}s "
                    f"({local_run.cpu_s:.3f} CPU-s)"
                )
    finally:
        stop_all(nodes)
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


def bench_memory(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    shape = MEMORY_SHAPE
    path = checkpoint(shape, args.cache_dir)
    config = shape.config()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    quarter = shape.layers // 4
    baseline = subprocess.run(
        [sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True, cwd=ROOT
    )
    baseline_mb = int(baseline.stdout.split()[-1]) / 1024
    nodes: list[NodeProcess] = []
    try:
        node = NodeProcess(
            [
                "join",
                "--model",
                str(path),
                "--blocks",
                f"0:{quarter}",
                "--listen",
                TCP,
                "--threads",
                str(args.threads),
                "--quant",
                "none",
                "--dtype",
                "float32",
                "--cache-dir",
                str(args.cache_dir),
            ],
            log_path=logs / "memory-server.log",
        )
        nodes.append(node)
        node.wait_for("online", 600)
        server_mb = peak_rss_mb(node.popen.pid)
    finally:
        stop_all(nodes)
    full_mb = full_bytes / 2**20
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
    parser.add_argument("--memory-slack-mb", type=float, default=64.0)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm")) / "bench",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    logs = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    log(f"node logs in {logs}")
    load_before = os.getloadavg()[0]
    results = [bench_shape(SHAPES[name], args, logs) for name in args.shapes.split(",")]
    summary: dict[str, Any] = {
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
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
    if not args.skip_memory:
        memory = bench_memory(args, logs)
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
    print(json.dumps(summary))
    ok = all(r["identical"] for r in results) and summary.get("memory_ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
