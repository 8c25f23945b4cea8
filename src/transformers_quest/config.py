"""Quest settings, validated once so that bad values fail at construction and never inside a kernel."""

from __future__ import annotations

from dataclasses import dataclass

AGGREGATIONS = ("max", "sum", "none")
"""How the query heads of one GQA group combine their page scores (every backend supports these).

``"max"`` / ``"sum"``: one page selection per KV head, shared by its query heads (reads each selected page once).
``"none"``: one selection per query head (the paper's MHA behaviour; on GQA models a KV head may read more pages).
"""

PAGE_SUMMARIES = ("minmax", "mean", "centroids")
"""The two vectors kept per page and KV head (same bytes either way).

``"mean"`` (the default): the min/max box moved to be centred on the page's mean key (``mean -+ r``, ``r`` the
box half-width), so the box score reads ``q.mean + spread * |q|.r``. On SmolLM2 (eval/README.md) it kept the most
passkey answers (43 of 50 at 4K, 33 at 8K, against 41 and 29 for ``"minmax"``) and the lowest perplexity at 8K
(+1.1% over dense at budget 1024, against +1.9%), at Quest's cost: same bytes, same scoring kernel, and the
metadata kernels keep the mean too (one more fp32 sum per element).
``"minmax"``: Quest's element-wise min and max of the page's keys, scored ``q.c + spread * |q|.r`` (``c``, ``r``:
the box centre and half-width); the paper's exact form (`QuestConfig.paper`).
``"centroids"``: the two centroids of a 2-means clustering of the page's keys, scored ``max(q.c1, q.c2)`` (an
estimate of the page's best ``q.k``, no bound). PyTorch reference only until the kernels compute the clustering.
"""

TORCH_ONLY_AGGREGATIONS = ("softmax", "rank")
"""Shared selections that first put the group's heads on one scale; PyTorch reference only (no compiled kernel).

``"softmax"``: max over the group of each head's softmax over pages (scores scaled by 1/sqrt(D)), so a head with a
large ``|q|`` no longer outvotes the others. ``"rank"``: a page's best rank in any head of the group, i.e. the union
of the heads' own top lists (ties broken by ``"softmax"``). Same metadata and matmuls as Quest; ``"rank"`` adds a
sort over pages per head.
"""


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r}).")
    return value


@dataclass(frozen=True)
class QuestConfig:
    """What Quest keeps and how it selects pages.

    Args:
        budget (`int`, defaults to 2048): tokens attended per decode step and KV head; ``budget // page_size``
            pages (rounded down, as in the paper's kernels), one of which is always the current (last) page.
            Contexts that fit are attended densely.
        page_size (`int`, defaults to 16): tokens per page; a positive power of two.
        dense_layers (`int`, defaults to 2): the first layers always attend densely (they are not sparse).
        aggregation (`str`, defaults to ``"max"``): see `AGGREGATIONS` and `TORCH_ONLY_AGGREGATIONS`.
        spread (`float`, defaults to 0.5): page score ``q.c + spread * |q|.r`` with ``c``/``r`` the centre and
            half-width of the page's box (``c`` is the page's mean key with ``page_summary="mean"``). With the
            min/max box, ``1.0`` is the paper's upper bound ``sum max(q*max, q*min)`` (`QuestConfig.paper`);
            ``0.0`` scores the box centre. Below 1 the score is no longer an upper bound of ``q.k``: a page whose
            keys are all far below its box corner can be ranked above one holding the true maximum. On SmolLM2
            (GQA 9/3) the bound overshoots true page maxima by 3-7 standard deviations of those maxima across
            pages, and 0.5 kept the most passkey answers of the shared selections measured, with either box
            (eval/README.md).
        keep_first_page (`bool`, defaults to True): always attend to the first page (the attention sink). On
            SmolLM2 at 8K (min/max box) it takes token-by-token perplexity at budget 1024 from +11.6% to +1.9% over
            dense, at no passkey cost (eval/README.md).
        recent_pages (`int`, defaults to 0): always attend to this many pages just before the current one (a local
            window), capped at ``(page_budget - 1) // 2`` so that at least half of the chosen pages are chosen by
            score. Same metadata and scoring as Quest; PyTorch reference only until the kernels support it.
        page_summary (`str`, defaults to ``"mean"``): the two vectors kept per page, see `PAGE_SUMMARIES`.
            ``"mean"`` (the min/max box centred on the page's mean key) kept more passkey answers than ``"minmax"``
            (4K: 43 against 41 of 50; 8K: 33 against 29) and lower perplexity at 8K (+5.7% / +1.1% over dense at
            budgets 256 / 1024, against +7.8% / +1.9%) on SmolLM2, with the same metadata bytes and kernels.
            ``spread`` applies to ``"minmax"`` and ``"mean"``, not to ``"centroids"``.
    """

    budget: int = 2048
    page_size: int = 16
    dense_layers: int = 2
    aggregation: str = "max"
    spread: float = 0.5
    keep_first_page: bool = True
    recent_pages: int = 0
    page_summary: str = "mean"

    def __post_init__(self) -> None:
        page_size = _check_int("page_size", self.page_size)
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"`page_size` must be a positive power of two (1, 2, 4, ..., 16, ...), got {page_size}.")
        budget = _check_int("budget", self.budget)
        if budget < page_size:
            raise ValueError(
                f"`budget` must be at least one page ({page_size} tokens with page_size={page_size}), got {budget}."
            )
        dense_layers = _check_int("dense_layers", self.dense_layers)
        if dense_layers < 0:
            raise ValueError(f"`dense_layers` must be >= 0, got {dense_layers}.")
        if self.aggregation not in AGGREGATIONS + TORCH_ONLY_AGGREGATIONS:
            raise ValueError(
                f"`aggregation` must be one of {AGGREGATIONS + TORCH_ONLY_AGGREGATIONS}, got {self.aggregation!r}."
            )
        if isinstance(self.spread, bool) or not isinstance(self.spread, (int, float)):
            raise TypeError(f"`spread` must be a float in [0, 1], got {type(self.spread).__name__} ({self.spread!r}).")
        if not 0.0 <= float(self.spread) <= 1.0:
            raise ValueError(f"`spread` must be in [0, 1] (1 = Quest's upper bound), got {self.spread}.")
        recent_pages = _check_int("recent_pages", self.recent_pages)
        if recent_pages < 0:
            raise ValueError(f"`recent_pages` must be >= 0, got {recent_pages}.")
        if self.page_summary not in PAGE_SUMMARIES:
            raise ValueError(f"`page_summary` must be one of {PAGE_SUMMARIES}, got {self.page_summary!r}.")
        if not isinstance(self.keep_first_page, bool):
            raise TypeError(f"`keep_first_page` must be a bool, got {self.keep_first_page!r}.")

    @classmethod
    def paper(cls, budget: int = 2048, **overrides) -> QuestConfig:
        """The paper's exact min/max Quest: ``spread=1.0`` (the upper bound ``sum_i max(q_i max_i, q_i min_i)``),
        no page kept without scoring, one selection per KV head (max over the group); other fields as given."""
        defaults = {"spread": 1.0, "aggregation": "max", "keep_first_page": False, "page_summary": "minmax"}
        return cls(budget=budget, **{**defaults, **overrides})

    @property
    def page_budget(self) -> int:
        """Pages attended per decode step, the current page included."""
        return self.budget // self.page_size

    @property
    def forced_recent_pages(self) -> int:
        """Recent pages kept without scoring, after the cap."""
        return min(self.recent_pages, (self.page_budget - 1) // 2)
