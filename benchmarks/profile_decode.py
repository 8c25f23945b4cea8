"""Where a compiled decode step's GPU time goes: a kernel breakdown of dense and Quest ``generate`` side by side.

Builds a random-weight model of a real shape (``--layers`` keeps the per-layer costs while shortening the prefill),
prefills ``--context`` tokens into a static cache, lets ``generate`` compile and capture the decode step, then
profiles ``--tokens`` further decode steps with ``torch.profiler`` and groups the kernels by what they do
(matmuls, attention, Quest ops, fused elementwise, copies). Per decode step: wall time, GPU busy time (the sum of
kernel durations) and the idle rest (launch gaps, host work). Prints a table and writes JSON.

    python benchmarks/profile_decode.py --shape llama3-8b --layers 8 --context 131072
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import SHAPES, build_model, environment  # noqa: E402

import transformers_quest  # noqa: E402,F401  (registers attn_implementation="quest")
from transformers_quest import QuestCache  # noqa: E402

# First match wins; the names are those of cuBLAS/cuDNN/flash, inductor (triton_*) and this project's kernels.
CATEGORIES = (
    ("quest score", r"page_scores"),
    ("quest select", r"select_pages"),
    ("quest attend", r"sparse_decode|decode_kernel|merge"),
    ("quest metadata", r"append_pages|refresh_pages"),
    ("sdpa / flash", r"flash|fmha|attention|softmax"),
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|sm90|cublas|splitK|ampere"),
    ("inductor fused", r"^triton"),
    ("copy / index", r"copy|index|scatter|gather|fill|cat"),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def kernel_events(prof) -> list:
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@torch.inference_mode()
def profile_method(model, method: str, ids: torch.Tensor, args) -> dict:
    quest = method == "quest"
    model.set_attn_implementation("quest" if quest else "sdpa")
    capacity = ids.shape[1] + args.warmup + args.tokens + 64
    cache = (
        QuestCache(budget=args.budget, max_cache_len=capacity)
        if quest
        else StaticCache(config=model.config, max_cache_len=capacity)
    )
    for chunk in torch.split(ids[:, :-1], args.prefill_chunk, dim=1):
        model(chunk, past_key_values=cache, logits_to_keep=1)
    # Warm-up decode: compile and capture happen here; the cache then continues in the profiled call.
    out = model.generate(ids, past_key_values=cache, max_new_tokens=args.warmup, do_sample=False)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        model.generate(out, past_key_values=cache, max_new_tokens=args.tokens, do_sample=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    per_category: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for event in kernel_events(prof):
        duration = event.time_range.elapsed_us()
        per_category[category(event.name)] += duration
        per_kernel[event.name[:90]] += duration
    steps = args.tokens
    busy = sum(per_category.values()) / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "method": method,
        "wall_us_per_step": wall * 1e6 / steps,
        "gpu_busy_us_per_step": busy,
        "categories_us_per_step": {k: v / steps for k, v in sorted(per_category.items(), key=lambda kv: -kv[1])},
        "top_kernels_us_per_step": {k: v / steps for k, v in top},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (the shape's own: 32)")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=6, help="decode steps before profiling (compile, capture)")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps profiled")
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/profile_decode.py needs a CUDA GPU.")
    SHAPES[args.shape][0]["num_hidden_layers"] = args.layers
    model = build_model(args.shape)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.context), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    rows = [profile_method(model, method, ids, args) for method in ("dense", "quest")]
    labels = sorted({k for r in rows for k in r["categories_us_per_step"]},
                    key=lambda k: -max(r["categories_us_per_step"].get(k, 0.0) for r in rows))
    print(f"{args.shape}, {args.layers} layers, context {args.context}, batch {args.batch}, budget {args.budget} "
          f"({torch.cuda.get_device_name()}); us per decode step")
    print("| | " + " | ".join(r["method"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in ("wall_us_per_step", "gpu_busy_us_per_step"):
        print(f"| {key} | " + " | ".join(f"{r[key]:.0f}" for r in rows) + " |")
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{r['categories_us_per_step'].get(label, 0.0):.0f}" for r in rows) + " |")
    for r in rows:
        print(f"\n{r['method']}: top kernels (us per step)")
        for name, us in r["top_kernels_us_per_step"].items():
            print(f"  {us:8.1f}  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
