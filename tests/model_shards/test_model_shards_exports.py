"""The package's curated API and its one exception tree."""

from __future__ import annotations

import inspect

import model_shards
from model_shards import _errors


def test_all_names_exist_and_claim_the_package() -> None:
    for name in model_shards.__all__:
        obj = getattr(model_shards, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "model_shards", name


def test_every_error_is_a_shard_error_with_its_own_code() -> None:
    errors = [
        obj for obj in vars(_errors).values() if inspect.isclass(obj) and issubclass(obj, Exception)
    ]
    assert all(issubclass(e, model_shards.ShardError) for e in errors)
    assert len({e.code for e in errors}) == len(errors)
    assert {e.__name__ for e in errors} <= set(model_shards.__all__)
    for error in (model_shards.InvalidShape, model_shards.WrongDtype, model_shards.TooLong):
        assert issubclass(error, model_shards.BadRequest)
    assert issubclass(model_shards.TensorTooLarge, model_shards.MalformedTensor)
    assert issubclass(model_shards.ManifestMismatch, model_shards.CheckpointError)
