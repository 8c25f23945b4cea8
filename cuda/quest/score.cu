// Page scoring: one fp32 criticality per page and selection head, masked and forced for the top-k that follows.
//
// score_mode 0 (box):   sum_i (w_hi * max(q_i mx_i, q_i mn_i) + w_lo * min(q_i mx_i, q_i mn_i)),
//                       w_hi = (1 + spread) / 2, w_lo = (1 - spread) / 2  (== q.c + spread |q|.r; spread 1 is the
//                       paper's upper bound of q.k over the page)
// score_mode 1 (two vectors per page, e.g. centroids kept in the same slots): max(q.page_max, q.page_min)
// Aggregation over the G query heads of a KV head: 0 max, 1 sum, 2 none (one score row per query head).
// Pages with no valid token (left padding, or past a sequence's length) score -inf, the current page +inf.
//
// With append keys, extra blocks also recompute the metadata of the current page (the decode append) from the keys,
// one block for every append_rows_per_block<D>() rows (D / 8 threads a row). Scoring never uses that page's metadata
// (it is forced), so the append needs no ordering against the scoring blocks and costs no launch of its own; the
// next step's scoring sees it.
#include <c10/cuda/CUDAStream.h>

#include "check.h"
#include "common.cuh"
#include "dispatch.h"
#include "launch.h"
#include "metadata.cuh"
#include "ops.h"

