// Op schemas of the Quest decode kernels. Mutated outputs come first and are marked `Tensor!`; every op returns
// nothing, takes lengths as device tensors where they change between CUDA-graph replays, and never syncs.
#include <torch/library.h>

#include "ops.h"
#include "registration.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  // Recompute the min/max (summary 0) or mean box (summary 1) of the pages that tokens [start, end) touch.
  ops.def("refresh_pages(Tensor! page_min, Tensor! page_max, Tensor keys, int start, int end, int page_size, "
          "int summary=0) -> ()");
  ops.impl("refresh_pages", c10::kCUDA, &refresh_pages);

  // Recompute the page that holds token seq_lens[b] - 1 of each sequence (a decode append, length on device).
  ops.def("append_pages(Tensor! page_min, Tensor! page_max, Tensor keys, Tensor seq_lens, int page_size, "
          "int summary=0) -> ()");
  ops.impl("append_pages", c10::kCUDA, &append_pages);

  // fp32 page scores [B, Hs, P] for one query token: invalid pages -inf, the current page +inf. With append_keys,
  // the same launch first recomputes each sequence's current page from them (append_pages, fused; summary as there).
  ops.def(
      "page_scores(Tensor! scores, Tensor query, Tensor(a!) page_min, Tensor(b!) page_max, Tensor? key_valid, "
      "Tensor? seq_lens, int max_len, float spread, int aggregation, int score_mode, int page_size, "
      "Tensor? append_keys=None, int summary=0) -> ()");
  ops.impl("page_scores", c10::kCUDA, &page_scores);

  // Indices [B, Hs, K] (int32, ascending) of the K best pages of every score row.
  ops.def("select_pages(Tensor! indices, Tensor scores, bool keep_first) -> ()");
  ops.impl("select_pages", c10::kCUDA, &select_pages);

  // Exact attention of one query token over the valid tokens of the selected pages (split-K with a merge).
  ops.def(
      "sparse_decode(Tensor! out, Tensor query, Tensor keys, Tensor values, Tensor indices, Tensor? key_valid, "
      "Tensor? seq_lens, int max_len, float scale, int page_size, bool per_query_head) -> ()");
  ops.impl("sparse_decode", c10::kCUDA, &sparse_decode);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
