"""How far apart two honest servers' outputs of the same blocks on the same input may be.

Two servers never return bit-equal hidden states: their weights may be quantized
differently (none, int8, nf4), they compute in different dtypes, and even in one precision
the checked session built its KV cache one step at a time while the checker recomputes the
positions before the step in one pass (then the step on that cache, through the kernels
of a session step): the cached keys and values, from the second block on, do not add up
the same numbers in the same order. A spot-check therefore compares with a tolerance, and the
tolerance must be scale-aware: hidden states grow along the residual stream, and what a
span adds to it can be small next to what it carries through.

The measure (``discrepancy``) is per token, relative to what the span did to that token:

    scale_t  = rms(out_t - in_t) + ROUNDING_FACTOR * (u_a + u_b) * rms(out_t)
    rms_t    = rms(a_t - b_t) / scale_t
    peak_t   = max_c |a_tc - b_tc| / scale_t

``in_t`` is the input both servers were sent, ``rms(out_t - in_t)`` the smaller of the two
updates (a server that skips its blocks has none, and cannot inflate the other's), and
``u`` the unit roundoff of each output dtype (one rounding of the residual stream itself,
which is not the span's doing). ``rms`` catches noise, zeros and skipped blocks; ``peak``
catches a change in one hidden channel that the average hides; measured against the
update, a uniform rescaling of the output shows too.

Every pair of precisions (dtype x quantization) has its largest honest errors measured
(``MEASURED``, by ``model_shards._spot_calibrate`` through ``benchmarks/tolerance.py``, on
models of hidden size 32, 128 and 256: how, and the figures, in docs/benchmarks.md
"Trust"); its tolerance is ``MARGIN`` times that, at least ``FLOOR`` (``tolerance_for``).
``rms`` is a mean over the channels, so the hidden size does not enter it; ``peak``, their
maximum, grows slowly with their number (for Gaussian errors about sqrt(2 ln H) times
``rms``: 2.6 at 32, 3.3 at 256, 4.1 at 4,096). The honest errors themselves grow with the
hidden size where blocks change the stream a lot, which only wider models show.

A tolerance is *strict* when it is tight enough to catch every cheat of the issue, outputs
scaled by 1.05 included (``STRICT_RMS``): pairs of one precision are, but for nf4 in
bfloat16 (on the CPU: a Mixtral expert choice flipped by rounding) and int8 in every dtype
from hidden size 128 on (in float32: LLM.int8 computes apart the columns where any row of
the batch has an activation over its outlier threshold, so the checker's one-pass prefix
and the session's one-token steps split them differently; in float16 and bfloat16 the
cached keys and values round further apart as the hidden size grows). Other pairs are
*coarse* (zeros and skipped blocks are still caught, subtler cheats not always), and a pair
whose tolerance would pass errors as large as the span's whole update (``COARSE_RMS``: nf4
against anything but nf4) is not compared at all. The spot-checker prefers strict
checkers. A mixture of experts whose expert choice a rounding flips differs by about the
expert's whole output, in any pair: ``MEASURED`` covers that only where its calibration
met it (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dtypes import DTYPES, dtype_name
from ._quant import Quantization

UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
"""Half the gap between 1 and the next number, per compute dtype."""

ROUNDING_FACTOR = 1.0
"""Roundings of the residual stream (to each output's dtype) the error budget allows for."""


@dataclass(frozen=True, slots=True)
class Precision:
    """How a server computes: its compute dtype and its weights' quantization."""

    dtype: torch.dtype
    quantization: Quantization

    @classmethod
    def of(cls, dtype: str | torch.dtype, quantization: str | Quantization) -> Precision:
        """From names as servers announce them (``"bfloat16"``, ``"nf4"``)."""
        resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
        if resolved not in UNIT_ROUNDOFF:
            raise ValueError(f"no tolerance is known for dtype {dtype!r}")
        return cls(resolved, Quantization(quantization))

    @property
    def unit_roundoff(self) -> float:
        return UNIT_ROUNDOFF[self.dtype]

    def __str__(self) -> str:
        return f"{self.quantization}/{dtype_name(self.dtype)}"


PRECISIONS: tuple[Precision, ...] = tuple(
    Precision.of(dtype, quant)
    for quant in ("none", "int8", "nf4")
    for dtype in ("float32", "bfloat16", "float16")
)
"""Every precision a server can announce: the calibration's and its test's."""


@dataclass(frozen=True, slots=True)
class Tolerance:
    """The largest honest ``Discrepancy`` between two precisions, per metric."""

    rms: float
    peak: float

    @property
    def strict(self) -> bool:
        """Tight enough to catch every cheat of the issue (``STRICT_RMS``)."""
        return self.rms <= STRICT_RMS


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """The worst token of a comparison, in units of the span's own update (module doc)."""

    rms: float
    peak: float
    tokens: int

    def within(self, tolerance: Tolerance) -> bool:
        return self.rms <= tolerance.rms and self.peak <= tolerance.peak

    def __str__(self) -> str:
        return f"rms {self.rms:.3g}, peak {self.peak:.3g} over {self.tokens} token(s)"


MARGIN = 2.0
"""A pair's tolerance is this many times the largest honest error measured between them."""
FLOOR = Tolerance(rms=0.01, peak=0.05)
"""The least tolerance of any pair (what calibration on one machine cannot see: other
kernels, other devices)."""
STRICT_RMS = 0.05
"""A pair whose ``rms`` tolerance is at most this tells every cheat of the issue apart,
outputs scaled by 1.05 included, whatever share of the output the span's update is."""
COARSE_RMS = 1.0
"""A pair whose ``rms`` tolerance is above this is not compared at all: errors as large as
the span's whole update would pass."""

MEASURED: dict[tuple[str, str], tuple[float, float]] = {
    ("none/float32", "none/float32"): (1.479e-06, 4.636e-06),
    ("none/bfloat16", "none/float32"): (0.3171, 1.436),
    ("none/float16", "none/float32"): (0.04354, 0.1737),
    ("int8/float32", "none/float32"): (0.1471, 0.3959),
    ("int8/bfloat16", "none/float32"): (0.2894, 1.362),
    ("int8/float16", "none/float32"): (0.1147, 0.3608),
    ("nf4/float32", "none/float32"): (0.8375, 2.839),
    ("nf4/bfloat16", "none/float32"): (0.8718, 2.686),
    ("nf4/float16", "none/float32"): (0.8428, 2.794),
    ("none/bfloat16", "none/bfloat16"): (0.01355, 0.07138),
    ("none/bfloat16", "none/float16"): (0.3122, 1.44),
    ("int8/float32", "none/bfloat16"): (0.3153, 1.443),
    ("int8/bfloat16", "none/bfloat16"): (0.3181, 1.766),
    ("int8/float16", "none/bfloat16"): (0.3088, 1.441),
    ("nf4/float32", "none/bfloat16"): (0.8407, 2.841),
    ("nf4/bfloat16", "none/bfloat16"): (0.8746, 2.632),
    ("nf4/float16", "none/bfloat16"): (0.846, 2.759),
    ("none/float16", "none/float16"): (0.002303, 0.01258),
    ("int8/float32", "none/float16"): (0.1471, 0.394),
    ("int8/bfloat16", "none/float16"): (0.2991, 1.23),
    ("int8/float16", "none/float16"): (0.1144, 0.3624),
    ("nf4/float32", "none/float16"): (0.8373, 2.843),
    ("nf4/bfloat16", "none/float16"): (0.8715, 2.695),
    ("nf4/float16", "none/float16"): (0.8426, 2.798),
    ("int8/float32", "int8/float32"): (0.03108, 0.1313),
    ("int8/bfloat16", "int8/float32"): (0.291, 1.36),
    ("int8/float16", "int8/float32"): (0.1445, 0.2949),
    ("int8/float32", "nf4/float32"): (0.8175, 2.839),
    ("int8/float32", "nf4/bfloat16"): (0.852, 2.85),
    ("int8/float32", "nf4/float16"): (0.8233, 2.812),
    ("int8/bfloat16", "int8/bfloat16"): (0.03654, 0.1357),
    ("int8/bfloat16", "int8/float16"): (0.2938, 1.229),
    ("int8/bfloat16", "nf4/float32"): (0.8162, 2.933),
    ("int8/bfloat16", "nf4/bfloat16"): (0.85, 2.765),
    ("int8/bfloat16", "nf4/float16"): (0.8208, 2.888),
    ("int8/float16", "int8/float16"): (0.03588, 0.1276),
    ("int8/float16", "nf4/float32"): (0.8192, 2.878),
    ("int8/float16", "nf4/bfloat16"): (0.8541, 2.734),
    ("int8/float16", "nf4/float16"): (0.8246, 2.837),
    ("nf4/float32", "nf4/float32"): (1.661e-06, 4.681e-06),
    ("nf4/bfloat16", "nf4/float32"): (0.3151, 1.344),
    ("nf4/float16", "nf4/float32"): (0.09581, 0.3265),
    ("nf4/bfloat16", "nf4/bfloat16"): (0.1293, 0.3145),
    ("nf4/bfloat16", "nf4/float16"): (0.3251, 1.478),
    ("nf4/float16", "nf4/float16"): (0.001966, 0.007835),
}
"""Largest honest (rms, peak) measured between two precisions, keyed by their names in
sorted order (``pair_key``); printed by ``benchmarks/tolerance.py``."""


def pair_key(a: Precision, b: Precision) -> tuple[str, str]:
    first, second = sorted((str(a), str(b)))
    return first, second


def tolerance_for(a: Precision, b: Precision) -> Tolerance | None:
    """How far a server computing in ``a`` and one in ``b`` may honestly differ; None when
    the pair was never calibrated or its tolerance is too loose to compare (``COARSE_RMS``)."""
    measured = MEASURED.get(pair_key(a, b))
    return None if measured is None else tolerance_from(*measured)


def tolerance_from(rms: float, peak: float) -> Tolerance | None:
    """The tolerance of a pair whose largest honest errors measured are ``rms``, ``peak``."""
    tolerance = Tolerance(max(FLOOR.rms, MARGIN * rms), max(FLOOR.peak, MARGIN * peak))
    return tolerance if tolerance.rms <= COARSE_RMS else None


def token_discrepancy(
    inputs: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor, *, rounding: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``[batch, tokens]``: the ``rms`` and ``peak`` metrics (module doc), with
    ``rounding`` the sum of the two outputs' unit roundoffs; inf where an output is not
    finite."""
    if not inputs.shape == reference.shape == candidate.shape or inputs.ndim != 3:
        raise ValueError(
            f"inputs {list(inputs.shape)}, reference {list(reference.shape)} and candidate "
            f"{list(candidate.shape)} must be one [batch, tokens, hidden] shape"
        )
    x, a, b = (t.detach().to(torch.float32) for t in (inputs, reference, candidate))
    update = torch.minimum(_rms(a - x), _rms(b - x))
    carried = torch.maximum(_rms(a), _rms(b))
    scale = update + ROUNDING_FACTOR * rounding * carried
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    error = a - b
    rms = _rms(error) / scale
    peak = error.abs().amax(dim=-1) / scale
    inf = torch.tensor(float("inf"))
    return torch.nan_to_num(rms, nan=inf, posinf=inf), torch.nan_to_num(peak, nan=inf, posinf=inf)


def discrepancy(
    inputs: torch.Tensor,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    rounding: float,
    mask: torch.Tensor | None = None,
) -> Discrepancy:
    """Compare two outputs ``[batch, tokens, hidden]`` of the same blocks on ``inputs``: the
    worst token. ``mask`` ``[batch, tokens]`` picks the positions to compare (padding
    carries no meaning and is left out)."""
    rms, peak = token_discrepancy(inputs, reference, candidate, rounding=rounding)
    if mask is not None:
        keep = mask.detach().to(device=rms.device, dtype=torch.bool)
        rms, peak = rms[keep], peak[keep]
    if rms.numel() == 0:
        return Discrepancy(0.0, 0.0, 0)
    return Discrepancy(float(rms.max()), float(peak.max()), rms.numel())


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.square().mean(dim=-1).sqrt()
