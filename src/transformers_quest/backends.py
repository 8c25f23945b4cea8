"""Which implementation of the Quest ops runs: the PyTorch reference, or compiled kernels where they fit.

This is the one module that knows compiled kernels exist. Every backend offers the same operations:

* ``refresh_pages(page_min, page_max, keys, start, end, page_size)``: fold tokens ``[start, end)`` into the page
  metadata, in place (see `reference.refresh_pages`).
* ``refresh_page_at(page_min, page_max, keys, position, page_size)``: the same for one token whose position is a
  device tensor (static cache; graph-safe).
* ``decode(query, keys, values, page_min, page_max, key_valid, config, scaling, seq_lens=None)
  -> (output, page_indices)``: one sparse decode step (see `reference.quest_decode`).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from transformers.utils import logging

from . import reference

logger = logging.get_logger(__name__)

BACKENDS = ("auto", "torch")
ENV_VAR = "TRANSFORMERS_QUEST_BACKEND"

TORCH_OPS = SimpleNamespace(
    name="torch",
    refresh_pages=reference.refresh_pages,
    refresh_page_at=reference.refresh_page_at,
    decode=reference.quest_decode,
)

_forced: str | None = None
_logged: set[tuple[str, str]] = set()


def set_backend(name: str) -> None:
    """Force a backend for every device ("torch"), or let it be chosen per device ("auto", the default).

    The environment variable ``TRANSFORMERS_QUEST_BACKEND`` does the same without code.
    """
    if name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {name!r}.")
    global _forced
    _forced = name


def requested_backend() -> str:
    name = _forced or os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}.")
    return name


def get_ops(device: torch.device) -> SimpleNamespace:
    """The ops for tensors on ``device``; logs once per device type which backend runs."""
    ops = TORCH_OPS
    key = (device.type, ops.name)
    if key not in _logged:
        _logged.add(key)
        logger.info(f"transformers-quest: '{ops.name}' backend on {device.type}")
    return ops
