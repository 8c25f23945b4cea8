"""Selectors and the evaluation grid against the caches they stand for, on a tiny random Llama (GQA 4 / 2 heads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import transformers_quest  # noqa: F401
from transformers_quest import QuestCache
from transformers_quest.evaluation.grid import prefill, run_grid
from transformers_quest.selectors import (
    SelectorCache,
    SelectorSpec,
    h2o_keep,
    oracle_page_scores,
    streaming_token_mask,
)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="quest",
    )
    model = LlamaForCausalLM(config).eval()
    # Sharpen attention so that selection matters: larger q/k projections.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def cache_logprobs(model, cache, prefix_ids, tail_ids):
    """Prefill through the cache, then feed the tail token by token; log p(tail[t + 1]) per step."""
    model.set_attn_implementation("quest")
    out = []
    with torch.no_grad():
        model(prefix_ids, past_key_values=cache, use_cache=True)
        for t in range(len(tail_ids) - 1):
            logits = model(torch.tensor([[tail_ids[t]]]), past_key_values=cache, use_cache=True).logits[0, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1)[tail_ids[t + 1]])
    return torch.stack(out)


SPECS = [  # quest rows that name no page_summary use the default (the mean-centred box)
    SelectorSpec("quest", budget=32, page_size=8, dense_layers=1, aggregation="max", spread=1.0, page_summary="minmax"),
    SelectorSpec("quest", budget=32, page_size=8, dense_layers=1, aggregation="none", spread=0.25),
    SelectorSpec("quest", budget=48, page_size=8, dense_layers=1, aggregation="sum", spread=0.0, keep_first_page=True),
    SelectorSpec("quest", budget=48, page_size=8, dense_layers=1, spread=0.5, recent_pages=2),
    SelectorSpec("quest", budget=32, page_size=8, dense_layers=1, page_summary="centroids", keep_first_page=True),
    SelectorSpec("quest", budget=32, page_size=8, dense_layers=1, page_summary="minmax", spread=0.5),
    SelectorSpec("oracle", budget=32, page_size=8, dense_layers=1),
    SelectorSpec("streaming", budget=32, dense_layers=1),
    SelectorSpec("h2o", budget=32, dense_layers=1),
    SelectorSpec("dense", budget=32),
]


def test_grid_rows_reproduce_their_caches(tiny_model):
    torch.manual_seed(1)
    prefix_ids = torch.randint(0, 97, (1, 150))
    tail_ids = torch.randint(0, 97, (20,)).tolist()
    pre = prefill(tiny_model, prefix_ids, h2o_window=0)
    grid = run_grid(tiny_model, pre, SPECS, tail_ids, score_tail=True)
    dense = cache_logprobs(tiny_model, QuestCache(budget=4096), prefix_ids, tail_ids)
    for row, spec in enumerate(SPECS):
        if spec.kind == "quest":
            cache = QuestCache(config=spec.quest_config())  # the kernels' path: reference.quest_decode
        else:
            cache = SelectorCache(spec)
        expected = cache_logprobs(tiny_model, cache, prefix_ids, tail_ids)
        torch.testing.assert_close(grid.tail_logprobs[row], expected, atol=2e-4, rtol=1e-4, msg=spec.name)
        if spec.kind != "dense":  # selection must matter in this setting, or the comparison proves little
            assert (expected - dense).abs().max() > 1e-3, spec.name
    torch.testing.assert_close(grid.tail_logprobs[-1], dense, atol=2e-4, rtol=1e-4)


def test_oracle_page_scores_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 37)
    scores = oracle_page_scores(logits, 8, "none")
    for p in range(5):
        torch.testing.assert_close(scores[..., p], logits[..., p * 8 : (p + 1) * 8].amax(-1).reshape(2, 6))
    torch.testing.assert_close(oracle_page_scores(logits, 8, "max"), scores.view(2, 3, 2, 5).amax(2))


def test_streaming_mask_keeps_sinks_and_window():
    mask = streaming_token_mask(20, 8, 2)
    assert mask.tolist() == [True, True] + [False] * 12 + [True] * 6


def test_h2o_eviction_is_permanent_and_budgeted():
    acc = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 0.0, 0.0]]])
    kept = torch.ones(1, 1, 6, dtype=torch.bool)
    kept = h2o_keep(acc, kept, budget=4, recent=2)
    assert kept.tolist() == [[[True, False, True, False, True, True]]]
    # Token 1 becomes heavy later but was evicted: it never comes back.
    acc = torch.tensor([[[5.0, 9.0, 4.0, 3.0, 0.0, 0.0, 0.0]]])
    kept = h2o_keep(acc, torch.nn.functional.pad(kept, (0, 1), value=True), budget=4, recent=2)
    assert kept.tolist() == [[[True, False, True, False, False, True, True]]]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kind": "bogus"}, "kind"), ({"kind": "quest", "spread": 2.0}, "spread"), ({"kind": "h2o", "recent_ratio": 1.0}, "recent_ratio")],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectorSpec(**kwargs)


def test_torch_only_aggregations():
    from transformers_quest.reference import page_minmax, page_scores

    torch.manual_seed(0)
    query, keys = torch.randn(1, 6, 16), torch.randn(1, 2, 160, 16)
    low, high = page_minmax(keys, 16)
    per_head = page_scores(query, low, high, 0.5, "none").view(1, 2, 3, 10)
    expected = torch.softmax(per_head / 4.0, dim=-1).amax(dim=2)
    torch.testing.assert_close(page_scores(query, low, high, 0.5, "softmax"), expected)
    # "rank": the top 3 * m pages are the union of every head's own top m (when those are distinct enough).
    ranked = page_scores(query, low, high, 0.5, "rank")
    for m in (1, 2):
        top = set(ranked[0, 0].topk(3 * m).indices.tolist())
        for head in range(3):
            assert set(per_head[0, 0, head].topk(m).indices.tolist()) <= top


def test_paper_config_is_the_exact_bound():
    from transformers_quest import QuestConfig

    config = QuestConfig.paper(256, dense_layers=3)
    assert (config.budget, config.spread, config.aggregation, config.dense_layers) == (256, 1.0, "max", 3)


def test_recent_pages_are_kept_and_capped():
    from transformers_quest import QuestConfig
    from transformers_quest.reference import select_pages

    scores = torch.arange(10.0, 0.0, -1.0).view(1, 1, 10)  # page 0 best ... page 9 worst
    assert select_pages(scores, 5, 9, recent_pages=2).tolist() == [[[0, 1, 7, 8, 9]]]
    assert QuestConfig(budget=64, recent_pages=4).forced_recent_pages == 1  # 4 pages: 1 recent, 2 by score
    assert QuestConfig(budget=1024, recent_pages=4).forced_recent_pages == 4
    with pytest.raises(ValueError, match="recent_pages"):
        QuestConfig(recent_pages=-1)
