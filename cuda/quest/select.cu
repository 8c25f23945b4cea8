// Top-k page selection: the K best-scoring pages of every row of scores, as ascending page indices.
//
// One block per row. The row is staged once in shared memory; a radix select over order-preserving keys (8 bits
// a pass, most significant first, stopping as soon as the boundary bin is taken whole) finds the K-th largest
// score exactly; a final pass keeps every page above it and the lowest-index pages equal to it, writing them in
// ascending order through a block-wide prefix sum. Histogram updates are aggregated per warp (__match_any_sync):
// scores share their exponent bits, so plain atomics would serialise on one bin.
// keep_first forces the first page with a finite score (the first real page: the attention sink) just below the
// current page, which page_scores already forced to +inf.
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

#include "check.h"
#include "common.cuh"
#include "ops.h"

namespace quest {

constexpr int kSelectThreads = 512;
constexpr int kMaxSharedPages = 40 * 1024;  // 160 KB of staged scores; longer rows are read from L2 each pass

template <bool kStaged>
__global__ void __launch_bounds__(kSelectThreads)
    select_pages_kernel(const float* __restrict__ scores, int64_t row_stride, int num_pages, int k,
                        int* __restrict__ indices, bool keep_first) {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int hist[256];
  __shared__ int chosen_digit, chosen_rest, chosen_done, sink;
  extern __shared__ uint32_t staged[];

  const int tid = threadIdx.x, lane = tid % 32;
  const float* row = scores + blockIdx.x * row_stride;
  int* out = indices + static_cast<int64_t>(blockIdx.x) * k;
  // Each thread owns a contiguous run of pages, so that the output can be written in ascending order.
  const int per_thread = (num_pages + kSelectThreads - 1) / kSelectThreads;
  const int begin = tid * per_thread, end = min(begin + per_thread, num_pages);

  if (tid == 0) sink = num_pages;
  if (kStaged) {
    for (int i = tid; i < num_pages; i += kSelectThreads) staged[i] = order_key(__ldg(row + i));
  }
  __syncthreads();
  auto raw_key = [&](int i) { return kStaged ? staged[i] : order_key(__ldg(row + i)); };
  const uint32_t minus_inf = order_key(-INFINITY);
  if (keep_first) {
    for (int i = begin; i < end; ++i) {
      if (raw_key(i) > minus_inf) {
        atomicMin(&sink, i);
        break;
      }
    }
    __syncthreads();
  }
  const int sink_page = sink;  // num_pages when not keeping the first page
  const uint32_t sink_key = order_key(FLT_MAX);
  auto key_at = [&](int i) { return i == sink_page ? sink_key : raw_key(i); };

  uint32_t prefix = 0, mask = 0;
  int rest = k;  // how many of the pages matching `prefix` (under `mask`) are still to be taken
#pragma unroll 1
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (tid < 256) hist[tid] = 0;
    __syncthreads();
    for (int j = 0; j < per_thread; ++j) {  // same trip count in every thread: __match_any_sync needs all lanes
      const int i = begin + j;
      int digit = 256;  // no bin
      if (i < end) {
        const uint32_t key = key_at(i);
        if ((key & mask) == prefix) digit = (key >> shift) & 255u;
      }
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
    }
    __syncthreads();
    // Thread t holds bin 255 - t, so the inclusive sum counts the pages with a digit >= 255 - t.
    const int count = tid < 256 ? hist[255 - tid] : 0;
    int at_least;
    Scan(scan_storage).InclusiveSum(count, at_least);
    if (tid < 256) {
      const int above = at_least - count;
      if (above < rest && at_least >= rest) {
        chosen_digit = 255 - tid;
        chosen_rest = rest - above;
        chosen_done = count == rest - above;  // the whole bin is taken: no need to look at lower bits
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(chosen_digit) << shift;
    mask |= 255u << shift;
    rest = chosen_rest;
    const bool done = chosen_done;
    __syncthreads();
    if (done) break;
  }

  // Take every page whose masked key is above `prefix`, and the first `rest` pages equal to it.
  int equal = 0;
  for (int i = begin; i < end; ++i) equal += (key_at(i) & mask) == prefix;
  int equal_before;
  Scan(scan_storage).ExclusiveSum(equal, equal_before);
  __syncthreads();
  int taken = 0;
  for (int i = begin, e = equal_before; i < end; ++i) {
    const uint32_t key = key_at(i) & mask;
    if (key > prefix) {
      ++taken;
    } else if (key == prefix) {
      taken += e < rest;
      ++e;
    }
  }
  int position;
  Scan(scan_storage).ExclusiveSum(taken, position);
  for (int i = begin, e = equal_before; i < end; ++i) {
    const uint32_t key = key_at(i) & mask;
    bool take = key > prefix;
    if (key == prefix) {
      take = e < rest;
      ++e;
    }
    if (take && position < k) out[position++] = i;
  }
}

}  // namespace quest

void select_pages(at::Tensor& indices, const at::Tensor& scores, bool keep_first) {
  TORCH_CHECK(scores.is_cuda() && scores.scalar_type() == at::kFloat && scores.dim() == 3 && scores.stride(2) == 1,
              "scores must be a float32 CUDA tensor [B, Hs, P] contiguous along pages");
  TORCH_CHECK(scores.stride(0) == scores.size(1) * scores.stride(1), "scores rows must be evenly strided");
  TORCH_CHECK(indices.is_cuda() && indices.scalar_type() == at::kInt && indices.is_contiguous() && indices.dim() == 3 &&
                  indices.size(0) == scores.size(0) && indices.size(1) == scores.size(1),
              "indices must be a contiguous int32 CUDA tensor [B, Hs, K]");
  const int64_t num_pages = scores.size(2), k = indices.size(2);
  TORCH_CHECK(k >= 1 && k <= num_pages, "need 1 <= K <= pages, got K=", k, " pages=", num_pages);
  const int64_t rows = scores.size(0) * scores.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(scores.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (num_pages <= quest::kMaxSharedPages) {
    const int smem = static_cast<int>(num_pages * sizeof(uint32_t));
    static bool raised[64] = {false};  // the opt-in above 48 KB is per device and kernel, once
    const int device = scores.get_device();
    if (smem > 48 * 1024 && device >= 0 && device < 64 && !raised[device]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(quest::select_pages_kernel<true>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          quest::kMaxSharedPages * static_cast<int>(sizeof(uint32_t))));
      raised[device] = true;
    }
    quest::select_pages_kernel<true><<<rows, quest::kSelectThreads, smem, stream>>>(
        scores.data_ptr<float>(), scores.stride(1), num_pages, k, indices.data_ptr<int>(), keep_first);
  } else {
    quest::select_pages_kernel<false><<<rows, quest::kSelectThreads, 0, stream>>>(
        scores.data_ptr<float>(), scores.stride(1), num_pages, k, indices.data_ptr<int>(), keep_first);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
