"""Progress reporting while loading blocks or hashing a checkpoint."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each unit of work (a block)."""


def tqdm_progress(description: str) -> Progress:
    """A ``Progress`` that draws a tqdm bar, closed when ``done == total``."""
    bar: tqdm | None = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="block")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report
