"""The package surface: curated ``__all__``, and no torch or numpy on import."""

from __future__ import annotations

import subprocess
import sys

import p2p


def test_all_names_exist_and_claim_the_package() -> None:
    assert sorted(p2p.__all__) == sorted(set(p2p.__all__))
    for name in p2p.__all__:
        obj = getattr(p2p, name)
        if isinstance(obj, type):
            assert obj.__module__ == "p2p", name


def test_embedding_needs_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, p2p, transport, security\n"
        "heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
