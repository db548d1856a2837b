"""The spot-check tolerance: honest pairs of precisions never flagged, cheats caught.

Fresh generations (other weights, prompts and spans than the calibration of
``benchmarks/tolerance.py``, which set ``_tolerance.MEASURED``) through tiny models of hidden
size 32 and Llamas of hidden size 128 and 256 (half the checks: honest errors grow with the
hidden size) at both weight scales, in all nine precisions (none/int8/nf4 x
float32/bfloat16/float16): every comparable pair, each side checking the other, over 1,024
checks (a step of a
sequence: a session step of the checked precision against the checker's recomputation of it
in its own precision, as checkers run it: the prefix before the step in one pass filling a
KV cache, then the step on that cache), must give zero false positives; and the cheats of
``tests/model_shards/cheater.py`` applied to the checked side must be flagged.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import transformers

from model_shards._spot_calibrate import Samples, join_samples, sample_checks
from model_shards._tolerance import (
    PRECISIONS,
    STRICT_RMS,
    Precision,
    Tolerance,
    discrepancy,
    token_discrepancy,
    tolerance_for,
)
from tests.model_shards.cheater import CORRUPTIONS
from tests.model_shards.tiny import CALIBRATION_CONFIGS

CASES = [
    *(
        (family, scale, span, 8)
        for family in ("llama", "qwen2", "bloom", "falcon")
        for scale, span in ((0.02, (1, 3)), (0.1, (2, 3)))
    ),
    ("llama-128", 0.1, (1, 3), 16),
    ("llama-256", 0.02, (0, 2), 16),
    ("llama-256", 0.1, (1, 3), 16),
    ("llama-256", 0.1, (2, 4), 16),
]
"""(model, weight scale, span, sequences): hidden size 32, then 128 and 256 (half the checks)."""
PROMPT, STEPS = 4, 7


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Samples]:
    directory = tmp_path_factory.mktemp("tolerance")
    found = []
    for index, (model, scale, (start, end), batch) in enumerate(CASES):
        config = CALIBRATION_CONFIGS[model]()
        config.initializer_range = scale
        torch.manual_seed(100 + index)
        path = Path(directory / f"{model}-{scale}-{index}")
        transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
        found.append(
            sample_checks(
                path,
                start,
                end,
                PRECISIONS,
                batch=batch,
                prompt=PROMPT,
                steps=STEPS,
                seed=1000 + index,
                methods=("two-pass",),
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
        rms, peak = sample.pair(checked, checker, method="two-pass", **kw)
        hits += int(((rms > tolerance.rms) | (peak > tolerance.peak)).sum())
        total += rms.numel()
    return hits, total


@pytest.mark.timeout(600)
def test_honest_pairs_are_never_flagged_over_1024_checks_each(samples: list[Samples]) -> None:
    hidden = [sample.steps[0].inputs.shape[-1] for sample in samples]
    assert set(hidden) == {32, 128, 256}
    assert sum(s.checks for s, h in zip(samples, hidden, strict=True) if h > 32) >= 512
    pairs = comparable_pairs()
    cross = [(a, b) for a, b, _ in pairs if a.quantization != b.quantization]
    assert cross, "some pairs of different quantizations must be comparable"
    assert {p.quantization for pair in pairs for p in pair[:2]} == {"none", "int8", "nf4"}
    for checked, checker, tolerance in pairs:
        hits, total = flagged(samples, checked, checker, tolerance)
        assert total >= 1024
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
    # unquantized and nf4 but nf4/bfloat16: int8's outlier columns depend on the rows batched
    assert strict >= len(same) >= 5


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


def test_rms_is_free_of_the_hidden_size_and_peak_grows_as_gaussian_maxima() -> None:
    """The same relative error per channel gives the same ``rms`` at any hidden size; the
    ``peak`` of Gaussian errors grows about as sqrt(2 ln H) times it (module doc)."""
    generator = torch.Generator().manual_seed(2)
    ratios = []
    for hidden in (32, 256, 4096):
        x = torch.randn(1, 256, hidden, generator=generator)
        a = x + torch.randn(1, 256, hidden, generator=generator)
        b = a + 0.05 * torch.randn(1, 256, hidden, generator=generator)
        rms, peak = token_discrepancy(x, a, b, rounding=0.0)
        assert float(rms.median()) == pytest.approx(0.05, rel=0.03)
        ratio = float((peak / rms).median())
        assert 0.85 < ratio / math.sqrt(2 * math.log(hidden)) < 0.95
        ratios.append(ratio)
    assert ratios == sorted(ratios)


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


@pytest.mark.timeout(120)
def test_one_block_checks_agree_within_rounding_and_samples_join(tmp_path: Path) -> None:
    """On one block the keys and values of the earlier positions come straight from the
    inputs, so a checker's recomputation (either method) only rounds differently; and
    precisions sampled apart join into what sampling them together gives."""
    torch.manual_seed(7)
    transformers.AutoModelForCausalLM.from_config(
        CALIBRATION_CONFIGS["llama"]()
    ).eval().save_pretrained(tmp_path)
    pair = [Precision.of("bfloat16", "nf4"), Precision.of("float32", "int8")]
    sizes = {"batch": 2, "prompt": 3, "steps": 3, "seed": 5}
    methods = ("two-pass", "one-pass")
    both = sample_checks(tmp_path, 0, 1, pair, methods=methods, **sizes)
    assert both.checks == 2 * 4
    for precision in pair:
        for method in methods:
            rms, peak = both.pair(precision, precision, method=method)
            assert float(rms.max()) < 1e-3 and float(peak.max()) < 1e-2, (precision, method)
    apart = join_samples(
        [sample_checks(tmp_path, 0, 1, [p], methods=methods, **sizes) for p in pair]
    )
    for joined, together in zip(apart.steps, both.steps, strict=True):
        for precision in pair:
            assert torch.equal(joined.session[precision], together.session[precision])
            for method in methods:
                assert torch.equal(
                    joined.checker[method][precision], together.checker[method][precision]
                )
    other = sample_checks(tmp_path, 0, 1, pair[:1], **{**sizes, "seed": 6})
    with pytest.raises(ValueError):
        join_samples([both, other])
