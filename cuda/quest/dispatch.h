// Compile-time dispatch over dtype, head dim and the number of query heads one block serves.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define QUEST_DISPATCH_DTYPE(scalar, T, ...)                                             \
  [&] {                                                                                  \
    if ((scalar) == at::kHalf) {                                                         \
      using T = __half;                                                                  \
      return __VA_ARGS__();                                                              \
    } else if ((scalar) == at::kBFloat16) {                                              \
      using T = __nv_bfloat16;                                                           \
      return __VA_ARGS__();                                                              \
    }                                                                                    \
    TORCH_CHECK(false, "Quest kernels support float16 and bfloat16, got ", (scalar));    \
  }()

#define QUEST_DISPATCH_HEAD_DIM(dim, D, ...)                                             \
  [&] {                                                                                  \
    if ((dim) == 64) {                                                                   \
      constexpr int D = 64;                                                              \
      return __VA_ARGS__();                                                              \
    } else if ((dim) == 128) {                                                           \
      constexpr int D = 128;                                                             \
      return __VA_ARGS__();                                                              \
    }                                                                                    \
    TORCH_CHECK(false, "Quest kernels support head_dim 64 and 128, got ", (dim));        \
  }()

// NQ: register slots for query heads; a launch serves nq <= NQ heads, rounded up to 1, 2, 4 or 8.
#define QUEST_DISPATCH_HEADS(nq, NQ, ...)                                                \
  [&] {                                                                                  \
    if ((nq) <= 1) {                                                                     \
      constexpr int NQ = 1;                                                              \
      return __VA_ARGS__();                                                              \
    } else if ((nq) <= 2) {                                                              \
      constexpr int NQ = 2;                                                              \
      return __VA_ARGS__();                                                              \
    } else if ((nq) <= 4) {                                                              \
      constexpr int NQ = 4;                                                              \
      return __VA_ARGS__();                                                              \
    } else if ((nq) <= 8) {                                                              \
      constexpr int NQ = 8;                                                              \
      return __VA_ARGS__();                                                              \
    }                                                                                    \
    TORCH_CHECK(false, "Quest kernels support up to 8 query heads per KV head, got ", (nq)); \
  }()
