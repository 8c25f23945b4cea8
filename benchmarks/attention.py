"""One decode step of one attention layer: the Quest kernels against dense SDPA decode, in the same run.

Every measurement is a CUDA graph of ten (L2 flush, step) pairs minus a graph of the ten flushes, timed with CUDA
events (median of the replays), divided by ten: the step's cost inside a model-level graph, cold L2. The Quest
step is `decode` as the static cache runs it (lengths on the device, the mean-box decode append fused into the
scoring launch): page scoring + top-k selection + sparse attention (+ the split merge); the per-op breakdown times
each op in its own graph, and "score + fused append" the scoring launch that also does the append. "floor" is the
time to read the bytes the step must read (dense: all keys and values; Quest: the page metadata and the selected
pages) at the copy bandwidth measured at the start of the run.

    python benchmarks/attention.py                       # the full grid of the issue, JSON to benchmarks/results/
    python benchmarks/attention.py --quick               # budget 2048, batch 1, float16 only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from transformers_quest import backends  # noqa: E402

SHAPES = {  # query heads, KV heads, head dim
    "llama2-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),  # also Mistral-7B, Qwen3-8B
    "qwen2.5-7b": (28, 4, 128),  # groups of 7
    "smollm2-360m": (15, 5, 64),  # groups of 3, d 64
    "llama3.2-1b": (32, 8, 64),  # groups of 4, d 64
    "qwen2.5-0.5b": (14, 2, 64),  # groups of 7, d 64
}
ISSUE_SHAPES = ["llama2-7b", "llama3-8b"]  # the grid the speed targets are set on
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=ISSUE_SHAPES, choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--max-context-batched", type=int, default=32768, help="largest context for batch > 1")
    parser.add_argument("--budgets", nargs="+", type=int, default=[512, 2048, 4096])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20, help="timed graph replays per measurement")
    parser.add_argument("--quick", action="store_true", help="budget 2048, batch 1, float16")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.batches, args.dtypes = [2048], [1], ["float16"]
    return args


class GraphTimer:
    """Time of one step inside a CUDA graph, as in a model-level graph: no per-step graph launch is counted.

    The graph holds `steps` repetitions of (flush L2, step); a second graph holds the flushes alone; the step costs
    the difference of their median replay times divided by `steps`. The flush reads a buffer larger than L2 (a
    written one would leave dirty lines whose write-back would be charged to the step).
    """

    def __init__(self, reps: int, steps: int = 10):
        self.reps, self.steps = reps, steps
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush_buffer = torch.ones(max(4 * l2, 256 << 20) // 4, dtype=torch.float32, device="cuda")
        self.flush_us = None

    def _graph_us(self, body) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        graph.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3

    def __call__(self, fn) -> float:
        def flushes():
            for _ in range(self.steps):
                self.flush_buffer.max()

        def steps():
            for _ in range(self.steps):
                self.flush_buffer.max()
                fn()

        if self.flush_us is None:
            self.flush_us = self._graph_us(flushes)
        return (self._graph_us(steps) - self.flush_us) / self.steps


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * src.numel() / statistics.median(times)


def load_cuda_kernel(script: str):
    """The Quest CUDA kernels, or exit with the reason: the benchmarks measure nothing without them."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU.")
    backends.set_backend("cuda")
    kernel = backends.load_kernel()
    if kernel is None:
        raise SystemExit(f"The Quest CUDA kernels did not load: {backends.kernel_error()}")
    return kernel


def write_results(stem: str, env: dict, args: argparse.Namespace, rows: list[dict]) -> Path:
    """JSON with the environment and arguments to --out, or benchmarks/results/<stem>-<device>.json."""
    out = args.out or ROOT / "benchmarks" / "results" / f"{stem}-{env['device'].replace(' ', '-').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(out)}, "rows": rows}, indent=1))
    return out


