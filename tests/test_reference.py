"""The reference ops against brute-force computations written independently here (random q/k, fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from transformers_quest import QuestConfig
from transformers_quest.reference import (
    append_pages,
    masked_decode_attention,
    page_centroids,
    page_mean_box,
    page_minmax,
    page_scores,
    page_summary,
    pages_to_token_mask,
    quest_decode,
    refresh_pages,
    select_pages,
)


def brute_force_page_scores(query, keys, page_size, spread, aggregation):
    """Loop over pages and heads; the bound written as the paper writes it (spread=1) or from its box."""
    batch, q_heads, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    num_pages = math.ceil(length / page_size)
    per_query_head = torch.empty(batch, q_heads, num_pages, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            q = query[b, h].double()
            for p in range(num_pages):
                page = keys[b, h // group, p * page_size : (p + 1) * page_size].double()
                high, low = page.max(dim=0).values, page.min(dim=0).values
                bound = torch.maximum(q * high, q * low)  # the paper's per-channel bound
                lower = torch.minimum(q * high, q * low)
                # q.c + s|q|.r == sum(((1 + s) * bound + (1 - s) * lower) / 2)
                per_query_head[b, h, p] = (((1 + spread) * bound + (1 - spread) * lower) / 2).sum()
    grouped = per_query_head.view(batch, kv_heads, group, num_pages)
    if aggregation == "max":
        return grouped.amax(dim=2)
    if aggregation == "sum":
        return grouped.sum(dim=2)
    return per_query_head


def brute_force_selection(scores, page_budget, num_pages):
    """Set of pages per (batch, head): the last page plus the best others, by sorting in Python."""
    chosen = []
    for row in scores.reshape(-1, num_pages).tolist():
        others = sorted(range(num_pages - 1), key=lambda p: row[p], reverse=True)[: page_budget - 1]
        chosen.append(set(others) | {num_pages - 1})
    return chosen


@pytest.mark.parametrize("length", [16, 17, 100, 128, 255])
@pytest.mark.parametrize("page_size", [4, 16])
def test_page_minmax_matches_per_page_reduction(length, page_size):
    keys = torch.randn(2, 3, length, 8)
    low, high = page_minmax(keys, page_size)
    for p in range(math.ceil(length / page_size)):
        page = keys[:, :, p * page_size : (p + 1) * page_size]
        torch.testing.assert_close(low[:, :, p], page.amin(dim=2), rtol=0, atol=0)
        torch.testing.assert_close(high[:, :, p], page.amax(dim=2), rtol=0, atol=0)


def test_refresh_pages_after_prefill_and_appends_equals_recomputation():
    page_size, capacity = 16, 160
    keys = torch.randn(2, 2, capacity, 8)
    page_min = torch.full((2, 2, capacity // page_size, 8), 7.0)
    page_max = torch.full_like(page_min, -7.0)
    refresh_pages(page_min, page_max, keys, 0, 37, page_size)  # prefill ending inside page 2
    for end in range(38, 120):  # single-token appends crossing page boundaries
        refresh_pages(page_min, page_max, keys, end - 1, end, page_size)
        low, high = page_minmax(keys[:, :, :end], page_size)
        pages = low.shape[2]
        torch.testing.assert_close(page_min[:, :, :pages], low, rtol=0, atol=0)
        torch.testing.assert_close(page_max[:, :, :pages], high, rtol=0, atol=0)


@pytest.mark.parametrize("aggregation", ["max", "sum", "none"])
@pytest.mark.parametrize("spread", [1.0, 0.25, 0.0])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("length", [64, 77])  # page-aligned, and a partial last page
def test_page_scores_match_brute_force(aggregation, spread, q_heads, kv_heads, length):
    page_size = 16
    query, keys = torch.randn(2, q_heads, 8), torch.randn(2, kv_heads, length, 8)
    low, high = page_minmax(keys, page_size)
    expected = brute_force_page_scores(query, keys, page_size, spread, aggregation)
    actual = page_scores(query, low, high, spread, aggregation)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["max", "sum", "none"])
@pytest.mark.parametrize("page_budget", [1, 2, 5, 9, 40])
def test_selection_matches_brute_force_up_to_ties(aggregation, page_budget):
    torch.manual_seed(page_budget)
    page_size, length = 16, 140  # 9 pages, the last one partial
    query, keys = torch.randn(3, 6, 8), torch.randn(3, 2, length, 8)
    low, high = page_minmax(keys, page_size)
    scores = page_scores(query, low, high, 1.0, aggregation)
    num_pages = scores.shape[-1]
    chosen = select_pages(scores, page_budget, num_pages - 1)
    expected = brute_force_selection(scores, page_budget, num_pages)
    rows = chosen.reshape(-1, chosen.shape[-1]).tolist()
    assert len(rows) == len(expected)
    for got, want, row in zip(rows, expected, scores.reshape(-1, num_pages).tolist()):
        assert len(set(got)) == len(got) == min(page_budget, num_pages)
        assert num_pages - 1 in got
        # Up to ties: every chosen page scores at least as high as the worst page the brute force kept.
        worst_kept = min((row[p] for p in want if p != num_pages - 1), default=float("inf"))
        assert all(row[p] >= worst_kept - 1e-6 for p in got if p != num_pages - 1)


def test_selection_respects_invalid_and_sink_pages():
    scores = torch.tensor([[[9.0, 8.0, 1.0, 2.0, 0.0, 5.0]]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    chosen = select_pages(scores, 3, current_page=5, page_valid=valid, sink_page=torch.tensor([2]))
    assert chosen.tolist() == [[[1, 2, 5]]]


def test_masked_attention_equals_softmax_over_exactly_the_selected_keys():
    torch.manual_seed(0)
    query, keys, values = torch.randn(2, 6, 8), torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    mask = torch.rand(2, 6, 50) < 0.3
    mask[..., -1] = True
    out = masked_decode_attention(query, keys, values, mask, scaling=0.35)
    for b in range(2):
        for h in range(6):
            idx = mask[b, h].nonzero().squeeze(-1)
            k, v = keys[b, h // 2, idx], values[b, h // 2, idx]
            expected = torch.softmax((k @ query[b, h]) * 0.35, dim=0) @ v
            torch.testing.assert_close(out[b, h], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["max", "none"])
def test_quest_decode_with_full_budget_is_dense_attention(aggregation):
    query, keys, values = torch.randn(2, 4, 8), torch.randn(2, 2, 90, 8), torch.randn(2, 2, 90, 8)
    low, high = page_minmax(keys, 16)
    config = QuestConfig(budget=96, page_size=16, aggregation=aggregation)
    out, pages = quest_decode(query, keys, values, low, high, None, config, 0.3)
    assert pages.shape[-1] == 6
    expected = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None], keys.repeat_interleave(2, dim=1), values.repeat_interleave(2, dim=1), scale=0.3
    )[:, :, 0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_token_mask_covers_selected_pages_only():
    mask = pages_to_token_mask(torch.tensor([[[0, 2]]]), num_pages=3, page_size=4, length=10)
    assert mask.int().tolist() == [[[1, 1, 1, 1, 0, 0, 0, 0, 1, 1]]]


def test_append_pages_with_ragged_device_lengths_equals_recomputation():
    page_size = 16
    keys = torch.randn(3, 2, 96, 8)
    lengths = torch.tensor([17, 32, 90], dtype=torch.int32)
    page_min = torch.zeros(3, 2, 6, 8)
    page_max = torch.zeros(3, 2, 6, 8)
    append_pages(page_min, page_max, keys, lengths, page_size)
    for b, n in enumerate(lengths.tolist()):
        page = (n - 1) // page_size
        low, high = page_minmax(keys[b : b + 1, :, :n], page_size)
        assert torch.equal(page_min[b, :, page], low[0, :, page]) and torch.equal(page_max[b, :, page], high[0, :, page])
        untouched = [p for p in range(6) if p != page]
        assert not page_min[b, :, untouched].any()  # only the newest token's page is written


@pytest.mark.parametrize("recent_pages", [0, 2])
def test_selection_with_device_current_page_equals_python_index(recent_pages):
    scores = torch.randn(2, 3, 12)
    expected = select_pages(scores, 6, current_page=9, recent_pages=recent_pages)
    actual = select_pages(scores, 6, current_page=torch.tensor([9, 9]), recent_pages=recent_pages)
    assert torch.equal(actual, expected)
    assert all(p in row for row in actual.reshape(-1, 6).tolist() for p in range(9 - recent_pages, 10))


# -- page_summary="centroids": two 2-means centroids per page in the min/max slots ----------------------------------


def brute_force_two_means(points: torch.Tensor, iterations: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented 2-means written as a plain loop over points (float64): farthest-point seeding, Lloyd steps."""
    points = points.double()
    mean = points.mean(0)
    a = points[max(range(len(points)), key=lambda i: float(((points[i] - mean) ** 2).sum()))].clone()
    b = points[max(range(len(points)), key=lambda i: float(((points[i] - a) ** 2).sum()))].clone()
    for _ in range(iterations):
        near_b = [bool(((p - b) ** 2).sum() < ((p - a) ** 2).sum()) for p in points]
        members_a = [p for p, nb in zip(points, near_b) if not nb]
        members_b = [p for p, nb in zip(points, near_b) if nb]
        a = torch.stack(members_a).mean(0) if members_a else a
        b = torch.stack(members_b).mean(0) if members_b else b
    return a, b


