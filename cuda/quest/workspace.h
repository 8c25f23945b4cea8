// Per-device scratch shared by launches on the device's streams.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace quest {

// Zero-initialised int32 counters for "last block of a row" hand-offs. Kernels leave them at zero again (the last
// block resets its counter), so they are allocated once per device and never freed: pointers captured in CUDA
// graphs stay valid. Launches that use them must not run concurrently on two streams of one device.
inline int* zeroed_counters(const at::Device& device, int64_t count) {
  constexpr int kMaxDevices = 64;
  static at::Tensor* current[kMaxDevices] = {nullptr};  // leaked on purpose: no destruction after CUDA teardown
  const int index = device.index();
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "device index out of range: ", index);
  if (current[index] == nullptr || current[index]->numel() < count) {
    // The previous buffer is kept alive (leaked) as graphs captured earlier may still point at it.
    current[index] = new at::Tensor(
        at::zeros({std::max<int64_t>(count, 4096)}, at::TensorOptions().dtype(at::kInt).device(device)));
  }
  return current[index]->data_ptr<int>();
}

}  // namespace quest
