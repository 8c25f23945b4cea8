"""Markdown tables and plots from the evaluation's JSON lines (``python -m transformers_quest.evaluation report``)."""

from __future__ import annotations

import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path

NUM_LAYERS_HINT = 30


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _order(records: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _budgets(records: list[dict]) -> list[int]:
    return sorted({r["budget"] for r in records if r["budget"] is not None})


def _cell(scores: list[float], as_count: bool) -> str:
    if not scores:
        return ""
    if as_count and all(s in (0.0, 1.0) for s in scores):
        return f"{int(sum(scores))}/{len(scores)}"
    return f"{100 * sum(scores) / len(scores):.0f}%"


def _target_length(record: dict) -> int:
    """The requested length (the key holds it), not the tokenised one."""
    return int(record["key"].split("-")[-2])


def accuracy_table(records: list[dict], methods: list[str] | None = None, budgets: list[int] | None = None) -> str:
    """Rows: methods; columns: budgets; cells: correct/prompts (or mean score %). Dense fills every column."""
    methods = methods or _order(records)
    budgets = budgets or _budgets(records)
    by = defaultdict(list)
    for r in records:
        by[(r["method"], r["budget"])].append(r["score"])
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for m in methods:
        if (m, None) in by:
            cells = [_cell(by[(m, None)], True)] * len(budgets)
        else:
            cells = [_cell(by.get((m, b), []), True) for b in budgets]
        if any(cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(records: list[dict], methods: list[str] | None = None) -> str:
    """Page recall against the oracle (same budget, page size and granularity), all sparse steps and layers."""
    budgets = _budgets(records)
    hits, total = defaultdict(int), defaultdict(int)
    for r in records:
        if "recall_total" in r:
            hits[(r["method"], r["budget"])] += sum(r["recall_hits"].values())
            total[(r["method"], r["budget"])] += sum(r["recall_total"].values())
    methods = [m for m in (methods or _order(records)) if any((m, b) in total for b in budgets)]
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for m in methods:
        cells = [f"{100 * hits[(m, b)] / total[(m, b)]:.0f}%" if total[(m, b)] else "" for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_per_layer(records: list[dict], budget: int) -> dict[str, dict[int, float]]:
    hits, total = defaultdict(lambda: defaultdict(int)), defaultdict(lambda: defaultdict(int))
    for r in records:
        if r["budget"] == budget and "recall_total" in r:
            for layer, t in r["recall_total"].items():
                hits[r["method"]][int(layer)] += r["recall_hits"][layer]
                total[r["method"]][int(layer)] += t
    return {m: {l: hits[m][l] / t for l, t in sorted(layers.items()) if t} for m, layers in total.items()}


def _plot_accuracy(records: list[dict], lengths: list[int], path: Path, title: str, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        subset = [r for r in records if _target_length(r) == length]
        budgets = _budgets(subset)
        for index, m in enumerate(methods):
            dense = [r["score"] for r in subset if r["method"] == m and r["budget"] is None]
            if dense:
                ax.axhline(100 * sum(dense) / len(dense), color="black", linestyle="--", label=f"{m}")
                continue
            ys = []
            for b in budgets:
                s = [r["score"] for r in subset if r["method"] == m and r["budget"] == b]
                ys.append(100 * sum(s) / len(s) if s else math.nan)
            if not all(math.isnan(y) for y in ys):
                ax.plot(budgets, ys, marker="o", label=m, color=f"C{index % 10}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(-5, 105)
        ax.set_xlabel("token budget")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{title}, {length} tokens")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:  # one legend with every method, whichever subplot it appears in
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heatmap(records: list[dict], methods: list[str], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({_target_length(r) for r in records})
    depths = sorted({round(r["depth"], 3) for r in records if r["depth"] is not None})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 0.6 * len(lengths) + 1.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = [[math.nan] * len(depths) for _ in lengths]
        for r in records:
            if r["method"] == m and r["budget"] in (budget, None):
                grid[lengths.index(_target_length(r))][depths.index(round(r["depth"], 3))] = r["score"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_yticks(range(len(lengths)), [str(l) for l in lengths])
        ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths], rotation=90, fontsize=7)
        title = textwrap.fill(m, 34)  # long labels on two lines, not over the next panel's title
        ax.set_title(title if m == "dense" else f"{title}\nbudget {budget}", fontsize=8)
        ax.set_xlabel("needle depth")
    axes[0][0].set_ylabel("context (tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_recall_layers(per_layer: dict[str, dict[int, float]], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, layers in per_layer.items():
        ax.plot(list(layers), [100 * v for v in layers.values()], marker=".", label=m)
    ax.set_xlabel("layer")
    ax.set_ylabel("page recall vs oracle (%)")
    ax.set_title(f"Passkey: pages chosen that the oracle also chose, budget {budget}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _passkey_section(records: list[dict], out: Path, stem: str) -> list[str]:
    lengths = sorted({_target_length(r) for r in records})
    text = [f"## Passkey retrieval ({stem})", ""]
    for length in lengths:
        subset = [r for r in records if _target_length(r) == length]
        prompts = len({r["key"] for r in subset})
        text += [f"### {length} tokens, {prompts} prompts", "", accuracy_table(subset), ""]
    issue2 = [m for m in ("quest-paper", "quest-paper-sum", "quest-paper-none") if any(r["method"] == m for r in records)]
    if issue2:
        text += ["### Dense vs the paper's bound (spread 1.0) per GQA aggregation", ""]
        for length in lengths:
            subset = [r for r in records if _target_length(r) == length]
            budgets = [b for b in _budgets(subset) if b >= 128]
            text += [f"{length} tokens:", "", accuracy_table(subset, ["dense", *issue2], budgets), ""]
    text += ["### Page recall against the oracle (all prompts, sparse steps, layers)", "", recall_table(records), ""]
    methods = _order(records)
    _plot_accuracy(records, lengths, out / f"{stem}_accuracy.png", "Passkey", methods)
    heat = ("dense", "oracle", "default", "quest:page_summary=minmax", "quest:page_summary=minmax,keep_first_page=true",
            "quest-paper", "streaming")
    heat_methods = [m for m in heat if m in methods]
    budgets = _budgets(records)
    heat_budget = 128 if 128 in budgets else budgets[0]
    _plot_heatmap(records, heat_methods, heat_budget, out / f"{stem}_heatmap.png")
    per_layer = recall_per_layer(records, heat_budget)
    _plot_recall_layers(per_layer, heat_budget, out / f"{stem}_recall_layers.png")
    layers = sorted({l for v in per_layer.values() for l in v})
    text += [f"### Page recall per layer at budget {heat_budget}", ""]
    text += ["| method | " + " | ".join(str(l) for l in layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for m, v in per_layer.items():
        text.append(f"| {m} | " + " | ".join(f"{100 * v[l]:.0f}" if l in v else "" for l in layers) + " |")
    text += ["", f"![accuracy]({stem}_accuracy.png)", f"![heatmap]({stem}_heatmap.png)", f"![recall]({stem}_recall_layers.png)", ""]
    return text


def _ruler_section(records: list[dict], out: Path, stem: str) -> list[str]:
    tasks = sorted({r["task"] for r in records})
    rows = []
    for m in _order(records):
        for b in sorted({r["budget"] for r in records if r["method"] == m}, key=lambda x: -1 if x is None else x):
            scores = {t: [r["score"] for r in records if r["method"] == m and r["budget"] == b and r["task"] == t] for t in tasks}
            means = {t: sum(s) / len(s) for t, s in scores.items() if s}
            average = sum(means.values()) / len(means) if means else math.nan
            rows.append((m, b, means, average))
    prompts = len({r["key"] for r in records}) // max(len(tasks), 1)
    text = [f"## RULER-style tasks ({stem}, {prompts} prompts per task)", ""]
    text += ["| method | budget | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 3) + "|"]
    for m, b, means, average in rows:
        cells = [f"{100 * means[t]:.0f}" if t in means else "" for t in tasks]
        text.append(f"| {m} | {b if b is not None else 'all'} | " + " | ".join(cells) + f" | {100 * average:.1f} |")
    _plot_accuracy(
        [dict(r, key=f"x-{_ruler_length(r)}-0") for r in _ruler_average(records)], sorted({_ruler_length(r) for r in records}),
        out / f"{stem}_accuracy.png", "RULER-style average", _order(records),
    )
    return text + ["", f"![ruler]({stem}_accuracy.png)", ""]


def _ruler_length(r: dict) -> int:
    return int(r["key"].split("-")[-2])


def _ruler_average(records: list[dict]) -> list[dict]:
    """One pseudo-record per (key prompt index, method, budget): the score averaged over tasks."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["method"], r["budget"], _ruler_length(r))].append(r["score"])
    return [
        {"method": m, "budget": b, "key": f"avg-{l}-0", "score": sum(s) / len(s), "depth": None}
        for (m, b, l), s in groups.items()
    ]


def _ppl_section(records: list[dict], stem: str) -> list[str]:
    text = [f"## Perplexity ({stem})", ""]
    for key in sorted({r["key"] for r in records}):
        subset = [r for r in records if r["key"] == key]
        first = subset[0]
        dense = next((r["perplexity"] for r in subset if r["method"] == "dense"), None)
        text += [
            f"{first['source']}: tokens {first['length'] - first['window']}..{first['length']} scored one by one "
            f"({first['tokens']} predictions) after a dense prefill of the first {first['length'] - first['window']}.",
            "",
            "| method | budget | perplexity | vs dense | page recall vs oracle |",
            "|---|---|---|---|---|",
        ]
        for r in subset:
            ratio = f"{100 * (r['perplexity'] / dense - 1):+.2f}%" if dense else ""
            recall = ""
            if "recall_total" in r and sum(r["recall_total"].values()):
                recall = f"{100 * sum(r['recall_hits'].values()) / sum(r['recall_total'].values()):.0f}%"
            text.append(f"| {r['method']} | {r['budget'] if r['budget'] is not None else 'all'} | {r['perplexity']:.3f} | {ratio} | {recall} |")
        text.append("")
    return text


HEADLINE = {
    "dense": "dense",
    "oracle": "oracle (exact page max; reads all keys)",
    "quest:page_summary=minmax,keep_first_page=true": "min/max box (previous default), spread 0.5 + first page",
    "quest:page_summary=mean": "default: box centred on the mean key, spread 0.5 + first page",
    "quest:page_summary=minmax,spread=0.5,keep_first_page=false": "spread 0.5 without the first page",
    "quest-paper": "Quest paper bound (spread 1), shared",
    "quest-paper-none": "Quest paper bound, per query head (up to 3x reads)",
    "streaming": "StreamingLLM",
    "h2o": "H2O",
}
"""Methods of the headline plot, with their legend labels. Rows are found by their recorded labels:
``quest:page_summary=minmax,keep_first_page=true`` is the min/max box, the default before the mean box;
``quest:page_summary=mean`` is today's default."""


def _headline(out: Path) -> list[str]:
    """One accuracy plot and one heatmap over every passkey file, for the methods in `HEADLINE`."""
    records = []
    for path in sorted(out.glob("passkey*.jsonl")):
        records += [r for r in _load(path) if r["method"] in HEADLINE]
    if not records:
        return []
    seen = set()
    unique = []
    for r in records:  # dense and oracle run in several files over the same prompts: count them once
        k = (r["key"], r["method"], r["budget"])
        if k not in seen:
            seen.add(k)
            unique.append(dict(r, method=HEADLINE[r["method"]]))
    lengths = sorted({_target_length(r) for r in unique})
    methods = [HEADLINE[m] for m in HEADLINE]
    _plot_accuracy(unique, lengths, out / "passkey_headline.png", "Passkey, SmolLM2-135M", methods)
    heat = [HEADLINE[m] for m in ("dense", "oracle", "quest-paper", "quest:page_summary=minmax,keep_first_page=true",
                                  "quest:page_summary=mean", "streaming")]
    _plot_heatmap(unique, heat, 256, out / "passkey_heatmap_all.png")
    return ["## Headline", "", "![passkey](passkey_headline.png)", "", "![heatmap](passkey_heatmap_all.png)", ""]


def write_report(out: Path) -> str:
    """Write ``out/RESULTS.md`` (all tables) and the plots; return the markdown."""
    out = Path(out)
    text = ["# Evaluation results", "", "Generated by `python -m transformers_quest.evaluation report` from the JSON lines here.", ""]
    text += _headline(out)
    for path in sorted(out.glob("*.jsonl")):
        records = _load(path)
        if not records:
            continue
        env_path = path.with_suffix("").with_suffix(".env.json")
        task = records[0]["task"]
        if task == "passkey":
            text += _passkey_section(records, out, path.stem)
        elif task == "perplexity":
            text += _ppl_section(records, path.stem)
        else:
            text += _ruler_section(records, out, path.stem)
        if env_path.exists():
            env = json.loads(env_path.read_text())
            text += [f"Environment: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
                     f"commit {str(env['commit'])[:10]}; `{env['command']}`", ""]
    markdown = "\n".join(text)
    (out / "RESULTS.md").write_text(markdown)
    for path in sorted(out.glob("*.jsonl")):
        (out / f"{path.stem}.summary.json").write_text(json.dumps(summarize(_load(path)), indent=1) + "\n")
    return markdown


def summarize(records: list[dict]) -> list[dict]:
    """Mean score (or perplexity) per task, requested length, method and budget."""
    groups = defaultdict(list)
    for r in records:
        value = r.get("perplexity", r.get("score"))
        groups[(r["task"], _target_length(r) if r["task"] != "perplexity" else r["length"], r["method"], r["budget"])].append(value)
    return [
        {"task": t, "length": l, "method": m, "budget": b, "mean": sum(v) / len(v), "n": len(v)}
        for (t, l, m, b), v in groups.items()
    ]
