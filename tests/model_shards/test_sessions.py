"""Inference sessions and the cache pool: reservations, typed errors, bad requests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model_shards import (
    BadRequest,
    CacheFull,
    CacheLimits,
    CachePool,
    InvalidShape,
    RequestLimits,
    SessionClosed,
    TooLong,
    WrongDtype,
    load_model_ends,
    load_span,
)
from tests.model_shards.tiny import TinyModel, chain_step, prompts


def test_session_reserves_its_whole_cache_up_front(tiny: Callable[[str], TinyModel]) -> None:
    span = load_span(tiny("llama").path, 0, 3)
    per_session = span.cache_bytes(2, 10)
    # 3 blocks x (keys + values) x 2 kv heads x 8 head dim x float32, per token
    assert per_session == 3 * 2 * 2 * 8 * 4 * 2 * 10
    pool = CachePool(CacheLimits(max_bytes=2 * per_session + per_session // 2))
    first = span.open_session(pool, batch_size=2, max_length=10)
    assert first.span is span
    assert pool.used_bytes == per_session and pool.sessions == 1
    second = span.open_session(pool, batch_size=2, max_length=10)
    with pytest.raises(CacheFull) as error:
        span.open_session(pool, batch_size=2, max_length=10)
    assert (error.value.requested, error.value.available) == (per_session, per_session // 2)
    assert error.value.code == "cache_full"
    span.open_session(pool, batch_size=1, max_length=10).close()
    first.close()
    first.close()
    assert pool.used_bytes == per_session and pool.sessions == 1
    with second:
        assert not second.closed
    assert second.closed and pool.used_bytes == 0 and pool.free_bytes == pool.limits.max_bytes
    with pytest.raises(SessionClosed):
        second.step(torch.zeros(2, 1, 32))
    with pytest.raises(SessionClosed):
        _ = second.position


def test_pool_bounds_sessions_length_and_batch(tiny: Callable[[str], TinyModel]) -> None:
    span = load_span(tiny("llama").path, 0, 1)
    pool = CachePool(CacheLimits(max_sessions=1, max_length=16, max_batch_size=2))
    with span.open_session(pool, batch_size=1, max_length=16):
        with pytest.raises(CacheFull, match="max_sessions=1"):
            span.open_session(pool, batch_size=1, max_length=4)
    with pytest.raises(TooLong, match="max_length=16"):
        span.open_session(pool, batch_size=1, max_length=17)
    with pytest.raises(BadRequest, match="max_batch_size=2"):
        span.open_session(pool, batch_size=3, max_length=4)
    with pytest.raises(BadRequest, match="empty"):
        span.open_session(pool, batch_size=1, max_length=0)
    assert pool.sessions == 0 and pool.used_bytes == 0


def test_full_session_fails_fast_and_leaves_the_cache_intact(
    tiny: Callable[[str], TinyModel],
) -> None:
    tm = tiny("mistral")
    ends = load_model_ends(tm.path)
    span = load_span(tm.path, 0, 4)
    ids = prompts(1, 12)
    with torch.no_grad():
        expected = tm.model(ids).logits
    with span.open_session(CachePool(), batch_size=1, max_length=10) as session:
        chain_step(ends, [session], ids[:, :8])
        with pytest.raises(TooLong, match="max_length=10"):
            chain_step(ends, [session], ids[:, 8:11])
        assert session.position == 8
        logits = chain_step(ends, [session], ids[:, 8:10])
        torch.testing.assert_close(logits, expected[:, 8:10], rtol=0, atol=1e-5)
        with pytest.raises(TooLong):
            chain_step(ends, [session], ids[:, 10:11])
        with pytest.raises(BadRequest, match="roll back to 11"):
            session.rollback(11)
        with pytest.raises(BadRequest):
            session.rollback(-1)


def test_bad_requests_are_typed(tiny: Callable[[str], TinyModel]) -> None:
    span = load_span(
        tiny("llama").path, 0, 2, limits=RequestLimits(max_batch_size=4, max_tokens=40)
    )
    good = torch.zeros(2, 5, 32)
    cases = [
        (torch.zeros(2, 5), InvalidShape, "hidden states must be"),
        ([[0.0]], InvalidShape, "got list"),
        (torch.zeros(2, 5, 31), InvalidShape, "hidden size 31"),
        (torch.zeros(2, 0, 32), InvalidShape, "empty"),
        (torch.zeros(2, 5, 32, dtype=torch.float16), WrongDtype, "float32"),
        (torch.zeros(5, 1, 32), BadRequest, "max_batch_size=4"),
        (torch.zeros(2, 21, 32), TooLong, "max_tokens=40"),
    ]
    for hidden, error, message in cases:
        with pytest.raises(error, match=message):
            span.forward(hidden)
    for mask, message in [
        (torch.ones(2, 4), "must be"),
        (torch.ones(2, 5), "integers or booleans"),
        ([[1] * 5] * 2, "must be"),
    ]:
        with pytest.raises(InvalidShape, match=message):
            span.forward(good, attention_mask=mask)
    for positions in [torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5), [[0] * 5] * 2]:
        with pytest.raises(InvalidShape, match="position_ids"):
            span.forward(good, position_ids=positions)
    with pytest.raises(InvalidShape, match="grad_output"):
        span.backward(good, torch.zeros(2, 4, 32))
    with span.open_session(CachePool(), batch_size=2, max_length=8) as session:
        with pytest.raises(InvalidShape, match="batch of 1, expected 2"):
            session.step(torch.zeros(1, 1, 32))
        with pytest.raises(InvalidShape):
            session.step(good, attention_mask=torch.ones(2, 3, dtype=torch.long))
        assert session.position == 0


def test_explicit_position_ids_and_masks(tiny: Callable[[str], TinyModel]) -> None:
    tm = tiny("qwen2")
    ends = load_model_ends(tm.path)
    span = load_span(tm.path, 0, 4)
    ids = prompts(2, 6)
    hidden = ends.embed(ids)
    default = span.forward(hidden)
    positions = torch.arange(6).expand(2, 6)
    assert torch.equal(span.forward(hidden, position_ids=positions.int()), default)
    assert torch.equal(
        span.forward(hidden, attention_mask=torch.ones(2, 6, dtype=torch.bool)), default
    )
    gapped = torch.tensor([[0, 1, 2, 10, 11, 12], [5, 6, 7, 8, 9, 20]])
    shifted = span.forward(hidden, position_ids=gapped)
    assert not torch.allclose(shifted, default)
    with torch.no_grad():
        expected = tm.model(ids, position_ids=gapped).logits
    torch.testing.assert_close(ends.logits(shifted), expected, rtol=0, atol=1e-5)
    with span.open_session(CachePool(), batch_size=2, max_length=6) as session:
        out = session.step(hidden[:, :4], position_ids=gapped[:, :4])
        out2 = session.step(hidden[:, 4:], position_ids=gapped[:, 4:])
    torch.testing.assert_close(torch.cat([out, out2], 1), shifted, rtol=0, atol=1e-5)


def test_falcon_cache_keeps_one_head_per_group(tiny: Callable[[str], TinyModel]) -> None:
    tm = tiny("falcon")
    config = tm.model.config
    span = load_span(tm.path, 0, 4)
    head_dim = config.hidden_size // config.num_attention_heads
    assert span.cache_bytes(1, 1) == 4 * 2 * config.num_kv_heads * head_dim * 4
    assert config.num_kv_heads < config.num_attention_heads


def test_device_out_of_memory_is_cache_full(tiny: Callable[[str], TinyModel]) -> None:
    span = load_span(tiny("llama").path, 0, 1)
    pool = CachePool(CacheLimits(max_bytes=2**62, max_length=2**45))
    with pytest.raises(CacheFull, match="cannot allocate"):
        span.open_session(pool, batch_size=1, max_length=2**40)
    assert pool.sessions == 0 and pool.used_bytes == 0
