"""The packages' surfaces: curated ``__all__``, the core imports without torch or numpy,
and the README's embedding example runs as printed."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ("security", "transport", "p2p", "dht", "scheduler")


@pytest.mark.parametrize("name", CORE)
def test_all_names_exist_once_and_claim_the_package(name: str) -> None:
    package = importlib.import_module(name)
    assert len(package.__all__) == len(set(package.__all__))
    for attr in package.__all__:
        obj = getattr(package, attr)
        if isinstance(obj, type):
            assert obj.__module__ == name, f"{name}.{attr} says it lives in {obj.__module__}"


def test_core_imports_leave_torch_and_numpy_out() -> None:
    code = (
        f"import sys, {', '.join(CORE)}\n"
        "print(','.join(sorted(m for m in ('torch', 'numpy') if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "", f"core packages pulled in {result.stdout.strip()}"


@pytest.mark.timeout(60)
def test_readme_embedding_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Embedding `p2p`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README lost its embedding example"
    result = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "'hello': 'swarm'" in result.stdout and "ping" in result.stdout
