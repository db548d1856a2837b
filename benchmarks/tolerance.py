"""Spot-check tolerance calibration: how far honest servers of each precision drift apart.

Usage::

    .venv/bin/python benchmarks/tolerance.py [--quick] [--families llama,bloom] [--threads N]

Tiny models of several families (``tests/model_shards/tiny.py``'s configs, random
weights) are built at two weight scales: ``initializer_range`` 0.02 (transformers' default:
each block adds ~2 % to the residual stream, so rounding of the stream dominates) and 0.1
(blocks change the stream by about its own size, so quantization of the weights
dominates). For each model, spans of one, two and four blocks, and every precision
(none/int8/nf4 x float32/bfloat16/float16, on the CPU or ``--device``),
``model_shards._spot_calibrate`` plays generations (a 6-token prompt, then 12 steps of
one token; 4 sequences) and records, per check (a step of a sequence), the metrics of
``model_shards._tolerance`` between a session step of one precision (the checked server)
and a forward of the whole prefix in another (the checker).

Printed: per unordered pair of precisions, the checks, the largest honest ``rms`` and
``peak``, the tolerance they give (``tolerance_from``: x``MARGIN``, ``FLOOR``, tier strict
/ coarse / not compared), and the share of checks that each cheat of
``tests/model_shards/cheater.py`` fails (false positives are measured by
``tests/model_shards/test_tolerance.py`` on other inputs); then ``MEASURED = {...}`` to paste into
``model_shards/_tolerance.py``. The LAST line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from model_shards._spot_calibrate import Samples, measured_errors, sample_checks  # noqa: E402
from model_shards._tolerance import Precision, Tolerance, pair_key, tolerance_from  # noqa: E402
from tests.model_shards.cheater import CORRUPTIONS  # noqa: E402
from tests.model_shards.tiny import CONFIGS  # noqa: E402

PRECISIONS = [
    Precision.of(dtype, quant)
    for quant in ("none", "int8", "nf4")
    for dtype in ("float32", "bfloat16", "float16")
]
FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "bloom", "falcon")
SCALES = (0.02, 0.1)
SPANS = ((0, 1), (1, 3), (0, 4))
CHEATS = [mode for mode in CORRUPTIONS if mode != "rare"]


def build(family: str, scale: float, directory: Path) -> Path:
    """``family``'s tiny model with weights drawn at ``initializer_range=scale``, saved."""
    config = CONFIGS[family]()
    config.initializer_range = scale
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = directory / f"{family}-{scale}"
    model.save_pretrained(path)
    return path


def collect(
    families: list[str],
    spans: tuple[tuple[int, int], ...],
    directory: Path,
    steps: int,
    device: str,
) -> list[Samples]:
    samples = []
    for family in families:
        for scale in SCALES:
            path = build(family, scale, directory)
            for start, end in spans:
                began = time.perf_counter()
                samples.append(
                    sample_checks(path, start, end, PRECISIONS, steps=steps, device=device)
                )
                took = time.perf_counter() - began
                print(f"# {family} x{scale} blocks {start}:{end}: {took:.1f}s", flush=True)
    return samples


def detection(
    samples: list[Samples], a: Precision, b: Precision, mode: str, tolerance: Tolerance | None
) -> float:
    """Share of checks (both directions) where a cheat of ``mode`` by the checked server
    falls outside the pair's tolerance."""
    if tolerance is None:
        return 0.0
    rng = random.Random(0)
    caught = total = 0
    for sample in samples:
        for checked, checker in {(a, b), (b, a)}:
            r, p = sample.pair(checked, checker, lambda x, y: CORRUPTIONS[mode](x, y, rng))
            flagged = (r > tolerance.rms) | (p > tolerance.peak)
            caught += int(flagged.sum())
            total += flagged.numel()
    return caught / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two families, one span, 6 steps")
    parser.add_argument("--families", help=f"comma-separated (default: {','.join(FAMILIES)})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the spans run, e.g. cuda:0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = args.families.split(",") if args.families else list(FAMILIES)
    spans = SPANS
    steps = 12
    if args.quick:
        families, spans, steps = families[:2], ((1, 3),), 6
    with tempfile.TemporaryDirectory() as tmp:
        samples = collect(families, spans, Path(tmp), steps, args.device)
    checks = sum(s.checks for s in samples)
    measured = measured_errors(samples, PRECISIONS)
    rows = []
    header = f"{'pair':<28} {'checks':>6} {'rms':>7} {'peak':>7} {'tol rms':>8} {'tier':>7}"
    print(header + "".join(f" {mode:>6}" for mode in CHEATS))
    for i, a in enumerate(PRECISIONS):
        for b in PRECISIONS[i:]:
            rms, peak = measured[pair_key(a, b)]
            tolerance = tolerance_from(rms, peak)
            tier = "none" if tolerance is None else "strict" if tolerance.strict else "coarse"
            caught = {mode: detection(samples, a, b, mode, tolerance) for mode in CHEATS}
            checked_pairs = checks * (1 if a == b else 2)
            rows.append(
                {
                    "pair": f"{a} ~ {b}",
                    "checks": checked_pairs,
                    "max_rms": rms,
                    "max_peak": peak,
                    "tolerance_rms": None if tolerance is None else tolerance.rms,
                    "tolerance_peak": None if tolerance is None else tolerance.peak,
                    "tier": tier,
                    "caught": caught,
                }
            )
            tol = "-" if tolerance is None else f"{tolerance.rms:.3f}"
            print(
                f"{a!s:>13} ~ {b!s:<12} {checked_pairs:>6} {rms:>7.4f} {peak:>7.4f} {tol:>8} "
                f"{tier:>7}" + "".join(f" {caught[mode]:>6.2f}" for mode in CHEATS),
                flush=True,
            )
    print("MEASURED = {")
    for key, (rms, peak) in measured.items():
        print(f"    {key!r}: ({rms:.4g}, {peak:.4g}),")
    print("}")
    print(json.dumps({"checks_per_precision_pair": checks, "pairs": rows}))


if __name__ == "__main__":
    main()
