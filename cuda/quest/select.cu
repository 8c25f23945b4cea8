// Top-k page selection: the K best-scoring pages of every row of scores, as ascending page indices.
//
// One block per row; the row's order-preserving keys are staged in shared memory (transposed with a padded pitch,
// so that a warp's reads and the staging stores spread over the banks). Exact, ties to the lower page index, in two ways:
//  * bucket path (the usual case): one histogram of the finite scores over kBuckets linear buckets between the
//    row's finite min and max (-inf and the forced pages get a bucket below / above them) finds the bucket holding
//    the K-th best page; the pages of that bucket (few, as scores spread over the buckets) are ranked exactly
//    against each other; everything above the bucket is taken.
//  * radix path (a boundary bucket with too many pages: equal or clustered scores): a radix select over the keys,
//    4 bits a pass with lane-private histograms, stopping once the boundary bin is taken whole.
// Both end with block-wide prefix sums that place the taken pages in ascending order.
// keep_first forces the first page scored above -inf (the first real page: the attention sink) just below the
// current page, which page_scores already forced to +inf.
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "check.h"
#include "common.cuh"
#include "launch.h"
#include "ops.h"

namespace quest {

// Threads per row: 512, or 1024 for long rows (more warps to hide the latency of the row's serial passes).
constexpr int kSelectThreads = 512;
constexpr int kWideSelectThreads = 1024;
constexpr int kWideSelectPages = 4096;  // rows longer than this use kWideSelectThreads
constexpr int kRadixBits = 4;
constexpr int kBins = 1 << kRadixBits;
constexpr int kBuckets = 2048;                // linear buckets over the finite scores
constexpr int kAllBuckets = kBuckets + 2;     // + one for -inf, one for +inf and the sink page
constexpr int kMaxCandidates = 512;           // pages of the boundary bucket ranked against each other
constexpr int kMaxSharedBytes = 160 * 1024;  // staged keys (4 B) and buckets (2 B) per page; longer rows use L2

// The row's first page above -inf (the sink candidate) and the finite range of the other pages, reduced over the
// block in one pass: the lower page index stays first and the other's first page joins the range.
struct RowSummary {
  int first;          // page index, INT_MAX for none
  float first_value;  // its score
  float lo, hi;       // finite range of the other pages

