"""Hostile wire values shared by the fuzz tests (``tests/dht/test_dht_fuzz.py``,
``tests/model_shards/test_server_fuzz.py``): msgpack scalars at the edges of their types,
map keys made of them, and nesting deep enough to break a recursive parser."""

from __future__ import annotations

import math
import random
from typing import Any


def edge_scalars(rng: random.Random) -> list[Any]:
    """Scalars at the edges of msgpack's types: the caller adds its protocol's own."""
    return [
        None,
        True,
        False,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        0.5,
        math.nan,
        math.inf,
        -0.0,
        "",
        "x" * rng.randint(1, 300),
        "\u0000\ud7ff",
        b"",
    ]


def as_key(value: Any) -> Any:
    """``value`` where a map may hold it as a key, else ``"k"``."""
    return value if isinstance(value, str | int | bytes) and not isinstance(value, bool) else "k"


def deep_nest(rng: random.Random, leaf: Any, most: int) -> Any:
    """``leaf`` inside 10 to ``most`` nested lists."""
    for _ in range(rng.randint(10, most)):
        leaf = [leaf]
    return leaf
