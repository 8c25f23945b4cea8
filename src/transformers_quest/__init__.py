"""Quest (query-aware sparse KV-cache decoding) for Hugging Face transformers.

Importing the package registers ``attn_implementation="quest"``; pass a `QuestCache` to ``generate``.
"""

from .attention import ATTENTION_NAME, quest_attention_forward, register
from .backends import set_backend
from .cache import QuestCache, QuestLayer, ReadStats
from .config import AGGREGATIONS, QuestConfig

register()


def __getattr__(name: str):
    # The pipeline pulls in transformers' pipeline machinery (slow to import): load it on first use only.
    if name in ("QuestTextGenerationPipeline", "quest_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AGGREGATIONS",
    "ATTENTION_NAME",
    "QuestCache",
    "QuestConfig",
    "QuestLayer",
    "QuestTextGenerationPipeline",
    "ReadStats",
    "quest_attention_forward",
    "quest_pipeline",
    "set_backend",
]
__version__ = "0.1.0"