  __device__ void add(int page, float value, uint32_t key, uint32_t minus_inf) {
    if (key <= minus_inf) return;
    if (page < first) {
      include(first_value, first != INT_MAX);
      first = page;
      first_value = value;
    } else {
      include(value, true);
    }
  }
  __device__ void include(float value, bool present) {
    if (present && isfinite(value)) {
      lo = fminf(lo, value);
      hi = fmaxf(hi, value);
    }
  }
};

struct CombineRowSummaries {
  __device__ RowSummary operator()(RowSummary a, const RowSummary& b) const {
    const bool a_first = a.first < b.first;
    RowSummary r = a_first ? a : b;
    const RowSummary& other = a_first ? b : a;
    r.lo = fminf(a.lo, b.lo);
    r.hi = fmaxf(a.hi, b.hi);
    r.include(other.first_value, other.first != INT_MAX);
    return r;
  }
};

template <bool kStaged, int kThreads>
__global__ void __launch_bounds__(kThreads, 1)
    select_pages_kernel(const float* __restrict__ scores, int64_t row_stride, int num_pages, int k,
                        int* __restrict__ indices, bool keep_first) {
  constexpr int kWarps = kThreads / 32;
  constexpr int kBucketsPerThread = (kAllBuckets + kThreads - 1) / kThreads;
  constexpr int kStride = kThreads + 1;  // staged row pitch: +1 word spreads the transposed stores over banks
  using Scan = cub::BlockScan<int, kThreads>;
  using Reduce = cub::BlockReduce<RowSummary, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } temp;
  __shared__ int hist[kAllBuckets];
  __shared__ union {
    // Radix path: lane-private histograms need no atomics and never collide, even when all keys share a digit.
    // A lane counts at most its own pages (per_thread < 65536) in a bin.
    uint16_t lane_hist[kWarps][kBins][32];
    int cand_before[kMaxCandidates + 1];  // bucket path: taken candidates before each one, in page order
  } by_path;
  auto& lane_hist = by_path.lane_hist;
  auto& cand_before = by_path.cand_before;
  __shared__ uint32_t cand_key[kMaxCandidates];
  __shared__ bool cand_take[kMaxCandidates];
  __shared__ int bin_count[kBins];
  __shared__ int chosen_digit, chosen_rest, chosen_done, boundary, boundary_rest;
  __shared__ RowSummary summary;
  extern __shared__ uint32_t staged[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const float* row = scores + blockIdx.x * row_stride;
  int* out = indices + static_cast<int64_t>(blockIdx.x) * k;
  // Thread t owns pages [t * per_thread, ...), so that the output can be written in ascending order.
  const int per_thread = (num_pages + kThreads - 1) / kThreads;
  const int begin = tid * per_thread, end = min(begin + per_thread, num_pages), mine = max(end - begin, 0);

  pdl_wait();  // the scores come from the kernel before
  pdl_launch_dependents();
  const uint32_t minus_inf = order_key(-INFINITY), plus_inf = order_key(INFINITY);
  // Sink candidate and finite range, gathered by the staging loads when staged.
  RowSummary mine_summary{INT_MAX, 0.f, INFINITY, -INFINITY};
  if (kStaged) {
    // floor(i / per_thread) as a multiply-high by ceil(2^32 / per_thread), exact while i * per_thread < 2^32 (staged
    // rows are far shorter): the division was ~6% of the select's stall samples at 8192 pages.
    const uint64_t magic = ((uint64_t{1} << 32) + per_thread - 1) / per_thread;
    const uint32_t magic_lo = static_cast<uint32_t>(magic), magic_hi = static_cast<uint32_t>(magic >> 32);
    auto owner_of = [&](int i) {
      const uint32_t n = static_cast<uint32_t>(i);
      return static_cast<int>(__umulhi(n, magic_lo) + (magic_hi ? n : 0u));
    };
    // Eight independent loads in flight per thread before the first store (the row is cold in L2 or DRAM).
    constexpr int kInFlight = 8;
    for (int base = 0; base < num_pages; base += kInFlight * kThreads) {
      float v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int i = base + u * kThreads + tid;
        v[u] = i < num_pages ? __ldg(row + i) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int i = base + u * kThreads + tid;
        if (i < num_pages) {
          const uint32_t key = order_key(v[u]);
          const int owner = owner_of(i);  // i / per_thread without a division
          staged[(i - owner * per_thread) * kStride + owner] = key;
          mine_summary.add(i, v[u], key, minus_inf);
        }
      }
    }
  }
  for (int b = tid; b < kAllBuckets; b += kThreads) hist[b] = 0;
  __syncthreads();
  auto raw_key = [&](int j) {  // the j-th page of this thread, j < mine
    return kStaged ? staged[j * kStride + tid] : order_key(__ldg(row + begin + j));
  };
  auto key_value = [](uint32_t key) { return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key); };
  if (!kStaged) {
    for (int j = 0; j < mine; ++j) {
      const uint32_t key = raw_key(j);
      mine_summary.add(begin + j, key_value(key), key, minus_inf);
    }
  }
  const RowSummary row_summary = Reduce(temp.reduce).Reduce(mine_summary, CombineRowSummaries());
  if (tid == 0) summary = row_summary;
  __syncthreads();
  // The first page above -inf is forced just below the +inf pages; without keep_first it is ranked like the rest.
  const bool has_first = summary.first != INT_MAX;
  const int sink_page = keep_first && has_first ? summary.first : num_pages;
  float lo = summary.lo, hi = summary.hi;
  if (!keep_first && has_first && isfinite(summary.first_value)) {
    lo = fminf(lo, summary.first_value);
    hi = fmaxf(hi, summary.first_value);
  }
  const uint32_t sink_key = order_key(FLT_MAX);
  auto key_at = [&](int j) { return begin + j == sink_page ? sink_key : raw_key(j); };
  const float scale = hi > lo ? kBuckets / (hi - lo) : 0.f;
  // Monotone in the key: subtracting and scaling by positive constants preserve order under rounding.
  auto bucket_of = [&](int j, uint32_t key) -> int {
    if (key <= minus_inf) return 0;
    if (key >= plus_inf || begin + j == sink_page) return kAllBuckets - 1;
    return 1 + min(kBuckets - 1, static_cast<int>((key_value(key) - lo) * scale));
  };
  // Buckets are computed once and cached next to the keys (the row's work is issue-bound on one SM).
  uint16_t* bucket_cache = reinterpret_cast<uint16_t*>(staged + per_thread * kStride);
  for (int j = 0; j < mine; ++j) {
    const int b = bucket_of(j, key_at(j));
    if (kStaged) bucket_cache[j * kStride + tid] = static_cast<uint16_t>(b);
    atomicAdd(&hist[b], 1);
  }
  auto bucket_at = [&](int j) -> int { return kStaged ? bucket_cache[j * kStride + tid] : bucket_of(j, key_at(j)); };
  __syncthreads();
  // Thread t holds buckets counted from the top: kAllBuckets - 1 - (t * kBucketsPerThread + i).
  int local = 0;
#pragma unroll
  for (int i = 0; i < kBucketsPerThread; ++i) {
    const int b = kAllBuckets - 1 - (tid * kBucketsPerThread + i);
    if (b >= 0) local += hist[b];
  }
  int above;
  Scan(temp.scan).ExclusiveSum(local, above);
