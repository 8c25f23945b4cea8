"""Bad input fails early with an error that names the parameter, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from transformers_quest import QuestCache, QuestConfig, QuestLayer, set_backend


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(budget=0), ValueError, r"`budget` must be at least one page \(16 tokens.*got 0"),
        (dict(budget=-5), ValueError, r"`budget`.*got -5"),
        (dict(budget=8), ValueError, r"`budget` must be at least one page.*got 8"),
        (dict(budget="2048"), TypeError, r"`budget` must be an int, got str"),
        (dict(budget=2048.0), TypeError, r"`budget` must be an int, got float"),
        (dict(page_size=12), ValueError, r"`page_size` must be a positive power of two.*got 12"),
        (dict(page_size=0), ValueError, r"`page_size`.*got 0"),
        (dict(page_size=-16), ValueError, r"`page_size`.*got -16"),
        (dict(page_size=True), TypeError, r"`page_size` must be an int, got bool"),
        (dict(dense_layers=-1), ValueError, r"`dense_layers` must be >= 0, got -1"),
        (dict(aggregation="mean"), ValueError, r"`aggregation` must be one of \('max', 'sum', 'none', 'softmax', 'rank'\), got 'mean'"),
        (dict(spread=1.5), ValueError, r"`spread` must be in \[0, 1\].*got 1.5"),
        (dict(spread="wide"), TypeError, r"`spread` must be a float"),
        (dict(keep_first_page=1), TypeError, r"`keep_first_page` must be a bool"),
        (dict(recent_pages=-2), ValueError, r"`recent_pages` must be >= 0, got -2"),
        (dict(page_summary="median"), ValueError, r"`page_summary` must be one of \('minmax', 'mean', 'centroids'\), got 'median'"),
    ],
)
def test_bad_settings_raise_named_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        QuestConfig(**kwargs)
    with pytest.raises(error, match=message):
        QuestCache(**kwargs)


def test_cache_rejects_a_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="`config` must be a QuestConfig, got dict"):
        QuestCache(config={"budget": 64})


def test_positive_crop_is_rejected():
    layer = QuestLayer(QuestConfig(budget=32), layer_idx=3)
    layer.update(torch.randn(1, 1, 20, 4), torch.randn(1, 1, 20, 4))
    with pytest.raises(ValueError, match="`crop` takes a negative number of tokens to remove, got 5"):
        layer.crop(5)


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"`backend` must be one of .*got 'triton'"):
        set_backend("triton")
    monkeypatch.setenv("TRANSFORMERS_QUEST_BACKEND", "gpu")
    from transformers_quest.backends import requested_backend

    with pytest.raises(ValueError, match="TRANSFORMERS_QUEST_BACKEND must be one of .*got 'gpu'"):
        requested_backend()


def test_auto_hands_the_choice_back_to_the_environment(monkeypatch):
    from transformers_quest.backends import requested_backend

    monkeypatch.setenv("TRANSFORMERS_QUEST_BACKEND", "torch")
    try:
        set_backend("cuda")
        assert requested_backend() == "cuda"  # a forced backend wins over the environment
        set_backend("auto")
        assert requested_backend() == "torch"
    finally:
        set_backend("auto")


def test_softcap_models_are_refused_on_the_sparse_path(model_pair):
    from transformers_quest import quest_attention_forward
    from transformers_quest.handoff import HANDOFF

    quest, _ = model_pair
    module = quest.model.layers[-1].self_attn
    cache = QuestCache(budget=16, dense_layers=0)
    kv_heads, head_dim = quest.config.num_key_value_heads, module.head_dim
    keys = torch.randn(1, kv_heads, 64, head_dim)
    cache.update(keys, keys, 0)
    query = torch.randn(1, quest.config.num_attention_heads, 1, head_dim)
    with pytest.raises(ValueError, match="does not support models that use `softcap`"):
        quest_attention_forward(module, query, cache.layers[0].keys, cache.layers[0].values, None, softcap=30.0)
    assert HANDOFF.layer is None


def test_centroid_summary_runs_on_the_reference_where_kernels_lack_it():
    """The kernels compute min/max only: both checks name the setting, so the CUDA backend hands it to torch."""
    from transformers_quest.backends import decode_unsupported, metadata_unsupported

    keys = torch.randn(1, 2, 64, 64, dtype=torch.float16)
    meta = torch.randn(1, 2, 4, 64, dtype=torch.float16)
    query = torch.randn(1, 4, 64, dtype=torch.float16)
    config = QuestConfig(budget=32, page_summary="centroids")
    assert "page_summary='centroids'" in decode_unsupported(query, keys, keys, meta, meta, None, config)
    assert "page_summary='centroids'" in metadata_unsupported(keys, meta, meta, "centroids")
    assert metadata_unsupported(keys, meta, meta) is None
    # "mean" keeps a box (re-centred): the decode kernels score it; only its metadata is computed by torch.
    assert decode_unsupported(query, keys, keys, meta, meta, None, QuestConfig(budget=32, page_summary="mean")) is None
    assert metadata_unsupported(keys, meta, meta, "mean") is None


def _kernel_inputs(q_heads=8, kv_heads=2, head_dim=64, tokens=64, dtype=torch.float16):
    query = torch.randn(1, q_heads, head_dim, dtype=dtype)
    keys = torch.randn(1, kv_heads, tokens, head_dim, dtype=dtype)
    meta = torch.randn(1, kv_heads, -(-tokens // 16), head_dim, dtype=dtype)
    return query, keys, keys.clone(), meta, meta.clone()


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values one element off a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return flat.view(t.shape).copy_(t)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "dtype torch.float32"),
        (lambda q, k, v: (q, k.bfloat16(), v), "different dtypes"),
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "head_dim 48"),
        (lambda q, k, v: (q.repeat(1, 2, 1)[:, :9], k, v), "9 query heads over 2 KV heads"),
        (lambda q, k, v: (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v), "keys is not 16-byte aligned"),
        (lambda q, k, v: (_misaligned(q), k, v), "query is not 16-byte aligned"),
    ],
)
def test_both_cuda_attention_paths_name_what_they_cannot_read(case, expected):
    """The sparse decode and the all-pages dense step refuse the same unsupported tensors, with the same reason."""
    from transformers_quest.backends import attend_all_unsupported, decode_unsupported

    query, keys, values, page_min, page_max = _kernel_inputs()
    config = QuestConfig(budget=32)
    assert decode_unsupported(query, keys, values, page_min, page_max, None, config) is None
    assert attend_all_unsupported(query, keys, values, None, 16) is None
    query, keys, values = case(query, keys, values)
    assert expected in decode_unsupported(query, keys, values, page_min, page_max, None, config)
    assert expected in attend_all_unsupported(query, keys, values, None, 16)


def test_cuda_attention_checks_that_differ_between_the_sparse_and_dense_steps():
    from transformers_quest.backends import KERNEL_MAX_SELECTED_PAGES, attend_all_unsupported, decode_unsupported

    query, keys, values, page_min, page_max = _kernel_inputs()
    mask = torch.ones(1, keys.shape[2], dtype=torch.int32)
    assert "key-validity mask" in decode_unsupported(query, keys, values, page_min, page_max, mask, QuestConfig(budget=32))
    assert "key-validity mask" in attend_all_unsupported(query, keys, values, mask, 16)
    # Per-head selection takes any group size; the dense step's kernel serves at most KERNEL_MAX_GROUP heads.
    wide = torch.randn(1, 32, 64, dtype=torch.float16)
    per_head = QuestConfig(budget=32, aggregation="none")
    assert decode_unsupported(wide, keys, values, page_min, page_max, None, per_head) is None
    assert "32 query heads over 2 KV heads" in attend_all_unsupported(wide, keys, values, None, 16)
    assert "page metadata of dtype torch.float32" in decode_unsupported(
        query, keys, values, page_min.float(), page_max.float(), None, QuestConfig(budget=32)
    )
    # More pages than the attention kernel's splits hold: only the dense step reads them all.
    long_keys = torch.empty(1, 2, 1, 64, dtype=torch.float16).expand(1, 2, (KERNEL_MAX_SELECTED_PAGES + 1) * 16, 64)
    assert decode_unsupported(query, long_keys, long_keys, page_min, page_max, None, QuestConfig(budget=32)) is None
    assert f"{KERNEL_MAX_SELECTED_PAGES + 1} pages" in attend_all_unsupported(query, long_keys, long_keys, None, 16)