def commit_id() -> str:
    """QUEST_COMMIT where the tree is a copy without git history (e.g. on a remote GPU machine), else git's HEAD."""
    commit = os.environ.get("QUEST_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return commit


def environment(kernel) -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit_id(),
        "kernel": getattr(kernel, "__file__", str(kernel)),
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_context(kernel, timer, shape, dtype_name, batch, context, budgets, page_size, bandwidth) -> list[dict]:
    q_heads, kv_heads, dim = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    element = torch.finfo(dtype).bits // 8
    keys = torch.randn(batch, kv_heads, context, dim, dtype=dtype, device="cuda")
    values = torch.randn_like(keys)
    query = torch.randn(batch, q_heads, dim, dtype=dtype, device="cuda")
    num_pages = math.ceil(context / page_size)
    page_min = torch.empty(batch, kv_heads, num_pages, dim, dtype=dtype, device="cuda")
    page_max = torch.empty_like(page_min)
    kernel.refresh_pages(page_min, page_max, keys, 0, context, page_size)
    scaling = dim**-0.5
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")

    query4 = query[:, :, None]
    gqa = q_heads != kv_heads
    sdpa_us = timer(lambda: F.scaled_dot_product_attention(query4, keys, values, scale=scaling, enable_gqa=gqa))
    dense_bytes = 2 * batch * kv_heads * context * dim * element
    append_us = timer(lambda: kernel.append_pages(page_min, page_max, keys, seq_lens, page_size))
    append_mean_us = timer(lambda: kernel.append_pages(page_min, page_max, keys, seq_lens, page_size, "mean"))

    rows = []
    for budget in budgets:
        page_budget = budget // page_size
        selected = min(page_budget, num_pages)

        def step():  # as the static cache runs it: lengths on the device, the decode append fused into scoring
            return kernel.decode(
                query, keys, values, page_min, page_max, None, page_size=page_size, page_budget=page_budget,
                scale=scaling, spread=0.5, keep_first_page=True, seq_lens=seq_lens, append_keys=keys, summary="mean",
            )

        quest_us = timer(step)
        scores = torch.empty(batch, kv_heads, num_pages, dtype=torch.float32, device="cuda")
        indices = torch.empty(batch, kv_heads, selected, dtype=torch.int32, device="cuda")
        out = torch.empty_like(query)
        score_us = timer(
            lambda: kernel.page_scores(scores, query, page_min, page_max, None, None, context, 1.0, 0, 0, page_size)
        )
        kernel.page_scores(scores, query, page_min, page_max, None, None, context, 1.0, 0, 0, page_size)
        score_append_us = timer(
            lambda: kernel.page_scores(
                scores, query, page_min, page_max, None, seq_lens, context, 1.0, 0, 0, page_size, keys, "mean"
            )
        )
        select_us = timer(lambda: kernel.select_pages(indices, scores, False))
        kernel.select_pages(indices, scores, False)
        attend_us = timer(
            lambda: kernel.sparse_decode(
                out, query, keys, values, indices, None, None, context, scaling, page_size, False
            )
        )
        quest_bytes = 2 * batch * kv_heads * (num_pages + selected * page_size) * dim * element
        rows.append(
            {
                "shape": shape,
                "dtype": dtype_name,
                "batch": batch,
                "context": context,
                "budget": budget,
                "sdpa_us": sdpa_us,
                "quest_us": quest_us,
                "speedup": sdpa_us / quest_us,
                "dense_floor_us": dense_bytes / bandwidth * 1e6,
                "quest_floor_us": quest_bytes / bandwidth * 1e6,
                "quest_floor_share": quest_bytes / bandwidth * 1e6 / quest_us,
                "score_us": score_us,
                "select_us": select_us,
                "attend_us": attend_us,
                "append_us": append_us,
                "append_share": append_us / quest_us,
                "append_mean_us": append_mean_us,
                "score_with_append_us": score_append_us,
                "fused_append_us": score_append_us - score_us,
                "fused_append_share": (score_append_us - score_us) / quest_us,
            }
        )
        print(format_row(rows[-1]), flush=True)
    del keys, values, page_min, page_max
    torch.cuda.empty_cache()
    return rows


HEADER = (
    "| shape | dtype | B | context | budget | SDPA us | Quest us | speedup | dense floor us | Quest floor us "
    "| Quest at floor | score us | select us | attend us | append us (share) | mean append us "
    "| score + fused append us (share) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    return (
        f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['context'] // 1024}K | {r['budget']} | {r['sdpa_us']:.1f} "
        f"| {r['quest_us']:.1f} | {r['speedup']:.2f}x | {r['dense_floor_us']:.1f} | {r['quest_floor_us']:.1f} "
        f"| {100 * r['quest_floor_share']:.0f}% | {r['score_us']:.1f} | {r['select_us']:.1f} | {r['attend_us']:.1f} "
        f"| {r['append_us']:.1f} ({100 * r['append_share']:.1f}%) | {r.get('append_mean_us', float('nan')):.1f} "
        f"| {r.get('score_with_append_us', float('nan')):.1f} "
        f"({100 * r.get('fused_append_share', float('nan')):.1f}%) |"
    )


TARGETS = {("llama2-7b", 32768): 6.0, ("llama2-7b", 131072): 10.0, ("llama3-8b", 32768): 4.0, ("llama3-8b", 131072): 8.0}


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["budget"] == 2048 and r["batch"] == 1 and (r["shape"], r["context"]) in TARGETS:
            want = TARGETS[(r["shape"], r["context"])]
            verdict = "met" if r["speedup"] >= want else "MISSED"
            lines.append(
                f"- {r['shape']} {r['dtype']} {r['context'] // 1024}K: {r['speedup']:.2f}x (target >= {want:g}x) {verdict}"
            )
    slower = [r for r in rows if r["context"] >= 4096 and r["speedup"] < 1.0]
    lines.append(f"- slower than dense at >= 4K: {len(slower)} of {len(rows)} configurations")
    worst_fused = max((r.get("fused_append_share", float("nan")) for r in rows), default=0.0)
    worst_alone = max((r["append_share"] for r in rows), default=0.0)
    lines.append(
        f"- metadata append fused into scoring (as decode runs it), largest share of a Quest step: "
        f"{100 * worst_fused:.1f}% (target <= 5%); as a launch of its own: {100 * worst_alone:.1f}%"
    )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    kernel = load_cuda_kernel("benchmarks/attention.py")
    bandwidth = copy_bandwidth()
    env = environment(kernel)
    env["copy_bandwidth_TBps"] = bandwidth / 1e12
    print(f"{env['device']}, torch {env['torch']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    timer = GraphTimer(args.reps)
    print(HEADER, flush=True)
    rows = []
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            for batch in args.batches:
                for context in args.contexts:
                    if batch > 1 and context > args.max_context_batched:
                        continue
                    rows += run_context(
                        kernel, timer, shape, dtype_name, batch, context, args.budgets, args.page_size, bandwidth
                    )
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))
    print("\nTargets (budget 2048, batch 1):")
    for line in target_lines(rows):
        print(line)
    print(f"\nwrote {write_results('attention', env, args, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
