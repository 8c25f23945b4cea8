"""Times one Quest decode step with its rows (KV heads) split into groups whose kernels overlap on several streams.

Each group runs the same three kernels (score, select, attend) on a slice of the heads. The baseline is one group
on the caller's stream, as the library runs a step. "parallel": every group on
its own stream from the start; "pipelined": the groups' scoring kernels in a row on one stream, each group's
select and attention on its own stream once its scores are there, so they run under the next group's scoring.
Batch 1, fp16, cold L2 as in benchmarks/attention.py. Prints a table and writes JSON.

    python benchmarks/overlap_probe.py --out benchmarks/results/overlap-probe-h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import SHAPES, GraphTimer, environment, load_cuda_kernel  # noqa: E402


def group_buffers(tensors, groups: int, page_size: int, page_budget: int) -> list:
    """Scores, indices and output of each group, allocated once: a buffer freed while another stream still uses it
    could be handed to the next group's allocation."""
    query, keys = tensors[0], tensors[1]
    kg, qg = keys.shape[1] // groups, query.shape[1] // groups
    num_pages = math.ceil(keys.shape[2] / page_size)
    return [
        (
            torch.empty(1, kg, num_pages, dtype=torch.float32, device="cuda"),
            torch.empty(1, kg, min(page_budget, num_pages), dtype=torch.int32, device="cuda"),
            torch.empty(1, qg, query.shape[2], dtype=query.dtype, device="cuda"),
        )
        for _ in range(groups)
    ]


def group_step(kernel, tensors, buffers, mode: str, streams, page_size: int, scale: float) -> list:
    """One step over len(buffers) groups of heads in `mode` ("serial", "parallel" or "pipelined"); the outputs."""
    query, keys, values, page_min, page_max, seq_lens = tensors
    groups = len(buffers)
    q_heads, kv_heads = query.shape[1], keys.shape[1]
    qg, kg = q_heads // groups, kv_heads // groups
    main = torch.cuda.current_stream()
    length = keys.shape[2]
    outs = []
    score_stream = streams[-1]
    if mode != "serial":
        score_stream.wait_stream(main)
    for g, stream in enumerate(streams[:groups]):
        q = query[:, g * qg : (g + 1) * qg]
        k, v = keys[:, g * kg : (g + 1) * kg], values[:, g * kg : (g + 1) * kg]
        pmin, pmax = page_min[:, g * kg : (g + 1) * kg], page_max[:, g * kg : (g + 1) * kg]
        scores, indices, out = buffers[g]
        if mode == "serial":  # everything on the caller's stream, as the library runs it
            kernel.page_scores(scores, q, pmin, pmax, None, seq_lens, length, 0.5, 0, 0, page_size, k, "mean")
            kernel.select_pages(indices, scores, True)
            kernel.sparse_decode(out, q, k, v, indices, None, seq_lens, length, scale, page_size, False)
            outs.append(out)
            continue
        if mode == "parallel":
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                kernel.page_scores(scores, q, pmin, pmax, None, seq_lens, length, 0.5, 0, 0, page_size, k, "mean")
        else:
            with torch.cuda.stream(score_stream):
                kernel.page_scores(scores, q, pmin, pmax, None, seq_lens, length, 0.5, 0, 0, page_size, k, "mean")
            stream.wait_stream(score_stream)
        with torch.cuda.stream(stream):
            kernel.select_pages(indices, scores, True)
            kernel.sparse_decode(out, q, k, v, indices, None, seq_lens, length, scale, page_size, False)
        outs.append(out)
    if mode != "serial":
        for stream in [*streams[:groups], score_stream]:
            main.wait_stream(stream)
    return outs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overlap-probe-h100.json"))
    args = parser.parse_args(argv)
    kernel = load_cuda_kernel("benchmarks/overlap_probe.py")
    timer = GraphTimer(args.reps)
    page_size = 16
    rows = []
    print("| shape | context | one group us | groups | parallel us | pipelined us | outputs equal |")
    print("|---|---|---|---|---|---|---|")
    for shape in ("llama2-7b", "llama3-8b"):
        q_heads, kv_heads, dim = SHAPES[shape]
        for context in args.contexts:
            keys = torch.randn(1, kv_heads, context, dim, dtype=torch.float16, device="cuda")
            values = torch.randn_like(keys)
            query = torch.randn(1, q_heads, dim, dtype=torch.float16, device="cuda")
            num_pages = math.ceil(context / page_size)
            page_min = torch.empty(1, kv_heads, num_pages, dim, dtype=torch.float16, device="cuda")
            page_max = torch.empty_like(page_min)
            kernel.refresh_pages(page_min, page_max, keys, 0, context, page_size)
            seq_lens = torch.full((1,), context, dtype=torch.int32, device="cuda")
            tensors = (query, keys, values, page_min, page_max, seq_lens)
            scale = dim**-0.5
            budget_pages = args.budget // page_size
            streams = [torch.cuda.Stream() for _ in range(max(args.groups) + 1)]
            one = group_buffers(tensors, 1, page_size, budget_pages)
            reference = torch.cat(group_step(kernel, tensors, one, "serial", streams, page_size, scale), 1).clone()
            one_us = timer(lambda: group_step(kernel, tensors, one, "serial", streams, page_size, scale))
            for groups in args.groups:
                if kv_heads % groups:
                    continue
                result = {"shape": shape, "context": context, "budget": args.budget, "one_group_us": one_us, "groups": groups}
                buffers = group_buffers(tensors, groups, page_size, budget_pages)
                equal = True
                for mode in ("parallel", "pipelined"):
                    fn = lambda: group_step(kernel, tensors, buffers, mode, streams, page_size, scale)  # noqa: E731
                    out = torch.cat(fn(), 1)
                    torch.cuda.synchronize()
                    equal &= bool(torch.allclose(out.float(), reference.float(), atol=2e-3, rtol=0))
                    result[f"{mode}_us"] = timer(fn)
                result["outputs_equal"] = equal
                rows.append(result)
                print(
                    f"| {shape} | {context // 1024}K | {one_us:.1f} | {groups} | {result['parallel_us']:.1f} "
                    f"| {result['pipelined_us']:.1f} | {equal} |",
                    flush=True,
                )
            del keys, values, page_min, page_max
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(kernel), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
