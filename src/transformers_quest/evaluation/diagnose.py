"""Why a page scorer misses the needle: for the query that must retrieve it (the last question token of passkey
prompts), where each scorer ranks the needle's page, layer by layer, and how far the min/max bound overshoots the
true page maxima compared with how much those maxima differ across pages."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..reference import page_minmax, page_scores
from ..selectors import oracle_page_scores
from .grid import capture_last_query
from .tasks import PASSKEY_NEEDLE, passkey_prompt

SPREADS = (1.0, 0.5, 0.25, 0.0)


def _needle_pages(tokenizer, text: str, key: str, page_size: int) -> list[int]:
    """Pages holding the tokens of the needle sentence."""
    start = text.index(PASSKEY_NEEDLE.format(key=key))
    end = start + len(PASSKEY_NEEDLE.format(key=key))
    offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping
    tokens = [i for i, (a, b) in enumerate(offsets) if b > start and a < end]
    return sorted({t // page_size for t in tokens})


def _rank(scores: torch.Tensor, pages: list[int]) -> torch.Tensor:
    """Best (0-based) rank among ``pages`` per row of scores [H, P]; the last (current) page excluded."""
    body = scores[:, :-1]
    best = body[:, pages].amax(dim=-1, keepdim=True)
    return (body > best).sum(dim=-1)


@torch.no_grad()
def diagnose(model, tokenizer, length: int, prompts: int, page_size: int = 16, dense_layers: int = 2) -> dict:
    """Per layer: median rank of the needle page under the oracle and each spread (shared per KV head, max over
    the group, and per query head), and the bound's overshoot relative to the spread of true page maxima."""
    per_layer: dict[int, dict[str, list[float]]] = {}
    for i in tqdm(range(prompts), desc="diagnose", unit="prompt"):
        prompt = passkey_prompt(tokenizer, length, (i + 0.5) / prompts, seed=length * 100 + i)
        text = prompt.context + prompt.tail
        ids = tokenizer(text, return_tensors="pt").input_ids
        needle = _needle_pages(tokenizer, text, prompt.answers[0], page_size)
        captured = capture_last_query(model, ids)
        for layer, (query, keys) in captured.items():
            if layer < dense_layers:
                continue
            stats = per_layer.setdefault(layer, {})
            kv_heads, length_, _ = keys.shape
            group = query.shape[0] // kv_heads
            logits = (query.view(kv_heads, group, -1) @ keys.transpose(-1, -2))[None]  # [1, Hkv, G, L]
            low, high = page_minmax(keys[None], page_size)
            for aggregation in ("max", "none"):
                exact = oracle_page_scores(logits, page_size, aggregation)[0]
                stats.setdefault(f"oracle/{aggregation}", []).extend(_rank(exact, needle).tolist())
                for spread in SPREADS:
                    s = page_scores(query[None], low, high, spread, aggregation)[0]
                    stats.setdefault(f"s={spread:g}/{aggregation}", []).extend(_rank(s, needle).tolist())
            exact = oracle_page_scores(logits, page_size, "none")[0][:, :-1]  # [Hq, P-1]
            bound = page_scores(query[None], low, high, 1.0, "none")[0][:, :-1]
            overshoot = (bound - exact).mean(dim=-1) / exact.std(dim=-1)
            stats.setdefault("overshoot/std", []).extend(overshoot.tolist())
    return {
        layer: {name: float(torch.tensor(values).median()) for name, values in stats.items()}
        for layer, stats in sorted(per_layer.items())
    }


def diagnose_table(result: dict, num_pages: int) -> str:
    names = list(next(iter(result.values())))
    lines = [
        f"Median rank (0 = top) of the needle's best page among {num_pages} pages, for the last question token; "
        "'overshoot/std' = mean (bound - true page max) / std of true page maxima across pages.",
        "",
        "| layer | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for layer, stats in result.items():
        lines.append(f"| {layer} | " + " | ".join(f"{stats[n]:.1f}" if "overshoot" in n else f"{stats[n]:.0f}" for n in names) + " |")
    medians = {n: sorted(s[n] for s in result.values())[len(result) // 2] for n in names}
    lines.append("| median over layers | " + " | ".join(f"{medians[n]:.1f}" for n in names) + " |")
    return "\n".join(lines)


__all__ = ["diagnose", "diagnose_table", "math"]
