// Kernel launch with programmatic stream serialization (see pdl_wait in common.cuh).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace quest {

// A switch from the environment for measuring what a choice is worth: on unless set to "0". Callers keep the value
// in a static, so it is read once.
inline bool env_switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// QUEST_KERNELS_PDL=0 launches every kernel without programmatic dependent launch (pdl_wait then returns at once):
// for measuring what the overlap is worth, or for tools that do not support it.
inline bool pdl_enabled() {
  static const bool enabled = env_switch_on("QUEST_KERNELS_PDL");
  return enabled;
}

// compute() (a positive value: a device attribute, an occupancy, a one-time opt-in) once per device, remembered:
// the callers run once per layer and step. Each call site's lambda is its own type, so it gets its own cache.
template <typename Compute>
int cached_per_device(int device, Compute compute) {
  static int values[64] = {0};  // 0: not computed yet
  if (device < 0 || device >= 64) return compute();
  if (values[device] == 0) values[device] = compute();
  return values[device];
}

inline int multiprocessor_count(int device) {
  return cached_per_device(device, [device] {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  });
}

template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace quest
