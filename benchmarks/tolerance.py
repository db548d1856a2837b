"""Spot-check tolerance calibration: how far honest servers of each precision drift apart.

Usage::

    .venv/bin/python benchmarks/tolerance.py [--quick] [--families llama,bloom] [--threads N]
        [--checker two-pass|one-pass|both] [--device cpu]
    python3 benchmarks/tolerance.py --quick-gpu [--device cuda] [--budget-s 60]

Tiny models of several families (``tests/model_shards/tiny.py``'s configs, hidden size
32, random weights) and Llamas of hidden size 128 and 256 are built at two weight scales:
``initializer_range`` 0.02 (transformers' default: at hidden size 32 each block adds ~2 %
to the residual stream, so rounding of the stream dominates) and 0.1 (blocks change the
stream by about its own size, so quantization of the weights dominates); a matrix's gain
is about the scale times the square root of the hidden size (0.1 at 256: 1.6, near the
1.3 of 0.02 at 4,096, real models' initialisation). For each model, spans of one, two
and four blocks, and every precision (none/int8/nf4 x float32/bfloat16/float16, on the
CPU or ``--device``),
``model_shards._spot_calibrate`` plays generations (a 6-token prompt, then 12 steps of
one token; 4 sequences) and records, per check (a step of a sequence), the metrics of
``model_shards._tolerance`` between a session step of one precision (the checked server)
and the checker's recomputation of it from the whole prefix in another: ``--checker
two-pass`` (what checkers run: the prefix before the step in one pass filling a KV cache,
then the step on it) or ``one-pass`` (a stateless forward of the whole prefix); ``both``
samples both and shows each one's honest figures side by side, the first's tolerances.

Printed: per unordered pair of precisions, the checks, the largest honest ``rms`` and
``peak`` (per checker method), the tolerance they give (``tolerance_from``: x``MARGIN``,
``FLOOR``, tier strict / coarse / not compared), and the share of checks that each cheat
of ``tests/model_shards/cheater.py`` fails (false positives are measured by
``tests/model_shards/test_tolerance.py`` on other inputs); then ``MEASURED = {...}`` to
paste into ``model_shards/_tolerance.py``. The LAST line is one JSON object with every
figure.

``--quick-gpu``: one short run for a lent GPU (``--device cuda``), about a minute in all:
float16 and bfloat16 x none/int8/nf4 (bitsandbytes' CUDA kernels), cells of one model,
span, batch and length in order of importance (single sequences of a Llama with hidden
size 256 among them), both checker methods, and per ordered pair of precisions the honest
``rms`` / ``peak`` and the false positives against the current ``_tolerance.MEASURED``.
Each precision of each cell runs on its own (an error is printed in its place and the
rest goes on); no cell starts after ``--budget-s`` seconds from the script's start; the
figures so far are written to ``$OUT/tolerance_gpu.json`` after every cell when ``OUT``
names a directory. Needs torch, transformers, safetensors and bitsandbytes only (not the
network packages). With ``--device cpu`` it runs the same code on shorter generations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import bitsandbytes  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from model_shards._spot_calibrate import (  # noqa: E402
    METHODS,
    Method,
    Samples,
    join_samples,
    measured_errors,
    sample_checks,
)
from model_shards._tolerance import (  # noqa: E402
    PRECISIONS,
    Precision,
    Tolerance,
    pair_key,
    tolerance_for,
    tolerance_from,
)
from tests.model_shards.tiny import CALIBRATION_CONFIGS  # noqa: E402

HALF_PRECISIONS = [p for p in PRECISIONS if p.dtype != torch.float32]
SCALES = (0.02, 0.1)
SPANS = ((0, 1), (1, 3), (0, 4))
CHEATS = ("noise", "zeros", "scale", "flip", "skip")

FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "bloom", "falcon", "llama-128", "llama-256")
"""The default model set: six families at hidden size 32, the Llama also wider (honest
quantization errors grow with the hidden size where blocks change the stream a lot)."""


def build(family: str, scale: float, directory: Path) -> Path:
    """``family``'s model with weights drawn at ``initializer_range=scale``, saved once."""
    path = directory / f"{family}-{scale}"
    if path.exists():
        return path
    config = CALIBRATION_CONFIGS[family]()
    config.initializer_range = scale
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return path


