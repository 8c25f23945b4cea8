// Top-k page selection: the K best-scoring pages of every row of scores, as ascending page indices.
//
// One block per row. A 4-pass radix select (8 bits a pass) over order-preserving keys finds the K-th largest
// score exactly; a final pass keeps every page above it and the lowest-index pages equal to it, writing them in
// ascending order through a block-wide prefix sum. The row (32 KB at 8192 pages) stays in L1 across passes.
// keep_first forces the first page with a finite score (the first real page: the attention sink) just below the
// current page, which page_scores already forced to +inf.
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

#include "check.h"
#include "common.cuh"
#include "ops.h"

namespace quest {

constexpr int kSelectThreads = 512;

__global__ void __launch_bounds__(kSelectThreads)
    select_pages_kernel(const float* __restrict__ scores, int64_t row_stride, int num_pages, int k,
                        int* __restrict__ indices, bool keep_first) {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int hist[256];
  __shared__ int chosen_digit, chosen_rest, sink;

  const int tid = threadIdx.x;
  const float* row = scores + blockIdx.x * row_stride;
  int* out = indices + static_cast<int64_t>(blockIdx.x) * k;
  // Each thread owns a contiguous run of pages, so that the output can be written in ascending order.
  const int per_thread = (num_pages + kSelectThreads - 1) / kSelectThreads;
  const int begin = tid * per_thread, end = min(begin + per_thread, num_pages);

  if (tid == 0) sink = num_pages;
  __syncthreads();
  if (keep_first) {
    for (int i = begin; i < end; ++i) {
      if (row[i] > -INFINITY) {
        atomicMin(&sink, i);
        break;
      }
    }
    __syncthreads();
  }
  const int sink_page = sink;  // num_pages when not keeping the first page
  const uint32_t sink_key = order_key(FLT_MAX);
  auto key_at = [&](int i) { return i == sink_page ? sink_key : order_key(__ldg(row + i)); };

  uint32_t prefix = 0, mask = 0;
  int rest = k;  // how many of the pages matching `prefix` are still to be taken
#pragma unroll 1
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (tid < 256) hist[tid] = 0;
    __syncthreads();
    for (int i = begin; i < end; ++i) {
      const uint32_t key = key_at(i);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
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
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(chosen_digit) << shift;
    mask |= 255u << shift;
    rest = chosen_rest;
    __syncthreads();
  }

  // prefix is now the K-th largest key; take everything above it and the first `rest` pages equal to it.
  int equal = 0;
  for (int i = begin; i < end; ++i) equal += key_at(i) == prefix;
  int equal_before;
  Scan(scan_storage).ExclusiveSum(equal, equal_before);
  __syncthreads();
  int taken = 0;
  for (int i = begin, e = equal_before; i < end; ++i) {
    const uint32_t key = key_at(i);
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
    const uint32_t key = key_at(i);
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
  quest::select_pages_kernel<<<rows, quest::kSelectThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      scores.data_ptr<float>(), scores.stride(1), num_pages, k, indices.data_ptr<int>(), keep_first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
