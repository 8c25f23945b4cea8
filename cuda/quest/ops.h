// Host entry points of the Quest decode kernels; each checks its inputs and launches on the current stream.
//
// Layouts (element strides; the last dimension must be contiguous and 16-byte aligned):
//   keys, values       [B, Hkv, L_capacity, D]   any batch/head/token strides (views of larger buffers)
//   page_min, page_max [B, Hkv, P_capacity, D]
//   query              [B, Hq, D]
//   scores             [B, Hs, P] float32, contiguous (Hs = Hkv, or Hq when every query head selects)
//   indices            [B, Hs, K] int32, contiguous
//   key_valid          [B, >= max_len] bool (False = padding), optional
//   seq_lens           [B] int32 tokens per sequence (device), optional; absent means max_len for all
#pragma once

#include <ATen/ATen.h>

#include <optional>

void refresh_pages(at::Tensor& page_min, at::Tensor& page_max, const at::Tensor& keys, int64_t start, int64_t end,
                   int64_t page_size, int64_t summary);

void append_pages(at::Tensor& page_min, at::Tensor& page_max, const at::Tensor& keys, const at::Tensor& seq_lens,
                  int64_t page_size, int64_t summary);

void page_scores(at::Tensor& scores, const at::Tensor& query, at::Tensor& page_min, at::Tensor& page_max,
                 const std::optional<at::Tensor>& key_valid, const std::optional<at::Tensor>& seq_lens, int64_t max_len,
                 double spread, int64_t aggregation, int64_t score_mode, int64_t page_size,
                 const std::optional<at::Tensor>& append_keys, int64_t summary);

void select_pages(at::Tensor& indices, const at::Tensor& scores, bool keep_first);

void sparse_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                   const at::Tensor& indices, const std::optional<at::Tensor>& key_valid,
                   const std::optional<at::Tensor>& seq_lens, int64_t max_len, double scale, int64_t page_size,
                   bool per_query_head);
