"""The static-capacity (compileable) QuestCache: same tokens as the growing cache, graph-safe decode step."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_greedy_equal_up_to_near_ties
from transformers_quest import QuestCache, QuestConfig
from transformers_quest.cache import StaticQuestLayer
from transformers_quest.handoff import HANDOFF
from transformers_quest.reference import page_mean_box, page_minmax


def prompt(batch: int = 1, length: int = 150, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("budget", [4096, 48])
def test_static_cache_generates_the_same_tokens_as_the_growing_cache(model_pair, budget):
    quest, _ = model_pair
    ids = prompt(2)
    growing = quest.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=QuestCache(budget))
    static_cache = QuestCache(budget, max_cache_len=200)
    static = quest.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=static_cache)
    assert torch.equal(static, growing)
    assert static_cache.is_compileable and int(static_cache.get_seq_length()) == 169


def test_static_cache_left_padded_batch_equals_growing_cache(model_pair):
    quest, _ = model_pair
    ids, mask = prompt(2), torch.ones(2, 150, dtype=torch.long)
    ids[1, :32], mask[1, :32] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    growing = quest.generate(ids, past_key_values=QuestCache(32), **kwargs)
    assert torch.equal(quest.generate(ids, past_key_values=QuestCache(32, max_cache_len=170), **kwargs), growing)


@pytest.mark.parametrize("config", [{}, {"page_summary": "minmax"}], ids=["default", "minmax"])
def test_static_layer_metadata_after_prefill_and_appends(config):
    layer = StaticQuestLayer(QuestConfig(budget=32, dense_layers=0, **config), layer_idx=0, max_cache_len=100)
    assert layer.max_cache_len == 112  # rounded up to whole pages
    keys = torch.randn(2, 3, 90, 8)
    layer.update(keys[:, :, :37], keys[:, :, :37])
    for t in range(37, 90):
        layer.update(keys[:, :, t : t + 1], keys[:, :, t : t + 1])
    HANDOFF.take()
    layer.sync_metadata()  # the last append waits for a sparse decode step to fold it in
    if layer.config.page_summary == "minmax":
        low, high = page_minmax(keys, 16)
        assert torch.equal(layer.page_min[:, :, :6], low) and torch.equal(layer.page_max[:, :, :6], high)
    else:  # the default: the min/max box centred on each page's mean key
        low, high = page_mean_box(keys, 16)
        torch.testing.assert_close(layer.page_min[:, :, :6], low, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.page_max[:, :, :6], high, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.keys[:, :, :90], keys) and layer.keys.shape[2] == 112


def test_static_cache_overflow_is_a_clear_error(model_pair):
    quest, _ = model_pair
    with pytest.raises(ValueError, match=r"max_cache_len=160\) cannot hold 161 tokens"):
        quest.generate(prompt(), max_new_tokens=30, do_sample=False, past_key_values=QuestCache(32, max_cache_len=160))


@pytest.mark.parametrize("value", [0, -3, 12.5, True])
def test_bad_max_cache_len(value):
    with pytest.raises(ValueError, match=f"`max_cache_len` must be a positive int or None, got {value!r}"):
        QuestCache(64, max_cache_len=value)


@pytest.mark.parametrize("page_summary", ["minmax", "mean", "centroids"])
def test_decode_step_traces_as_one_graph(model_pair, page_summary):
    """fullgraph=True fails on any graph break: a host sync or a Python branch on a device value."""
    quest, _ = model_pair
    ids = prompt(length=120)
    cache = QuestCache(32, dense_layers=1, page_summary=page_summary, max_cache_len=160)
    quest(ids, past_key_values=cache)  # eager prefill
    eager_cache = QuestCache(32, dense_layers=1, page_summary=page_summary, max_cache_len=160)
    quest(ids, past_key_values=eager_cache)
    step = prompt(length=1, seed=9)
    mask = torch.ones(1, 121, dtype=torch.long)
    compiled = torch.compile(quest.forward, backend="eager", fullgraph=True)
    from transformers.masking_utils import create_masks_for_generate

    def forward(model_fn, past):
        attention = create_masks_for_generate(
            config=quest.config,
            inputs_embeds=torch.empty(1, 1, 0),
            attention_mask=mask,
            past_key_values=past,
            position_ids=torch.tensor([[120]]),
        )
        return model_fn(input_ids=step, attention_mask=attention, position_ids=torch.tensor([[120]]), past_key_values=past).logits

    expected = forward(quest.forward, eager_cache)
    torch._dynamo.reset()
    actual = forward(compiled, cache)
    torch.testing.assert_close(actual, expected)


def gpu_model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    model.set_attn_implementation("quest")
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.gpu
def test_decode_step_with_kernels_traces_as_one_graph():
    """With the CUDA backend inside: no graph break (a break makes generate recompile per layer)."""
    model = gpu_model(torch.float16)
    ids = prompt(length=700).cuda()
    cache = QuestCache(64, dense_layers=1, max_cache_len=720)
    model(ids, past_key_values=cache)
    eager_cache = QuestCache(64, dense_layers=1, max_cache_len=720)
    model(ids, past_key_values=eager_cache)
    step, position = prompt(length=1, seed=9).cuda(), torch.tensor([[700]], device="cuda")
    from transformers.masking_utils import create_masks_for_generate

    def forward(model_fn, past):
        mask = create_masks_for_generate(
            config=model.config, inputs_embeds=torch.empty(1, 1, 0, device="cuda", dtype=torch.float16),
            attention_mask=torch.ones(1, 701, dtype=torch.long, device="cuda"), past_key_values=past,
            position_ids=position,
        )
        return model_fn(input_ids=step, attention_mask=mask, position_ids=position, past_key_values=past).logits

    expected = forward(model.forward, eager_cache)
    torch._dynamo.reset()
    actual = forward(torch.compile(model.forward, backend="eager", fullgraph=True), cache)
    torch.testing.assert_close(actual, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_static_cache_on_gpu_matches_the_torch_backend(dtype):
    """The compiled kernels (when they load) and the PyTorch ops give the same tokens through a static cache, up to
    near-ties of the next-token logits (the kernels and SDPA round differently)."""
    from transformers_quest import set_backend

    model = gpu_model(dtype)
    ids = prompt(2, length=700).cuda()
    outputs = {}
    try:
        for backend in ("torch", "auto"):
            set_backend(backend)
            cache = QuestCache(64, dense_layers=1, max_cache_len=720)
            outputs[backend] = model.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=cache,
                                              disable_compile=True, output_scores=True, return_dict_in_generate=True)
    finally:
        set_backend("auto")
    assert_greedy_equal_up_to_near_ties(outputs["auto"], outputs["torch"], ids.shape[1], dtype)
