// Per-stream scratch for kernels that hand work to the last block of a row.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

namespace quest {

// Zero-initialised int32 counters for "last block of a row" hand-offs. Kernels leave them at zero again (the last
// block resets its counter), so they are allocated once per (device, stream) and never freed: pointers captured in
// CUDA graphs stay valid. One buffer per stream lets launches on different streams run concurrently; launches on
// one stream are ordered, so they can share it.
inline int* zeroed_counters(const at::Device& device, int64_t count) {
  static std::mutex mutex;
  static auto* buffers = new std::map<std::pair<int, int64_t>, at::Tensor>();  // leaked: no teardown after CUDA's
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[{device.index(), static_cast<int64_t>(stream.id())}];
  if (!buffer.defined() || buffer.numel() < count) {
    // The previous buffer is kept alive (leaked) as graphs captured earlier may still point at it.
    if (buffer.defined()) new at::Tensor(buffer);
    buffer = at::zeros({std::max<int64_t>(count, 4096)}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  return buffer.data_ptr<int>();
}

}  // namespace quest
