"""Which implementation of the Quest ops runs: the PyTorch reference, or compiled kernels where they fit.

This is the one module that knows compiled kernels exist. Every backend offers the same operations:

* ``refresh_pages(page_min, page_max, keys, start, end, page_size, summary="minmax")``: fold tokens ``[start, end)``
  into the page metadata, in place (see `reference.refresh_pages`).
* ``append_pages(page_min, page_max, keys, seq_lens, page_size, summary="minmax")``: recompute the page holding
  each sequence's newest token, whose length is a device tensor (static cache; graph-safe).
* ``decode(query, keys, values, page_min, page_max, key_valid, config, scaling, seq_lens=None, append_keys=None)
  -> (output, page_indices)``: one sparse decode step (see `reference.quest_decode`; the CUDA backend returns
  int32 page indices). With ``append_keys`` (a static cache's key buffer), the step first does the decode append
  of ``append_pages``; the kernels fold it into the scoring launch.
* ``attend_all_pages(query, keys, values, key_valid, scaling, page_size, seq_lens=None) -> output | None``: dense
  one-token attention by the sparse attention kernel over every page, for the steps Quest leaves dense; None where
  no kernel fits (the torch backend always), and the caller runs SDPA.

The CUDA kernels (``cuda/`` in the source tree) are loaded through the ``kernels`` package, from the first of:

1. ``TRANSFORMERS_QUEST_KERNEL_PATH=/path/to/kernel/repo`` (a folder holding ``build/<variant>/``), through
   ``kernels.get_local_kernel``;
2. ``kernels.get_kernel(KERNEL_REPO_ID, version=KERNEL_VERSION)`` when ``LOCAL_KERNELS`` names that repo id;
3. ``cuda/build/<variant>/`` of a source checkout, if it was built (``python cuda/build_variant.py``);
4. ``kernels.get_kernel(KERNEL_REPO_ID, version=KERNEL_VERSION)`` from the Hub.

Where none loads, or a call does not fit the kernels (dtype, head dim, group size, layout), the PyTorch reference
runs; each such decision is logged once.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from transformers.utils import logging

from . import reference
from .config import AGGREGATIONS, QuestConfig

logger = logging.get_logger(__name__)

BACKENDS = ("auto", "torch", "cuda")
ENV_VAR = "TRANSFORMERS_QUEST_BACKEND"
KERNEL_PATH_ENV_VAR = "TRANSFORMERS_QUEST_KERNEL_PATH"
KERNEL_REPO_ID = "transformers-quest/quest-kernels"
KERNEL_VERSION = 1
SOURCE_KERNEL_DIR = Path(__file__).resolve().parents[2] / "cuda"

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)
KERNEL_MAX_GROUP = 8
KERNEL_MAX_SELECTED_PAGES = 64 * 256  # splits x pages per split of the attention kernel

def _append_then_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    key_valid: torch.Tensor | None,
    config: QuestConfig,
    scaling: float,
    seq_lens: torch.Tensor | None = None,
    append_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference decode step, with the decode append (if any) done first."""
    if append_keys is not None:
        reference.append_pages(page_min, page_max, append_keys, seq_lens, config.page_size, config.page_summary)
    return reference.quest_decode(query, keys, values, page_min, page_max, key_valid, config, scaling, seq_lens=seq_lens)


TORCH_OPS = SimpleNamespace(
    name="torch",
    refresh_pages=reference.refresh_pages,
    append_pages=reference.append_pages,
    decode=_append_then_decode,
    attend_all_pages=lambda *args, **kwargs: None,  # SDPA is the reference for dense attention
)

_forced: str | None = None
_logged: set[tuple[str, ...]] = set()
_kernel: ModuleType | None = None
_kernel_error: str | None = None
_kernel_tried = False
_cuda_ops: "CudaOps | None" = None
_resolved: dict[str, "SimpleNamespace | CudaOps"] = {}


