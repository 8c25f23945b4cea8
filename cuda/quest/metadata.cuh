// Page metadata of one page from its keys: the device-side recompute shared by the metadata ops (metadata.cu) and
// the decode append fused into page scoring (score.cu).
#pragma once

#include <ATen/ATen.h>

#include "common.cuh"

namespace quest {

// Recomputes kVec elements of one page's metadata from its tokens [t0, t1) (k points at token 0 of the row and
// the slice): element-wise min / max, or with mean_box that box centred on the mean key (mean -+ (max - min) / 2).
template <typename T>
__device__ __forceinline__ void recompute_page_slice(const T* k, int64_t k_stride_t, int t0, int t1, bool mean_box,
                                                     T* page_min, T* page_max) {
  float lo[kVec], hi[kVec], sum[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    lo[i] = INFINITY;
    hi[i] = -INFINITY;
    sum[i] = 0.f;
  }
  for (int t = t0; t < t1; ++t) {
    float x[kVec];
    unpack8<T>(load16(k + t * k_stride_t), x);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      lo[i] = fminf(lo[i], x[i]);
      hi[i] = fmaxf(hi[i], x[i]);
      sum[i] += x[i];
    }
  }
  if (mean_box) {
    const float inv_count = 1.f / static_cast<float>(max(t1 - t0, 1));
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float mean = sum[i] * inv_count, radius = (hi[i] - lo[i]) * 0.5f;
      lo[i] = mean - radius;
      hi[i] = mean + radius;
    }
  }
  *reinterpret_cast<uint4*>(page_min) = pack8<T>(lo);
  *reinterpret_cast<uint4*>(page_max) = pack8<T>(hi);
}

// Shapes, dtypes and layouts of page_min / page_max against keys (metadata.cu).
void check_metadata(const at::Tensor& page_min, const at::Tensor& page_max, const at::Tensor& keys);

}  // namespace quest