namespace quest {

template <typename T>
struct ScoreParams {
  const T* query;
  int64_t q_stride_b, q_stride_h;
  const T* page_min;
  const T* page_max;
  int64_t m_stride_b, m_stride_h, m_stride_p;
  const bool* key_valid;  // nullable
  int64_t v_stride_b;
  const int* seq_lens;  // nullable
  int max_len;
  float* scores;
  int64_t s_stride_b, s_stride_h;
  int kv_heads, group, num_pages, page_size, log2_page;
  float w_hi, w_lo;
  int aggregation, score_mode;
};

template <typename T>
struct AppendParams {
  const T* keys;  // null: no append
  T* page_min;
  T* page_max;
  int64_t k_stride_b, k_stride_h, k_stride_t;
  int max_tokens;  // keys.size(2): lengths beyond it are ignored rather than read out of bounds
  bool mean_box;
};

constexpr int kScoreWarps = 8;

// Rows whose decode append one block of the scoring kernel does: few append blocks leave the wave to the scoring.
template <int D>
constexpr int append_rows_per_block() {
  return kScoreWarps * 32 / (D / kVec);
}

// With several heads per page (GQA) the scoring is heavy on arithmetic: a block then loads its next batch while it
// scores the current one, two pages per lane each. With one head (MHA) the arithmetic is light and more blocks in
// flight, four pages per lane and no second batch in registers, keep more bytes moving.
template <int NQ>
constexpr bool score_pipelined() {
  return NQ >= 2;
}

template <int NQ>
constexpr int score_unroll() {
  return score_pipelined<NQ>() ? 2 : 4;
}

template <int D, int NQ>
constexpr int score_pages_per_batch() {
  return kScoreWarps * (32 / (D / kVec)) * score_unroll<NQ>();
}

// Sums v[h] over the LPT lanes of a page for all NQ heads with log2(LPT) + NQ - 1 shuffles instead of
// NQ * log2(LPT): each step halves the heads a lane carries. On return, the lane holds the page sum of head
// sub / (LPT / NQ) (sub = lane % LPT).
template <int NQ, int LPT>
__device__ __forceinline__ float reduce_scatter(float (&v)[NQ], int lane) {
  static_assert(NQ <= LPT, "one head per lane at most");
#pragma unroll
  for (int n = NQ, offset = LPT / 2; n > 1; n /= 2, offset /= 2) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const float send = upper ? v[i] : v[i + n / 2];
      const float keep = upper ? v[i + n / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
  }
  float x = v[0];
#pragma unroll
  for (int offset = LPT / NQ / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The decode append of rows blockIdx.y, ... + append_rows_per_block<D>() - 1 (the append block of every other row
// exits at once): recompute the page holding each row's newest token from its keys, D / 8 threads a row.
template <typename T, int D>
__device__ __forceinline__ void append_current_pages(const ScoreParams<T>& p, const AppendParams<T>& a) {
  constexpr int kRows = append_rows_per_block<D>();
  if (blockIdx.y % kRows != 0) return;
  const int row_index = blockIdx.y + threadIdx.x / (D / kVec), vec = threadIdx.x % (D / kVec);
  if (row_index >= gridDim.y) return;
  const int b = row_index / p.kv_heads, kvh = row_index % p.kv_heads;
  pdl_wait();  // the keys come from the kernels before
  pdl_launch_dependents();
  const int len = p.seq_lens != nullptr ? p.seq_lens[b] : p.max_len;
  if (len <= 0 || len > a.max_tokens) return;
  const int t0 = ((len - 1) >> p.log2_page) << p.log2_page;
  const int t1 = min(t0 + p.page_size, len);
  const int64_t row = b * p.m_stride_b + kvh * p.m_stride_h + (t0 >> p.log2_page) * p.m_stride_p;
  recompute_page_slice<T>(a.keys + b * a.k_stride_b + kvh * a.k_stride_h + vec * kVec, a.k_stride_t, t0, t1,
                          a.mean_box, a.page_min + row + vec * kVec, a.page_max + row + vec * kVec);
}

// A block scores batches blockIdx.x, blockIdx.x + stride, ... of one row with the query weights prepared once; when
// pipelined, the next batch's metadata is loaded while the current one is scored.
template <typename T, int D, int NQ>
__global__ void __launch_bounds__(kScoreWarps * 32)
    page_scores_kernel(const ScoreParams<T> p, const AppendParams<T> a) {
  const bool appends = a.keys != nullptr;
  if (appends && blockIdx.x == gridDim.x - 1) {
    append_current_pages<T, D>(p, a);
    return;
  }
  constexpr int LPT = D / kVec;         // lanes per page
  constexpr int PPW = 32 / LPT;         // pages per warp and step
  constexpr int SAME_HEAD = LPT / NQ;   // lanes holding the same head after reduce_scatter
  constexpr int U = score_unroll<NQ>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / LPT, sub = lane % LPT;
  const int b = blockIdx.y / p.kv_heads, kvh = blockIdx.y % p.kv_heads;
  const int nq = p.group;
  const int my_head = sub / SAME_HEAD;
  pdl_wait();  // the query and the metadata come from the kernels before
  pdl_launch_dependents();

  const int len = p.seq_lens != nullptr ? min(p.seq_lens[b], p.max_len) : p.max_len;
  const int used_pages = (len + p.page_size - 1) >> p.log2_page;
  const int current = used_pages - 1;
  const int64_t meta = b * p.m_stride_b + kvh * p.m_stride_h + sub * kVec;
  const int batches = (p.num_pages + score_pages_per_batch<D, NQ>() - 1) / score_pages_per_batch<D, NQ>();
  const int stride = gridDim.x - (appends ? 1 : 0);
  auto first_page = [&](int batch) { return batch * score_pages_per_batch<D, NQ>() + warp * PPW * U + slot; };
  auto load_batch = [&](int batch, uint4 (&raw_min)[U], uint4 (&raw_max)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int page = first_page(batch) + u * PPW;
      if (batch < batches && page < p.num_pages) {
        raw_min[u] = load16(p.page_min + meta + page * p.m_stride_p);
        raw_max[u] = load16(p.page_max + meta + page * p.m_stride_p);
      } else {
        raw_min[u] = make_uint4(0, 0, 0, 0);
        raw_max[u] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  // The first batch's loads go out before the query is read and prepared.
  uint4 raw_min[U], raw_max[U];
  load_batch(blockIdx.x, raw_min, raw_max);

  // Box score as two FMAs per element: max(q mx, q mn) is q mx for q >= 0 and q mn for q < 0 (mx >= mn), so
  // w_hi max(..) + w_lo min(..) = wa mx + wb mn. In score_mode 1, wa = wb = q and the two dot products stay apart.
  float wa[NQ][kVec], wb[NQ][kVec];
#pragma unroll
  for (int h = 0; h < NQ; ++h) {
    float q[kVec];
    if (h < nq) {
      unpack8<T>(load16(p.query + b * p.q_stride_b + (kvh * p.group + h) * p.q_stride_h + sub * kVec), q);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) q[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const bool box = p.score_mode == 0;
      wa[h][i] = box ? (q[i] >= 0.f ? p.w_hi : p.w_lo) * q[i] : q[i];
      wb[h][i] = box ? (q[i] >= 0.f ? p.w_lo : p.w_hi) * q[i] : q[i];
    }
  }

  for (int batch = blockIdx.x; batch < batches; batch += stride) {
    uint4 next_min[U], next_max[U];
    if constexpr (score_pipelined<NQ>()) load_batch(batch + stride, next_min, next_max);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int page = first_page(batch) + u * PPW;
      float mn[kVec], mx[kVec];
      unpack8<T>(raw_min[u], mn);
      unpack8<T>(raw_max[u], mx);
      float score;
      if (p.score_mode == 0) {
        float v[NQ];
#pragma unroll
        for (int h = 0; h < NQ; ++h) {
          float acc = 0.f;
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc = fmaf(wa[h][i], mx[i], fmaf(wb[h][i], mn[i], acc));
          v[h] = acc;
        }
        score = reduce_scatter<NQ, LPT>(v, lane);
      } else {
        float v_max[NQ], v_min[NQ];
#pragma unroll
        for (int h = 0; h < NQ; ++h) {
          float d_max = 0.f, d_min = 0.f;
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            d_max = fmaf(wa[h][i], mx[i], d_max);
            d_min = fmaf(wb[h][i], mn[i], d_min);
          }
          v_max[h] = d_max;
          v_min[h] = d_min;
        }
        score = fmaxf(reduce_scatter<NQ, LPT>(v_max, lane), reduce_scatter<NQ, LPT>(v_min, lane));
      }
      // Combine the heads of the group across the lanes that hold them (padding heads beyond nq do not count).
      if (p.aggregation != 2) {
        float agg = my_head < nq ? score : (p.aggregation == 0 ? -INFINITY : 0.f);
#pragma unroll
        for (int offset = SAME_HEAD; offset < LPT; offset *= 2) {
          const float other = __shfl_xor_sync(0xffffffffu, agg, offset);
          agg = p.aggregation == 0 ? fmaxf(agg, other) : agg + other;
        }
        score = agg;
      }
      // A page is valid if it lies within the sequence and (with a padding mask) holds at least one real token.
      bool valid = page < used_pages;
      if (p.key_valid != nullptr) {
        bool any = false;
        for (int t = sub; t < p.page_size; t += LPT) {
          const int tok = (page << p.log2_page) + t;
          if (valid && tok < len) any |= p.key_valid[b * p.v_stride_b + tok];
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, any);
        valid = valid && ((ballot >> (slot * LPT)) & ((1u << LPT) - 1u)) != 0u;
      }
      if (page >= p.num_pages) continue;
      const float value = page == current ? INFINITY : (valid ? score : -INFINITY);
      float* row = p.scores + b * p.s_stride_b + page;
      if (p.aggregation == 2) {
        if (sub % SAME_HEAD == 0 && my_head < nq) row[(kvh * p.group + my_head) * p.s_stride_h] = value;
      } else if (sub == 0) {
        row[kvh * p.s_stride_h] = value;
      }
    }
    if constexpr (score_pipelined<NQ>()) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        raw_min[u] = next_min[u];
        raw_max[u] = next_max[u];
      }
    } else {
      load_batch(batch + stride, raw_min, raw_max);
    }
  }
}

// Blocks of the scoring kernel that fit on one multiprocessor (on the current device, which the caller set).
template <typename T, int D, int NQ>
int resident_score_blocks(int device) {
  return cached_per_device(device, [] {
    int count = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, page_scores_kernel<T, D, NQ>, kScoreWarps * 32, 0));
    return std::max(count, 1);
  });
}

}  // namespace quest

