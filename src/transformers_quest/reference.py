"""Quest in plain PyTorch: the specification that the CUDA kernels and the tests are checked against.

No speed tricks here beyond avoiding O(pages x dim) temporaries. Shapes:
    B batch, Hq query heads, Hkv key/value heads, G = Hq // Hkv, Hs selection heads (Hkv, or Hq when each
    query head selects its own pages), L tokens in the cache, P = ceil(L / page_size) pages, D head dim.
"""

from __future__ import annotations

import math

import torch

from .config import QuestConfig


def page_minmax(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of the keys of every page; a partial last page covers only its tokens.

    Args:
        keys: [B, H, L, D]
    Returns:
        page_min, page_max: [B, H, ceil(L / page_size), D], same dtype as ``keys`` (min/max are exact).
    """
    batch, heads, length, dim = keys.shape
    num_pages = math.ceil(length / page_size)
    pad = num_pages * page_size - length
    shape = (batch, heads, num_pages, page_size, dim)
    # Padding with +inf / -inf keeps a partial page's extrema those of its real tokens.
    low = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf")).view(shape).amin(dim=3)
    high = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf")).view(shape).amax(dim=3)
    return low, high


def two_means(keys: torch.Tensor, valid: torch.Tensor, iterations: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two centroids of each group of keys (2-means, deterministic): a page's summary for ``page_summary="centroids"``.

    Seeded with the key farthest from the mean and the key farthest from that one, then ``iterations`` Lloyd steps
    (ties go to the first centroid; an emptied cluster keeps its centroid). A group of one key, or of equal keys,
    gets that key twice.

    Args:
        keys: [..., S, D]
        valid: bool, broadcastable to [..., S]; every group has at least one valid key.
    Returns:
        centroid_a, centroid_b: [..., D], fp32.
    """
    x = keys.float()
    valid = valid.expand(x.shape[:-1])
    weight = valid.to(x.dtype)[..., None]
    mean = (x * weight).sum(-2) / weight.sum(-2).clamp(min=1)
    norms = (x * x).sum(-1)  # [..., S]

    def distances(centre: torch.Tensor) -> torch.Tensor:  # squared, [..., S], without an [..., S, D] temporary
        return norms - 2 * (x @ centre[..., :, None]).squeeze(-1) + (centre * centre).sum(-1, keepdim=True)

    def farthest_from(centre: torch.Tensor) -> torch.Tensor:
        index = distances(centre).masked_fill(~valid, float("-inf")).argmax(-1)
        return x.gather(-2, index[..., None, None].expand(*index.shape, 1, x.shape[-1])).squeeze(-2)

    a = farthest_from(mean)
    b = farthest_from(a)
    for _ in range(iterations):
        to_b = (distances(b) < distances(a)) & valid
        to_a = valid & ~to_b
        for members, centre in ((to_a, a), (to_b, b)):
            count = members.sum(-1, keepdim=True)
            centre.copy_(torch.where(count > 0, (x * members[..., None]).sum(-2) / count.clamp(min=1), centre))
    return a, b


def _split_pages(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, L, D] -> pages [B, H, P, page_size, D] (a partial last page zero-padded) and valid [P, page_size]."""
    batch, heads, length, dim = keys.shape
    num_pages = math.ceil(length / page_size)
    pad = num_pages * page_size - length
    pages = torch.nn.functional.pad(keys, (0, 0, 0, pad)).view(batch, heads, num_pages, page_size, dim)
    valid = (torch.arange(num_pages * page_size, device=keys.device) < length).view(num_pages, page_size)
    return pages, valid


def page_centroids(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`two_means` of the keys of every page; a partial last page covers only its tokens.

    Args:
        keys: [B, H, L, D]
    Returns:
        centroid_a, centroid_b: [B, H, ceil(L / page_size), D], in the keys' dtype (kept in the min/max slots).
    """
    pages, valid = _split_pages(keys, page_size)
    a, b = two_means(pages, valid)
    return a.to(keys.dtype), b.to(keys.dtype)


def _mean_box(keys: torch.Tensor, valid: torch.Tensor, low: torch.Tensor, high: torch.Tensor):
    """``mean -+ half-width`` over the reduced axis -2 of ``keys`` (``valid`` marks the real tokens), in keys' dtype."""
    weight = valid.to(torch.float32)
    mean = (keys.float() * weight).sum(-2) / weight.sum(-2).clamp(min=1)
    radius = (high.float() - low.float()) * 0.5
    return (mean - radius).to(keys.dtype), (mean + radius).to(keys.dtype)


def page_mean_box(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min/max box of every page moved to be centred on the page's mean key: ``(mean - r, mean + r)`` with
    ``r = (max - min) / 2``, so the box score of these slots is ``q.mean + spread * |q|.r``.

    Args:
        keys: [B, H, L, D]
    Returns:
        low, high: [B, H, ceil(L / page_size), D], in the keys' dtype.
    """
    pages, valid = _split_pages(keys, page_size)
    return _mean_box(pages, valid[..., None], *page_minmax(keys, page_size))


def page_summary(keys: torch.Tensor, page_size: int, summary: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """The two vectors per page that ``summary`` (`config.PAGE_SUMMARIES`) keeps, in the min/max slots."""
    if summary == "centroids":
        return page_centroids(keys, page_size)
    if summary == "mean":
        return page_mean_box(keys, page_size)
    return page_minmax(keys, page_size)


def refresh_pages(
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    keys: torch.Tensor,
    start: int,
    end: int,
    page_size: int,
    summary: str = "minmax",
) -> None:
    """Recompute, in place, the metadata of the pages that tokens ``[start, end)`` fall in.

    ``keys`` already holds tokens ``[0, end)``. Only touched pages are reduced, so a decode step costs one page
    (at most ``page_size`` keys), and a partial page always ends up with the extrema of exactly its tokens.

    Args:
        page_min, page_max: [B, H, >= ceil(end / page_size), D], updated in place.
        keys: [B, H, >= end, D]
    """
    if end <= start:
        return
    first_page = start // page_size
    last_page = (end - 1) // page_size
    low, high = page_summary(keys[:, :, first_page * page_size : end], page_size, summary)
    page_min[:, :, first_page : last_page + 1] = low
    page_max[:, :, first_page : last_page + 1] = high


def append_pages(
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    summary: str = "minmax",
) -> None:
    """Recompute, in place, the page holding token ``seq_lens[b] - 1`` of every sequence, from its tokens so far.

    The graph-safe form of `refresh_pages` for a decode append: lengths are a device tensor, so a captured decode
    step needs no host sync and no shape that depends on the length.

    Args:
        page_min, page_max: [B, H, capacity // page_size, D], updated in place.
        keys: [B, H, capacity, D] (capacity a multiple of page_size), the new token already written.
        seq_lens: [B] int tokens per sequence after the append.
    """
    batch, heads, _, dim = keys.shape
    page = (seq_lens.long() - 1) // page_size  # [B]
    token_index = page[:, None] * page_size + torch.arange(page_size, device=keys.device)  # [B, page_size]
    gather_index = token_index.view(batch, 1, page_size, 1).expand(batch, heads, page_size, dim)
    page_keys = keys.gather(2, gather_index)  # [B, H, page_size, D]
    valid = (token_index < seq_lens.long()[:, None]).view(batch, 1, page_size, 1)
    if summary == "centroids":
        a, b = two_means(page_keys, valid[..., 0])
        low, high = a[:, :, None].to(keys.dtype), b[:, :, None].to(keys.dtype)
    else:
        low = page_keys.masked_fill(~valid, float("inf")).amin(dim=2, keepdim=True)
        high = page_keys.masked_fill(~valid, float("-inf")).amax(dim=2, keepdim=True)
        if summary == "mean":
            low, high = _mean_box(page_keys, valid, low[:, :, 0], high[:, :, 0])
            low, high = low[:, :, None], high[:, :, None]
    scatter_index = page.view(batch, 1, 1, 1).expand(batch, heads, 1, dim)
    page_min.scatter_(2, scatter_index, low)
    page_max.scatter_(2, scatter_index, high)


def page_scores(
    query: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    spread: float,
    aggregation: str,
    summary: str = "minmax",
) -> torch.Tensor:
    """Criticality of every page for one query token, in fp32.

    ``q.c + spread * |q|.r`` with ``c = (max + min) / 2``, ``r = (max - min) / 2``; at ``spread = 1`` this equals the
    paper's ``sum_i max(q_i * max_i, q_i * min_i)``, an upper bound of ``q.k`` for every key of the page. With
    ``summary="centroids"`` the two slots hold centroids and the score is ``max(q.c1, q.c2)`` (``spread`` unused).

    Args:
        query: [B, Hq, D]
        page_min, page_max: [B, Hkv, P, D]
        aggregation: "max" / "sum" over the query heads of a group, or "none" (one score row per query head).
    Returns:
        scores: [B, Hs, P], Hs = Hkv for "max" / "sum", Hq for "none".
    """
    batch, q_heads, dim = query.shape
    kv_heads, num_pages = page_min.shape[1], page_min.shape[2]
    group = q_heads // kv_heads
    q = query.float().view(batch, kv_heads, group, dim)
    high, low = page_max.float(), page_min.float()
    if summary == "centroids":
        scores = torch.maximum(q @ low.transpose(-1, -2), q @ high.transpose(-1, -2))
    else:
        scores = q @ ((high + low) * 0.5).transpose(-1, -2)  # [B, Hkv, G, P]
    if spread and summary != "centroids":
        scores = scores + spread * (q.abs() @ ((high - low) * 0.5).transpose(-1, -2))
    if aggregation in ("softmax", "rank"):
        return _normalised_aggregate(scores, aggregation, dim)
    return aggregate_scores(scores, aggregation)


def aggregate_scores(scores: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Combine per-query-head page scores [B, Hkv, G, P] (fp32) of each GQA group -> [B, Hs, P].

    ``"max"`` / ``"sum"`` / ``"none"`` as in `config.AGGREGATIONS`; ``"softmax"`` / ``"rank"`` as in
    `config.TORCH_ONLY_AGGREGATIONS` (scores taken as logits scaled by 1/sqrt(D)).
    """
    batch, kv_heads, group, num_pages = scores.shape
    if aggregation == "max":
        return scores.amax(dim=2)
    if aggregation == "sum":
        return scores.sum(dim=2)
    if aggregation == "none":
        return scores.reshape(batch, kv_heads * group, num_pages)
    raise ValueError(f"`aggregation` {aggregation!r} needs the head dimension: use page_scores.")


def _normalised_aggregate(scores: torch.Tensor, aggregation: str, dim: int) -> torch.Tensor:
    probs = torch.softmax(scores * dim**-0.5, dim=-1)  # [B, Hkv, G, P]
    best = probs.amax(dim=2)
    if aggregation == "softmax":
        return best
    # "rank": best rank over the group (0 = a head's top page); probabilities in [0, 1) only break ties.
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return -rank.amin(dim=2).float() + 0.5 * best


def select_pages(
    scores: torch.Tensor,
    page_budget: int,
    current_page: int | torch.Tensor,
    page_valid: torch.Tensor | None = None,
    sink_page: torch.Tensor | None = None,
    recent_pages: int = 0,
) -> torch.Tensor:
    """Indices of the pages to attend: the current page, the ``recent_pages`` before it, the sink page if given,
    then the top-scoring rest.

    Args:
        scores: [B, Hs, P]
        page_budget: pages to keep, the current one included.
        current_page: index of the page holding the newest token (always kept); an int, or a [B] int64 tensor
            when lengths live on the device (static cache).
        page_valid: [B, P] bool, False for pages with no attendable token (left padding); never selected
            unless fewer valid pages than ``page_budget`` exist (then they are masked out downstream anyway).
        sink_page: [B] int64, a page to always keep (the first real page of each sequence).
    Returns:
        page_indices: [B, Hs, min(page_budget, P)], int64, ascending.
    """
    batch, heads, num_pages = scores.shape
    ranked = scores.clone()
    if page_valid is not None:
        ranked.masked_fill_(~page_valid[:, None, :], float("-inf"))
    if sink_page is not None:
        ranked.scatter_(2, sink_page.view(batch, 1, 1).expand(batch, heads, 1), float("inf"))
    if isinstance(current_page, torch.Tensor):
        # [B, recent_pages + 1]: the current page and the ones just before it, per sequence.
        forced = (current_page.view(batch, 1) - torch.arange(recent_pages + 1, device=scores.device)).clamp(min=0)
        ranked.scatter_(2, forced[:, None, :].expand(batch, heads, -1), float("inf"))
    else:
        ranked[:, :, max(current_page - recent_pages, 0) : current_page + 1] = float("inf")
    indices = ranked.topk(min(page_budget, num_pages), dim=-1).indices
    return indices.sort(dim=-1).values


def pages_to_token_mask(page_indices: torch.Tensor, num_pages: int, page_size: int, length: int) -> torch.Tensor:
    """[B, Hs, K] page indices -> [B, Hs, length] bool mask of the tokens they cover."""
    batch, heads, _ = page_indices.shape
    selected = torch.zeros(batch, heads, num_pages, dtype=torch.bool, device=page_indices.device)
    selected.scatter_(2, page_indices, True)
    return selected.repeat_interleave(page_size, dim=2)[:, :, :length]


def masked_decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Exact softmax attention of one query token over the keys where ``key_mask`` is True, fp32 accumulation.

    Args:
        query: [B, Hq, D]
        keys, values: [B, Hkv, L, D]
        key_mask: [B, Hm, L] bool with Hm in {1, Hkv, Hq}
    Returns:
        [B, Hq, D] in the query's dtype.
    """
    batch, q_heads, dim = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    q = query.float().view(batch, kv_heads, group, dim)
    logits = (q @ keys.float().transpose(-1, -2)) * scaling  # [B, Hkv, G, L]
    if key_mask.shape[1] == q_heads and group > 1:
        mask = key_mask.view(batch, kv_heads, group, -1)
    else:
        mask = key_mask[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ values.float()
    return out.reshape(batch, q_heads, values.shape[-1]).to(query.dtype)


def key_validity(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """[B, 1, Sq, L] bool (True = attend) or additive float mask -> [B, L] bool for the last query row."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, -length:]
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2


def quest_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    key_valid: torch.Tensor | None,
    config: QuestConfig,
    scaling: float,
    seq_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Quest decode step of one layer: score pages, select, attend over the selected tokens only.

    Args:
        query: [B, Hq, D] (the single new token)
        keys, values: [B, Hkv, L, D]
        page_min, page_max: [B, Hkv, >= P, D]
        key_valid: [B, L] bool or None (False for padding and, in a static cache, for slots not yet written).
        seq_lens: [B] int32/int64 tokens written per sequence, when ``keys`` is a buffer longer than that (static
            cache); the newest token's page is always kept. None: every sequence fills ``keys``.
    Returns:
        output [B, Hq, D] and the selected page indices [B, Hs, K].
    """
    length = keys.shape[2]
    page_size = config.page_size
    num_pages = math.ceil(length / page_size)
    page_valid = sink_page = None
    if key_valid is not None:
        pad = num_pages * page_size - length
        page_valid = torch.nn.functional.pad(key_valid, (0, pad)).view(-1, num_pages, page_size).any(dim=-1)
    if config.keep_first_page:
        sink_page = (
            page_valid.int().argmax(dim=-1)
            if page_valid is not None
            else torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        )
    scores = page_scores(
        query,
        page_min[:, :, :num_pages],
        page_max[:, :, :num_pages],
        config.spread,
        config.aggregation,
        config.page_summary,
    )
    current_page = num_pages - 1 if seq_lens is None else (seq_lens.long() - 1) // page_size
    page_indices = select_pages(
        scores, config.page_budget, current_page, page_valid, sink_page, config.forced_recent_pages
    )
    token_mask = pages_to_token_mask(page_indices, num_pages, page_size, length)
    if key_valid is not None:
        token_mask = token_mask & key_valid[:, None, :]
    return masked_decode_attention(query, keys, values, token_mask, scaling), page_indices
