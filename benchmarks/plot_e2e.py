"""Combine benchmarks/e2e.py result files into one table (speedups against the faster dense path) and a plot.

    python benchmarks/plot_e2e.py benchmarks/results/e2e-h100-*.json --out benchmarks/results/e2e-h100.png

Rows of one (shape, context, batch) may come from several runs (e.g. a method re-run with a smaller prefill
chunk); the best dense latency is taken over all of them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

METHOD_STYLE = {
    "dense-eager": ("tab:gray", "--"),
    "dense-compiled": ("tab:gray", "-"),
    "quest-eager": ("tab:blue", "--"),
    "quest-compiled": ("tab:blue", "-"),
}


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            if row.get("backend") == "torch":
                continue  # runs without the kernels are kept for reference, not compared here
            rows.append({**row, "file": path.name, "device": data["environment"]["device"]})
    return rows


def with_speedups(rows: list[dict]) -> list[dict]:
    best_dense: dict[tuple, float] = {}
    for row in rows:
        if row["method"].startswith("dense"):
            key = (row["shape"], row["context"], row["batch"])
            best_dense[key] = min(best_dense.get(key, float("inf")), row["decode_ms_per_token"])
    for row in rows:
        dense = best_dense.get((row["shape"], row["context"], row["batch"]))
        row["speedup"] = dense / row["decode_ms_per_token"] if dense else float("nan")
    order = list(METHOD_STYLE)
    return sorted(rows, key=lambda r: (r["shape"], r["batch"], r["context"], order.index(r["method"])))


def print_table(rows: list[dict]) -> None:
    print("| shape | batch | context | method | ms/token | vs faster dense | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['context'] // 1024}K | {r['method']} | "
              f"{r['decode_ms_per_token']:.2f} | {r['speedup']:.2f}x | {r['peak_memory_gib']:.1f} |")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["shape"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (shape, batch) in zip(axes[0], panels):
        series = defaultdict(list)
        for r in rows:
            if (r["shape"], r["batch"]) == (shape, batch):
                series[r["method"]].append((r["context"], r["decode_ms_per_token"]))
        for method, points in series.items():
            points.sort()
            color, style = METHOD_STYLE[method]
            ax.plot([c / 1024 for c, _ in points], [t for _, t in points], style, color=color, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("decode latency (ms / token)")
        ax.set_title(f"{shape}, batch {batch}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"model.generate on {rows[0]['device']}, Quest budget 2048", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e-h100.png"))
    args = parser.parse_args()
    rows = with_speedups(load_rows(args.files))
    print_table(rows)
    plot(rows, args.out)


if __name__ == "__main__":
    main()