#pragma unroll
  for (int i = 0; i < kBucketsPerThread; ++i) {
    const int b = kAllBuckets - 1 - (tid * kBucketsPerThread + i);
    if (b >= 0) {
      const int count = hist[b];
      if (above < k && above + count >= k) {
        boundary = b;
        boundary_rest = k - above;
      }
      above += count;
    }
  }
  __syncthreads();
  const int bucket = boundary, rest_in_bucket = boundary_rest, candidates = hist[bucket];

  if (candidates <= kMaxCandidates) {
    // Rank the boundary bucket's pages exactly; they are numbered in page order by a prefix sum. A page's output
    // position is the number of pages above the bucket before it plus the number of taken candidates before it.
    static_assert(kMaxCandidates <= kThreads, "one candidate a thread");
    int above_mine = 0, in_mine = 0;
    for (int j = 0; j < mine; ++j) {
      const int b = bucket_at(j);
      above_mine += b > bucket;
      in_mine += b == bucket;
    }
    int slot0, above_before;
    if (num_pages < (1 << 15)) {  // both counts in one scan: (above << 16) + in bucket
      int packed;
      Scan(temp.scan).ExclusiveSum((above_mine << 16) | in_mine, packed);
      slot0 = packed & 0xffff;
      above_before = packed >> 16;
    } else {
      Scan(temp.scan).ExclusiveSum(in_mine, slot0);
      __syncthreads();
      Scan(temp.scan).ExclusiveSum(above_mine, above_before);
    }
    for (int j = 0, slot = slot0; j < mine; ++j) {
      if (bucket_at(j) == bucket) cand_key[slot++] = key_at(j);
    }
    __syncthreads();
    int take = 0;
    if (tid < candidates) {
      const uint32_t key = cand_key[tid];
      int rank = 0;
      for (int u = 0; u < candidates; ++u) {
        const uint32_t other = cand_key[u];
        rank += other > key || (other == key && u < tid);
      }
      take = rank < rest_in_bucket;
      cand_take[tid] = take;
    }
    int taken_before;
    Scan(temp.scan).ExclusiveSum(take, taken_before);
    if (tid < candidates) cand_before[tid] = taken_before;
    if (tid == 0) cand_before[candidates] = rest_in_bucket;
    __syncthreads();
    for (int j = 0, slot = slot0; j < mine; ++j) {
      const int b = bucket_at(j);
      if (b > bucket) {
        const int position = above_before++ + cand_before[slot];
        if (position < k) out[position] = begin + j;
      } else if (b == bucket) {
        const int position = above_before + cand_before[slot];
        if (cand_take[slot] && position < k) out[position] = begin + j;
        ++slot;
      }
    }
    return;
  }

  // Radix path.
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
    static_assert(kWarps >= kBins, "one warp a radix bin");
    if (warp < kBins) {
      int count = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) count += lane_hist[w][warp][lane];
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
      const int above_bin = at_least - count;
      if (lane < kBins && above_bin < rest && at_least >= rest) {
        chosen_digit = kBins - 1 - lane;
        chosen_rest = rest - above_bin;
        chosen_done = count == rest - above_bin;  // the whole bin is taken: no need to look at lower bits
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
  Scan(temp.scan).ExclusiveSum(equal, equal_before);
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
  Scan(temp.scan).ExclusiveSum(taken, position);
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

template <int kThreads>
void launch_select(at::Tensor& indices, const at::Tensor& scores, int64_t num_pages, int64_t k, int64_t rows,
                   bool keep_first) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t per_thread = (num_pages + kThreads - 1) / kThreads;
  const int64_t staged_bytes = per_thread * (kThreads + 1) * (sizeof(uint32_t) + sizeof(uint16_t));
  if (staged_bytes <= kMaxSharedBytes) {
    cached_per_device(scores.get_device(), [] {  // the opt-in above 48 KB (static + dynamic): per device and kernel
      C10_CUDA_CHECK(cudaFuncSetAttribute(select_pages_kernel<true, kThreads>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSharedBytes));
      return 1;
    });
    launch_pdl(select_pages_kernel<true, kThreads>, dim3(rows), dim3(kThreads), static_cast<int>(staged_bytes), stream,
               scores.data_ptr<float>(), scores.stride(1), static_cast<int>(num_pages), static_cast<int>(k),
               indices.data_ptr<int>(), keep_first);
  } else {
    launch_pdl(select_pages_kernel<false, kThreads>, dim3(rows), dim3(kThreads), 0, stream, scores.data_ptr<float>(),
               scores.stride(1), static_cast<int>(num_pages), static_cast<int>(k), indices.data_ptr<int>(),
               keep_first);
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
  if (num_pages > quest::kWideSelectPages) {
    quest::launch_select<quest::kWideSelectThreads>(indices, scores, num_pages, k, rows, keep_first);
  } else {
    quest::launch_select<quest::kSelectThreads>(indices, scores, num_pages, k, rows, keep_first);
  }
}
