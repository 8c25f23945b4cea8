"""Quest decode kernels: page metadata, page scoring, top-k page selection and sparse paged decode attention.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, Hs selection heads (Hkv when a GQA group shares one
selection, Hq when each query head selects), L tokens, P pages (ceil(L / page_size)), K selected pages, D head dim
(64 or 128). Vectors are float16 or bfloat16, contiguous in D and 16-byte aligned; keys/values may be views of
larger buffers (any batch/head/token strides). Every op writes into its first argument(s), never syncs with the
host, and has a fake implementation, so it runs under ``torch.compile`` and inside CUDA graphs; lengths that change
between graph replays are passed as ``seq_lens`` (int32 device tensor).
"""

from __future__ import annotations

import math

import torch

from ._ops import add_op_namespace_prefix, ops

AGGREGATIONS = {"max": 0, "sum": 1, "none": 2}
SCORE_MODES = {"box": 0, "max_dot": 1}

__all__ = [
    "AGGREGATIONS",
    "SCORE_MODES",
    "append_pages",
    "decode",
    "page_scores",
    "refresh_pages",
    "select_pages",
    "sparse_decode",
]


SUMMARIES = {"minmax": 0, "mean": 1}


def refresh_pages(
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    keys: torch.Tensor,
    start: int,
    end: int,
    page_size: int,
    summary: str = "minmax",
) -> None:
    """Recompute, in place, the metadata of every page that tokens ``[start, end)`` touch.

    Args:
        page_min, page_max: (B, Hkv, >= ceil(end / page_size), D), updated in place.
        keys: (B, Hkv, >= end, D), holding tokens ``[0, end)``.
        summary: "minmax" (element-wise min / max) or "mean" (that box centred on the page's mean key).
    """
    ops.refresh_pages(page_min, page_max, keys, start, end, page_size, SUMMARIES[summary])


def append_pages(
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    summary: str = "minmax",
) -> None:
    """Recompute, in place, the page holding token ``seq_lens[b] - 1`` of every sequence (the decode append).

    Args:
        keys: (B, Hkv, capacity, D) with the new token already written.
        seq_lens: (B,), int32 on the device: tokens per sequence after the append.
        summary: as for `refresh_pages`.
    """
    ops.append_pages(page_min, page_max, keys, seq_lens, page_size, SUMMARIES[summary])


def page_scores(
    scores: torch.Tensor,
    query: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    key_valid: torch.Tensor | None,
    seq_lens: torch.Tensor | None,
    max_len: int,
    spread: float,
    aggregation: int,
    score_mode: int,
    page_size: int,
    append_keys: torch.Tensor | None = None,
    summary: str = "minmax",
) -> None:
    """Write fp32 page scores: ``-inf`` for pages without a valid token, ``+inf`` for each sequence's last page.

    Args:
        scores: (B, Hs, ceil(max_len / page_size)), float32, written.
        query: (B, Hq, D).
        page_min, page_max: (B, Hkv, >= P, D).
        key_valid: (B, >= max_len), bool, False for padding; or None.
        seq_lens: (B,), int32 tokens per sequence; or None for ``max_len`` everywhere.
        aggregation: 0 max / 1 sum over the G heads of a KV head, 2 none (Hs = Hq).
        score_mode: 0 ``q.c + spread |q|.r`` over the min/max box; 1 ``max(q.page_max, q.page_min)``.
        append_keys: (B, Hkv, capacity, D) with the new token written, to fold it into the metadata in the same
            launch (`append_pages` with ``seq_lens``, or ``max_len`` tokens); the current page's score is forced,
            so its metadata is only needed from the next step on. None: no append.
        summary: as for `refresh_pages`, for the append.
    """
    ops.page_scores(
        scores, query, page_min, page_max, key_valid, seq_lens, max_len, spread, aggregation, score_mode, page_size,
        append_keys, SUMMARIES[summary],
    )


