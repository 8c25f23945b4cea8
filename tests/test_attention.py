"""The dense path of the "quest" attention function against transformers' SDPA attention."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from transformers_quest.attention import dense_decode


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _repeated_reference(query, key, value, mask, scaling):
    """Plain SDPA over explicitly repeated K/V heads: the definition the packed path must match."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scaling
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("kv_heads,q_heads", [(2, 6), (1, 4), (3, 3)])
def test_one_token_dense_decode_equals_repeated_kv_sdpa(mask_kind, kv_heads, q_heads):
    torch.manual_seed(0)
    batch, length, dim = 3, 37, 16
    query = torch.randn(batch, q_heads, 1, dim)
    key = torch.randn(batch, kv_heads, length, dim)
    value = torch.randn(batch, kv_heads, length, dim)
    mask = None
    if mask_kind != "none":
        valid = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        valid[1, ..., :5] = False  # left padding
        valid[2, ..., 30:] = False  # unwritten static-cache slots
        mask = valid if mask_kind == "bool" else torch.where(valid, 0.0, torch.finfo(torch.float32).min)
    out, weights = dense_decode(_Module(q_heads // kv_heads), query, key, value, mask, 0.0, 0.3)
    assert weights is None
    assert out.shape == (batch, 1, q_heads, dim)
    torch.testing.assert_close(out, _repeated_reference(query, key, value, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_multi_token_and_per_head_masks_take_transformers_sdpa():
    torch.manual_seed(1)
    query = torch.randn(2, 4, 3, 8)
    key, value = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    per_head = torch.rand(2, 4, 3, 9) > 0.3
    per_head[..., 0] = True
    out, _ = dense_decode(_Module(2), query, key, value, per_head, 0.0, None)
    torch.testing.assert_close(out, _repeated_reference(query, key, value, per_head, None), atol=1e-5, rtol=1e-5)
