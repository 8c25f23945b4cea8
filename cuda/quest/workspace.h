// Per-stream scratch for kernels that hand work to the last block of a row.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

namespace quest {

// Zero-initialised int32 counters for "last block of a row" hand-offs. Kernels leave them at zero again (the last
// block resets its counter), so they are allocated once per (device, stream) and never freed: pointers captured in
// CUDA graphs stay valid. One buffer per stream lets launches on different streams run concurrently; launches on
// one stream are ordered, so they can share it.
//
// The first call on a stream often comes while that stream is being captured into a CUDA graph. The buffer is then
// allocated and zeroed outside the capture (relaxed capture mode for this thread, a stream of its own), so that it
// is zero before any graph runs, not only after the replay of the graph that happened to create it.
inline int* zeroed_counters(const at::Device& device, int64_t count) {
  struct Buffer {
    int* data = nullptr;
    int64_t count = 0;
  };
  static std::mutex mutex;
  static auto* buffers = new std::map<std::pair<int, int64_t>, Buffer>();  // leaked, as are the buffers
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const std::lock_guard<std::mutex> lock(mutex);
  Buffer& buffer = (*buffers)[{device.index(), static_cast<int64_t>(stream.id())}];
  if (buffer.count < count) {
    // A smaller earlier buffer stays allocated: graphs captured before may still point at it.
    const int64_t elements = std::max<int64_t>(count, 4096);
    const c10::cuda::CUDAGuard guard(device);
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    int* data = nullptr;
    cudaStream_t side = nullptr;
    cudaError_t status = cudaMalloc(&data, elements * sizeof(int));
    if (status == cudaSuccess) status = cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
    if (status == cudaSuccess) status = cudaMemsetAsync(data, 0, elements * sizeof(int), side);
    if (status == cudaSuccess) status = cudaStreamSynchronize(side);
    if (side != nullptr) cudaStreamDestroy(side);
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    C10_CUDA_CHECK(status);
    buffer = {data, elements};
  }
  return buffer.data;
}

}  // namespace quest
