"""The spot-check tolerance: honest pairs of precisions never flagged, cheats caught.

Fresh generations (other prompts, other families and spans than the calibration of
``benchmarks/tolerance.py``, which set ``_tolerance.MEASURED``) through tiny models at both
weight scales, in all nine precisions (none/int8/nf4 x float32/bfloat16/float16): every
comparable pair, each side checking the other, over more than 1,000 checks (a step of a
sequence: a session step of the checked precision against a forward of the whole prefix in
the checker's), must give zero false positives; and the cheats of
``tests/model_shards/cheater.py`` applied to the checked side must be flagged.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from model_shards._spot_calibrate import Samples, sample_checks
from model_shards._tolerance import (
    STRICT_RMS,
    Precision,
    Tolerance,
    discrepancy,
    tolerance_for,
)
from tests.model_shards.cheater import CORRUPTIONS
from tests.model_shards.tiny import CONFIGS

PRECISIONS = [
    Precision.of(dtype, quant)
    for quant in ("none", "int8", "nf4")
    for dtype in ("float32", "bfloat16", "float16")
]
CASES = [
    (family, scale, span)
    for family in ("llama", "qwen2", "bloom", "falcon")
    for scale, span in ((0.02, (1, 3)), (0.1, (2, 3)))
]
BATCH, PROMPT, STEPS = 8, 4, 15


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Samples]:
    directory = tmp_path_factory.mktemp("tolerance")
    found = []
    for index, (family, scale, (start, end)) in enumerate(CASES):
        config = CONFIGS[family]()
        config.initializer_range = scale
        torch.manual_seed(100 + index)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        path = Path(directory / f"{family}-{scale}")
        model.save_pretrained(path)
        found.append(
            sample_checks(
                path,
                start,
                end,
                PRECISIONS,
                batch=BATCH,
                prompt=PROMPT,
                steps=STEPS,
                seed=1000 + index,
            )
        )
    return found


def comparable_pairs() -> list[tuple[Precision, Precision, Tolerance]]:
    pairs = []
    for checked in PRECISIONS:
        for checker in PRECISIONS:
            tolerance = tolerance_for(checked, checker)
            if tolerance is not None:
                pairs.append((checked, checker, tolerance))
    return pairs


def flagged(
    samples: list[Samples], checked: Precision, checker: Precision, tolerance: Tolerance, **kw
) -> tuple[int, int]:
    """(flagged checks, checks) of ``checked`` sessions against ``checker`` forwards."""
    hits = total = 0
    for sample in samples:
        rms, peak = sample.pair(checked, checker, **kw)
        hits += int(((rms > tolerance.rms) | (peak > tolerance.peak)).sum())
        total += rms.numel()
    return hits, total


@pytest.mark.timeout(600)
def test_honest_pairs_are_never_flagged_over_1000_checks_each(samples: list[Samples]) -> None:
    pairs = comparable_pairs()
    cross = [(a, b) for a, b, _ in pairs if a.quantization != b.quantization]
    assert cross, "some pairs of different quantizations must be comparable"
    assert {p.quantization for pair in pairs for p in pair[:2]} == {"none", "int8", "nf4"}
    for checked, checker, tolerance in pairs:
        hits, total = flagged(samples, checked, checker, tolerance)
        assert total >= 1000
        assert hits == 0, f"{checked} checked by {checker}: {hits} false positives of {total}"


@pytest.mark.timeout(600)
def test_every_cheat_is_caught_by_strict_pairs_and_gross_ones_by_all(
    samples: list[Samples],
) -> None:
    rng = random.Random(0)
    strict = 0
    for checked, checker, tolerance in comparable_pairs():
        strict += tolerance.strict
        for mode in ("noise", "zeros", "scale", "flip", "skip"):
            if not tolerance.strict and mode not in ("zeros", "skip"):
                continue

            def corrupt(x: torch.Tensor, y: torch.Tensor, mode: str = mode) -> torch.Tensor:
                return CORRUPTIONS[mode](x, y, rng)

            hits, total = flagged(samples, checked, checker, tolerance, corrupt=corrupt)
            # one channel negated goes unseen where that channel is near 0 for the token
            least = 0.95 if mode == "flip" else 1.0
            assert hits / total >= least, f"{mode} by {checked} vs {checker}: {hits}/{total}"
    same = [p for p in PRECISIONS if tolerance_for(p, p) is not None and tolerance_for(p, p).strict]
    assert strict >= len(same) >= 6


def test_the_measure_is_scale_free_and_skips_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=generator)
    a = x + 0.5 * torch.randn(2, 3, 16, generator=generator)
    b = a + 0.01 * torch.randn(2, 3, 16, generator=generator)
    found = discrepancy(x, a, b, rounding=0.0)
    scaled = discrepancy(1000 * x, 1000 * a, 1000 * b, rounding=0.0)
    assert found.tokens == 6
    assert scaled.rms == pytest.approx(found.rms, rel=1e-4)
    assert scaled.peak == pytest.approx(found.peak, rel=1e-4)
    broken = b.clone()
    broken[1, 0] = 99.0
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 0] = False
    masked = discrepancy(x, a, broken, rounding=0.0, mask=mask)
    assert masked == discrepancy(x, a, b, rounding=0.0, mask=mask)
    assert masked.tokens == 5
    assert discrepancy(x, a, broken, rounding=0.0).rms > 10
    nan = b.clone()
    nan[0, 0, 0] = float("nan")
    assert discrepancy(x, a, nan, rounding=0.0).rms == float("inf")
    with pytest.raises(ValueError):
        discrepancy(x, a, b[:, :2], rounding=0.0)


def test_skipping_blocks_is_caught_even_when_the_update_is_tiny() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 64, generator=generator)
    a = x + 1e-3 * torch.randn(1, 4, 64, generator=generator)
    tolerance = tolerance_for(Precision.of("float32", "none"), Precision.of("float32", "none"))
    assert tolerance is not None and tolerance.strict and tolerance.rms <= STRICT_RMS
    assert not discrepancy(x, a, x.clone(), rounding=2**-23).within(tolerance)


def test_tolerances_are_symmetric_and_nf4_is_never_compared_with_unquantized() -> None:
    for a in PRECISIONS:
        for b in PRECISIONS:
            assert tolerance_for(a, b) == tolerance_for(b, a)
    nf4 = Precision.of("float32", "nf4")
    assert tolerance_for(nf4, Precision.of("float32", "none")) is None
    assert tolerance_for(nf4, nf4) is not None
    with pytest.raises(ValueError):
        Precision.of("int64", "none")
