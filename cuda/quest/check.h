// Input checks shared by the host entry points: they raise c10::Error (ValueError/RuntimeError in Python).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace quest {

inline void check_vectors(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
              " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  for (int i = 0; i < t.dim() - 1; ++i) {
    TORCH_CHECK(t.stride(i) % 8 == 0, name, " strides must be multiples of 8 elements, got stride ", t.stride(i),
                " in dim ", i);
  }
}

inline int log2_exact(int64_t x, const char* name) {
  TORCH_CHECK(x > 0 && (x & (x - 1)) == 0, name, " must be a positive power of two, got ", x);
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

inline void check_seq_lens(const std::optional<at::Tensor>& seq_lens, int64_t batch) {
  if (!seq_lens.has_value()) return;
  TORCH_CHECK(seq_lens->is_cuda() && seq_lens->scalar_type() == at::kInt && seq_lens->dim() == 1 &&
                  seq_lens->size(0) == batch && seq_lens->is_contiguous(),
              "seq_lens must be a contiguous int32 CUDA tensor of shape [", batch, "]");
}

inline void check_key_valid(const std::optional<at::Tensor>& key_valid, int64_t batch, int64_t max_len) {
  if (!key_valid.has_value()) return;
  TORCH_CHECK(key_valid->is_cuda() && key_valid->scalar_type() == at::kBool && key_valid->dim() == 2 &&
                  key_valid->size(0) == batch && key_valid->size(1) >= max_len && key_valid->stride(1) == 1,
              "key_valid must be a bool CUDA tensor [", batch, ", >= ", max_len, "] contiguous along tokens");
}

}  // namespace quest
