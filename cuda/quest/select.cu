// Top-k page selection: the K best-scoring pages of every row of scores, as ascending page indices.
//
// One block per row. The row is staged once in shared memory; a radix select over order-preserving keys (4 bits
// a pass, most significant first, stopping as soon as the boundary bin is taken whole) finds the K-th largest
// score exactly; a final pass keeps every page above it and the lowest-index pages equal to it, writing them in
// ascending order through a block-wide prefix sum.
// keep_first forces the first page with a finite score (the first real page: the attention sink) just below the
// current page, which page_scores already forced to +inf.
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

#include "check.h"
#include "common.cuh"
#include "ops.h"

namespace quest {

constexpr int kSelectThreads = 512;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kRadixBits = 4;
constexpr int kBins = 1 << kRadixBits;
constexpr int kMaxSharedPages = 40 * 1024;  // 160 KB of staged keys; longer rows are read from L2 each pass

// Thread t owns pages [t * per_thread, (t + 1) * per_thread), so that the output can be written in ascending order.
// Staged keys are stored transposed (page t * per_thread + j at j * kSelectThreads + t): a warp's accesses to its
// j-th pages then hit 32 different banks.
template <bool kStaged>
__global__ void __launch_bounds__(kSelectThreads)
    select_pages_kernel(const float* __restrict__ scores, int64_t row_stride, int num_pages, int k,
                        int* __restrict__ indices, bool keep_first) {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  // Per-lane histograms: lane-private counters need no atomics and never collide, even when every score falls in
  // the same bin (they share sign and exponent bits).
  __shared__ int lane_hist[kSelectWarps][kBins][32];
  __shared__ int bin_count[kBins];
  __shared__ int chosen_digit, chosen_rest, chosen_done, sink;
  extern __shared__ uint32_t staged[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const float* row = scores + blockIdx.x * row_stride;
  int* out = indices + static_cast<int64_t>(blockIdx.x) * k;
  const int per_thread = (num_pages + kSelectThreads - 1) / kSelectThreads;
  const int begin = tid * per_thread, end = min(begin + per_thread, num_pages), mine = max(end - begin, 0);

  if (tid == 0) sink = num_pages;
  if (kStaged) {
    for (int i = tid; i < num_pages; i += kSelectThreads) {
      staged[(i % per_thread) * kSelectThreads + i / per_thread] = order_key(__ldg(row + i));
    }
  }
  __syncthreads();
  auto raw_key = [&](int j) {  // the j-th page of this thread, j < mine
    return kStaged ? staged[j * kSelectThreads + tid] : order_key(__ldg(row + begin + j));
  };
  const uint32_t minus_inf = order_key(-INFINITY);
  if (keep_first) {
    for (int j = 0; j < mine; ++j) {
      if (raw_key(j) > minus_inf) {
        atomicMin(&sink, begin + j);
        break;
      }
    }
    __syncthreads();
  }
  const int sink_page = sink;  // num_pages when not keeping the first page
  const uint32_t sink_key = order_key(FLT_MAX);
  auto key_at = [&](int j) { return begin + j == sink_page ? sink_key : raw_key(j); };

  uint32_t prefix = 0, mask = 0;
  int rest = k;  // how many of the pages matching `prefix` (under `mask`) are still to be taken
#pragma unroll 1
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
#pragma unroll
    for (int b = 0; b < kBins; ++b) lane_hist[warp][b][lane] = 0;
    for (int j = 0; j < mine; ++j) {
      const uint32_t key = key_at(j);
      if ((key & mask) == prefix) ++lane_hist[warp][(key >> shift) & (kBins - 1)][lane];
    }
    __syncthreads();
    // Warp b counts bin b: a sum over warps, then over lanes.
    if (warp < kBins) {
      int count = 0;
#pragma unroll
      for (int w = 0; w < kSelectWarps; ++w) count += lane_hist[w][warp][lane];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) count += __shfl_xor_sync(0xffffffffu, count, offset);
      if (lane == 0) bin_count[warp] = count;
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l holds bin kBins - 1 - l; the inclusive sum counts the pages with a digit >= kBins - 1 - l.
      const int count = lane < kBins ? bin_count[kBins - 1 - lane] : 0;
      int at_least = count;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, at_least, offset);
        if (lane >= offset) at_least += other;
      }
      const int above = at_least - count;
      if (lane < kBins && above < rest && at_least >= rest) {
        chosen_digit = kBins - 1 - lane;
        chosen_rest = rest - above;
        chosen_done = count == rest - above;  // the whole bin is taken: no need to look at lower bits
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(chosen_digit) << shift;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    rest = chosen_rest;
    const bool done = chosen_done;
    if (done) break;
  }

  // Take every page whose masked key is above `prefix`, and the first `rest` pages equal to it.
  int equal = 0;
  for (int j = 0; j < mine; ++j) equal += (key_at(j) & mask) == prefix;
  int equal_before;
  Scan(scan_storage).ExclusiveSum(equal, equal_before);
  __syncthreads();
  int taken = 0;
  for (int j = 0, e = equal_before; j < mine; ++j) {
    const uint32_t key = key_at(j) & mask;
    if (key > prefix) {
      ++taken;
    } else if (key == prefix) {
      taken += e < rest;
      ++e;
    }
  }
  int position;
  Scan(scan_storage).ExclusiveSum(taken, position);
  for (int j = 0, e = equal_before; j < mine; ++j) {
    const uint32_t key = key_at(j) & mask;
    bool take = key > prefix;
    if (key == prefix) {
      take = e < rest;
      ++e;
    }
    if (take && position < k) out[position++] = begin + j;
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
  const int64_t staged_pages = (num_pages + quest::kSelectThreads - 1) / quest::kSelectThreads * quest::kSelectThreads;
  if (staged_pages <= quest::kMaxSharedPages) {
    const int smem = static_cast<int>(staged_pages * sizeof(uint32_t));
    static bool raised[64] = {false};  // the opt-in above 48 KB (static + dynamic) is per device and kernel, once
    const int device = scores.get_device();
    if (device >= 0 && device < 64 && !raised[device]) {
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