def collect(
    families: list[str],
    spans: tuple[tuple[int, int], ...],
    directory: Path,
    steps: int,
    device: str,
    methods: tuple[Method, ...],
) -> list[Samples]:
    samples = []
    for family in families:
        for scale in SCALES:
            path = build(family, scale, directory)
            for start, end in spans:
                began = time.perf_counter()
                samples.append(
                    sample_checks(
                        path, start, end, PRECISIONS, steps=steps, device=device, methods=methods
                    )
                )
                took = time.perf_counter() - began
                print(f"# {family} x{scale} blocks {start}:{end}: {took:.1f}s", flush=True)
    return samples


def detection(
    samples: list[Samples],
    a: Precision,
    b: Precision,
    mode: str,
    tolerance: Tolerance | None,
    method: Method,
) -> float:
    """Share of checks (both directions) where a cheat of ``mode`` by the checked server
    falls outside the pair's tolerance."""
    # the cheats sit beside the network test servers, whose packages --quick-gpu lacks
    from tests.model_shards.cheater import CORRUPTIONS

    if tolerance is None:
        return 0.0
    rng = random.Random(0)
    caught = total = 0
    for sample in samples:
        for checked, checker in {(a, b), (b, a)}:
            r, p = sample.pair(
                checked,
                checker,
                lambda x, y: CORRUPTIONS[mode](x, y, rng),
                method=method,
            )
            flagged = (r > tolerance.rms) | (p > tolerance.peak)
            caught += int(flagged.sum())
            total += flagged.numel()
    return caught / total


def calibrate(args: argparse.Namespace) -> None:
    """The CPU calibration: every precision, families x scales x spans (module doc)."""
    families = args.families.split(",") if args.families else list(FAMILIES)
    spans = SPANS
    steps = 12
    if args.quick:
        families, spans, steps = families[:2], ((1, 3),), 6
    methods: tuple[Method, ...] = METHODS if args.checker == "both" else (args.checker,)
    with tempfile.TemporaryDirectory() as tmp:
        samples = collect(families, spans, Path(tmp), steps, args.device, methods)
    checks = sum(s.checks for s in samples)
    measured = {method: measured_errors(samples, PRECISIONS, method) for method in methods}
    primary = methods[0]
    rows = []
    honest = "".join(f" {m[:3] + ' rms':>8} {'peak':>6}" for m in methods)
    print(
        f"{'pair':<28} {'checks':>6}{honest} {'tol rms':>8} {'tier':>7}"
        + "".join(f" {mode:>6}" for mode in CHEATS)
    )
    for i, a in enumerate(PRECISIONS):
        for b in PRECISIONS[i:]:
            rms, peak = measured[primary][pair_key(a, b)]
            tolerance = tolerance_from(rms, peak)
            tier = "none" if tolerance is None else "strict" if tolerance.strict else "coarse"
            caught = {mode: detection(samples, a, b, mode, tolerance, primary) for mode in CHEATS}
            checked_pairs = checks * (1 if a == b else 2)
            figures = {m: measured[m][pair_key(a, b)] for m in methods}
            rows.append(
                {
                    "pair": f"{a} ~ {b}",
                    "checks": checked_pairs,
                    "checker": primary,
                    "max_rms": rms,
                    "max_peak": peak,
                    "honest": {m: {"max_rms": r, "max_peak": p} for m, (r, p) in figures.items()},
                    "tolerance_rms": None if tolerance is None else tolerance.rms,
                    "tolerance_peak": None if tolerance is None else tolerance.peak,
                    "tier": tier,
                    "caught": caught,
                }
            )
            tol = "-" if tolerance is None else f"{tolerance.rms:.3f}"
            honest = "".join(f" {r:>8.4f} {p:>6.3f}" for r, p in figures.values())
            print(
                f"{a!s:>13} ~ {b!s:<12} {checked_pairs:>6}{honest} {tol:>8} "
                f"{tier:>7}" + "".join(f" {caught[mode]:>6.2f}" for mode in CHEATS),
                flush=True,
            )
    print(f"MEASURED = {{  # checker: {primary}")
    for (a, b), (rms, peak) in measured[primary].items():
        print(f'    ("{a}", "{b}"): ({rms:.4g}, {peak:.4g}),')
    print("}")
    print(json.dumps({"checks_per_precision_pair": checks, "checker": primary, "pairs": rows}))


