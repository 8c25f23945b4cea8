"""QuestCache: the whole KV cache, plus the two vectors per page (`QuestConfig.page_summary`) that Quest scores
pages with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .backends import get_ops
from .config import QuestConfig
from .handoff import HANDOFF


@dataclass
class ReadStats:
    """Key/value vectors read by decode steps (one query token), against what dense attention would read.

    Metadata reads count as two vectors per page. Counted in Python integers, so they cost no device sync.
    """

    dense_vectors: int = 0
    read_vectors: int = 0

    def add(self, dense: int, read: int) -> None:
        self.dense_vectors += dense
        self.read_vectors += read

    @property
    def read_fraction(self) -> float:
        """Share of the dense decode's KV reads that Quest made (1.0 before any decode step)."""
        return self.read_vectors / self.dense_vectors if self.dense_vectors else 1.0


class QuestLayer(CacheLayerMixin):
    """One layer's keys, values and page metadata, in buffers grown geometrically (no O(n) copy per step).

    ``keys``/``values`` are views ``[B, Hkv, length, D]`` of the buffers; ``page_min``/``page_max`` are
    ``[B, Hkv, capacity // page_size, D]`` (only for layers that select pages; dense layers keep none).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, config: QuestConfig, layer_idx: int, stats: ReadStats | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_dense = layer_idx < config.dense_layers
        self.keeps_metadata = not self.is_dense  # subclasses whose selector needs no page metadata turn it off
        self.stats = stats if stats is not None else ReadStats()
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.page_min: torch.Tensor | None = None
        self.page_max: torch.Tensor | None = None
        # A decode append left for the next sparse step to fold into its scoring launch (static layers only).
        self._append_pending = False

    def __repr__(self) -> str:
        kind = "dense" if self.is_dense else "quest"
        return f"QuestLayer(layer_idx={self.layer_idx}, {kind}, length={self.length})"

    # -- storage -------------------------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate empty buffers on the keys' device and dtype, so `device_map` models keep each layer local."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self._allocate(0, key_states.shape[-1], value_states.shape[-1])
        self.is_initialized = True

    def _allocate(self, capacity: int, key_dim: int, value_dim: int, fill=torch.empty) -> None:
        shape = (self.batch_size, self.num_heads, capacity)
        kwargs = {"dtype": self.dtype, "device": self.device}
        self._key_buffer = fill(*shape, key_dim, **kwargs)
        self._value_buffer = fill(*shape, value_dim, **kwargs)
        if self.keeps_metadata:
            pages = (self.batch_size, self.num_heads, capacity // self.config.page_size, key_dim)
            self.page_min = fill(pages, **kwargs)
            self.page_max = fill(pages, **kwargs)

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[2]

    def _reserve(self, needed: int) -> None:
        """Grow the buffers to hold ``needed`` tokens, geometrically so that appends cost amortised O(1)."""
        if needed <= self.capacity:
            return
        page_size = self.config.page_size
        # Growth by 1.25x: still amortised O(1) per token, and a long context's last reallocation (old and new
        # buffers alive at once) costs 2.25x its KV instead of 3x. Set max_cache_len to avoid reallocations.
        capacity = max(needed, self.capacity + self.capacity // 4, 256)
        capacity = -(-capacity // page_size) * page_size
        old = (self._key_buffer, self._value_buffer, self.page_min, self.page_max)
        self._allocate(capacity, old[0].shape[-1], old[1].shape[-1])
        self._key_buffer[:, :, : self.length] = old[0][:, :, : self.length]
        self._value_buffer[:, :, : self.length] = old[1][:, :, : self.length]
        if self.keeps_metadata:
            used_pages = -(-self.length // page_size)
            self.page_min[:, :, :used_pages] = old[2][:, :, :used_pages]
            self.page_max[:, :, :used_pages] = old[3][:, :, :used_pages]

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    # -- what the attention function asks of a layer ---------------------------------------------------------------

    @property
    def visible_length(self) -> int:
        """Length of the key/value tensors that ``update`` returned (the attention function checks it)."""
        return self.length

    def seq_lens(self) -> torch.Tensor | None:
        """[B] int32 tokens written per sequence when the buffers are longer than that (static); None here."""
        return None

    def record_decode(self, dense: int, read: int) -> None:
        self.stats.add(dense=dense, read=read)

    def written_keys(self) -> torch.Tensor | None:
        """[B, L] bool of the slots holding tokens, for when transformers passes no mask; None: all of them."""
        return None

    def sync_metadata(self) -> None:
        """Bring the page metadata up to date with the keys (a static layer may defer its last decode append)."""

    def _refresh_metadata(self, start: int, end: int) -> None:
        if self.keeps_metadata:
            get_ops(self.device).refresh_pages(
                self.page_min, self.page_max, self._key_buffer, start, end, self.config.page_size,
                self.config.page_summary,
            )

    # -- decode hooks, called by the "quest" attention function ------------------------------------------------------

    def is_sparse_step(self, query_length: int, length: int) -> bool:
        """Whether this step selects pages: one query token, a layer that selects, more pages than the budget."""
        num_pages = -(-length // self.config.page_size)
        return query_length == 1 and not self.is_dense and num_pages > self.config.page_budget

    def sparse_decode(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_valid: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """One sparse decode step: query [B, Hq, D], key/value [B, Hkv, L, D] -> [B, Hq, D] (the backend's decode)."""
        config = self.config
        batch, q_heads, _ = query.shape
        kv_heads, length = key.shape[1], key.shape[2]
        num_pages = -(-length // config.page_size)
        if key_valid is None:
            key_valid = self.written_keys()
        append_keys = self._key_buffer if self._append_pending else None
        self._append_pending = False
        output, _ = get_ops(query.device).decode(
            query, key, value, self.page_min, self.page_max, key_valid, config, scaling,
            seq_lens=self.seq_lens(), append_keys=append_keys,
        )
        # Upper bound of the pages a KV head reads: per-query-head selection may pick different pages per head.
        group = q_heads // kv_heads
        pages_read = min(config.page_budget * (group if config.aggregation == "none" else 1), num_pages)
        read = min(pages_read * config.page_size, length) + 2 * num_pages
        self.record_decode(dense=batch * kv_heads * length, read=batch * kv_heads * read)
        return output

    def attend_all_pages(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
    ) -> torch.Tensor | None:
        """A dense one-token step by the backend's attention kernel: query [B, Hq, D] -> [B, Hq, D], or None where
        the backend leaves it to SDPA (no kernel, or one that does not fit)."""
        if key_valid is None:
            key_valid = self.written_keys()
        return get_ops(query.device).attend_all_pages(
            query, key, value, key_valid, scaling, self.config.page_size, seq_lens=self.seq_lens()
        )

    def observe_dense(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> None:
        """Called after every dense attention call of this layer (prefill included); selectors that learn from
        attention (H2O) override it."""

    # -- CacheLayerMixin API -------------------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, Hkv, n, D]`` keys/values, fold them into the page metadata, return the whole cache."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._reserve(end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._refresh_metadata(start, end)
        self._set_length(end)
        HANDOFF.publish(self)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget the tokens, keep the buffers for the next prompt."""
        if self.is_initialized:
            self._set_length(0)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative, as transformers passes it) and re-reduce the cut page."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove, got {tokens_to_remove} "
                "(positive values were a legacy absolute length)."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        new_length = max(self.length + tokens_to_remove, 0)
        page_start = new_length - new_length % self.config.page_size
        self._refresh_metadata(page_start, new_length)
        self._set_length(new_length)

    def _map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch dimension of every buffer (beam reorder, repeat, select)."""
        if not self.is_initialized:
            return
        self._key_buffer = fn(self._key_buffer)
        self._value_buffer = fn(self._value_buffer)
        if self.keeps_metadata:
            self.page_min = fn(self.page_min)
            self.page_max = fn(self.page_max)
        self.batch_size = self._key_buffer.shape[0]
        self._set_length(self.length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self) -> None:
        raise NotImplementedError("QuestCache does not support offloading.")

    def prefetch(self) -> None:
        raise NotImplementedError("QuestCache does not support offloading.")


class StaticQuestLayer(QuestLayer):
    """A `QuestLayer` of fixed capacity for compiled / CUDA-graph decoding.

    Buffers (keys, values, page metadata) are allocated once and written in place, the length lives in a device
    tensor, and a decode step has no host sync and no Python branch on the length, so ``generate`` can compile
    and graph-capture it. Like transformers' `StaticLayer`, ``update`` returns the whole buffers; the attention
    mask hides the slots not yet written.
    """

    is_compileable = True
    is_croppable = False

    def __init__(self, config: QuestConfig, layer_idx: int, max_cache_len: int, stats: ReadStats | None = None):
        super().__init__(config, layer_idx, stats)
        page_size = config.page_size
        self.max_cache_len = -(-max_cache_len // page_size) * page_size
        # Tensors, not ints: an int would be baked into a compiled graph (or recompile it every step).
        self.cumulative_length = torch.tensor(0, dtype=torch.long)
        self._seq_lens: torch.Tensor | None = None  # [B] int32 copy of the length, the kernels' vocabulary

    def __repr__(self) -> str:
        return f"StaticQuestLayer(layer_idx={self.layer_idx}, max_cache_len={self.max_cache_len})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # Zeros: attention reads the whole buffer with unwritten slots masked, and 0 * NaN garbage would be NaN.
        self._allocate(self.max_cache_len, key_states.shape[-1], value_states.shape[-1], fill=torch.zeros)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self._seq_lens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)
        self.keys, self.values = self._key_buffer, self._value_buffer
        if not torch.compiler.is_compiling():
            # Fixed addresses, or CUDA graphs cannot be used (same as transformers' StaticLayer).
            for tensor in (
                self._key_buffer, self._value_buffer, self.page_min, self.page_max, self.cumulative_length, self._seq_lens
            ):
                if tensor is not None:
                    torch._dynamo.mark_static_address(tensor)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, Hkv, n, D]`` keys/values at the current length, in place; return the whole buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        if not torch.compiler.is_compiling():
            # Eager steps (always the prefill) can afford the check; a compiled step cannot sync to make it.
            end = int(self.cumulative_length) + count
            if end > self.max_cache_len:
                raise ValueError(
                    f"QuestCache(max_cache_len={self.max_cache_len}) cannot hold {end} tokens: give max_cache_len >= "
                    "prompt length + max_new_tokens."
                )
        # An append the attention did not take (a dense step, another attention function) runs before the write:
        # it recomputes the page of the newest token, which the write is about to change.
        self._flush_append()
        positions = torch.arange(count, device=self.device) + self.cumulative_length
        self._key_buffer.index_copy_(2, positions, key_states)
        self._value_buffer.index_copy_(2, positions, value_states)
        self.cumulative_length.add_(count)
        self._seq_lens.add_(count)
        if self.keeps_metadata:
            if count == 1:
                # The current page's score is forced, so its metadata is first needed by the next step: a sparse
                # decode folds this append into its scoring launch instead of launching it here.
                self._append_pending = True
                if not self.is_sparse_step(1, self.max_cache_len):
                    self._flush_append()
            else:
                start = int(positions[0])
                self._refresh_metadata(start, start + count)
        HANDOFF.publish(self)
        return self.keys, self.values

    def sync_metadata(self) -> None:
        """Run a decode append left for the next sparse step on its own. Only code that reads ``page_min`` /
        ``page_max`` outside a decode step needs this."""
        self._flush_append()

    def _flush_append(self) -> None:
        if self._append_pending:
            self._append_pending = False
            get_ops(self.device).append_pages(
                self.page_min, self.page_max, self._key_buffer, self._seq_lens, self.config.page_size,
                self.config.page_summary,
            )

    @property
    def visible_length(self) -> int:
        return self.max_cache_len

    def seq_lens(self) -> torch.Tensor:
        return self._seq_lens

    def record_decode(self, dense: int, read: int) -> None:
        """Not counted: the real length is on the device and reading it would sync every step."""

    def written_keys(self) -> torch.Tensor:
        written = torch.arange(self.max_cache_len, device=self.device) < self.cumulative_length
        return written[None].expand(self.batch_size, -1)

    def get_seq_length(self) -> torch.Tensor | int:
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.cumulative_length.zero_()
        if self._seq_lens is not None:
            self._seq_lens.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A static QuestCache (max_cache_len set) cannot be cropped; use QuestCache without max_cache_len for "
            "assisted or prompt-lookup decoding."
        )

    def _map_batch(self, fn) -> None:
        """In place, so that the buffers keep the addresses compiled graphs were captured with."""
        if not self.is_initialized:
            return
        for tensor in (self._key_buffer, self._value_buffer, self.page_min, self.page_max):
            if tensor is not None:
                result = fn(tensor)
                if result.shape != tensor.shape:
                    raise ValueError("A static QuestCache cannot change its batch size after allocation.")
                tensor.copy_(result)


class QuestCache(Cache):
    """A transformers `Cache` for Quest decoding: keeps every token, selects pages per decode step.

    Use with a model loaded with ``attn_implementation="quest"`` (registered by ``import transformers_quest``).
    One cache holds one generation: make a new one for every ``generate`` call.

    Args:
        budget (`int`, defaults to 2048): tokens attended per decode step (see `QuestConfig`).
        page_size (`int`, defaults to 16): tokens per page, a power of two.
        dense_layers (`int`, defaults to 2): the first layers attend densely.
        aggregation (`str`, defaults to ``"max"``): how a GQA group combines page scores ("max", "sum", "none").
        spread (`float`, defaults to 0.5): weight of the box half-width in the page score (1.0 = Quest's bound).
        keep_first_page (`bool`, defaults to True): always attend to the first page (the attention sink).
        recent_pages (`int`, defaults to 0): always attend to the pages just before the current one.
        page_summary (`str`, defaults to ``"mean"``): the two vectors kept per page ("mean", "minmax", "centroids").
        config (`QuestConfig`, *optional*): all of the above at once; excludes the other arguments.
        max_cache_len (`int`, *optional*): preallocate this many tokens (prompt + new tokens) per layer and make
            the cache compileable: on a GPU, ``generate`` then compiles and graph-captures the decode step.

    Example:
        >>> import transformers_quest
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="quest")
        >>> out = model.generate(**inputs, past_key_values=transformers_quest.QuestCache(budget=2048))
    """

    def __init__(
        self,
        budget: int = 2048,
        page_size: int = 16,
        dense_layers: int = 2,
        aggregation: str = "max",
        spread: float = 0.5,
        keep_first_page: bool = True,
        *,
        recent_pages: int = 0,
        page_summary: str = "mean",
        config: QuestConfig | None = None,
        max_cache_len: int | None = None,
    ):
        if max_cache_len is not None and (
            isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0
        ):
            raise ValueError(f"`max_cache_len` must be a positive int or None, got {max_cache_len!r}.")
        if config is None:
            config = QuestConfig(
                budget, page_size, dense_layers, aggregation, spread, keep_first_page, recent_pages, page_summary
            )
        elif not isinstance(config, QuestConfig):
            raise TypeError(f"`config` must be a QuestConfig, got {type(config).__name__}.")
        self.config = config
        # Whole pages; not named `max_cache_len` because some transformers versions define that as a property.
        self.static_capacity = None if max_cache_len is None else -(-max_cache_len // config.page_size) * config.page_size
        self.stats = ReadStats()
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> QuestLayer:
        if self.static_capacity is not None:
            return StaticQuestLayer(self.config, len(self.layers), self.static_capacity, stats=self.stats)
        return QuestLayer(self.config, layer_idx=len(self.layers), stats=self.stats)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # Static layers are created on first update, after the prefill mask is built: size it like they will be.
        if self.static_capacity is not None:
            return self.static_capacity, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def __repr__(self) -> str:
        static = f", max_cache_len={self.static_capacity}" if self.static_capacity is not None else ""
        return f"QuestCache({self.config}{static}, layers={len(self.layers)})"
