"""Measuring how far honest servers of each precision drift apart: spot-check calibration.

For one checkpoint and span, ``sample_checks`` plays what a spot-check compares, for every
precision asked: the checked server's side (an inference session: a prompt, then one
token per step, with its KV cache) and the checker's side, all from the same float32
hidden states entering the span (embeddings of random tokens through the blocks before
it, in float32). A float32 forward without quantization is the exact reference.

The checker recomputes the step from the whole prefix, in one of two ways (``Method``):

* ``"two-pass"`` (what checkers run): the positions before the step in one pass, filling a
  temporary KV cache, then the step's own positions on that cache, as a session step
  does (``Span.open_session``), so that both sides take the same kernels for the step
  (bitsandbytes, for one, picks its kernels by the number of rows);
* ``"one-pass"``: a stateless forward of the whole prefix, keeping its last positions.

``Samples.against_exact`` gives, per precision, each check's metrics against the exact
reference; ``Samples.pair`` each check's metrics between a session of one precision and a
checker of another (optionally corrupted by a cheat), which is what a spot-check sees.
``benchmarks/tolerance.py`` runs this over families, spans and weight scales and prints
``_tolerance.MEASURED`` (``measured_errors``); the tests check every pair against
``tolerance_for`` again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ._cache import CachePool
from ._checkpoint import Checkpoint
from ._ends import load_model_ends
from ._limits import CacheLimits
from ._span import Span, load_span
from ._tolerance import Precision, pair_key, token_discrepancy

EXACT = Precision.of("float32", "none")

Method = Literal["two-pass", "one-pass"]
"""How the checker recomputes a step from the whole prefix (module doc)."""
METHODS: tuple[Method, ...] = ("two-pass", "one-pass")


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the generation: the span's inputs for its new positions, and outputs."""

    inputs: torch.Tensor
    """``[batch, new, hidden]`` float32."""
    exact: torch.Tensor
    """The float32 reference output for those positions."""
    session: dict[Precision, torch.Tensor]
    """Per precision: what an inference session returned (float32)."""
    checker: dict[Method, dict[Precision, torch.Tensor]]
    """Per method and precision: the checker's output for those positions."""


@dataclass(frozen=True, slots=True)
class Samples:
    """Every step of ``batch`` generations through one span, in every precision."""

    steps: tuple[Step, ...]

    @property
    def checks(self) -> int:
        """How many checks a pair's figures hold: one per (step, sequence)."""
        return sum(step.inputs.shape[0] for step in self.steps)

    def against_exact(self, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
        """Per check, ``precision``'s session and each method's checker output against the
        exact reference: the worst token's ``rms`` and ``peak`` (``checks`` values per
        method sampled, and the session's)."""
        rounding = precision.unit_roundoff + EXACT.unit_roundoff
        found = [
            _worst(step.inputs, step.exact, outputs[precision], rounding)
            for step in self.steps
            for outputs in (step.session, *step.checker.values())
        ]
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])

    def pair(
        self,
        checked: Precision,
        checker: Precision,
        corrupt: Corrupt | None = None,
        *,
        method: Method = "two-pass",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per check, a ``checked`` session step (corrupted by ``corrupt(inputs, output)``
        in ``checked``'s dtype, if given) against a ``checker`` recomputing it by
        ``method``: the worst token's ``rms`` and ``peak``, as a spot-check computes them."""
        rounding = checked.unit_roundoff + checker.unit_roundoff
        found = []
        for step in self.steps:
            candidate = step.session[checked]
            if corrupt is not None:
                cast = step.inputs.to(checked.dtype)
                candidate = corrupt(cast, candidate.to(checked.dtype)).to(torch.float32)
            reference = step.checker[method][checker]
            found.append(_worst(step.inputs, reference, candidate, rounding))
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


Corrupt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _worst(
    inputs: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor, rounding: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rms, peak = token_discrepancy(inputs, reference, candidate, rounding=rounding)
    return rms.amax(dim=1), peak.amax(dim=1)


def measured_errors(
    samples: Sequence[Samples], precisions: Sequence[Precision], method: Method = "two-pass"
) -> dict[tuple[str, str], tuple[float, float]]:
    """The largest honest ``rms`` and ``peak`` seen between each unordered pair of
    precisions (either one checked, the other checking by ``method``), keyed by their
    names, sorted."""
    table = {}
    for i, a in enumerate(precisions):
        for b in precisions[i:]:
            rms = peak = 0.0
            for sample in samples:
                for checked, checker in ((a, b), (b, a)):
                    r, p = sample.pair(checked, checker, method=method)
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
    methods: Sequence[Method] = ("two-pass",),
) -> Samples:
    """Run ``batch`` generations of ``prompt`` + ``steps`` tokens through blocks
    ``[start, end)`` in every precision on ``device`` (the exact reference and the inputs
    on the CPU), the checker's side by each of ``methods``; the prompt is step 0."""
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
    checker_out: dict[Method, dict[Precision, list[torch.Tensor]]] = {m: {} for m in methods}
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
        for method in methods:
            checker_out[method][precision] = [
                _recompute(span, pool, cast, a, b, method).float().cpu() for a, b in bounds
            ]
    return Samples(
        tuple(
            Step(
                inputs=hidden[:, a:b],
                exact=reference[:, a:b],
                session={p: session_out[p][i] for p in precisions},
                checker={m: {p: out[p][i] for p in precisions} for m, out in checker_out.items()},
            )
            for i, (a, b) in enumerate(bounds)
        )
    )


def _recompute(
    span: Span, pool: CachePool, hidden: torch.Tensor, start: int, end: int, method: Method
) -> torch.Tensor:
    """The checker's output for positions ``[start, end)`` of ``hidden`` by ``method``."""
    if method == "one-pass":
        return span.forward(hidden[:, :end])[:, start:end]
    with span.open_session(pool, batch_size=hidden.shape[0], max_length=end) as session:
        if start > 0:
            session.step(hidden[:, :start])
        return session.step(hidden[:, start:end])


def join_samples(parts: Sequence[Samples]) -> Samples:
    """The same generations sampled in separate calls (other precisions), as one: every
    part must come from one ``sample_checks`` setting (checkpoint, span, sizes, seed)."""
    first = parts[0]
    for part in parts[1:]:
        same = len(part.steps) == len(first.steps) and all(
            torch.equal(a.inputs, b.inputs) for a, b in zip(part.steps, first.steps, strict=True)
        )
        if not same:
            raise ValueError("samples of different generations cannot be joined")
    steps = []
    for index, step in enumerate(first.steps):
        others = [part.steps[index] for part in parts]
        methods = dict.fromkeys(m for other in others for m in other.checker)
        steps.append(
            Step(
                inputs=step.inputs,
                exact=step.exact,
                session={p: t for other in others for p, t in other.session.items()},
                checker={
                    m: {p: t for other in others for p, t in other.checker.get(m, {}).items()}
                    for m in methods
                },
            )
        )
    return Samples(tuple(steps))