@dataclass(frozen=True, slots=True)
class Cell:
    """One ``sample_checks`` setting of ``--quick-gpu``."""

    family: str
    scale: float
    span: tuple[int, int]
    batch: int
    steps: int

    def __str__(self) -> str:
        start, end = self.span
        return f"{self.family} x{self.scale} {start}:{end} b{self.batch} s{self.steps}"


GPU_CELLS = (
    Cell("llama", 0.1, (1, 3), 16, 31),
    Cell("qwen2", 0.02, (1, 3), 16, 31),
    Cell("llama-256", 0.02, (0, 2), 1, 63),
    Cell("mixtral", 0.1, (0, 2), 16, 31),
    Cell("llama-256", 0.1, (1, 3), 8, 31),
    Cell("bloom", 0.02, (0, 4), 16, 31),
    Cell("falcon", 0.1, (1, 3), 16, 31),
    Cell("llama-256", 0.1, (0, 2), 1, 63),
    Cell("mistral", 0.02, (0, 4), 16, 31),
    Cell("llama", 0.02, (0, 4), 1, 63),
)
"""In order of importance: two cells give every same-precision pair over 1,000 checks."""
GPU_PROMPT = 6


@dataclass
class Figures:
    """One ordered pair and checker method, over the cells so far."""

    checks: int = 0
    max_rms: float = 0.0
    max_peak: float = 0.0
    false_positives: int | None = None
    """Against the current ``tolerance_for``; None when the pair is not compared."""

    def add(self, rms: torch.Tensor, peak: torch.Tensor, tolerance: Tolerance | None) -> None:
        self.checks += rms.numel()
        self.max_rms = max(self.max_rms, float(rms.max()))
        self.max_peak = max(self.max_peak, float(peak.max()))
        if tolerance is not None:
            flagged = int(((rms > tolerance.rms) | (peak > tolerance.peak)).sum())
            self.false_positives = (self.false_positives or 0) + flagged


@dataclass
class GpuRun:
    """Everything ``--quick-gpu`` measured so far."""

    device: str
    cells: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[tuple[str, str, Method], Figures] = field(default_factory=dict)

    def add(self, samples: Samples, precisions: list[Precision]) -> None:
        for checked in precisions:
            for checker in precisions:
                tolerance = tolerance_for(checked, checker)
                for method in METHODS:
                    rms, peak = samples.pair(checked, checker, method=method)
                    key = (str(checked), str(checker), method)
                    self.figures.setdefault(key, Figures()).add(rms, peak, tolerance)

    def pairs(self) -> list[dict[str, Any]]:
        """Per unordered pair: both directions together, per method."""
        rows = []
        for i, a in enumerate(HALF_PRECISIONS):
            for b in HALF_PRECISIONS[i:]:
                directions = {(str(a), str(b)), (str(b), str(a))}
                row: dict[str, Any] = {"pair": f"{a} ~ {b}"}
                for method in METHODS:
                    found = [self.figures.get((x, y, method)) for x, y in directions]
                    found = [f for f in found if f is not None]
                    if not found:
                        continue
                    fps = [f.false_positives for f in found if f.false_positives is not None]
                    row[method] = {
                        "checks": sum(f.checks for f in found),
                        "max_rms": _short(max(f.max_rms for f in found)),
                        "max_peak": _short(max(f.max_peak for f in found)),
                        "false_positives": sum(fps) if fps else None,
                    }
                tolerance = tolerance_for(a, b)
                row["tolerance"] = None if tolerance is None else [tolerance.rms, tolerance.peak]
                rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """What the JSON line holds."""
        return {
            "mode": "quick-gpu",
            "device": self.device,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "elapsed_s": round(time.perf_counter() - STARTED, 1),
            "cells": self.cells,
            "pairs": self.pairs(),
        }

    def save(self) -> None:
        out = os.environ.get("OUT")
        if out and Path(out).is_dir():
            text = json.dumps(self.summary())
            (Path(out) / "tolerance_gpu.json").write_text(text + "\n")


def _short(value: float) -> float:
    return float(f"{value:.4g}")