void page_scores(at::Tensor& scores, const at::Tensor& query, at::Tensor& page_min, at::Tensor& page_max,
                 const std::optional<at::Tensor>& key_valid, const std::optional<at::Tensor>& seq_lens, int64_t max_len,
                 double spread, int64_t aggregation, int64_t score_mode, int64_t page_size,
                 const std::optional<at::Tensor>& append_keys, int64_t summary) {
  using namespace quest;
  check_vectors(query, "query");
  check_vectors(page_min, "page_min");
  check_vectors(page_max, "page_max");
  TORCH_CHECK(query.dim() == 3 && page_min.dim() == 4, "query must be [B, Hq, D] and page_min [B, Hkv, P, D]");
  TORCH_CHECK(page_min.sizes() == page_max.sizes() && page_min.strides() == page_max.strides(),
              "page_min and page_max must have the same shape and strides");
  TORCH_CHECK(query.scalar_type() == page_min.scalar_type() && page_max.scalar_type() == page_min.scalar_type(),
              "query, page_min and page_max must share a dtype");
  const int64_t batch = query.size(0), q_heads = query.size(1), dim = query.size(2), kv_heads = page_min.size(1);
  TORCH_CHECK(page_min.size(0) == batch && page_min.size(3) == dim, "page_min must be [B, Hkv, P, D] like query");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "query heads (", q_heads, ") must be a multiple of KV heads (",
              kv_heads, ")");
  TORCH_CHECK(aggregation >= 0 && aggregation <= 2, "aggregation must be 0 (max), 1 (sum) or 2 (none)");
  TORCH_CHECK(score_mode == 0 || score_mode == 1, "score_mode must be 0 (box) or 1 (max of two dot products)");
  const int log2_page = log2_exact(page_size, "page_size");
  const int64_t sel_heads = aggregation == 2 ? q_heads : kv_heads;
  TORCH_CHECK(scores.is_cuda() && scores.scalar_type() == at::kFloat && scores.dim() == 3 && scores.size(0) == batch &&
                  scores.size(1) == sel_heads && scores.stride(2) == 1,
              "scores must be float32 [", batch, ", ", sel_heads, ", P] contiguous along pages");
  const int64_t num_pages = scores.size(2);
  TORCH_CHECK(max_len >= 1 && (max_len + page_size - 1) / page_size == num_pages && num_pages <= page_min.size(2),
              "scores must have ceil(max_len / page_size) pages (and page_min at least as many): max_len=", max_len,
              " pages=", num_pages, " page_min pages=", page_min.size(2));
  check_key_valid(key_valid, batch, max_len);
  check_seq_lens(seq_lens, batch);
  if (append_keys.has_value()) {
    TORCH_CHECK(summary == 0 || summary == 1, "summary must be 0 (min/max) or 1 (mean box), got ", summary);
    check_metadata(page_min, page_max, *append_keys);
    TORCH_CHECK(page_min.size(2) * page_size >= append_keys->size(2), "page_min must cover every token of append_keys");
  }
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());

  QUEST_DISPATCH_DTYPE(query.scalar_type(), T, [&] {
    QUEST_DISPATCH_HEAD_DIM(dim, D, [&] {
      QUEST_DISPATCH_HEADS(q_heads / kv_heads, NQ, [&] {
        ScoreParams<T> p;
        p.query = reinterpret_cast<const T*>(query.data_ptr());
        p.q_stride_b = query.stride(0);
        p.q_stride_h = query.stride(1);
        p.page_min = reinterpret_cast<const T*>(page_min.data_ptr());
        p.page_max = reinterpret_cast<const T*>(page_max.data_ptr());
        p.m_stride_b = page_min.stride(0);
        p.m_stride_h = page_min.stride(1);
        p.m_stride_p = page_min.stride(2);
        p.key_valid = key_valid.has_value() ? key_valid->data_ptr<bool>() : nullptr;
        p.v_stride_b = key_valid.has_value() ? key_valid->stride(0) : 0;
        p.seq_lens = seq_lens.has_value() ? seq_lens->data_ptr<int>() : nullptr;
        p.max_len = static_cast<int>(max_len);
        p.scores = scores.data_ptr<float>();
        p.s_stride_b = scores.stride(0);
        p.s_stride_h = scores.stride(1);
        p.kv_heads = kv_heads;
        p.group = q_heads / kv_heads;
        p.num_pages = num_pages;
        p.page_size = page_size;
        p.log2_page = log2_page;
        p.w_hi = static_cast<float>((1.0 + spread) * 0.5);
        p.w_lo = static_cast<float>((1.0 - spread) * 0.5);
        p.aggregation = aggregation;
        p.score_mode = score_mode;
        AppendParams<T> a = {};
        if (append_keys.has_value()) {
          a.keys = reinterpret_cast<const T*>(append_keys->data_ptr());
          a.page_min = reinterpret_cast<T*>(page_min.data_ptr());
          a.page_max = reinterpret_cast<T*>(page_max.data_ptr());
          a.k_stride_b = append_keys->stride(0);
          a.k_stride_h = append_keys->stride(1);
          a.k_stride_t = append_keys->stride(2);
          a.max_tokens = append_keys->size(2);
          a.mean_box = summary == 1;
        }
        // Pipelined: one wave, as many blocks per row as fit on the GPU together (the working append blocks included,
        // so that none of them waits for a slot), each looping over its share of the batches. Otherwise a block per
        // batch.
        const int64_t batches = (num_pages + score_pages_per_batch<D, NQ>() - 1) / score_pages_per_batch<D, NQ>();
        const int64_t rows = batch * kv_heads;
        int64_t per_row = batches;
        if (score_pipelined<NQ>()) {
          const int64_t target = int64_t{multiprocessor_count(query.get_device())} *
                                     resident_score_blocks<T, D, NQ>(query.get_device()) -
                                 (append_keys.has_value() ? (rows + append_rows_per_block<D>() - 1) /
                                                                      append_rows_per_block<D>()
                                                                : 0);
          per_row = std::max<int64_t>(1, std::min<int64_t>(batches, target / rows));
        }
        const dim3 grid(per_row + (append_keys.has_value() ? 1 : 0), batch * kv_heads);
        launch_pdl(page_scores_kernel<T, D, NQ>, grid, dim3(kScoreWarps * 32), 0, c10::cuda::getCurrentCUDAStream(), p,
                   a);
      });
    });
  });
}
