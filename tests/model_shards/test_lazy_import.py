"""``model_shards`` loads its names on first use: ``swarm status`` never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import model_shards

HEAVY = ("torch", "transformers", "numpy", "bitsandbytes", "safetensors")


def fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.timeout(90)
def test_status_and_its_imports_leave_torch_out() -> None:
    code = (
        "import contextlib, io, sys\n"
        "import model_shards, model_shards._announce, model_shards._server_errors\n"
        "from swarm._cli import parser\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    parser().parse_args(['status', '--help'])\n"
        "model_shards.ServerLimits, model_shards.ShardError, model_shards.BlockNotServed\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = fresh(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"status pulled in {result.stdout.strip()}"


@pytest.mark.timeout(90)
def test_without_the_model_extra_a_torch_name_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import model_shards\n"
        "assert model_shards.CacheLimits().max_bytes > 0\n"
        "try:\n"
        "    model_shards.load_span\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    result = fresh(code)
    assert result.returncode == 0, result.stderr
    assert "model_shards.load_span needs torch: pip install 'swarm[model]'" in result.stdout


def test_all_is_the_lazy_table() -> None:
    assert sorted(model_shards.__all__) == sorted(model_shards._MODULE_OF)
    assert len(model_shards.__all__) == len(set(model_shards.__all__))
    assert set(model_shards.__all__) <= set(dir(model_shards))
    with pytest.raises(AttributeError, match="no attribute 'load_everything'"):
        _ = model_shards.load_everything
