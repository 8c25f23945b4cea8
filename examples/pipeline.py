"""Quest through `pipeline("text-generation")`: every prompt of a list gets its own QuestCache.

    python examples/pipeline.py
"""

from __future__ import annotations

import transformers_quest  # noqa: F401  (registers attn_implementation="quest")
from transformers_quest import QuestConfig, quest_pipeline
from transformers_quest.models import load_smollm2

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def main() -> None:
    model, tokenizer = load_smollm2(attn_implementation="quest")
    generator = quest_pipeline(model, tokenizer, QuestConfig(budget=128))
    prompts = [
        [{"role": "user", "content": FILLER * 20 + "The secret city is Lisbon. " + FILLER * 20 + "What is the secret city?"}],
        [{"role": "user", "content": FILLER * 30 + "The secret fruit is a mango. " + FILLER * 5 + "What is the secret fruit?"}],
    ]
    for messages, result in zip(prompts, generator(prompts, max_new_tokens=16, do_sample=False)):
        question = messages[0]["content"].rsplit(". ", 1)[-1]
        print(f"{question} -> {result[0]['generated_text'][-1]['content']!r}")


if __name__ == "__main__":
    main()
