"""Shared fixtures: tiny random models of real architectures, the real SmolLM2 model, GPU skipping."""

from __future__ import annotations

import pytest
import torch

import transformers_quest  # noqa: F401  (registers attn_implementation="quest")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
