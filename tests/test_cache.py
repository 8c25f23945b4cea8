"""QuestLayer / QuestCache storage: metadata always equals its page summary recomputed from the stored keys."""

from __future__ import annotations

import math

import pytest
import torch

from transformers_quest import QuestCache, QuestConfig, QuestLayer
from transformers_quest.handoff import HANDOFF

SUMMARIES = pytest.mark.parametrize("config", [{}, {"page_summary": "minmax"}], ids=["default", "minmax"])


def recomputed_metadata(keys: torch.Tensor, page_size: int, summary: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent recomputation: a Python loop over pages of the stored keys. ``"minmax"``: element-wise min and
    max; ``"mean"``: that box moved to be centred on the page's mean key (fp32 mean, rounded to the keys' dtype)."""
    pages = math.ceil(keys.shape[2] / page_size)
    lows, highs = [], []
    for p in range(pages):
        page = keys[:, :, p * page_size : (p + 1) * page_size]
        low, high = page.amin(2), page.amax(2)
        if summary == "mean":
            centre, radius = page.float().mean(2), (high.float() - low.float()) / 2
            low, high = (centre - radius).to(keys.dtype), (centre + radius).to(keys.dtype)
        lows.append(low)
        highs.append(high)
    return torch.stack(lows, dim=2), torch.stack(highs, dim=2)


def assert_metadata_consistent(layer: QuestLayer) -> None:
    summary = layer.config.page_summary
    low, high = recomputed_metadata(layer.keys, layer.config.page_size, summary)
    pages = low.shape[2]
    if summary == "minmax":  # exact in every dtype
        assert torch.equal(layer.page_min[:, :, :pages], low)
        assert torch.equal(layer.page_max[:, :, :pages], high)
    else:  # a mean: another summation order, so equal up to one rounding to the keys' dtype
        tolerance = dict(rtol=1e-6, atol=1e-6) if layer.keys.dtype == torch.float32 else {}
        torch.testing.assert_close(layer.page_min[:, :, :pages], low, **tolerance)
        torch.testing.assert_close(layer.page_max[:, :, :pages], high, **tolerance)


def filled_layer(prefill: int, appends: int, dtype=torch.float32, batch: int = 2, **config) -> QuestLayer:
    layer = QuestLayer(QuestConfig(budget=64, page_size=16, dense_layers=0, **config), layer_idx=0)
    layer.update(torch.randn(batch, 3, prefill, 8, dtype=dtype), torch.randn(batch, 3, prefill, 8, dtype=dtype))
    for _ in range(appends):
        layer.update(torch.randn(batch, 3, 1, 8, dtype=dtype), torch.randn(batch, 3, 1, 8, dtype=dtype))
    HANDOFF.take()
    return layer


@SUMMARIES
@pytest.mark.parametrize("prefill,appends", [(1, 0), (16, 0), (37, 1), (37, 40), (64, 17), (5, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_metadata_after_prefill_and_appends(prefill, appends, dtype, config):
    layer = filled_layer(prefill, appends, dtype, **config)
    assert layer.get_seq_length() == prefill + appends
    assert layer.keys.dtype == layer.page_min.dtype == dtype
    assert_metadata_consistent(layer)


def test_keys_and_values_round_trip_through_growth():
    layer = QuestLayer(QuestConfig(budget=64, dense_layers=0), layer_idx=0)
    keys, values = torch.randn(1, 2, 700, 4), torch.randn(1, 2, 700, 4)
    layer.update(keys[:, :, :3], values[:, :, :3])
    capacities = set()
    for t in range(3, 700):
        out_k, out_v = layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        capacities.add(layer.capacity)
    HANDOFF.take()
    assert torch.equal(out_k, keys) and torch.equal(out_v, values)
    assert len(capacities) <= 6  # geometric growth (x1.25 from 256): a handful of allocations, not one per token


@SUMMARIES
@pytest.mark.parametrize("remove", [1, 5, 16, 20, 33])
def test_crop_recomputes_the_cut_page(remove, config):
    layer = filled_layer(37, 20, **config)
    kept = layer.keys[:, :, : 57 - remove].clone()
    layer.crop(-remove)
    assert torch.equal(layer.keys, kept)
    assert_metadata_consistent(layer)
    for _ in range(remove + 3):  # appending after a crop folds into the recomputed page
        layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    HANDOFF.take()
    assert_metadata_consistent(layer)


@SUMMARIES
def test_reorder_select_and_repeat_keep_metadata_with_their_sequence(config):
    layer = filled_layer(40, 9, batch=3, **config)
    keys = layer.keys.clone()
    beam_idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(beam_idx)
    assert torch.equal(layer.keys, keys[beam_idx])
    assert_metadata_consistent(layer)
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(layer.keys, keys[torch.tensor([2, 0])])
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4
    assert torch.equal(layer.keys[1], keys[2]) and torch.equal(layer.keys[3], keys[0])
    assert_metadata_consistent(layer)


def test_cache_layers_dense_first_and_lazily_on_the_keys_device_and_dtype():
    cache = QuestCache(budget=32, dense_layers=2)
    for idx in range(4):
        cache.update(torch.randn(1, 2, 20, 8, dtype=torch.bfloat16), torch.randn(1, 2, 20, 8, dtype=torch.bfloat16), idx)
    HANDOFF.take()
    assert [layer.is_dense for layer in cache.layers] == [True, True, False, False]
    assert cache.layers[0].page_min is None and cache.layers[3].page_min.dtype == torch.bfloat16
    assert cache.get_seq_length() == 20
    assert cache.get_mask_sizes(1, 3) == (21, 0)
    cache.reset()
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("summary", ["centroids", "mean"])
def test_summary_metadata_follows_prefill_appends_crop_and_reorder(summary):
    from transformers_quest.reference import page_summary

    def assert_summary(layer):
        a, b = page_summary(layer.keys, layer.config.page_size, summary)
        pages = a.shape[2]
        torch.testing.assert_close(layer.page_min[:, :, :pages], a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.page_max[:, :, :pages], b, rtol=1e-6, atol=1e-6)

    layer = QuestLayer(QuestConfig(budget=64, page_size=16, dense_layers=0, page_summary=summary), layer_idx=0)
    layer.update(torch.randn(2, 3, 37, 8), torch.randn(2, 3, 37, 8))
    for _ in range(30):
        layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    assert_summary(layer)
    layer.crop(-9)
    assert_summary(layer)
    layer.reorder_cache(torch.tensor([1, 0]))
    for _ in range(5):
        layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    HANDOFF.take()
    assert_summary(layer)
