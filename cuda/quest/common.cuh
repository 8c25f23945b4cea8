// Shared device helpers: 16-byte vectors of 8 half-precision values, warp reductions, order-preserving keys.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

namespace quest {

// One lane moves 8 elements (16 bytes) of a head vector; a head of D elements is spread over D / 8 lanes.
constexpr int kVec = 8;

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[kVec]);

template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& raw, float (&out)[kVec]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& raw, float (&out)[kVec]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&in)[kVec]);

template <>
__device__ __forceinline__ uint4 pack8<__half>(const float (&in)[kVec]) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
  return raw;
}

template <>
__device__ __forceinline__ uint4 pack8<__nv_bfloat16>(const float (&in)[kVec]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
  return raw;
}

// Read-only 16-byte load through the non-coherent path (the data does not change during the kernel).
__device__ __forceinline__ uint4 load16(const void* ptr) { return __ldg(reinterpret_cast<const uint4*>(ptr)); }

// Sum over groups of `width` consecutive lanes (width a power of two <= 32); every lane gets its group's sum.
template <int width>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Maps a float to an unsigned key with the same order (larger float -> larger key), -inf lowest, +inf highest.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace quest

namespace quest {

// Programmatic dependent launch (sm_90+): a kernel launched with launch_pdl may be scheduled while the previous
// kernel in the stream is still finishing; pdl_wait() blocks until that kernel has completed and its writes are
// visible, so it must precede every read of data the previous kernels produced. pdl_launch_dependents() lets the
// next kernel start scheduling. On older architectures both are no-ops and launches are ordinary.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace quest
