"""Measuring how far honest servers of each precision drift apart: spot-check calibration.

For one checkpoint and span, ``sample_checks`` plays what a spot-check compares, for every
precision asked: the checked server's side (an inference session: a prompt, then one
token per step, with its KV cache) and the checker's side (a stateless forward of the
whole prefix, keeping the step's last positions), all from the same float32 hidden states
entering the span (embeddings of random tokens through the blocks before it, in float32).
A float32 forward without quantization is the exact reference.

``Samples.against_exact`` gives, per precision, each check's metrics against the exact
reference; ``Samples.pair`` each check's metrics between a session of one precision and a
forward of another (optionally corrupted by a cheat), which is what a spot-check sees.
``benchmarks/tolerance.py`` runs this over families, spans and weight scales and prints
``_tolerance.MEASURED`` (``measured_errors``); the tests check every pair against
``tolerance_for`` again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._cache import CachePool
from ._checkpoint import Checkpoint
from ._ends import load_model_ends
from ._limits import CacheLimits
from ._span import load_span
from ._tolerance import Precision, pair_key, token_discrepancy

EXACT = Precision.of("float32", "none")


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the generation: the span's inputs for its new positions, and outputs."""

    inputs: torch.Tensor
    """``[batch, new, hidden]`` float32."""
    exact: torch.Tensor
    """The float32 reference output for those positions."""
    session: dict[Precision, torch.Tensor]
    """Per precision: what an inference session returned (float32)."""
    forward: dict[Precision, torch.Tensor]
    """Per precision: the last ``new`` positions of a forward of the whole prefix."""


@dataclass(frozen=True, slots=True)
class Samples:
    """Every step of ``batch`` generations through one span, in every precision."""

    steps: tuple[Step, ...]

    @property
    def checks(self) -> int:
        """How many checks a pair's figures hold: one per (step, sequence)."""
        return sum(step.inputs.shape[0] for step in self.steps)

    def against_exact(self, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
        """Per check, ``precision``'s session and forward against the exact reference:
        the worst token's ``rms`` and ``peak`` (twice ``checks`` values each)."""
        rounding = precision.unit_roundoff + EXACT.unit_roundoff
        found = [
            _worst(step.inputs, step.exact, outputs[precision], rounding)
            for step in self.steps
            for outputs in (step.session, step.forward)
        ]
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])

    def pair(
        self, checked: Precision, checker: Precision, corrupt: Corrupt | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per check, a ``checked`` session step (corrupted by ``corrupt(inputs, output)``
        in ``checked``'s dtype, if given) against a ``checker`` forward: the worst token's
        ``rms`` and ``peak``, as a spot-check computes them."""
        rounding = checked.unit_roundoff + checker.unit_roundoff
        found = []
        for step in self.steps:
            candidate = step.session[checked]
            if corrupt is not None:
                cast = step.inputs.to(checked.dtype)
                candidate = corrupt(cast, candidate.to(checked.dtype)).to(torch.float32)
            found.append(_worst(step.inputs, step.forward[checker], candidate, rounding))
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


Corrupt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _worst(
    inputs: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor, rounding: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rms, peak = token_discrepancy(inputs, reference, candidate, rounding=rounding)
    return rms.amax(dim=1), peak.amax(dim=1)


def measured_errors(
    samples: Sequence[Samples], precisions: Sequence[Precision]
) -> dict[tuple[str, str], tuple[float, float]]:
    """The largest honest ``rms`` and ``peak`` seen between each unordered pair of
    precisions (either one checked, the other checking), keyed by their names, sorted."""
    table = {}
    for i, a in enumerate(precisions):
        for b in precisions[i:]:
            rms = peak = 0.0
            for sample in samples:
                for checked, checker in ((a, b), (b, a)):
                    r, p = sample.pair(checked, checker)
                    rms, peak = max(rms, float(r.max())), max(peak, float(p.max()))
            table[pair_key(a, b)] = (rms, peak)
    return table


def sample_checks(
    checkpoint: str | os.PathLike[str] | Checkpoint,
    start: int,
    end: int,
    precisions: Sequence[Precision],
    *,
    batch: int = 4,
    prompt: int = 6,
    steps: int = 12,
    seed: int = 0,
    device: str = "cpu",
) -> Samples:
    """Run ``batch`` generations of ``prompt`` + ``steps`` tokens through blocks
    ``[start, end)`` in every precision on ``device`` (the exact reference and the inputs
    on the CPU); the prompt is step 0."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.open(checkpoint)
    generator = torch.Generator().manual_seed(seed)
    ends = load_model_ends(checkpoint, dtype=torch.float32, device="cpu")
    vocab = ends.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt + steps), generator=generator)
    with torch.no_grad():
        hidden = ends.embed(ids)
    if start > 0:
        hidden = load_span(checkpoint, 0, start, dtype=torch.float32, device="cpu").forward(hidden)
    exact = load_span(
        checkpoint, start, end, dtype=torch.float32, quantization="none", device="cpu"
    )
    reference = exact.forward(hidden)
    bounds = [(0, prompt), *((t, t + 1) for t in range(prompt, prompt + steps))]
    session_out: dict[Precision, list[torch.Tensor]] = {}
    forward_out: dict[Precision, list[torch.Tensor]] = {}
    pool = CachePool(CacheLimits())
    for precision in precisions:
        span = load_span(
            checkpoint,
            start,
            end,
            dtype=precision.dtype,
            quantization=precision.quantization,
            device=device,
        )
        cast = hidden.to(precision.dtype)
        with span.open_session(pool, batch_size=batch, max_length=prompt + steps) as session:
            session_out[precision] = [session.step(cast[:, a:b]).float().cpu() for a, b in bounds]
        forward_out[precision] = [
            span.forward(cast[:, :b])[:, a:b].float().cpu() for a, b in bounds
        ]
    return Samples(
        tuple(
            Step(
                inputs=hidden[:, a:b],
                exact=reference[:, a:b],
                session={p: session_out[p][i] for p in precisions},
                forward={p: forward_out[p][i] for p in precisions},
            )
            for i, (a, b) in enumerate(bounds)
        )
    )
