"""Every family: the client's ends plus two separately loaded spans equal the local model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model_shards import CachePool, load_model_ends, load_span
from tests.model_shards.tiny import (
    CONFIGS,
    TinyModel,
    chain_forward,
    chain_generate,
    chain_step,
    left_padded,
    mask_positions,
    prompts,
)

FAMILY_NAMES = list(CONFIGS)


def two_servers(tm: TinyModel, **kwargs: object):
    """The client's ends and spans [0, k), [k, n), each loaded on its own from disk."""
    k = tm.num_blocks // 2
    ends = load_model_ends(tm.path)
    return ends, [
        load_span(tm.path, 0, k, **kwargs),
        load_span(tm.path, k, tm.num_blocks, **kwargs),
    ]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chain_logits_equal_local_model(tiny: Callable[[str], TinyModel], name: str) -> None:
    tm = tiny(name)
    ends, spans = two_servers(tm)
    ids = prompts(2, 11)
    with torch.no_grad():
        expected = tm.model(ids).logits
    torch.testing.assert_close(chain_forward(ends, spans, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_greedy_generation_equals_generate(tiny: Callable[[str], TinyModel], name: str) -> None:
    tm = tiny(name)
    ends, spans = two_servers(tm)
    ids = prompts(2, 9)
    expected = tm.model.generate(ids, do_sample=False, max_new_tokens=32)
    pool = CachePool()
    sessions = [span.open_session(pool, batch_size=2, max_length=41) for span in spans]
    assert torch.equal(chain_generate(ends, sessions, ids, 32), expected)
    assert [s.position for s in sessions] == [40, 40]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_padded_batch_equals_local_model(tiny: Callable[[str], TinyModel], name: str) -> None:
    tm = tiny(name)
    ends, spans = two_servers(tm)
    ids, mask = left_padded([4, 10, 7])
    with torch.no_grad():
        expected = tm.model(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
    logits = chain_forward(ends, spans, ids, mask)
    real = mask.bool()
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-5)

    generated = tm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    pool = CachePool()
    sessions = [span.open_session(pool, batch_size=3, max_length=40) for span in spans]
    assert torch.equal(chain_generate(ends, sessions, ids, 24, mask), generated)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chunked_prefill_and_rollback(tiny: Callable[[str], TinyModel], name: str) -> None:
    tm = tiny(name)
    ends, spans = two_servers(tm)
    ids = prompts(2, 16, seed=5)
    with torch.no_grad():
        expected = tm.model(ids).logits
    pool = CachePool()
    sessions = [span.open_session(pool, batch_size=2, max_length=16) for span in spans]
    chunks = [chain_step(ends, sessions, ids[:, a:b]) for a, b in [(0, 7), (7, 8), (8, 12)]]
    torch.testing.assert_close(torch.cat(chunks, 1), expected[:, :12], rtol=0, atol=1e-5)

    wrong = prompts(2, 3, seed=9)
    chain_step(ends, sessions, wrong)
    for session in sessions:
        session.rollback(12)
        assert session.position == 12
    rest = chain_step(ends, sessions, ids[:, 12:])
    torch.testing.assert_close(rest, expected[:, 12:], rtol=0, atol=1e-5)
    for session in sessions:
        session.rollback(5)
    again = chain_step(ends, sessions, ids[:, 5:9])
    torch.testing.assert_close(again, expected[:, 5:9], rtol=0, atol=1e-5)
