"""How the attention function finds the cache layer that was just updated.

transformers calls ``past_key_values.update(...)`` and then the attention function, but never passes the cache to
the latter. A `QuestLayer` publishes itself here in ``update``; the "quest" attention function takes it right
after, in the same attention module's forward. A layer still waiting when the next one is published means no
"quest" attention function ran: the cache is used under another attention implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.utils import logging

if TYPE_CHECKING:
    from .cache import QuestLayer

logger = logging.get_logger(__name__)


class _Handoff:
    def __init__(self) -> None:
        self.layer: QuestLayer | None = None
        self.warned_unconsumed = False

    def publish(self, layer: QuestLayer) -> None:
        if self.layer is not None and not self.warned_unconsumed:
            self.warned_unconsumed = True
            logger.warning(
                "QuestCache is being used by a model whose attention implementation is not 'quest', so decoding is "
                "dense and Quest does nothing. Load the model with `attn_implementation=\"quest\"` (after "
                "`import transformers_quest`) or call `model.set_attn_implementation(\"quest\")`."
            )
        self.layer = layer

    def take(self) -> QuestLayer | None:
        layer, self.layer = self.layer, None
        return layer


HANDOFF = _Handoff()
