"""When each generated token arrived: a streamer for ``generate``, for tests and benchmarks.

``generate(..., streamer=TokenClock())`` records the time of every new token; ``gaps_s``
are the times between consecutive tokens (the first one measured from the prompt, so it
includes the prefill) and ``stall_s`` the longest of them after the first: how long a
failover held the generation up, for instance. ``on_token(n)`` is called after the
``n``-th new token (from 1), in the generating thread: a test kills a server there.

After a rewind (``DistributedModelForCausalLM.generate``: a cheater caught late),
``rewound(length)`` forgets the tokens past the first ``length`` of the sequence, with
their times: ``tokens`` are always the final ones, and the gap before the first token
drawn again holds the rewind's cost. ``rewinds`` lists each rewind's ``length``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise

import torch


class TokenClock:
    """A ``transformers`` streamer that timestamps each generated token (batch of one)."""

    def __init__(
        self,
        on_token: Callable[[int], None] | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.on_token = on_token
        self._clock = clock
        self.started: float | None = None
        """When the prompt was handed over (the first ``put``)."""
        self.times: list[float] = []
        """When each new token arrived."""
        self.tokens: list[int] = []
        self.prompt = 0
        """Tokens of the prompt (the first ``put``)."""
        self.rewinds: list[int] = []
        """The sequence length kept at each rewind, in order."""

    def put(self, value: torch.Tensor) -> None:
        now = self._clock()
        if self.started is None:
            self.started = now
            self.prompt = value.shape[-1]
            return
        self.times.append(now)
        self.tokens.extend(int(t) for t in value.reshape(-1))
        if self.on_token is not None:
            self.on_token(len(self.times))

    def end(self) -> None:
        """Generation is over (nothing to flush)."""

    def rewound(self, length: int) -> None:
        """The generation went back to its first ``length`` tokens: later ones are dropped."""
        kept = max(0, length - self.prompt)
        del self.tokens[kept:]
        del self.times[kept:]
        self.rewinds.append(length)

    @property
    def gaps_s(self) -> list[float]:
        """Seconds from the prompt to the first token, then between consecutive tokens."""
        if self.started is None:
            return []
        points = [self.started, *self.times]
        return [b - a for a, b in pairwise(points)]

    @property
    def stall_s(self) -> float:
        """The longest gap between two consecutive generated tokens (0 for fewer than two)."""
        return max(self.gaps_s[1:], default=0.0)
