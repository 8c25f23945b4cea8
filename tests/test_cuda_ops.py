"""The CUDA kernels against the PyTorch reference, on fresh random inputs (run on a GPU; skipped elsewhere).

Metadata must be bit-exact; selected pages identical up to near-ties of the fp32 scores; attention within twice
the error that PyTorch's own attention makes at the same dtype (both against an fp32 computation).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_greedy_equal_up_to_near_ties
from transformers_quest import QuestCache, QuestConfig, backends, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
AGG = {"max": 0, "sum": 1, "none": 2}


@pytest.fixture(scope="module")
def kernel():
    module = backends.load_kernel()
    assert module is not None, f"CUDA kernels did not load: {backends.kernel_error()}"
    return module


def cache_buffers(batch, heads, length, dim, dtype, capacity=None, gen=None):
    """Keys as the cache holds them: a view [B, H, L, D] of a larger buffer (strides include the capacity)."""
    capacity = capacity or length + 37
    buffer = torch.randn(batch, heads, capacity, dim, generator=gen, device="cuda").to(dtype)
    return buffer[:, :, :length]


def padded_validity(batch, length, pads):
    valid = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    for b, pad in enumerate(pads):
        valid[b, :pad] = False
    return valid


# -- metadata ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("page_size", [16, 8, 32])
def test_refresh_pages_prefill_and_appends_are_bit_exact(kernel, dtype, dim, page_size):
    gen = torch.Generator(device="cuda").manual_seed(dim + page_size)
    batch, heads, capacity = 2, 3, 320
    keys = torch.randn(batch, heads, capacity, dim, generator=gen, device="cuda").to(dtype)
    pages = capacity // page_size
    page_min = torch.full((batch, heads, pages, dim), 7.0, dtype=dtype, device="cuda")
    page_max = torch.full_like(page_min, -7.0)
    kernel.refresh_pages(page_min, page_max, keys, 0, 100, page_size)  # prefill ending inside a page
    for end in list(range(101, 140)) + [capacity]:
        kernel.refresh_pages(page_min, page_max, keys, end - 1, end, page_size)  # single-token appends
    kernel.refresh_pages(page_min, page_max, keys, 139, capacity, page_size)  # a second, multi-page chunk
    low, high = reference.page_minmax(keys, page_size)
    assert torch.equal(page_min, low) and torch.equal(page_max, high)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_box_metadata_by_refresh_and_append_matches_the_reference(kernel, dtype):
    """page_summary="mean": the box centred on the page's mean key, within one rounding of the key dtype (the
    kernel sums the page sequentially in fp32, the reference with torch's reduction order)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    batch, heads, capacity, dim, page_size = 2, 3, 256, 128, 16
    keys = torch.randn(batch, heads, capacity, dim, generator=gen, device="cuda").to(dtype)
    page_min = torch.zeros(batch, heads, capacity // page_size, dim, dtype=dtype, device="cuda")
    page_max = torch.zeros_like(page_min)
    kernel.refresh_pages(page_min, page_max, keys, 0, 70, page_size, "mean")
    lengths = torch.tensor([70, 70], dtype=torch.int32, device="cuda")
    tolerance = 2 * torch.finfo(dtype).eps * 8  # |mean -+ r| < 8 for these keys: one rounding each way
    for step in range(30):
        lengths += 1
        kernel.append_pages(page_min, page_max, keys, lengths, page_size, "mean")
        length = int(lengths[0])
        low, high = reference.page_mean_box(keys[:, :, :length], page_size)
        used = low.shape[2]
        assert (page_min[:, :, :used].float() - low.float()).abs().max() <= tolerance, step
        assert (page_max[:, :, :used].float() - high.float()).abs().max() <= tolerance, step


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_pages_with_device_lengths_is_bit_exact(kernel, dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch, heads, capacity, dim, page_size = 3, 2, 256, 128, 16
    keys = torch.randn(batch, heads, capacity, dim, generator=gen, device="cuda").to(dtype)
    page_min = torch.zeros(batch, heads, capacity // page_size, dim, dtype=dtype, device="cuda")
    page_max = torch.zeros_like(page_min)
    lengths = torch.tensor([1, 50, 200], dtype=torch.int32, device="cuda")
    for b, length in enumerate(lengths.tolist()):  # state after each sequence's prefill of length - 1 tokens
        if length > 1:
            kernel.refresh_pages(page_min[b : b + 1], page_max[b : b + 1], keys[b : b + 1], 0, length - 1, page_size)
    for step in range(40):  # ragged decode appends, lengths on the device
        kernel.append_pages(page_min, page_max, keys, lengths, page_size)
        for b, length in enumerate(lengths.tolist()):
            low, high = reference.page_minmax(keys[b : b + 1, :, :length], page_size)
            used = low.shape[2]
            assert torch.equal(page_min[b : b + 1, :, :used], low), (step, b)
            assert torch.equal(page_max[b : b + 1, :, :used], high), (step, b)
        lengths += 1


# -- scoring and selection ---------------------------------------------------------------------------------------


def reference_masked_scores(query, page_min, page_max, key_valid, length, page_size, spread, aggregation):
    """Reference fp32 scores with the kernels' masking: -inf for pages without a valid token, +inf current page."""
    num_pages = math.ceil(length / page_size)
    scores = reference.page_scores(query, page_min[:, :, :num_pages], page_max[:, :, :num_pages], spread, aggregation)
    if key_valid is not None:
        pad = num_pages * page_size - length
        page_valid = torch.nn.functional.pad(key_valid[:, :length], (0, pad)).view(-1, num_pages, page_size).any(-1)
        scores = scores.masked_fill(~page_valid[:, None], float("-inf"))
    scores[:, :, num_pages - 1] = float("inf")
    return scores


SCORE_CASES = [
    # batch, q_heads, kv_heads, dim, length, page_size
    (1, 32, 32, 128, 4096, 16),
    (2, 32, 8, 128, 1000, 16),
    (3, 9, 3, 64, 777, 16),
    (2, 8, 1, 64, 513, 8),
    (1, 4, 4, 64, 16, 16),
    (2, 6, 2, 128, 70, 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCORE_CASES)
@pytest.mark.parametrize("aggregation", ["max", "sum", "none"])
@pytest.mark.parametrize("spread", [1.0, 0.5, 0.0])
def test_page_scores_match_reference(kernel, dtype, case, aggregation, spread):
    batch, q_heads, kv_heads, dim, length, page_size = case
    gen = torch.Generator(device="cuda").manual_seed(length)
    keys = cache_buffers(batch, kv_heads, length, dim, dtype, gen=gen)
    query = torch.randn(batch, q_heads, dim, generator=gen, device="cuda").to(dtype)
    low, high = reference.page_minmax(keys, page_size)
    valid = padded_validity(batch, length, [min(b * 37, length - 1) for b in range(batch)])
    num_pages = math.ceil(length / page_size)
    sel_heads = q_heads if aggregation == "none" else kv_heads
    scores = torch.full((batch, sel_heads, num_pages), float("nan"), device="cuda")
    kernel.page_scores(scores, query, low, high, valid, None, length, spread, AGG[aggregation], 0, page_size)
    expected = reference_masked_scores(query, low, high, valid, length, page_size, spread, aggregation)
    finite = expected.isfinite()
    assert torch.equal(scores.isfinite(), finite) and torch.equal(scores[~finite], expected[~finite])
    scale = query.float().abs().sum(-1).max() * keys.float().abs().max()
    torch.testing.assert_close(scores[finite], expected[finite], rtol=1e-5, atol=1e-5 * scale.item())


@pytest.mark.parametrize("dtype", DTYPES)
# batch 4: 12 to 80 rows, one append block for 16 (d 128) or 32 (d 64) of them, the last one partly used
@pytest.mark.parametrize("dim,q_heads,kv_heads", [(64, 9, 3), (128, 32, 8), (128, 4, 4), (128, 10, 5), (64, 40, 20)])
@pytest.mark.parametrize("summary", ["minmax", "mean"])
def test_page_scores_with_fused_append_equal_append_then_score(kernel, dtype, dim, q_heads, kv_heads, summary):
    """The decode append folded into the scoring launch: metadata bit-exact as `append_pages`, scores unchanged."""
    batch, capacity, page_size = 4, 704, 16
    gen = torch.Generator(device="cuda").manual_seed(dim + q_heads)
    keys = torch.randn(batch, kv_heads, capacity, dim, generator=gen, device="cuda").to(dtype)
    query = torch.randn(batch, q_heads, dim, generator=gen, device="cuda").to(dtype)
    lens = torch.tensor([641, 656, 657, 1], dtype=torch.int32, device="cuda")  # mid-page, page end, page start
    pages = capacity // page_size
    low = torch.empty(batch, kv_heads, pages, dim, dtype=dtype, device="cuda")
    high = torch.empty_like(low)
    kernel.refresh_pages(low, high, keys, 0, capacity, page_size, summary)
    expected_low, expected_high = low.clone(), high.clone()
    keys[torch.arange(batch), :, (lens - 1).long()] += 3  # the new tokens, not yet in the metadata
    kernel.append_pages(expected_low, expected_high, keys, lens, page_size, summary)
    expected_scores = torch.empty(batch, kv_heads, pages, device="cuda")
    args = (None, lens, capacity, 0.5, AGG["max"], 0, page_size)
    kernel.page_scores(expected_scores, query, expected_low, expected_high, *args)

    scores = torch.empty_like(expected_scores)
    kernel.page_scores(scores, query, low, high, *args, append_keys=keys, summary=summary)
    assert torch.equal(low, expected_low) and torch.equal(high, expected_high)
    assert torch.equal(scores, expected_scores)


@pytest.mark.parametrize("dtype", DTYPES)
def test_page_scores_two_vector_mode_is_max_of_dot_products(kernel, dtype):
    gen = torch.Generator(device="cuda").manual_seed(3)
    batch, q_heads, kv_heads, dim, pages, page_size = 2, 8, 2, 128, 40, 16
    first = torch.randn(batch, kv_heads, pages, dim, generator=gen, device="cuda").to(dtype)
    second = torch.randn(batch, kv_heads, pages, dim, generator=gen, device="cuda").to(dtype)
    query = torch.randn(batch, q_heads, dim, generator=gen, device="cuda").to(dtype)
    length = pages * page_size
    scores = torch.empty(batch, kv_heads, pages, device="cuda")
    kernel.page_scores(scores, query, second, first, None, None, length, 1.0, AGG["sum"], 1, page_size)
    q = query.float().view(batch, kv_heads, 4, dim)
    expected = torch.maximum(q @ first.float().transpose(-1, -2), q @ second.float().transpose(-1, -2)).sum(2)
    expected[:, :, -1] = float("inf")
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "rows,num_pages,k",
    [
        (1, 8192, 127),
        (32, 2048, 128),
        (5, 300, 1),
        (3, 77, 77),
        (4, 1500, 100),  # 3 pages a thread (512 threads)
        (2, 10000, 255),
        (1, 26000, 200),  # 26 pages a thread (1024 threads): the longest row staged in shared memory
        (1, 50000, 300),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_select_pages_is_exact_top_k(kernel, rows, num_pages, k, ties):
    gen = torch.Generator(device="cuda").manual_seed(num_pages + k)
    scores = torch.randn(1, rows, num_pages, generator=gen, device="cuda")
    if ties:
        scores = (scores * 2).round()  # many equal scores: the kernel keeps the lowest indices among ties
    scores[0, :, -1] = float("inf")
    scores[0, :, : num_pages // 10] = float("-inf")  # padding pages
    indices = torch.empty(1, rows, k, dtype=torch.int32, device="cuda")
    kernel.select_pages(indices, scores, False)
    # Stable descending sort gives the lowest index first among equal scores: the same rule.
    expected = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values
    assert torch.equal(indices.long(), expected)


def test_select_pages_keep_first_forces_first_valid_page(kernel):
    scores = torch.tensor([[[float("-inf"), float("-inf"), -5.0, 3.0, 1.0, 2.0, float("inf")]]], device="cuda")
    indices = torch.empty(1, 1, 3, dtype=torch.int32, device="cuda")
    kernel.select_pages(indices, scores, True)
    assert indices.tolist() == [[[2, 3, 6]]]


@pytest.mark.parametrize("rows,num_pages,k", [(8, 2048, 128), (2, 8192, 128), (1, 50000, 300)])
@pytest.mark.parametrize("ties", [False, True])
def test_select_pages_keep_first_is_exact_top_k_with_the_sink_forced(kernel, rows, num_pages, k, ties):
    """On long random rows: the first finite page ranks just below the forced (+inf) pages, the rest by score."""
    gen = torch.Generator(device="cuda").manual_seed(num_pages + 3 * k)
    scores = torch.randn(1, rows, num_pages, generator=gen, device="cuda") * 40  # a sink far below the top
    if ties:
        scores = scores.round()
    pads = torch.randint(0, num_pages // 4, (rows,), generator=gen, device="cuda")
    for row in range(rows):
        scores[0, row, : pads[row]] = float("-inf")
        scores[0, row, pads[row]] = scores[0, row].min().clamp(min=-1e4) - 1  # the sink: the lowest finite score
    scores[0, :, -1] = float("inf")
    indices = torch.empty(1, rows, k, dtype=torch.int32, device="cuda")
    kernel.select_pages(indices, scores, True)
    forced = scores.clone()
    forced[0, torch.arange(rows), pads] = torch.finfo(torch.float32).max
    expected = forced.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values
    assert torch.equal(indices.long(), expected)


# -- decode ------------------------------------------------------------------------------------------------------

DECODE_CASES = [
    # batch, q_heads, kv_heads, dim, length, budget, page_size, pads
    (1, 32, 32, 128, 4096, 512, 16, None),  # Llama-2 shape
    (1, 32, 8, 128, 4100, 2048, 16, None),  # Llama-3 shape, partial last page
    (3, 9, 3, 64, 1000, 128, 16, [0, 100, 333]),  # SmolLM2 shape, left padding
    (2, 8, 1, 64, 513, 64, 8, [5, 0]),  # MQA, page 8
    (2, 4, 4, 128, 200, 16, 16, None),  # budget of one page
    (2, 16, 2, 128, 300, 4096, 16, [0, 17]),  # budget >= context: every page
    (4, 8, 8, 64, 33, 32, 32, [0, 1, 2, 3]),  # tiny, pages of 32
    (2, 32, 4, 128, 20000, 1024, 16, [0, 4000]),  # many splits per row
    (2, 32, 8, 128, 33000, 4096, 16, [0, 300]),  # GQA with > 8 MiB selected: one block row per KV head
    (3, 28, 4, 128, 40007, 4096, 16, [0, 5000, 123]),  # the same for groups of 7 (the tensor-core tile's 8 head rows)
    (5, 16, 4, 64, 70001, 8192, 16, [0, 31, 0, 2, 900]),  # the same at d 64, groups of 4
]


def torch_error_at_dtype(query, keys, values, token_mask, scaling, expected):
    """Max error of PyTorch's own attention at the inputs' dtype (SDPA with a boolean mask) against fp32."""
    group = query.shape[1] // keys.shape[1]
    mask = token_mask if token_mask.shape[1] == query.shape[1] else token_mask.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None],
        keys.repeat_interleave(group, dim=1),
        values.repeat_interleave(group, dim=1),
        attn_mask=mask[:, :, None],
        scale=scaling,
    )[:, :, 0]
    return (out.float() - expected.float()).abs().max().item()


def reference_attention_on(indices, query, keys, values, key_valid, page_size, scaling):
    """fp32 attention over the tokens of the given pages (the kernel's own selection) and the validity mask."""
    length = keys.shape[2]
    num_pages = math.ceil(length / page_size)
    mask = reference.pages_to_token_mask(indices.long(), num_pages, page_size, length)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    q64, k64, v64 = query.double(), keys.double(), values.double()
    out = reference.masked_decode_attention(q64, k64, v64, mask, scaling)
    return out, mask


def assert_same_selection_up_to_ties(indices, expected_scores, page_budget):
    """Each row's selected set must be a top-k of the reference scores, allowing near-ties at the boundary."""
    k = indices.shape[-1]
    assert k == min(page_budget, expected_scores.shape[-1])
    ranked = expected_scores.sort(dim=-1, descending=True).values
    kth = ranked[..., k - 1 : k]  # [B, Hs, 1]
    chosen = torch.gather(expected_scores, -1, indices.long())
    assert torch.equal(indices.sort(-1).values, indices), "indices must be ascending"
    assert (indices[..., 1:] != indices[..., :-1]).all(), "indices must be distinct"
    tol = 1e-4 * (1 + kth.abs().clamp(max=1e30))
    assert (chosen >= kth - tol).all(), "a selected page scores below the reference k-th best"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("aggregation", ["max", "sum", "none"])
@pytest.mark.parametrize("keep_first_page", [False, True])
def test_decode_matches_reference(kernel, dtype, case, aggregation, keep_first_page):
    batch, q_heads, kv_heads, dim, length, budget, page_size, pads = case
    gen = torch.Generator(device="cuda").manual_seed(length + budget)
    keys = cache_buffers(batch, kv_heads, length, dim, dtype, gen=gen)
    values = cache_buffers(batch, kv_heads, length, dim, dtype, gen=gen)
    query = (2 * torch.randn(batch, q_heads, dim, generator=gen, device="cuda")).to(dtype)
    low, high = reference.page_minmax(keys, page_size)
    key_valid = padded_validity(batch, length, pads) if pads else None
    config = QuestConfig(
        budget=budget, page_size=page_size, aggregation=aggregation, keep_first_page=keep_first_page,
        page_summary="minmax",  # the metadata above
    )
    scaling = dim**-0.5

    out, indices = backends.CudaOps(kernel).decode(query, keys, values, low, high, key_valid, config, scaling)

    expected_scores = reference_masked_scores(
        query, low, high, key_valid, length, page_size, config.spread, aggregation
    )
    if keep_first_page:  # the kernel ranks the first valid page just below the current one
        first_valid = key_valid.int().argmax(-1) // page_size if key_valid is not None else [0] * batch
        for b in range(batch):
            column = expected_scores[b, :, int(first_valid[b])]
            column.copy_(torch.where(column == float("inf"), column, torch.full_like(column, 3e38)))
    assert_same_selection_up_to_ties(indices, expected_scores, config.page_budget)

    expected, mask = reference_attention_on(indices, query, keys, values, key_valid, page_size, scaling)
    kernel_error = (out.double() - expected).abs().max().item()
    torch_error = torch_error_at_dtype(query, keys, values, mask, scaling, expected)
    assert kernel_error <= 2 * torch_error + 1e-6, (kernel_error, torch_error)

    # And the whole step against the reference, wherever both picked the same pages.
    ref_out, ref_indices = reference.quest_decode(query, keys, values, low, high, key_valid, config, scaling)
    same = (ref_indices == indices.long()).all(-1)  # [B, Hs]
    if aggregation == "none":
        same_heads = same
    else:
        same_heads = same.repeat_interleave(q_heads // kv_heads, dim=1)
    diff = (out.float() - ref_out.float()).abs()[same_heads]
    assert diff.numel() == 0 or diff.max().item() <= 2 * torch_error + 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(32, 8, 128), (4, 4, 64), (9, 3, 64), (8, 1, 128)])
def test_attend_all_pages_equals_dense_attention(kernel, dtype, q_heads, kv_heads, dim):
    """The dense decode of layers and steps Quest leaves dense: every valid key, ragged lengths and padding."""
    batch, length, page_size = 3, 5000, 16
    gen = torch.Generator(device="cuda").manual_seed(q_heads + dim)
    keys = cache_buffers(batch, kv_heads, length, dim, dtype, gen=gen)
    values = cache_buffers(batch, kv_heads, length, dim, dtype, gen=gen)
    query = (2 * torch.randn(batch, q_heads, dim, generator=gen, device="cuda")).to(dtype)
    key_valid = padded_validity(batch, length, [0, 37, 1200])
    seq_lens = torch.tensor([length, length - 9, 3001], dtype=torch.int32, device="cuda")
    scaling = dim**-0.5

    out = backends.CudaOps(kernel).attend_all_pages(query, keys, values, key_valid, scaling, page_size, seq_lens)

    within = torch.arange(length, device="cuda")[None] < seq_lens[:, None]
    mask = (key_valid & within)[:, None, :].expand(batch, kv_heads, length)
    expected = reference.masked_decode_attention(query.double(), keys.double(), values.double(), mask, scaling)
    kernel_error = (out.double() - expected).abs().max().item()
    torch_error = torch_error_at_dtype(query, keys, values, mask, scaling, expected)
    assert kernel_error <= 2 * torch_error + 1e-6, (kernel_error, torch_error)


def test_attend_all_pages_leaves_unsupported_calls_to_sdpa(kernel):
    query = torch.randn(1, 4, 64, device="cuda")  # float32: no kernel
    keys = torch.randn(1, 2, 100, 64, device="cuda")
    assert backends.CudaOps(kernel).attend_all_pages(query, keys, keys, None, 0.125, 16) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_with_device_lengths_matches_each_sequence_alone(kernel, dtype):
    """Ragged batch through seq_lens (the CUDA-graph mode): each sequence equals a single-sequence reference."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    batch, q_heads, kv_heads, dim, capacity, page_size, budget = 3, 16, 4, 128, 3000, 16, 512
    keys = torch.randn(batch, kv_heads, capacity, dim, generator=gen, device="cuda").to(dtype)
    values = torch.randn(batch, kv_heads, capacity, dim, generator=gen, device="cuda").to(dtype)
    query = torch.randn(batch, q_heads, dim, generator=gen, device="cuda").to(dtype)
    lengths = [3000, 1234, 600]
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    low, high = reference.page_minmax(keys, page_size)
    out, indices = kernel.decode(
        query, keys, values, low, high, None, page_size=page_size, page_budget=budget // page_size,
        scale=dim**-0.5, seq_lens=seq_lens,
    )
    for b, length in enumerate(lengths):
        k, v = keys[b : b + 1, :, :length], values[b : b + 1, :, :length]
        chosen = indices[b : b + 1]
        assert (chosen.long() * page_size < length).all()  # every sequence has more pages than the budget
        expected_scores = reference_masked_scores(query[b : b + 1], low[b : b + 1], high[b : b + 1], None, length,
                                                  page_size, 1.0, "max")
        assert_same_selection_up_to_ties(chosen, expected_scores, budget // page_size)
        expected, mask = reference_attention_on(chosen, query[b : b + 1], k, v, None, page_size, dim**-0.5)
        torch_error = torch_error_at_dtype(query[b : b + 1], k, v, mask, dim**-0.5, expected)
        assert (out[b : b + 1].double() - expected).abs().max().item() <= 2 * torch_error + 1e-6


def test_decode_runs_inside_a_cuda_graph_with_changing_lengths(kernel):
    batch, q_heads, kv_heads, dim, capacity, page_size = 2, 8, 2, 128, 2048, 16
    keys = torch.randn(batch, kv_heads, capacity, dim, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)
    query = torch.randn(batch, q_heads, dim, device="cuda", dtype=torch.float16)
    low, high = reference.page_minmax(keys, page_size)
    seq_lens = torch.tensor([1000, 2000], dtype=torch.int32, device="cuda")

    def step():
        return kernel.decode(query, keys, values, low, high, None, page_size=page_size, page_budget=16,
                             scale=dim**-0.5, seq_lens=seq_lens)

    eager_out, _ = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, _ = step()
    graph.replay()
    torch.testing.assert_close(graph_out, eager_out, rtol=0, atol=0)
    seq_lens.copy_(torch.tensor([500, 1500], dtype=torch.int32))
    graph.replay()
    fresh_out, _ = step()
    torch.testing.assert_close(graph_out, fresh_out, rtol=0, atol=0)
    assert not torch.equal(graph_out, eager_out)


def test_decode_graph_on_a_fresh_stream_needs_no_other_graph_replayed_first(kernel):
    """The split counters first used inside a capture are zero before any replay: a second graph captured on the
    same stream replays correctly although the first graph (the one that created them) never ran."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    q_heads, kv_heads, dim, length, page_size = 32, 8, 128, 8192, 16
    keys = torch.randn(1, kv_heads, length, dim, generator=gen, device="cuda").half()
    values = torch.randn(1, kv_heads, length, dim, generator=gen, device="cuda").half()
    query = torch.randn(1, q_heads, dim, generator=gen, device="cuda").half()
    low, high = reference.page_minmax(keys, page_size)

    def step():
        return kernel.decode(query, keys, values, low, high, None, page_size=page_size, page_budget=128,
                             scale=dim**-0.5)[0]

    eager = step()
    capture_stream = torch.cuda.Stream()
    first, second = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(first, stream=capture_stream):
        step()
    with torch.cuda.graph(second, stream=capture_stream):
        out = step()
    second.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


def test_decode_on_concurrent_streams_equals_each_alone(kernel):
    """Split-K hand-off counters are per stream: steps racing on four streams give the results each gives alone."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    q_heads, kv_heads, dim, length, page_size = 32, 8, 128, 8192, 16
    problems = []
    for _ in range(4):
        keys = torch.randn(1, kv_heads, length, dim, generator=gen, device="cuda").half()
        values = torch.randn(1, kv_heads, length, dim, generator=gen, device="cuda").half()
        query = torch.randn(1, q_heads, dim, generator=gen, device="cuda").half()
        low, high = reference.page_minmax(keys, page_size)
        problems.append((query, keys, values, low, high))

    def step(problem):
        query, keys, values, low, high = problem
        return kernel.decode(query, keys, values, low, high, None, page_size=page_size, page_budget=128,
                             scale=dim**-0.5)[0]

    alone = [step(problem) for problem in problems]
    streams = [torch.cuda.Stream() for _ in problems]
    main = torch.cuda.current_stream()
    for _ in range(20):
        outs = []
        for stream, problem in zip(streams, problems):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(step(problem))
        for stream, out in zip(streams, outs):
            main.wait_stream(stream)
            out.record_stream(main)
        for out, expected in zip(outs, alone):
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_ops_pass_opcheck(kernel):
    """Schemas, fake (meta) implementations and torch.compile tracing of every op."""
    ops = kernel.ops
    keys = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)
    query = torch.randn(1, 4, 64, device="cuda", dtype=torch.float16)
    low, high = reference.page_minmax(keys, 16)
    low, high = low.clone(), high.clone()
    lens = torch.tensor([64], dtype=torch.int32, device="cuda")
    scores = torch.empty(1, 2, 4, device="cuda")
    indices = torch.empty(1, 2, 2, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    kernel.page_scores(scores, query, low, high, None, None, 64, 1.0, 0, 0, 16)
    kernel.select_pages(indices, scores, False)
    cases = [
        (ops.refresh_pages, (low, high, keys, 0, 64, 16)),
        (ops.append_pages, (low, high, keys, lens, 16)),
        (ops.page_scores, (scores, query, low, high, None, lens, 64, 1.0, 0, 0, 16)),
        (ops.page_scores, (scores, query, low, high, None, lens, 64, 1.0, 0, 0, 16, keys, 1)),
        (ops.select_pages, (indices, scores, True)),
        (ops.sparse_decode, (out, query, keys, values, indices, None, lens, 64, 0.125, 16, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# -- through the model -------------------------------------------------------------------------------------------


def tiny_llama(q_heads, kv_heads, head_dim, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=q_heads * head_dim,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        initializer_range=0.2,  # peaky logits: greedy choices are not near-ties
        attn_implementation="quest",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128)])
def test_generate_equals_torch_backend(kernel, dtype, q_heads, kv_heads, head_dim):
    """Greedy generation through the model equals the PyTorch backend's, up to near-ties of the next-token logits.

    Both backends accumulate in fp32 but round differently, so where the torch backend's two best logits are
    within rounding of each other the paths may legitimately part; only such a step may differ.
    """
    model = tiny_llama(q_heads, kv_heads, head_dim, dtype)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 700), generator=gen).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :90] = 0  # left padding
    outputs = {}
    try:
        for name in ("torch", "cuda"):
            backends.set_backend(name)
            # The paper's bound spreads page scores widely, so the backends' different fp32 summation orders do
            # not reorder pages at the selection boundary over 24 chained steps; selection under the default
            # (centred) score is compared op by op, up to ties, in test_decode_matches_reference.
            cache = QuestCache(config=QuestConfig.paper(128, page_size=16, dense_layers=0))
            with torch.no_grad():
                outputs[name] = model.generate(
                    input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=24,
                    do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                )
            assert cache.stats.read_fraction < 0.5  # the sparse path ran
    finally:
        backends.set_backend("auto")
    assert_greedy_equal_up_to_near_ties(outputs["cuda"], outputs["torch"], 700, dtype)