def set_backend(name: str) -> None:
    """Force a backend for every device: "torch", "cuda" (an error if the kernels cannot load), or "auto" (the
    default: the CUDA kernels on CUDA devices where they load, the PyTorch reference elsewhere).

    The environment variable ``TRANSFORMERS_QUEST_BACKEND`` does the same without code.
    """
    if name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {name!r}.")
    global _forced
    _forced = None if name == "auto" else name  # "auto" hands the choice back to the environment variable
    _resolved.clear()


def requested_backend() -> str:
    name = _forced or os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}.")
    return name


def _log_once(key: tuple[str, ...], message: str, warning: bool = False) -> None:
    if torch.compiler.is_compiling():  # a log call inside a traced step would break the graph; eager steps log
        return
    if key not in _logged:
        _logged.add(key)
        (logger.warning if warning else logger.info)(message)


def _has_local_build(path: Path) -> bool:
    return (path / "build").is_dir() and any((path / "build").glob("*/metadata.json"))


def load_kernel() -> ModuleType | None:
    """The compiled Quest kernels loaded through ``kernels`` (tried once per process), or None with the reason
    kept for `kernel_error`."""
    global _kernel, _kernel_error, _kernel_tried
    if _kernel_tried:
        return _kernel
    _kernel_tried = True
    try:
        import kernels
    except ImportError as error:
        _kernel_error = f"the `kernels` package is not installed ({error})"
        return None
    local_overrides = os.environ.get("LOCAL_KERNELS", "")
    explicit = os.environ.get(KERNEL_PATH_ENV_VAR)
    try:
        if explicit:
            source = f"local kernel {explicit}"
            _kernel = kernels.get_local_kernel(Path(explicit))
        elif f"{KERNEL_REPO_ID}=" in local_overrides or not _has_local_build(SOURCE_KERNEL_DIR):
            source = f"{KERNEL_REPO_ID} version {KERNEL_VERSION}"
            _kernel = kernels.get_kernel(KERNEL_REPO_ID, version=KERNEL_VERSION)
        else:
            source = f"local build in {SOURCE_KERNEL_DIR}"
            _kernel = kernels.get_local_kernel(SOURCE_KERNEL_DIR)
    except Exception as error:  # a missing build, a variant for another torch, no network: all mean "use torch"
        _kernel_error = f"loading {source} failed: {type(error).__name__}: {error}"
        return None
    logger.info(f"transformers-quest: loaded CUDA kernels from {source}")
    return _kernel


def kernel_error() -> str | None:
    """Why `load_kernel` returned None (after it was called), else None."""
    return _kernel_error


def _vector_layout_problem(name: str, t: torch.Tensor) -> str | None:
    # data_ptr() cannot be traced; inside a compiled step the buffers are the cache's own allocations (aligned).
    misaligned = not torch.compiler.is_compiling() and t.data_ptr() % 16
    if t.stride(-1) != 1 or misaligned or any(s % 8 for s in t.stride()[:-1]):
        return f"{name} is not 16-byte aligned with a contiguous last dimension"
    return None


def _attention_unsupported(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_valid: torch.Tensor | None,
    max_group: int | None,
) -> str | None:
    """Why the attention kernel cannot read these tensors (None if it can): shared by the sparse and dense steps."""
    if query.dtype not in KERNEL_DTYPES:
        return f"dtype {query.dtype} (kernels: float16, bfloat16)"
    if keys.dtype != query.dtype or values.dtype != query.dtype:
        return f"query, keys and values of different dtypes ({query.dtype}, {keys.dtype}, {values.dtype})"
    head_dim = query.shape[-1]
    if head_dim not in KERNEL_HEAD_DIMS or values.shape[-1] != head_dim:
        return f"head_dim {head_dim} / value dim {values.shape[-1]} (kernels: {KERNEL_HEAD_DIMS}, equal)"
    q_heads, kv_heads = query.shape[1], keys.shape[1]
    if q_heads % kv_heads or (max_group is not None and q_heads // kv_heads > max_group):
        return f"{q_heads} query heads over {kv_heads} KV heads (kernels: groups of up to {KERNEL_MAX_GROUP})"
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.stride(-1) != 1):
        return "a key-validity mask that is not a bool tensor contiguous along tokens"
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        problem = _vector_layout_problem(name, t)
        if problem:
            return problem
    return None