def run_cell(
    cell: Cell, seed: int, directory: Path, device: str, deadline: float
) -> tuple[Samples | None, list[Precision], dict[str, str]]:
    """Every half precision of ``cell`` on its own; what ran, joined, and the errors."""
    parts, ran, errors = [], [], {}
    path = build(cell.family, cell.scale, directory)
    for precision in HALF_PRECISIONS:
        if time.perf_counter() - STARTED > deadline:
            errors[str(precision)] = "skipped: time budget spent"
            continue
        try:
            parts.append(
                sample_checks(
                    path,
                    *cell.span,
                    [precision],
                    batch=cell.batch,
                    prompt=GPU_PROMPT,
                    steps=cell.steps,
                    seed=seed,
                    device=device,
                    methods=METHODS,
                )
            )
            ran.append(precision)
        except Exception as e:  # one precision failing must not end the run
            errors[str(precision)] = f"{type(e).__name__}: {e}"[:160]
    return (join_samples(parts) if parts else None), ran, errors


def quick_gpu(args: argparse.Namespace) -> None:
    """The GPU calibration run (module doc)."""
    device = args.device or "cuda"
    on_cpu = device == "cpu"
    run = GpuRun(device)
    longest = 0.0
    seen: set[str] = set()
    print(f"# {device}: started in {time.perf_counter() - STARTED:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for index, cell in enumerate(GPU_CELLS):
            if on_cpu:
                cell = Cell(cell.family, cell.scale, cell.span, min(cell.batch, 4), 3)
            elapsed = time.perf_counter() - STARTED
            if elapsed + longest > args.budget_s:
                run.cells.append({"cell": str(cell), "skipped": f"time budget at {elapsed:.0f}s"})
                print(f"# {cell}: not started (at {elapsed:.1f}s, budget {args.budget_s}s)")
                continue
            began = time.perf_counter()
            record: dict[str, Any] = {"cell": str(cell)}
            try:
                samples, ran, errors = run_cell(
                    cell, 100 + index, Path(tmp), device, args.budget_s + 8
                )
                if samples is not None:
                    run.add(samples, ran)
                    record["checks"] = samples.checks
                record["errors"] = errors
            except Exception as e:  # a broken cell must not end the run
                record["errors"] = {"cell": f"{type(e).__name__}: {e}"[:160]}
            took = time.perf_counter() - began
            longest = max(longest, took)
            record["took_s"] = round(took, 2)
            run.cells.append(record)
            print(f"# {cell}: {took:.1f}s, checks {record.get('checks', 0)}", flush=True)
            for name, error in record["errors"].items():
                print(f"#   {name}: {'as above' if error in seen else error}", flush=True)
                seen.add(error)
            run.save()
    summary = run.summary()
    print(
        f"{'pair':<29} {'checks':>6} {'2p rms':>7} {'peak':>6} {'fp':>4} "
        f"{'1p rms':>7} {'peak':>6} {'fp':>4} {'tol rms':>7} {'peak':>6}"
    )
    for row in summary["pairs"]:
        cols = []
        for method in METHODS:
            found = row.get(method)
            if found is None:
                cols.append(f"{'-':>7} {'-':>6} {'-':>4}")
                continue
            fp = "-" if found["false_positives"] is None else str(found["false_positives"])
            cols.append(f"{found['max_rms']:>7.4f} {found['max_peak']:>6.3f} {fp:>4}")
        checks = max((row[m]["checks"] for m in METHODS if m in row), default=0)
        tol = row["tolerance"]
        tol_text = f"{'-':>7} {'-':>6}" if tol is None else f"{tol[0]:>7.3f} {tol[1]:>6.3f}"
        print(f"{row['pair']:<29} {checks:>6} {' '.join(cols)} {tol_text}")
    run.save()
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two families, one span, 6 steps")
    parser.add_argument("--families", help=f"comma-separated (default: {','.join(FAMILIES)})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--device",
        help="where the spans run, e.g. cuda:0 (default: cpu; cuda with --quick-gpu)",
    )
    parser.add_argument(
        "--checker",
        choices=("two-pass", "one-pass", "both"),
        default="two-pass",
        help="how the checker recomputes a step (both: sample both, tolerances from two-pass)",
    )
    parser.add_argument("--quick-gpu", action="store_true", help="the short GPU run (module doc)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=55.0,
        help="--quick-gpu: no cell starts after this many seconds from the script's start",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    if args.quick_gpu:
        quick_gpu(args)
        return
    args.device = args.device or "cpu"
    calibrate(args)


if __name__ == "__main__":
    main()
