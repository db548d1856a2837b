from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.model_shards.tiny import TinyModel, make_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyModel]:
    """``tiny(name)``: that family's tiny model, built and saved once per test session."""
    built: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in built:
            built[name] = make_tiny(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get
