"""Quest (query-aware sparse KV-cache decoding) for Hugging Face transformers.

Importing the package registers ``attn_implementation="quest"``; pass a `QuestCache` to ``generate``.
"""

from .attention import ATTENTION_NAME, quest_attention_forward, register
from .backends import set_backend
from .cache import QuestCache, QuestLayer, ReadStats
from .config import AGGREGATIONS, QuestConfig

register()

__all__ = [
    "AGGREGATIONS",
    "ATTENTION_NAME",
    "QuestCache",
    "QuestConfig",
    "QuestLayer",
    "ReadStats",
    "quest_attention_forward",
    "set_backend",
]
__version__ = "0.1.0"
