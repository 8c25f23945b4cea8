"""A text-generation pipeline that gives every call its own QuestCache.

A cache object passed once to ``pipeline(...)`` is reused for every prompt: the second prompt would continue
the first one's cache and its output would be silently wrong. This pipeline makes a fresh cache per forward.
"""

from __future__ import annotations

from typing import Any

from transformers import Pipeline, TextGenerationPipeline
from transformers import pipeline as hf_pipeline
from transformers.cache_utils import Cache

from .attention import ATTENTION_NAME
from .cache import QuestCache
from .config import QuestConfig


class QuestTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` whose every ``generate`` call gets a new `QuestCache` built from ``quest_config``."""

    def __init__(self, *args: Any, quest_config: QuestConfig | None = None, **kwargs: Any):
        if quest_config is not None and not isinstance(quest_config, QuestConfig):
            raise TypeError(f"`quest_config` must be a QuestConfig, got {type(quest_config).__name__}.")
        self.quest_config = quest_config or QuestConfig()
        super().__init__(*args, **kwargs)
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"The model's attn_implementation is {implementation!r}; Quest needs {ATTENTION_NAME!r}. Load it with "
                f"`attn_implementation=\"{ATTENTION_NAME}\"` or call `model.set_attn_implementation(\"{ATTENTION_NAME}\")`."
            )

    def _forward(self, model_inputs: dict, **generate_kwargs: Any) -> dict:
        if isinstance(generate_kwargs.get("past_key_values"), Cache):
            raise ValueError(
                "Do not pass `past_key_values` to a Quest pipeline: one cache object would be shared by every prompt. "
                "Set `quest_config=QuestConfig(...)` instead; each call gets its own QuestCache."
            )
        generate_kwargs["past_key_values"] = QuestCache(config=self.quest_config)
        return super()._forward(model_inputs, **generate_kwargs)


def quest_pipeline(model: Any, tokenizer: Any = None, quest_config: QuestConfig | None = None, **kwargs: Any) -> Pipeline:
    """``pipeline("text-generation", ...)`` with Quest decoding; ``kwargs`` go to `transformers.pipeline`.

    Example:
        >>> generator = quest_pipeline(model, tokenizer, QuestConfig(budget=1024))
        >>> generator(["first prompt", "second prompt"], max_new_tokens=32, do_sample=False)
    """
    return hf_pipeline(
        "text-generation",
        model=model,
        tokenizer=tokenizer,
        pipeline_class=QuestTextGenerationPipeline,
        quest_config=quest_config,
        **kwargs,
    )
