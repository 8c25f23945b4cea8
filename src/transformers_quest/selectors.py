"""Who attends to what: Quest's page selector and the yardsticks it is measured against.

Every selector answers one question per decode step and layer: which keys may this query attend to? It returns
a boolean token mask; attention over the masked keys is then exact (softmax over the kept keys only). One
interface serves both the user-facing caches below (usable with ``generate``) and the offline evaluation grid,
which is checked against these caches in the tests.

* ``quest``: pages scored from the two vectors kept per page (`QuestConfig.page_summary`; by default the keys'
  min/max box centred on their mean) by `reference.page_scores`, the kernels' path.
* ``oracle``: pages ranked by their exact ``max q.k``. It reads every key, so it saves nothing: a yardstick for
  what the best page selection at a budget could reach, never a method.
* ``streaming``: StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): a few attention-sink tokens plus the most
  recent tokens.
* ``h2o``: H2O (Zhang et al., 2023, arXiv 2306.14048): heavy hitters by accumulated attention plus the most recent
  tokens; evicted tokens never come back. Shared per KV head (attention summed over the group).
* ``dense``: every key (the reference answer).

Budgets mean the same for all: tokens attended per decode step and KV head (``budget // page_size`` pages for the
page selectors, the current page included). The first ``dense_layers`` layers always attend densely.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, L tokens, P pages, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .cache import QuestCache, QuestLayer
from .config import AGGREGATIONS, QuestConfig
from .reference import (
    _normalised_aggregate,
    aggregate_scores,
    page_minmax,
    page_scores,
    pages_to_token_mask,
    select_pages,
)

KINDS = ("quest", "oracle", "streaming", "h2o", "dense")


@dataclass(frozen=True)
class SelectorSpec:
    """A selector and its settings; `QuestConfig` fields for ``kind="quest"``.

    Args:
        kind (`str`): one of `KINDS`.
        budget (`int`): tokens attended per decode step and KV head.
        page_size (`int`, defaults to 16): tokens per page (``quest`` and ``oracle``).
        dense_layers (`int`, defaults to 2): the first layers attend densely.
        aggregation (`str`, defaults to ``"max"``): how a GQA group combines page scores (``quest``, ``oracle``).
        spread (`float`, defaults to `QuestConfig`'s): weight of the box half-width (``quest``).
        keep_first_page (`bool`, defaults to `QuestConfig`'s): always keep the first page (``quest``).
        recent_pages (`int`, defaults to `QuestConfig`'s): pages before the current one always kept (``quest``).
        page_summary (`str`, defaults to `QuestConfig`'s): the two vectors kept per page (``quest``).
        sink_tokens (`int`, defaults to 4): attention sinks kept by ``streaming``.
        recent_ratio (`float`, defaults to 0.5): share of the budget kept for the most recent tokens (``h2o``).
    """

    kind: str
    budget: int = 2048
    page_size: int = 16
    dense_layers: int = 2
    aggregation: str = QuestConfig.aggregation
    spread: float = QuestConfig.spread
    keep_first_page: bool = QuestConfig.keep_first_page
    recent_pages: int = QuestConfig.recent_pages
    page_summary: str = QuestConfig.page_summary
    sink_tokens: int = 4
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}.")
        # QuestConfig validates budget, page_size, dense_layers, aggregation, spread and keep_first_page.
        self.quest_config()
        if self.kind == "streaming" and not 0 <= self.sink_tokens < self.budget:
            raise ValueError(f"`sink_tokens` must be in [0, budget={self.budget}), got {self.sink_tokens}.")
        if self.kind == "oracle" and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` of the oracle must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
        if not 0.0 < self.recent_ratio < 1.0:
            raise ValueError(f"`recent_ratio` must be in (0, 1), got {self.recent_ratio}.")

    def quest_config(self) -> QuestConfig:
        return QuestConfig(
            self.budget,
            self.page_size,
            self.dense_layers,
            self.aggregation,
            float(self.spread),
            self.keep_first_page,
            self.recent_pages,
            self.page_summary,
        )

    @property
    def name(self) -> str:
        """Short label used in tables: kind and the settings that distinguish it."""
        if self.kind == "quest":
            if self.page_summary == "centroids":
                label = f"quest[{self.aggregation},centroids"
            else:
                label = f"quest[{self.aggregation},{self.page_summary},s={self.spread:g}"
            label += ",sink" if self.keep_first_page else ""
            label += f",recent={self.recent_pages}" if self.recent_pages else ""
            label += f",p={self.page_size}" if self.page_size != 16 else ""
            label += f",d={self.dense_layers}" if self.dense_layers != 2 else ""
            return label + "]"
        if self.kind == "oracle":
            return f"oracle[{self.aggregation}]" + (f"[p={self.page_size}]" if self.page_size != 16 else "")
        return self.kind

    def with_budget(self, budget: int) -> SelectorSpec:
        return replace(self, budget=budget)

    def new_layer_selector(self, layer_idx: int) -> LayerSelector:
        cls = {
            "quest": QuestSelector,
            "oracle": OracleSelector,
            "streaming": StreamingSelector,
            "h2o": H2OSelector,
            "dense": DenseSelector,
        }[self.kind]
        return cls(self, layer_idx)


# -- pure selection functions ------------------------------------------------------------------------------------


def oracle_page_scores(logits: torch.Tensor, page_size: int, aggregation: str) -> torch.Tensor:
    """Exact ``max q.k`` of every page.

    Args:
        logits: [B, Hkv, G, L] raw ``q.k`` (no scaling).
    Returns:
        [B, Hs, P], Hs = Hkv for "max" / "sum" (max / sum over the group), Hq for "none".
    """
    batch, kv_heads, group, length = logits.shape
    num_pages = math.ceil(length / page_size)
    pad = num_pages * page_size - length
    padded = torch.nn.functional.pad(logits.float(), (0, pad), value=float("-inf"))
    per_head = padded.view(batch, kv_heads, group, num_pages, page_size).amax(dim=-1)  # [B, Hkv, G, P]
    return aggregate_scores(per_head, aggregation)


def streaming_token_mask(length: int, budget: int, sink_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[L] bool: the first ``sink_tokens`` tokens and the last ``budget - sink_tokens``."""
    position = torch.arange(length, device=device)
    return (position < sink_tokens) | (position >= length - (budget - sink_tokens))


def h2o_keep(accumulated: torch.Tensor, kept: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """H2O's next kept set: the ``recent`` newest tokens plus the ``budget - recent`` heaviest still-kept others.

    Args:
        accumulated: [B, H, L] attention each token received so far.
        kept: [B, H, L] bool, tokens not yet evicted (eviction is permanent).
    Returns:
        [B, H, L] bool, the new kept set (exactly ``min(budget, L)`` tokens when enough are still kept).
    """
    length = accumulated.shape[-1]
    old = torch.arange(length, device=accumulated.device) < length - recent  # [L]
    candidates = kept & old
    ranked = accumulated.float().masked_fill(~candidates, float("-inf"))
    heavy = min(budget - recent, length - recent)
    top = ranked.topk(heavy, dim=-1).indices
    new = torch.zeros_like(kept)
    new.scatter_(-1, top, True)
    return (new & candidates) | ~old


def attention_column_sums(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, window: int | None = None, chunk: int = 256
) -> torch.Tensor:
    """Causal attention each key receives from the last ``window`` queries (all when None), summed over a group.

    H2O's initial heavy-hitter scores after a dense prefill. Computed in query chunks so memory stays
    O(chunk x L).

    Args:
        query: [B, Hq, S, D], the last S tokens of a cache of L keys.
        keys: [B, Hkv, L, D]
    Returns:
        [B, Hkv, L] fp32.
    """
    batch, q_heads, steps, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    first = 0 if window is None else max(steps - window, 0)
    k = keys.float()
    sums = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
    offset = length - steps  # cache position of query 0
    for start in range(first, steps, chunk):
        end = min(start + chunk, steps)
        q = query[:, :, start:end].float().reshape(batch, kv_heads, group * (end - start), dim)
        logits = (q @ k.transpose(-1, -2)) * scaling  # [B, Hkv, G*C, L]
        logits = logits.view(batch, kv_heads, group, end - start, length)
        position = torch.arange(start, end, device=keys.device)[:, None] + offset
        causal = torch.arange(length, device=keys.device)[None, :] <= position  # [C, L]
        logits = logits.masked_fill(~causal, float("-inf"))
        sums += torch.softmax(logits, dim=-1).sum(dim=(2, 3))
    return sums


# -- per-layer selectors -----------------------------------------------------------------------------------------


class LayerSelector:
    """One layer's selector. ``token_mask`` sees the raw logits ``q.k`` [B, Hkv, G, L] (the attention reads them
    anyway) and, for Quest, the page metadata; ``observe`` gets the attention probabilities afterwards."""

    uses_metadata = False

    def __init__(self, spec: SelectorSpec, layer_idx: int):
        self.spec = spec
        self.layer_idx = layer_idx
        self.is_dense_layer = layer_idx < spec.dense_layers

    def is_sparse(self, length: int) -> bool:
        """Whether a one-token step at this cache length selects (otherwise it attends to every key)."""
        return not self.is_dense_layer and length > self.spec.budget

    def token_mask(
        self,
        query: torch.Tensor,
        logits: torch.Tensor,
        page_min: torch.Tensor | None,
        page_max: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mask [B, Hs, L] bool with Hs in {Hkv, Hq}, selected page indices [B, Hs, K] or None)."""
        raise NotImplementedError

    def observe(self, probs: torch.Tensor) -> None:
        """Attention probabilities [B, Hkv, G, L] of this step (dense or sparse)."""

    def observe_prefill(self, column_sums: torch.Tensor) -> None:
        """Attention summed over the prefill queries and a group, [B, Hkv, L]."""


class DenseSelector(LayerSelector):
    def is_sparse(self, length: int) -> bool:
        return False


class _PageSelector(LayerSelector):
    def is_sparse(self, length: int) -> bool:
        return not self.is_dense_layer and math.ceil(length / self.spec.page_size) > self.spec.budget // self.spec.page_size

    def _select(self, scores: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        num_pages = math.ceil(length / spec.page_size)
        sink = None
        if spec.keep_first_page:
            sink = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        recent = spec.quest_config().forced_recent_pages if spec.kind == "quest" else 0
        pages = select_pages(scores, spec.budget // spec.page_size, num_pages - 1, None, sink, recent)
        return pages_to_token_mask(pages, num_pages, spec.page_size, length), pages


class QuestSelector(_PageSelector):
    uses_metadata = True

    def token_mask(self, query, logits, page_min, page_max, page_terms=None):
        """``page_terms``: optional precomputed per-head terms, each [B, Hkv, G, P] (the evaluation grid shares
        them across rows): ``(q.c, |q|.r)`` of the box (min/max or mean-centred), or ``(q.c1, q.c2)`` of the
        centroids; otherwise scored by `reference.page_scores`."""
        num_pages = math.ceil(logits.shape[-1] / self.spec.page_size)
        if page_terms is not None:
            first, second = page_terms
            if self.spec.page_summary == "centroids":
                scores = torch.maximum(first, second)
            else:
                scores = first + self.spec.spread * second if self.spec.spread else first
            if self.spec.aggregation in ("softmax", "rank"):
                scores = _normalised_aggregate(scores, self.spec.aggregation, query.shape[-1])
            else:
                scores = aggregate_scores(scores, self.spec.aggregation)
        else:
            scores = page_scores(
                query,
                page_min[:, :, :num_pages],
                page_max[:, :, :num_pages],
                self.spec.spread,
                self.spec.aggregation,
                self.spec.page_summary,
            )
        return self._select(scores, logits.shape[-1])


class OracleSelector(_PageSelector):
    def token_mask(self, query, logits, page_min, page_max):
        scores = oracle_page_scores(logits, self.spec.page_size, self.spec.aggregation)
        return self._select(scores, logits.shape[-1])


class StreamingSelector(LayerSelector):
    def token_mask(self, query, logits, page_min, page_max):
        batch, kv_heads, _, length = logits.shape
        mask = streaming_token_mask(length, self.spec.budget, self.spec.sink_tokens, logits.device)
        return mask.expand(batch, kv_heads, length), None


class H2OSelector(LayerSelector):
    """Keeps ``accumulated`` [B, Hkv, L] attention and the ``kept`` set [B, Hkv, L] across steps."""

    def __init__(self, spec: SelectorSpec, layer_idx: int):
        super().__init__(spec, layer_idx)
        self.accumulated: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None

    def _grow(self, batch: int, kv_heads: int, length: int, device: torch.device) -> None:
        if self.accumulated is None:
            self.accumulated = torch.zeros(batch, kv_heads, 0, device=device)
            self.kept = torch.zeros(batch, kv_heads, 0, dtype=torch.bool, device=device)
        extra = length - self.accumulated.shape[-1]
        if extra > 0:
            self.accumulated = torch.nn.functional.pad(self.accumulated, (0, extra))
            self.kept = torch.nn.functional.pad(self.kept, (0, extra), value=True)

    def observe_prefill(self, column_sums: torch.Tensor) -> None:
        self.accumulated = column_sums.float().clone()
        self.kept = torch.ones_like(self.accumulated, dtype=torch.bool)

    def token_mask(self, query, logits, page_min, page_max):
        batch, kv_heads, _, length = logits.shape
        self._grow(batch, kv_heads, length, logits.device)
        recent = max(int(self.spec.budget * self.spec.recent_ratio), 1)
        self.kept = h2o_keep(self.accumulated, self.kept, self.spec.budget, recent)
        return self.kept, None

    def observe(self, probs: torch.Tensor) -> None:
        batch, kv_heads, _, length = probs.shape
        self._grow(batch, kv_heads, length, probs.device)
        self.accumulated += probs.float().sum(dim=2)


# -- caches usable with generate ---------------------------------------------------------------------------------


def selector_decode(
    selector: LayerSelector,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_min: torch.Tensor | None,
    page_max: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step through a selector: exact softmax over the kept keys, fp32 accumulation.

    Args:
        query: [B, Hq, D]; keys, values: [B, Hkv, L, D].
    Returns:
        output [B, Hq, D] in the query's dtype, selected pages [B, Hs, K] or None.
    """
    batch, q_heads, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = query.float().view(batch, kv_heads, group, dim)
    logits = q @ keys.float().transpose(-1, -2)  # [B, Hkv, G, L], raw q.k
    pages = None
    scaled = logits * scaling
    if selector.is_sparse(length):
        mask, pages = selector.token_mask(query, logits, page_min, page_max)
        if mask.shape[1] == q_heads and group > 1:
            mask = mask.view(batch, kv_heads, group, length)
        else:
            mask = mask[:, :, None, :]
        scaled = scaled.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    selector.observe(probs)
    out = probs @ values.float()
    return out.reshape(batch, q_heads, values.shape[-1]).to(query.dtype), pages


class SelectorLayer(QuestLayer):
    """A `QuestLayer` whose decode steps go through a `LayerSelector` (torch only; no compiled kernels)."""

    def __init__(self, spec: SelectorSpec, layer_idx: int, stats=None):
        super().__init__(spec.quest_config(), layer_idx, stats)
        self.spec = spec
        self.selector = spec.new_layer_selector(layer_idx)
        self.keeps_metadata = self.selector.uses_metadata and not self.is_dense

    def is_sparse_step(self, query_length: int, length: int) -> bool:
        return query_length == 1 and self.selector.is_sparse(length)

    def observe_dense(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> None:
        if isinstance(self.selector, H2OSelector):
            if query.shape[2] == 1 and self.selector.accumulated is not None:
                batch, q_heads, _, dim = query.shape
                q = query[:, :, 0].float().view(batch, key.shape[1], q_heads // key.shape[1], dim)
                self.selector.observe(torch.softmax((q @ key.float().transpose(-1, -2)) * scaling, dim=-1))
            else:
                sums = attention_column_sums(query, key, scaling)
                if self.selector.accumulated is not None:  # a chunked prefill continues the sums
                    self.selector._grow(sums.shape[0], sums.shape[1], sums.shape[2], sums.device)
                    sums = sums + self.selector.accumulated
                self.selector.observe_prefill(sums)

    def sparse_decode(self, query, key, value, key_valid, scaling):
        if key_valid is not None and not bool(key_valid.all()):
            raise ValueError(f"{type(self.selector).__name__} caches do not support padded batches.")
        out, pages = selector_decode(self.selector, query, key, value, self.page_min, self.page_max, scaling)
        self.stats.add(dense=query.shape[0] * key.shape[1] * key.shape[2], read=query.shape[0] * key.shape[1] * min(self.spec.budget, key.shape[2]))
        return out


class SelectorCache(QuestCache):
    """A cache whose sparse decode steps go through any `SelectorSpec` (StreamingLLM, H2O, oracle, Quest variants).

    For baselines and yardsticks: everything runs in PyTorch, and the oracle and H2O read every key.

    Example:
        >>> cache = SelectorCache(SelectorSpec("streaming", budget=256))
        >>> model.generate(**inputs, past_key_values=cache)
    """

    def __init__(self, spec: SelectorSpec):
        if not isinstance(spec, SelectorSpec):
            raise TypeError(f"`spec` must be a SelectorSpec, got {type(spec).__name__}.")
        self.spec = spec
        super().__init__(config=spec.quest_config())

    def _new_layer(self) -> SelectorLayer:
        return SelectorLayer(self.spec, layer_idx=len(self.layers), stats=self.stats)


def StreamingLLMCache(budget: int, sink_tokens: int = 4, dense_layers: int = 2) -> SelectorCache:
    """StreamingLLM: ``sink_tokens`` attention sinks + the most recent ``budget - sink_tokens`` tokens."""
    return SelectorCache(SelectorSpec("streaming", budget=budget, dense_layers=dense_layers, sink_tokens=sink_tokens))


def H2OCache(budget: int, recent_ratio: float = 0.5, dense_layers: int = 2) -> SelectorCache:
    """H2O: heavy hitters by accumulated attention + the most recent ``budget * recent_ratio`` tokens."""
    return SelectorCache(SelectorSpec("h2o", budget=budget, dense_layers=dense_layers, recent_ratio=recent_ratio))


def OracleCache(budget: int, page_size: int = 16, dense_layers: int = 2, aggregation: str = "max") -> SelectorCache:
    """Pages ranked by their exact ``max q.k`` (reads every key: a yardstick, not a method)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}.")  # exact maxima: no rescaling
    return SelectorCache(SelectorSpec("oracle", budget=budget, page_size=page_size, dense_layers=dense_layers, aggregation=aggregation))


__all__ = [
    "KINDS",
    "H2OCache",
    "OracleCache",
    "SelectorCache",
    "SelectorLayer",
    "SelectorSpec",
    "StreamingLLMCache",
    "attention_column_sums",
    "h2o_keep",
    "oracle_page_scores",
    "page_minmax",
    "selector_decode",
    "streaming_token_mask",
]