@pytest.mark.parametrize("length", [1, 16, 23, 64])
def test_page_centroids_match_a_per_page_two_means(length):
    torch.manual_seed(length)
    page_size = 16
    keys = torch.randn(2, 3, length, 8)
    a, b = page_centroids(keys, page_size)
    for p in range(math.ceil(length / page_size)):
        for bi in range(2):
            for h in range(3):
                ea, eb = brute_force_two_means(keys[bi, h, p * page_size : (p + 1) * page_size])
                torch.testing.assert_close(a[bi, h, p].double(), ea, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(b[bi, h, p].double(), eb, rtol=1e-5, atol=1e-5)


def test_page_centroids_recover_two_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0, 0], [-5.0, 1, 0, 0]])
    members = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1])
    keys = (centres[members] + 0.1 * torch.randn(16, 4))[None, None]
    a, b = page_centroids(keys, 16)
    found = sorted([a[0, 0, 0], b[0, 0, 0]], key=lambda c: float(c[0]))
    torch.testing.assert_close(found[0], keys[0, 0][members == 1].mean(0))
    torch.testing.assert_close(found[1], keys[0, 0][members == 0].mean(0))


@pytest.mark.parametrize("length", [1, 16, 23, 64])
def test_page_mean_box_is_the_box_centred_on_the_mean_key(length):
    keys = torch.randn(2, 3, length, 8)
    low, high = page_mean_box(keys, 16)
    for p in range(math.ceil(length / 16)):
        page = keys[:, :, p * 16 : (p + 1) * 16]
        half_width = (page.amax(dim=2) - page.amin(dim=2)) / 2
        torch.testing.assert_close(low[:, :, p], page.mean(dim=2) - half_width)
        torch.testing.assert_close(high[:, :, p], page.mean(dim=2) + half_width)
    # Scored like the min/max box: q.mean + spread |q|.r.
    query = torch.randn(2, 6, 8)
    mean_score = (query.view(2, 3, 2, 8)[..., None, :] * keys.view(2, 3, 1, -1, 8)[..., :16, :].mean(-2, keepdim=True)).sum(-1)
    radius = (keys[:, :, :16].amax(2) - keys[:, :, :16].amin(2)) / 2
    width = (query.view(2, 3, 2, 8).abs() * radius[:, :, None]).sum(-1)
    expected = (mean_score[..., 0] + 0.5 * width).view(2, 6)
    torch.testing.assert_close(page_scores(query, low, high, 0.5, "none")[:, :, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("summary", ["centroids", "mean"])
def test_summary_metadata_by_refresh_and_by_append_equal_recomputation(summary):
    page_size, capacity = 16, 96
    keys = torch.randn(2, 2, capacity, 8)
    page_min, page_max = torch.zeros(2, 2, capacity // page_size, 8), torch.zeros(2, 2, capacity // page_size, 8)
    app_min, app_max = page_min.clone(), page_max.clone()
    refresh_pages(page_min, page_max, keys, 0, 21, page_size, summary)
    refresh_pages(app_min, app_max, keys, 0, 21, page_size, summary)
    for end in range(22, 90):
        refresh_pages(page_min, page_max, keys, end - 1, end, page_size, summary)
        append_pages(app_min, app_max, keys, torch.full((2,), end), page_size, summary)
        a, b = page_summary(keys[:, :, :end], page_size, summary)
        pages = a.shape[2]
        for got_a, got_b in ((page_min, page_max), (app_min, app_max)):
            torch.testing.assert_close(got_a[:, :, :pages], a, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_b[:, :, :pages], b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["max", "sum", "none"])
def test_centroid_page_scores_are_the_best_centroid_dot_product(aggregation):
    query, low, high = torch.randn(2, 6, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    per_head = torch.empty(2, 6, 5)
    for b in range(2):
        for h in range(6):
            for p in range(5):
                per_head[b, h, p] = max(float(query[b, h] @ low[b, h // 3, p]), float(query[b, h] @ high[b, h // 3, p]))
    grouped = per_head.view(2, 2, 3, 5)
    expected = {"max": grouped.amax(2), "sum": grouped.sum(2), "none": per_head}[aggregation]
    actual = page_scores(query, low, high, 0.7, aggregation, "centroids")  # spread has no effect here
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