def select_pages(indices: torch.Tensor, scores: torch.Tensor, keep_first: bool) -> None:
    """Write the K best pages of every row of ``scores`` (ties: lower index first) in ascending order.

    Args:
        indices: (B, Hs, K), int32, written.
        scores: (B, Hs, P), float32.
        keep_first: also keep the first page with a finite score (the attention sink).
    """
    ops.select_pages(indices, scores, keep_first)


def sparse_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    key_valid: torch.Tensor | None,
    seq_lens: torch.Tensor | None,
    max_len: int,
    scale: float,
    page_size: int,
    per_query_head: bool,
) -> None:
    """Exact softmax attention (fp32 accumulation) of one query token over the valid tokens of the selected pages.

    Args:
        out: (B, Hq, D), written.
        query: (B, Hq, D).
        keys, values: (B, Hkv, >= max_len, D).
        indices: (B, Hs, K), int32 page indices; Hs = Hq if ``per_query_head`` else Hkv.
    """
    ops.sparse_decode(
        out, query, keys, values, indices, key_valid, seq_lens, max_len, scale, page_size, per_query_head
    )


def decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    key_valid: torch.Tensor | None,
    *,
    page_size: int,
    page_budget: int,
    scale: float,
    spread: float = 1.0,
    aggregation: str = "max",
    keep_first_page: bool = False,
    score_mode: str = "box",
    seq_lens: torch.Tensor | None = None,
    append_keys: torch.Tensor | None = None,
    summary: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Quest decode step of one layer: score pages, keep the best ``page_budget``, attend to them.

    Args:
        query: (B, Hq, D); keys, values: (B, Hkv, L, D); page_min, page_max: (B, Hkv, >= P, D).
        key_valid: (B, L), bool or None.
        append_keys, summary: the decode append, fused into scoring (see `page_scores`).
    Returns:
        out (B, Hq, D) in the query's dtype, and page indices (B, Hs, min(page_budget, P)), int32, ascending.
    """
    batch, q_heads, dim = query.shape
    length = keys.shape[2]
    num_pages = math.ceil(length / page_size)
    agg = AGGREGATIONS[aggregation]
    sel_heads = q_heads if agg == 2 else keys.shape[1]
    scores = torch.empty(batch, sel_heads, num_pages, dtype=torch.float32, device=query.device)
    ops.page_scores(
        scores, query, page_min, page_max, key_valid, seq_lens, length, spread, agg, SCORE_MODES[score_mode], page_size,
        append_keys, SUMMARIES[summary],
    )
    indices = torch.empty(batch, sel_heads, min(page_budget, num_pages), dtype=torch.int32, device=query.device)
    ops.select_pages(indices, scores, keep_first_page)
    out = torch.empty(batch, q_heads, dim, dtype=query.dtype, device=query.device)
    ops.sparse_decode(out, query, keys, values, indices, key_valid, seq_lens, length, scale, page_size, agg == 2)
    return out, indices


# Every op only writes into its arguments, so its fake implementation creates and returns nothing.


@torch.library.register_fake(add_op_namespace_prefix("refresh_pages"))
def _(page_min, page_max, keys, start, end, page_size, summary=0) -> None:
    return None


@torch.library.register_fake(add_op_namespace_prefix("append_pages"))
def _(page_min, page_max, keys, seq_lens, page_size, summary=0) -> None:
    return None


@torch.library.register_fake(add_op_namespace_prefix("page_scores"))
def _(
    scores, query, page_min, page_max, key_valid, seq_lens, max_len, spread, aggregation, score_mode, page_size,
    append_keys=None, summary=0,
) -> None:
    return None


@torch.library.register_fake(add_op_namespace_prefix("select_pages"))
def _(indices, scores, keep_first) -> None:
    return None


@torch.library.register_fake(add_op_namespace_prefix("sparse_decode"))
def _(out, query, keys, values, indices, key_valid, seq_lens, max_len, scale, page_size, per_query_head) -> None:
    return None
