"""End-to-end decode latency through ``model.generate``: dense vs Quest, eager vs compiled, on random weights.

Methods, each timed in the same run on the same prompt:
    dense-eager      DynamicCache, SDPA, no compile (transformers' default)
    dense-compiled   StaticCache, SDPA, generate's automatic compile + CUDA graphs (the fastest dense path)
    quest-eager      QuestCache(max_cache_len=...), attn_implementation="quest", no compile
    quest-compiled   the same cache, compiled + CUDA graphs like dense-compiled
    quest-growing    (on request) QuestCache without capacity, eager: reallocates as it grows

The prompt is prefilled in chunks outside the timed decode (so long batches fit), then ``generate`` decodes
``--new-tokens`` tokens; a streamer stamps every token, and the per-token latency is the median interval after
``--warmup`` tokens (the first decode steps of a compiled run include compilation and graph capture).

    python benchmarks/e2e.py --shape llama2-7b --contexts 8192 32768 65536 --batch 1
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.generation.streamers import BaseStreamer

import transformers_quest
from transformers_quest import QuestCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import commit_id  # noqa: E402

SHAPES = {
    # name: (config kwargs, dtype)
    "llama2-7b": (
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=262144),
        torch.float16,
    ),
    "llama3-8b": (
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=262144),
        torch.bfloat16,
    ),
}
METHODS = ("dense-eager", "dense-compiled", "quest-eager", "quest-compiled")
OPTIONAL_METHODS = ("quest-growing",)


class TokenClock(BaseStreamer):
    """Stamps the wall time at which each new token reaches the host (``put`` syncs through ``.cpu()``)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        value.cpu()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def build_model(shape: str) -> LlamaForCausalLM:
    kwargs, dtype = SHAPES[shape]
    config = LlamaConfig(**kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model.eval()


def make_cache(method: str, model, budget: int, capacity: int, batch: int):
    if method == "dense-eager":
        return DynamicCache()
    if method == "dense-compiled":
        return StaticCache(config=model.config, max_cache_len=capacity)
    if method == "quest-growing":
        return QuestCache(budget=budget)
    return QuestCache(budget=budget, max_cache_len=capacity)


@torch.inference_mode()
def run_one(model, method: str, ids: torch.Tensor, args) -> dict:
    model.set_attn_implementation("quest" if method.startswith("quest") else "sdpa")
    capacity = ids.shape[1] + args.new_tokens + 64
    cache = make_cache(method, model, args.budget, capacity, ids.shape[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for chunk in torch.split(ids[:, :-1], args.prefill_chunk, dim=1):  # eager prefill, in chunks
        model(chunk, past_key_values=cache, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    clock = TokenClock()
    out = model.generate(
        ids, past_key_values=cache, max_new_tokens=args.new_tokens, do_sample=False, streamer=clock,
        disable_compile=not method.endswith("compiled"),
    )
    intervals = torch.tensor(clock.stamps[1:]).diff()  # stamps[0]: the prompt; then one per new token
    steady = intervals[args.warmup :]
    result = {
        "method": method,
        "prefill_s": prefill_s,
        "first_steps_s": float(intervals[: args.warmup].sum()),  # compile + capture for compiled methods
        "decode_ms_per_token": float(steady.median()) * 1e3,
        "decode_ms_p90": float(steady.quantile(0.9)) * 1e3,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tokens": out[:, ids.shape[1] :].tolist(),
        "backend": transformers_quest.backends.get_ops(ids.device).name if method.startswith("quest") else "sdpa",
    }
    del cache, out
    gc.collect()
    torch.cuda.empty_cache()
    return result


def agreement(tokens: list[list[int]], other: list[list[int]]) -> dict:
    """Share of equal greedy tokens, and how many tokens each sequence matched before its first difference."""
    pairs = [(x, y) for x, y in zip(tokens, other)]
    equal = sum(a == b for x, y in pairs for a, b in zip(x, y)) / sum(len(x) for x in tokens)
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in pairs]
    return {"share": equal, "common_prefix": prefix}


def environment() -> dict:
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "commit": commit_id(),
        "command": " ".join(sys.argv),
    }


def print_table(rows: list[dict]) -> None:
    print("| shape | context | batch | method | backend | decode ms/token | speedup vs best dense | prefill s | "
          "first steps s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['context']} | {row['batch']} | {row['method']} | {row['backend']} | "
              f"{row['decode_ms_per_token']:.2f} | {row['speedup_vs_best_dense']:.2f}x | {row['prefill_s']:.1f} | "
              f"{row['first_steps_s']:.1f} | {row['peak_memory_gib']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--methods", nargs="+", choices=METHODS + OPTIONAL_METHODS, default=list(METHODS))
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=72)
    parser.add_argument("--warmup", type=int, default=8, help="decode steps left out of the median")
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/e2e.py needs a CUDA GPU.")

    model = build_model(args.shape)
    rows = []
    for batch in args.batch:
        for context in args.contexts:
            ids = torch.randint(1, model.config.vocab_size, (batch, context), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(context))
            results = []
            for method in args.methods:
                try:
                    results.append(run_one(model, method, ids, args))
                except torch.OutOfMemoryError:
                    print(f"{args.shape} {context} x{batch} {method}: out of memory", flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
            dense = [r["decode_ms_per_token"] for r in results if r["method"].startswith("dense")]
            best_dense = min(dense) if dense else float("nan")
            by_method = {r["method"]: r for r in results}
            for r in results:
                r.update(shape=args.shape, context=context, batch=batch,
                         speedup_vs_best_dense=best_dense / r["decode_ms_per_token"])
                # Compiled vs eager greedy tokens; the dense pair is the control for how far random weights
                # let rounding differences (compiled kernels) flip an argmax.
                eager = by_method.get(r["method"].replace("compiled", "eager"))
                if r["method"].endswith("compiled") and eager is not None:
                    r["tokens_equal_eager"] = agreement(r["tokens"], eager["tokens"])
                print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
            rows.extend(results)
    for r in rows:
        r["tokens"] = [seq[:16] for seq in r["tokens"]]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "budget": args.budget, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
