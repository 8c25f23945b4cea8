"""The "quest" attention function: dense SDPA where Quest does not apply, page-sparse decode where it does."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from .handoff import HANDOFF
from .reference import key_validity

logger = logging.get_logger(__name__)

ATTENTION_NAME = "quest"

_warned_no_cache = False
_KERNEL_UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def _uses_unsupported(kwargs: dict) -> bool:
    """Whether the model passes an attention term that only transformers' own SDPA path applies."""
    return any(kwargs.get(name) is not None for name in _KERNEL_UNSUPPORTED)


def _warn_no_quest_cache() -> None:
    global _warned_no_cache
    if not _warned_no_cache:
        _warned_no_cache = True
        logger.warning(
            "attn_implementation='quest' is running without a QuestCache, so attention is dense. Pass "
            "`past_key_values=transformers_quest.QuestCache(budget=...)` to `generate` (a new one per call)."
        )


def dense_decode(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Dense attention for the layers and steps Quest leaves dense, SDPA semantics unchanged.

    Off CUDA, a one-token GQA step runs SDPA with the group's query heads as the query rows of their KV head
    (``[B, Hkv, G, D]``), so each key and value is read once. transformers' own SDPA path repeats the K/V heads
    under ``torch.compile`` instead, a full copy of the cache per step and layer. On CUDA the caller first tries
    the Quest attention kernel over every page (`QuestLayer.attend_all_pages`).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    packable = (
        query.device.type != "cuda"  # there cuDNN would run one block per KV head instead of one per query head
        and q_len == 1
        and q_heads != kv_heads
        and dropout == 0.0
        and not _uses_unsupported(kwargs)
        and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1))
    )
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    group = q_heads // kv_heads
    packed = query.reshape(batch, kv_heads, group, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling
    )
    return output.reshape(batch, 1, q_heads, value.shape[-1]), None


def quest_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query ``[B, Hq, Sq, D]``, key/value ``[B, Hkv, L, D]`` as the
    cache returned them; returns ``([B, Sq, Hq, D], None)``.

    One-token steps of layers that select pages, with more pages than the budget, take the Quest path; prefill,
    multi-token steps (assisted decoding), dense layers and short contexts take SDPA unchanged.
    """
    layer = HANDOFF.take()
    if layer is None or layer.keys is None or key.shape[-2] != layer.visible_length:
        _warn_no_quest_cache()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    batch, q_heads, q_len, head_dim = query.shape
    length = key.shape[-2]
    if scaling is None:
        scaling = head_dim**-0.5
    if not layer.is_sparse_step(q_len, length):
        if q_len == 1:
            layer.record_decode(dense=batch * key.shape[1] * length, read=batch * key.shape[1] * length)
        layer.observe_dense(query, key, attention_mask, scaling)
        if q_len == 1 and dropout == 0.0 and not _uses_unsupported(kwargs):
            output = layer.attend_all_pages(query[:, :, 0], key, value, key_validity(attention_mask, length), scaling)
            if output is not None:
                return output[:, None], None
        return dense_decode(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    for unsupported in _KERNEL_UNSUPPORTED:
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"The 'quest' attention does not support models that use `{unsupported}` (got {unsupported}="
                f"{kwargs[unsupported]!r}); use attn_implementation='eager' for this model."
            )
    output = layer.sparse_decode(query[:, :, 0], key, value, key_validity(attention_mask, length), scaling)
    return output[:, None], None


def register() -> None:
    """Register "quest" with transformers' attention and mask interfaces (done on ``import transformers_quest``).

    The mask function matters: without one registered under the same name, transformers passes no mask at all,
    and left-padded batches would attend to padding.
    """
    AttentionInterface.register(ATTENTION_NAME, quest_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
