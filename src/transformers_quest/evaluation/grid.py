"""Many selectors at once over one prefilled context: the engine that makes a budget x method sweep affordable.

A prompt's context is prefilled densely once. Then every (method, budget) becomes one row of a batch: the rows
share the prefilled keys/values (stored once, read once per step for all rows), each row appends its own tail
(the question fed token by token, then its own greedy answer), and each row's attention goes through its own
`LayerSelector`, exactly as `selectors.selector_decode` does for one cache. The tests check that a row reproduces
a `QuestCache` / `SelectorCache` run token for token.

Two attention functions are registered for this: one for the prefill (dense SDPA that also records the attention
each key receives, for H2O) and one for the grid steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..reference import page_summary, select_pages
from ..selectors import LayerSelector, SelectorSpec, attention_column_sums, oracle_page_scores

PREFILL_ATTENTION = "quest_eval_prefill"
GRID_ATTENTION = "quest_eval_grid"


class _State:
    layer: GridLayer | None = None
    record_window: int | None = None  # None: record nothing; otherwise the last N prefill queries (0 = all)
    column_sums: dict[int, torch.Tensor] = {}
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> (last query, keys)


_STATE = _State()


def _prefill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if _STATE.record_window is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        window = _STATE.record_window or None
        _STATE.column_sums[module.layer_idx] = attention_column_sums(query, key, scale, window)
    if _STATE.captured is not None:
        _STATE.captured[module.layer_idx] = (query[0, :, -1].float().clone(), key[0].float().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _grid_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer, _STATE.layer = _STATE.layer, None
    if layer is None or query.shape[2] != 1:
        raise RuntimeError("The evaluation grid attention runs only one-token steps over a GridCache.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query[:, :, 0], scale)[:, None], None


AttentionInterface.register(PREFILL_ATTENTION, _prefill_attention)
AttentionMaskInterface.register(PREFILL_ATTENTION, sdpa_mask)
AttentionInterface.register(GRID_ATTENTION, _grid_attention)


@dataclass
class Prefix:
    """A densely prefilled context: per layer keys/values [1, Hkv, L0, D], H2O's column sums [1, Hkv, L0] or None,
    and the logits of the last position [vocab]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    column_sums: list[torch.Tensor] | None
    last_logits: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, h2o_window: int | None = None) -> Prefix:
    """Dense prefill of ``input_ids`` [1, L0]; records H2O's column sums over the last ``h2o_window`` queries
    (0 = all) when not None."""
    model.set_attn_implementation(PREFILL_ATTENTION)
    _STATE.record_window, _STATE.column_sums = h2o_window, {}
    try:
        cache = DynamicCache()
        out = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        _STATE.record_window = None
    layers = cache.layers
    sums = None
    if h2o_window is not None:
        sums = [_STATE.column_sums[i] for i in range(len(layers))]
    _STATE.column_sums = {}
    return Prefix([l.keys for l in layers], [l.values for l in layers], sums, out.logits[0, -1].float())


