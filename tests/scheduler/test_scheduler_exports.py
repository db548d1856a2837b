"""The package surface: curated ``__all__``, names claim the package, no torch or numpy."""

from __future__ import annotations

import inspect
import subprocess
import sys

import scheduler


def test_all_names_exist_once_and_claim_the_package() -> None:
    assert len(scheduler.__all__) == len(set(scheduler.__all__))
    for name in scheduler.__all__:
        obj = getattr(scheduler, name)
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert obj.__module__ == "scheduler", name


def test_errors_share_one_root() -> None:
    for name in ("MissingBlocksError", "UnknownServer", "InvalidSnapshot", "SchedulerConfigError"):
        assert issubclass(getattr(scheduler, name), scheduler.SchedulerError)


def test_the_scheduler_imports_without_torch_numpy_or_networking() -> None:
    code = (
        "import sys, scheduler\n"
        "heavy = ('torch', 'numpy', 'asyncio', 'socket', 'transport', 'p2p', 'dht')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
