"""Where a Quest decode step's fixed cost comes from: each kernel cold (after an L2 flush) and again right after
itself (warm), next to the cost of a near-empty kernel and of one cold read.

`benchmarks/attention.py` times every op after a flush of L2. Each Quest kernel then costs ~5-10 us more than its
bytes at full bandwidth. This probe splits that into the kernel boundary (a one-element write), one cold DRAM
read (a 16-byte copy from the key cache), and what the op itself loses to a cold L2 and TLB (op twice minus op
once, against op once), and the attention over every page (a dense one-token step). "touch + attend" first reads one element in every 2 MiB of the key and value caches, so
the attention's first accesses find their translations already walked: if that makes the pair cheaper than the
two alone, the attention waits on page-table walks.

The second table times the attention alone against the number of pages each row selects (random distinct pages,
1 to 512): what stays at one page is the kernel's fixed cost, the rest grows with the bytes.

    python benchmarks/latency_probe.py        # table on stdout, JSON to benchmarks/results/latency-probe-<device>.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import DTYPES, SHAPES, GraphTimer, environment, load_cuda_kernel, write_results  # noqa: E402

CASES = [("llama3-8b", 32768), ("llama3-8b", 131072), ("llama2-7b", 32768)]
TOUCH_BYTES = 2 << 20  # one read per 2 MiB: the GPU's large-page size
SELECTED_PAGES = [1, 4, 16, 64, 128, 256, 512]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def probe_case(kernel, timer, shape: str, context: int, dtype: torch.dtype, budget: int, page_size: int) -> dict:
    q_heads, kv_heads, dim = SHAPES[shape]
    keys = torch.randn(1, kv_heads, context, dim, dtype=dtype, device="cuda")
    values = torch.randn_like(keys)
    query = torch.randn(1, q_heads, dim, dtype=dtype, device="cuda")
    num_pages = math.ceil(context / page_size)
    page_min = torch.empty(1, kv_heads, num_pages, dim, dtype=dtype, device="cuda")
    page_max = torch.empty_like(page_min)
    kernel.refresh_pages(page_min, page_max, keys, 0, context, page_size)
    seq_lens = torch.full((1,), context, dtype=torch.int32, device="cuda")
    scores = torch.empty(1, kv_heads, num_pages, dtype=torch.float32, device="cuda")
    selected = min(budget // page_size, num_pages)
    indices = torch.empty(1, kv_heads, selected, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    scale = dim**-0.5

    one = torch.zeros(1, device="cuda")
    small = torch.empty(8, dtype=dtype, device="cuda")
    flat_keys, flat_values = keys.view(-1), values.view(-1)
    far = flat_keys.numel() // 2 + 12345
    stride = TOUCH_BYTES // keys.element_size()
    touch_index = torch.arange(0, flat_keys.numel(), stride, device="cuda")
    touched = torch.empty(2, touch_index.numel(), dtype=dtype, device="cuda")

    def score():
        kernel.page_scores(scores, query, page_min, page_max, None, seq_lens, context, 0.5, 0, 0, page_size, keys, "mean")

    def select():
        kernel.select_pages(indices, scores, True)

    def attend():
        kernel.sparse_decode(out, query, keys, values, indices, None, seq_lens, context, scale, page_size, False)

    all_pages = torch.arange(num_pages, dtype=torch.int32, device="cuda").expand(1, kv_heads, -1).contiguous()

    def attend_all():  # a dense one-token step as the cache runs it: the attention kernel over every page
        kernel.sparse_decode(out, query, keys, values, all_pages, None, seq_lens, context, scale, page_size, False)

    def touch():
        torch.index_select(flat_keys, 0, touch_index, out=touched[0])
        torch.index_select(flat_values, 0, touch_index, out=touched[1])

    def step():
        kernel.decode(
            query, keys, values, page_min, page_max, None, page_size=page_size, page_budget=budget // page_size,
            scale=scale, spread=0.5, keep_first_page=True, seq_lens=seq_lens, append_keys=keys, summary="mean",
        )

    score()
    select()

    def twice(fn):
        return lambda: (fn(), fn())

    timings = {
        "one_element_write": timer(lambda: one.fill_(1.0)),
        "one_cold_read": timer(lambda: small.copy_(flat_keys[far : far + 8])),
        "two_cold_reads": timer(lambda: (small.copy_(flat_keys[far : far + 8]), small.copy_(flat_values[far : far + 8]))),
        "touch": timer(touch),
    }
    for name, fn in [("score", score), ("select", select), ("attend", attend), ("step", step)]:
        cold = timer(fn)
        both = timer(twice(fn))
        timings[name] = cold
        timings[f"{name}_warm"] = both - cold
    timings["attend_all_pages"] = timer(attend_all)
    timings["touch_then_attend"] = timer(lambda: (touch(), attend()))
    timings["attend_after_touch"] = timings["touch_then_attend"] - timings["touch"]
    timings["attend_by_pages"] = attend_by_pages(kernel, timer, query, keys, values, seq_lens, scale, page_size)
    del keys, values, page_min, page_max
    torch.cuda.empty_cache()
    return {"shape": shape, "context": context, "budget": budget, "touch_reads": 2 * touch_index.numel()} | timings


def attend_by_pages(kernel, timer, query, keys, values, seq_lens, scale: float, page_size: int) -> dict:
    """Attention cold and warm for each count in SELECTED_PAGES of random distinct pages per row."""
    batch, kv_heads, context, _ = keys.shape
    num_pages = math.ceil(context / page_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = torch.empty_like(query)
    result = {}
    for count in SELECTED_PAGES:
        rows = [torch.randperm(num_pages, generator=gen, device="cuda")[:count].sort().values for _ in range(kv_heads)]
        indices = torch.stack(rows).to(torch.int32)[None].expand(batch, -1, -1).contiguous()

        def attend():
            kernel.sparse_decode(out, query, keys, values, indices, None, seq_lens, context, scale, page_size, False)

        cold = timer(attend)
        result[str(count)] = {"cold": cold, "warm": timer(lambda: (attend(), attend())) - cold}
    return result


COLUMNS = [
    "one_element_write", "one_cold_read", "two_cold_reads", "touch", "score", "score_warm", "select", "select_warm",
    "attend", "attend_warm", "attend_after_touch", "step", "step_warm", "attend_all_pages",
]


def main(argv=None) -> int:
    args = parse_args(argv)
    kernel = load_cuda_kernel("benchmarks/latency_probe.py")
    env = environment(kernel)
    timer = GraphTimer(args.reps)
    rows = [
        probe_case(kernel, timer, shape, context, DTYPES[args.dtype], args.budget, args.page_size)
        for shape, context in CASES
    ]
    print(f"{env['device']}, budget {args.budget}, {args.dtype}, batch 1; microseconds, cold = after an L2 flush")
    print("| case | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = " | ".join(f"{r[c]:.1f}" for c in COLUMNS)
        print(f"| {r['shape']} {r['context'] // 1024}K | {cells} |")
    print("\nattention alone, cold / warm, against the pages each row selects")
    print("| case | " + " | ".join(str(n) for n in SELECTED_PAGES) + " |")
    print("|---|" + "---|" * len(SELECTED_PAGES))
    for r in rows:
        cells = " | ".join(f"{r['attend_by_pages'][str(n)]['cold']:.1f} / {r['attend_by_pages'][str(n)]['warm']:.1f}"
                          for n in SELECTED_PAGES)
        print(f"| {r['shape']} {r['context'] // 1024}K | {cells} |")
    print(f"wrote {write_results('latency-probe', env, args, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