@torch.no_grad()
def capture_last_query(model, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Dense forward of ``input_ids`` [1, L]; per layer the last token's query [Hq, D] and all keys [Hkv, L, D]."""
    model.set_attn_implementation(PREFILL_ATTENTION)
    _STATE.captured = {}
    try:
        model(input_ids, use_cache=False, logits_to_keep=1)
        return _STATE.captured
    finally:
        _STATE.captured = None


@dataclass
class RecallCounter:
    """Pages a selector chose that the oracle (same budget, page size, granularity) also chose, current page
    excluded; counted per layer over all sparse steps."""

    hits: dict[int, int] = field(default_factory=dict)
    total: dict[int, int] = field(default_factory=dict)

    def add(self, layer_idx: int, hits: int, total: int) -> None:
        self.hits[layer_idx] = self.hits.get(layer_idx, 0) + hits
        self.total[layer_idx] = self.total.get(layer_idx, 0) + total

    def overall(self) -> float | None:
        total = sum(self.total.values())
        return sum(self.hits.values()) / total if total else None

    def per_layer(self) -> dict[int, float]:
        return {i: self.hits[i] / t for i, t in sorted(self.total.items()) if t}


class GridLayer(CacheLayerMixin):
    """One layer: the shared prefix [1, Hkv, L0, D] plus each row's tail [N, Hkv, T, D]."""

    is_compileable = False
    is_sliding = False

    def __init__(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        groups: list[tuple[SelectorSpec, int, int]],
        max_tail: int,
        column_sums: torch.Tensor | None,
        recall: list[RecallCounter] | None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.prefix_keys = keys[0].float()  # [Hkv, L0, D]
        self.prefix_values = values[0].float()
        self.groups = groups
        self.selectors: list[LayerSelector] = [spec.new_layer_selector(layer_idx) for spec, _, _ in groups]
        rows = groups[-1][2]
        kv_heads, _, dim = self.prefix_keys.shape
        self.tail_keys = torch.zeros(rows, kv_heads, max_tail, dim)
        self.tail_values = torch.zeros(rows, kv_heads, max_tail, values.shape[-1])
        self.tail = 0
        self.recall = recall
        self._prefix_meta: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for selector, (_, start, end) in zip(self.selectors, groups):
            if column_sums is not None:
                selector.observe_prefill(column_sums.expand(end - start, -1, -1))
        self.is_initialized = True

    @property
    def length(self) -> int:
        return self.prefix_keys.shape[1] + self.tail

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[2]
        self.tail_keys[:, :, self.tail : self.tail + n] = key_states
        self.tail_values[:, :, self.tail : self.tail + n] = value_states
        self.tail += n
        _STATE.layer = self
        return self.tail_keys[:, :, : self.tail], self.tail_values[:, :, : self.tail]

    def lazy_initialization(self, key_states, value_states) -> None:  # built initialized
        pass

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def _page_terms(self, q: torch.Tensor, page_size: int, summary: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The two per-head page terms of every row, each [N, Hkv, G, P]: ``q.c`` and ``|q|.r`` of the box (min/max
        or mean-centred), or ``q.c1`` and ``q.c2`` of the centroids (``summary="centroids"``).

        Pages wholly inside the shared prefix are scored for all rows with one matmul; the rest (the prefix's
        partial page and the tails) per row. Same numbers as `reference.page_scores` before its combination.
        """
        rows, kv_heads, group, dim = q.shape
        prefix_len = self.prefix_keys.shape[1]
        full = prefix_len // page_size
        centroids = summary == "centroids"

        def vectors(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (low, high) if centroids else ((high + low) * 0.5, (high - low) * 0.5)

        if (page_size, summary) not in self._prefix_meta:
            low, high = page_summary(self.prefix_keys[None, :, : full * page_size], page_size, summary)
            self._prefix_meta[page_size, summary] = vectors(low[0], high[0])  # [Hkv, P0, D] each
        first0, second0 = self._prefix_meta[page_size, summary]
        q_by_head = q.permute(1, 0, 2, 3).reshape(kv_heads, rows * group, dim)
        q_second = q_by_head if centroids else q_by_head.abs()
        t0 = (q_by_head @ first0.transpose(1, 2)).view(kv_heads, rows, group, full).permute(1, 0, 2, 3)
        u0 = (q_second @ second0.transpose(1, 2)).view(kv_heads, rows, group, full).permute(1, 0, 2, 3)
        rest = torch.cat(
            [self.prefix_keys[None, :, full * page_size :].expand(rows, -1, -1, -1), self.tail_keys[:, :, : self.tail]],
            dim=2,
        )
        first1, second1 = vectors(*page_summary(rest, page_size, summary))  # [N, Hkv, P1, D]
        t1 = q @ first1.float().transpose(-1, -2)
        u1 = (q if centroids else q.abs()) @ second1.float().transpose(-1, -2)
        return torch.cat([t0, t1], dim=-1), torch.cat([u0, u1], dim=-1)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [N, Hq, D] -> [N, Hq, D]; each row through its group's selector."""
        rows, q_heads, dim = query.shape
        kv_heads, prefix_len, _ = self.prefix_keys.shape
        group = q_heads // kv_heads
        length = prefix_len + self.tail
        q = query.float().view(rows, kv_heads, group, dim)
        # The shared prefix is read once for all rows: [Hkv, N*G, D] @ [Hkv, D, L0].
        q_by_head = q.permute(1, 0, 2, 3).reshape(kv_heads, rows * group, dim)
        logits0 = (q_by_head @ self.prefix_keys.transpose(1, 2)).view(kv_heads, rows, group, prefix_len)
        tail_keys = self.tail_keys[:, :, : self.tail]
        logits = torch.cat([logits0.permute(1, 0, 2, 3), q @ tail_keys.transpose(-1, -2)], dim=-1)  # [N, Hkv, G, L]
        scaled = logits * scaling
        terms: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for selector, (spec, start, end) in zip(self.selectors, self.groups):
            if not selector.is_sparse(length):
                continue
            if selector.uses_metadata:
                key = (spec.page_size, spec.page_summary)
                if key not in terms:
                    terms[key] = self._page_terms(q, *key)
                first, second = terms[key]
                mask, pages = selector.token_mask(
                    query[start:end], logits[start:end], None, None, (first[start:end], second[start:end])
                )
            else:
                mask, pages = selector.token_mask(query[start:end], logits[start:end], None, None)
            if mask.shape[1] == q_heads and group > 1:
                mask = mask.view(end - start, kv_heads, group, length)
            else:
                mask = mask[:, :, None, :]
            scaled[start:end].masked_fill_(~mask, float("-inf"))
            if self.recall is not None and pages is not None and spec.kind == "quest":
                self._count_recall(spec, pages, logits[start:end], self.recall[self.groups.index((spec, start, end))])
        probs = torch.softmax(scaled, dim=-1)  # [N, Hkv, G, L]
        for selector, (_, start, end) in zip(self.selectors, self.groups):
            selector.observe(probs[start:end])
        probs0 = probs[..., :prefix_len].permute(1, 0, 2, 3).reshape(kv_heads, rows * group, prefix_len)
        out = (probs0 @ self.prefix_values).view(kv_heads, rows, group, -1).permute(1, 0, 2, 3)
        out = out + probs[..., prefix_len:] @ self.tail_values[:, :, : self.tail]
        return out.reshape(rows, q_heads, -1).to(query.dtype)

    def _count_recall(self, spec: SelectorSpec, pages: torch.Tensor, logits: torch.Tensor, counter: RecallCounter) -> None:
        length = logits.shape[-1]
        num_pages = -(-length // spec.page_size)
        oracle_aggregation = "none" if spec.aggregation == "none" else "max"
        oracle = select_pages(
            oracle_page_scores(logits, spec.page_size, oracle_aggregation), spec.budget // spec.page_size, num_pages - 1
        )
        chosen = torch.zeros(*pages.shape[:2], num_pages, dtype=torch.bool)
        chosen.scatter_(2, pages, True)
        best = torch.zeros_like(chosen)
        best.scatter_(2, oracle, True)
        chosen[..., -1] = best[..., -1] = False  # the current page is always kept: not a choice
        counter.add(self.layer_idx, int((chosen & best).sum()), int(best.sum()))


class GridCache(Cache):
    """The rows of a grid run: ``specs[i]`` gets rows ``[i * rows_per_spec, (i + 1) * rows_per_spec)``."""

    def __init__(self, prefix: Prefix, specs: list[SelectorSpec], max_tail: int, track_recall: bool = False):
        groups, start = [], 0
        for spec in specs:
            groups.append((spec, start, start + 1))
            start += 1
        self.specs = specs
        self.recall = [RecallCounter() for _ in specs] if track_recall else None
        layers = [
            GridLayer(
                i,
                prefix.keys[i],
                prefix.values[i],
                groups,
                max_tail,
                None if prefix.column_sums is None else prefix.column_sums[i],
                self.recall,
            )
            for i in range(len(prefix.keys))
        ]
        super().__init__(layers=layers)


@dataclass
class GridResult:
    generated: list[list[int]]  # per row, greedy tokens after the tail
    tail_logprobs: torch.Tensor | None  # [N, T - 1]: log p(tail[t + 1] | ...) per row, when asked
    recall: list[RecallCounter] | None


@torch.no_grad()
def run_grid(
    model,
    prefix: Prefix,
    specs: list[SelectorSpec],
    tail_ids: list[int],
    max_new_tokens: int = 0,
    stop_ids: set[int] | None = None,
    score_tail: bool = False,
    track_recall: bool = False,
    progress=None,
) -> GridResult:
    """Feed ``tail_ids`` token by token to every row, then decode up to ``max_new_tokens`` greedy tokens per row.

    Rows stop together once every row has produced a token of ``stop_ids`` (their later tokens are dropped).
    """
    if not tail_ids:
        raise ValueError("`tail_ids` must hold at least one token (the step that first exercises selection).")
    rows = len(specs)
    cache = GridCache(prefix, specs, len(tail_ids) + max_new_tokens, track_recall)
    model.set_attn_implementation(GRID_ATTENTION)
    logprobs = torch.zeros(rows, len(tail_ids) - 1) if score_tail else None
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    stop_ids = stop_ids or set()
    total = len(tail_ids) + max_new_tokens - 1
    for step in range(total):
        if step < len(tail_ids):
            tokens = torch.full((rows, 1), tail_ids[step], dtype=torch.long)
        else:
            tokens = torch.tensor([[row[-1]] for row in generated])
        out = model(tokens, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()  # [N, vocab]
        if progress is not None:
            progress.update(1)
        if step + 1 < len(tail_ids):
            if logprobs is not None:
                logprobs[:, step] = torch.log_softmax(logits, dim=-1)[:, tail_ids[step + 1]]
            continue
        choice = logits.argmax(dim=-1).tolist()
        for r in range(rows):
            if not done[r]:
                generated[r].append(choice[r])
                done[r] = choice[r] in stop_ids
            else:
                generated[r].append(choice[r])
        if all(done):
            break
    # Trim each row at its first stop token.
    for r in range(rows):
        for i, t in enumerate(generated[r]):
            if t in stop_ids:
                generated[r] = generated[r][:i]
                break
    return GridResult(generated, logprobs, cache.recall)
