"""generate() with QuestCache against dense SDPA with transformers' own cache, on tiny random MHA and GQA models."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from transformers_quest import QuestCache, attention
from transformers_quest.handoff import HANDOFF

FULL = 4096  # a budget larger than every context below: Quest must equal dense attention


def prompt(batch: int = 1, length: int = 150, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 96, (batch, length), generator=generator)


def test_greedy_equals_dense(model_pair):
    quest, dense = model_pair
    ids = prompt(2)
    expected = dense.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(quest.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=QuestCache(FULL)), expected)


def test_seeded_sampling_equals_dense(model_pair):
    quest, dense = model_pair
    ids = prompt()
    torch.manual_seed(7)
    expected = dense.generate(ids, max_new_tokens=16, do_sample=True, top_k=20)
    torch.manual_seed(7)
    actual = quest.generate(ids, max_new_tokens=16, do_sample=True, top_k=20, past_key_values=QuestCache(FULL))
    assert torch.equal(actual, expected)


def test_beam_search_with_several_returned_sequences_equals_dense(model_pair):
    quest, dense = model_pair
    ids = prompt(2)
    kwargs = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False)
    expected = dense.generate(ids, **kwargs)
    assert torch.equal(quest.generate(ids, past_key_values=QuestCache(FULL), **kwargs), expected)


def test_sampling_with_several_returned_sequences_runs_sparse(model_pair):
    quest, _ = model_pair
    cache = QuestCache(budget=32, page_size=16, dense_layers=0)
    out = quest.generate(prompt(), max_new_tokens=8, do_sample=True, num_return_sequences=3, past_key_values=cache)
    assert out.shape == (3, 158)
    assert cache.get_seq_length() == 157 and cache.layers[-1].keys.shape[0] == 3
    assert cache.stats.read_fraction < 0.5


def test_assisted_decoding_equals_dense_greedy(model_pair):
    quest, dense = model_pair
    assistant = type(dense)(dense.config).eval()  # a different (random) draft model, same vocabulary
    assistant.generation_config.pad_token_id = 0
    ids = prompt()
    expected = dense.generate(ids, max_new_tokens=20, do_sample=False)
    actual = quest.generate(
        ids, max_new_tokens=20, do_sample=False, assistant_model=assistant, past_key_values=QuestCache(FULL)
    )
    assert torch.equal(actual, expected)


def test_prompt_lookup_decoding_equals_dense_greedy(model_pair):
    quest, dense = model_pair
    ids = prompt().repeat(1, 2)  # repetitive prompt so that lookups propose (and crop) candidates
    expected = dense.generate(ids, max_new_tokens=20, do_sample=False)
    actual = quest.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4, past_key_values=QuestCache(FULL))
    assert torch.equal(actual, expected)


def test_prompt_lookup_decoding_runs_sparse(model_pair):
    quest, _ = model_pair
    cache = QuestCache(budget=32)
    out = quest.generate(prompt().repeat(1, 2), max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4, past_key_values=cache)
    assert out.shape[1] == 320 and cache.get_seq_length() == 319


def test_continuing_from_a_filled_cache_equals_dense(model_pair):
    quest, dense = model_pair
    ids = prompt()
    dense_cache, quest_cache = DynamicCache(), QuestCache(FULL)
    first = dense.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=dense_cache)
    assert torch.equal(quest.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=quest_cache), first)
    follow_up = torch.cat([first, prompt(length=30, seed=3)], dim=1)
    expected = dense.generate(follow_up, max_new_tokens=10, do_sample=False, past_key_values=dense_cache)
    assert torch.equal(quest.generate(follow_up, max_new_tokens=10, do_sample=False, past_key_values=quest_cache), expected)


@pytest.mark.parametrize("budget", [FULL, 48])
def test_left_padded_batch_equals_each_prompt_alone(model_pair, budget):
    """Pads are whole pages here, so page boundaries match a lone run and even sparse selections agree."""
    quest, _ = model_pair
    lengths = [150, 118, 86]
    prompts = [prompt(length=n, seed=n)[0] for n in lengths]
    batch = torch.zeros(3, 150, dtype=torch.long)
    mask = torch.zeros(3, 150, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, 150 - len(p) :], mask[row, 150 - len(p) :] = p, 1
    together = quest.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False, past_key_values=QuestCache(budget))
    for row, p in enumerate(prompts):
        alone = quest.generate(p[None], max_new_tokens=16, do_sample=False, past_key_values=QuestCache(budget))
        assert torch.equal(together[row, 150:], alone[0, len(p) :]), f"prompt {row} differs"


def test_sparse_budget_reads_less_and_changes_attention(model_pair):
    quest, dense = model_pair
    ids = prompt(length=400)
    cache = QuestCache(budget=32, dense_layers=1)
    sparse_logits = quest(ids[:, :-1], past_key_values=cache).logits
    step = quest(ids[:, -1:], past_key_values=cache).logits[:, -1]
    dense_step = dense(ids).logits[:, -1]
    assert cache.stats.read_fraction < 0.5
    assert not torch.allclose(step, dense_step, atol=1e-6)  # sparsity must actually change the computation
    assert torch.allclose(sparse_logits, dense(ids[:, :-1]).logits, atol=1e-5)  # prefill stays dense


def test_quest_attention_without_quest_cache_warns_and_is_dense(model_pair):
    quest, dense = model_pair
    ids = prompt()
    attention._warned_no_cache = False
    with CaptureLogger(logging.get_logger("transformers_quest.attention")) as captured:
        out = quest.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=DynamicCache())
    assert torch.equal(out, dense.generate(ids, max_new_tokens=5, do_sample=False))
    assert captured.out.count("without a QuestCache") == 1


def test_quest_cache_under_another_attention_warns(model_pair):
    _, dense = model_pair
    HANDOFF.layer, HANDOFF.warned_unconsumed = None, False
    logger = logging.get_logger("transformers_quest.handoff")
    with CaptureLogger(logger) as captured:
        dense.generate(prompt(), max_new_tokens=3, do_sample=False, past_key_values=QuestCache(64))
    HANDOFF.layer = None
    assert "attn_implementation=\"quest\"" in captured.out