def decode_unsupported(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    key_valid: torch.Tensor | None,
    config: QuestConfig,
) -> str | None:
    """Why the CUDA decode cannot run this call (None if it can)."""
    if config.aggregation not in AGGREGATIONS:
        return f"aggregation {config.aggregation!r} (kernels: {AGGREGATIONS})"
    if config.forced_recent_pages:
        return f"recent_pages={config.recent_pages} (kernels: 0)"
    if config.page_summary == "centroids":
        return "page_summary='centroids' (kernels: 'minmax', 'mean')"
    # With aggregation "none" every query head selects its own pages: any number of heads per KV head.
    max_group = None if config.aggregation == "none" else KERNEL_MAX_GROUP
    problem = _attention_unsupported(query, keys, values, key_valid, max_group)
    if problem:
        return problem
    if page_min.dtype != query.dtype or page_max.dtype != query.dtype:
        return f"page metadata of dtype {page_min.dtype} / {page_max.dtype} with a {query.dtype} query"
    selected = min(config.page_budget, -(-keys.shape[2] // config.page_size))
    if selected > KERNEL_MAX_SELECTED_PAGES:
        return f"{selected} selected pages (kernels: up to {KERNEL_MAX_SELECTED_PAGES})"
    for name, t in (("page_min", page_min), ("page_max", page_max)):
        problem = _vector_layout_problem(name, t)
        if problem:
            return problem
    return None


def attend_all_unsupported(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_valid: torch.Tensor | None, page_size: int
) -> str | None:
    """Why the attention kernel cannot attend to every page of this call (None if it can)."""
    problem = _attention_unsupported(query, keys, values, key_valid, KERNEL_MAX_GROUP)
    if problem:
        return problem
    pages = -(-keys.shape[2] // page_size)
    if pages > KERNEL_MAX_SELECTED_PAGES:
        return f"{pages} pages (kernels: up to {KERNEL_MAX_SELECTED_PAGES})"
    return None


def metadata_unsupported(
    keys: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, summary: str = "minmax"
) -> str | None:
    """Why the CUDA metadata ops cannot run on these tensors (None if they can)."""
    if summary not in ("minmax", "mean"):
        return f"page_summary={summary!r} (kernels: 'minmax', 'mean')"
    if keys.dtype not in KERNEL_DTYPES or page_min.dtype != keys.dtype or keys.shape[-1] % 8:
        return f"dtype {keys.dtype} / head_dim {keys.shape[-1]}"
    for name, t in (("keys", keys), ("page_min", page_min), ("page_max", page_max)):
        problem = _vector_layout_problem(name, t)
        if problem:
            return problem
    return None


class CudaOps:
    """The compiled kernels behind the backend interface; calls they do not fit go to the reference."""

    name = "cuda"

    def __init__(self, kernel: ModuleType):
        self.kernel = kernel

    def refresh_pages(
        self,
        page_min: torch.Tensor,
        page_max: torch.Tensor,
        keys: torch.Tensor,
        start: int,
        end: int,
        page_size: int,
        summary: str = "minmax",
    ) -> None:
        problem = metadata_unsupported(keys, page_min, page_max, summary)
        if problem:
            _log_once(("refresh", problem), f"transformers-quest: page metadata on torch for {problem}")
            return reference.refresh_pages(page_min, page_max, keys, start, end, page_size, summary)
        self.kernel.refresh_pages(page_min, page_max, keys, start, end, page_size, summary)

    def append_pages(
        self,
        page_min: torch.Tensor,
        page_max: torch.Tensor,
        keys: torch.Tensor,
        seq_lens: torch.Tensor,
        page_size: int,
        summary: str = "minmax",
    ) -> None:
        problem = metadata_unsupported(keys, page_min, page_max, summary)
        if problem:
            _log_once(("append", problem), f"transformers-quest: page metadata on torch for {problem}")
            return reference.append_pages(page_min, page_max, keys, seq_lens, page_size, summary)
        self.kernel.append_pages(page_min, page_max, keys, seq_lens, page_size, summary)

    def decode(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        page_min: torch.Tensor,
        page_max: torch.Tensor,
        key_valid: torch.Tensor | None,
        config: QuestConfig,
        scaling: float,
        seq_lens: torch.Tensor | None = None,
        append_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        problem = decode_unsupported(query, keys, values, page_min, page_max, key_valid, config)
        if append_keys is not None and (
            problem or metadata_unsupported(append_keys, page_min, page_max, config.page_summary)
        ):
            self.append_pages(page_min, page_max, append_keys, seq_lens, config.page_size, config.page_summary)
            append_keys = None
        if problem:
            _log_once(("decode", problem), f"transformers-quest: decode on torch for {problem}", warning=True)
            return reference.quest_decode(
                query, keys, values, page_min, page_max, key_valid, config, scaling, seq_lens=seq_lens
            )
        return self.kernel.decode(
            query,
            keys,
            values,
            page_min,
            page_max,
            key_valid,
            page_size=config.page_size,
            page_budget=config.page_budget,
            scale=scaling,
            spread=float(config.spread),
            aggregation=config.aggregation,
            keep_first_page=config.keep_first_page,
            seq_lens=seq_lens,
            append_keys=append_keys,
            summary=config.page_summary,
        )


    def attend_all_pages(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_valid: torch.Tensor | None,
        scaling: float,
        page_size: int,
        seq_lens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """[B, Hq, D] attention of one query token over every valid key; split over the KV sequence, so a
        one-token step reads each key and value once at close to full bandwidth (SDPA with a mask runs one
        block per head there)."""
        problem = attend_all_unsupported(query, keys, values, key_valid, page_size)
        if problem:
            _log_once(("attend_all", problem), f"transformers-quest: dense decode by SDPA for {problem}")
            return None
        batch, q_heads, _ = query.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        pages = -(-length // page_size)
        indices = torch.arange(pages, dtype=torch.int32, device=query.device).expand(batch, kv_heads, pages)
        out = torch.empty_like(query)
        self.kernel.sparse_decode(
            out, query, keys, values, indices.contiguous(), key_valid, seq_lens, length, scaling, page_size, False
        )
        return out


def get_ops(device: torch.device) -> SimpleNamespace | CudaOps:
    """The ops for tensors on ``device``; logs once per device type which backend runs.

    Resolved once per device type and remembered, so that a compiled decode step only reads a dict (reading the
    environment or loading the kernel inside a traced region would break the graph).
    """
    ops = _resolved.get(device.type)
    if ops is None:
        ops = _resolved[device.type] = _resolve_ops(device)
    return ops


def _resolve_ops(device: torch.device) -> SimpleNamespace | CudaOps:
    name = requested_backend()
    ops = TORCH_OPS
    if name != "torch" and device.type == "cuda":
        kernel = load_kernel()
        if kernel is not None:
            global _cuda_ops
            if _cuda_ops is None or _cuda_ops.kernel is not kernel:
                _cuda_ops = CudaOps(kernel)
            ops = _cuda_ops
        elif name == "cuda":
            raise RuntimeError(f"The 'cuda' Quest backend was requested but {_kernel_error}.")
        else:
            _log_once(("no-kernel",), f"transformers-quest: no CUDA kernels ({_kernel_error}); using torch", True)
    elif name == "cuda":
        raise RuntimeError(f"The 'cuda' Quest backend was requested for a {device.type} tensor; it needs CUDA.")
    _log_once((device.type, ops.name), f"transformers-quest: '{ops.name}' backend on {device.type}")
    return ops
