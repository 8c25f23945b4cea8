"""Runs one Quest decode step's three kernels a few times, for Nsight Compute to profile the last round.

    ncu --clock-control none -k regex:"page_scores|select_pages|sparse_decode" --launch-skip 6 --launch-count 3 \
        --section SpeedOfLight --section WarpStateStats --section SourceCounters python benchmarks/ncu_step.py llama3-8b 32768
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import SHAPES, load_cuda_kernel  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=list(SHAPES))
    parser.add_argument("context", type=int)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    kernel = load_cuda_kernel("benchmarks/ncu_step.py")
    q_heads, kv_heads, dim = SHAPES[args.shape]
    keys = torch.randn(1, kv_heads, args.context, dim, dtype=torch.float16, device="cuda")
    values = torch.randn_like(keys)
    query = torch.randn(1, q_heads, dim, dtype=torch.float16, device="cuda")
    num_pages = math.ceil(args.context / args.page_size)
    page_min = torch.empty(1, kv_heads, num_pages, dim, dtype=torch.float16, device="cuda")
    page_max = torch.empty_like(page_min)
    kernel.refresh_pages(page_min, page_max, keys, 0, args.context, args.page_size)
    seq_lens = torch.full((1,), args.context, dtype=torch.int32, device="cuda")
    scores = torch.empty(1, kv_heads, num_pages, dtype=torch.float32, device="cuda")
    indices = torch.empty(1, kv_heads, min(args.budget // args.page_size, num_pages), dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    for _ in range(args.rounds):
        kernel.page_scores(
            scores, query, page_min, page_max, None, seq_lens, args.context, 0.5, 0, 0, args.page_size, keys, "mean"
        )
        kernel.select_pages(indices, scores, True)
        kernel.sparse_decode(
            out, query, keys, values, indices, None, seq_lens, args.context, dim**-0.5, args.page_size, False
        )
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
