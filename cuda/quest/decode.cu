// Sparse paged decode attention: one query token attends, with an exact fp32 softmax, to the tokens of the
// selected pages only.
//
// Split-K: block (split, b * Hs + s) reads pages [split * pages_per_split, ...) of selection row s and serves every
// query head that uses that selection (the G heads of a KV head, or one head when each query head selects), so
// a KV page is read once per group. For small GQA selections (split_heads) the block rows are the query heads
// instead, each reading its KV head's selection: the group's repeated reads then come from L2. Each split leaves an unnormalised partial output with its running max and
// sum (log2 domain); the last block to finish a row (counted in a per-device counter it resets) merges the splits
// of that row, so the whole step is one launch. With one split the block writes the output directly.
#include <c10/cuda/CUDAStream.h>

#include "check.h"
#include "common.cuh"
#include "dispatch.h"
#include "launch.h"
#include "ops.h"
#include "workspace.h"

namespace quest {

template <typename T>
struct DecodeParams {
  const T* query;
  int64_t q_stride_b, q_stride_h;
  const T* keys;
  int64_t k_stride_b, k_stride_h, k_stride_t;
  const T* values;
  int64_t v_stride_b, v_stride_h, v_stride_t;
  const int* indices;  // [B, Hs, K]
  int num_selected;    // K
  const bool* key_valid;
  int64_t kv_stride_b;
  const int* seq_lens;
  int max_len;
  int sel_heads, q_heads, group;
  bool per_query_head;
  bool split_heads;  // one block row per query head, reading its KV head's selection (GQA, grouped selection)
  int page_size, log2_page;
  float scale_log2;  // softmax scale times log2(e): logits live in the log2 domain
  int pages_per_split, num_splits;
  float* part_o;    // [B * Hq, splits, D]
  float2* part_ml;  // [B * Hq, splits] (running max, running sum)
  int* counters;    // [B * Hs] finished splits per row, zero between launches
  T* out;
  int64_t o_stride_b, o_stride_h;
};

constexpr int kDecodeWarps = 4;
constexpr int kMaxPagesPerSplit = 256;
constexpr int kMaxSplits = 64;  // the merge keeps one weight per split and head in shared memory
constexpr int64_t kMaxSplitHeadsBytes = int64_t{8} << 20;  // see split_heads in sparse_decode

// Tokens in flight per lane: fewer with more heads (their scores and outputs take the registers).
__host__ __device__ constexpr int decode_unroll(int heads) { return heads >= 8 ? 2 : heads >= 2 ? 4 : 8; }

// Tokens a block reads in one round of its main loop: all warps, each a step of 32 / (D / kVec) tokens per unroll.
// (Head sizes the kernel does not take give 1 here; the dispatch rejects them.)
__host__ __device__ constexpr int decode_round_tokens(int dim, int heads) {
  return dim >= kVec && dim <= 32 * kVec ? kDecodeWarps * (32 / (dim / kVec)) * decode_unroll(heads) : 1;
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Online-softmax merge of state (mo, lo, acc_o) into (m, l, acc); -inf maxima mean "no token yet".
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[kVec], float mo, float lo,
                                            const float (&acc_o)[kVec]) {
  const float mn = fmaxf(m, mo);
  if (mn == -INFINITY) return;
  const float a = exp2f(m - mn), c = exp2f(mo - mn);
  l = l * a + lo * c;
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = acc[i] * a + acc_o[i] * c;
  m = mn;
}

template <typename T, int D, int NQ>
__global__ void __launch_bounds__(kDecodeWarps * 32) sparse_decode_kernel(const DecodeParams<T> p) {
  constexpr int LPT = D / kVec;  // lanes per token
  constexpr int TPW = 32 / LPT;  // tokens per warp step
  constexpr int kDecodeUnroll = decode_unroll(NQ);
  constexpr int CHUNK = TPW * kDecodeUnroll;
  static_assert(kDecodeWarps * CHUNK == decode_round_tokens(D, NQ), "the host sizes splits in these rounds");
  __shared__ int page_ids[kMaxPagesPerSplit];
  __shared__ float sm_m[kDecodeWarps][NQ], sm_l[kDecodeWarps][NQ];
  __shared__ float sm_o[kDecodeWarps][NQ][D];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, slot = lane / LPT, sub = lane % LPT;
  const int split = blockIdx.x;
  // Block row r of sequence b: a selection row (serving its query heads), or with split_heads a query head that
  // reads the selection row of its KV head.
  const int rows_per_batch = p.split_heads ? p.q_heads : p.sel_heads;
  const int b = blockIdx.y / rows_per_batch, r = blockIdx.y % rows_per_batch;
  const int s = p.split_heads ? r / p.group : r;
  const int kvh = p.per_query_head ? s / p.group : s;
  const bool one_head = p.per_query_head || p.split_heads;
  const int q0 = one_head ? r : s * p.group;
  const int nq = one_head ? 1 : p.group;
  pdl_wait();  // the query, keys, values and page indices come from the kernels before
  pdl_launch_dependents();

  const int page_begin = split * p.pages_per_split;
  const int split_pages = min(p.pages_per_split, p.num_selected - page_begin);
  const int* sel = p.indices + static_cast<int64_t>(b * p.sel_heads + s) * p.num_selected + page_begin;
  for (int i = threadIdx.x; i < split_pages; i += blockDim.x) page_ids[i] = sel[i];

  float q[NQ][kVec];
#pragma unroll
  for (int h = 0; h < NQ; ++h) {
    if (h < nq) {
      unpack8<T>(load16(p.query + b * p.q_stride_b + (q0 + h) * p.q_stride_h + sub * kVec), q[h]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) q[h][i] *= p.scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) q[h][i] = 0.f;
    }
  }
  __syncthreads();

  const int len = p.seq_lens != nullptr ? min(p.seq_lens[b], p.max_len) : p.max_len;
  const T* kbase = p.keys + b * p.k_stride_b + kvh * p.k_stride_h + sub * kVec;
  const T* vbase = p.values + b * p.v_stride_b + kvh * p.v_stride_h + sub * kVec;
  const bool* valid_row = p.key_valid != nullptr ? p.key_valid + b * p.kv_stride_b : nullptr;

  float m[NQ], l[NQ], acc[NQ][kVec];
#pragma unroll
  for (int h = 0; h < NQ; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[h][i] = 0.f;
  }

  const int num_slots = split_pages << p.log2_page;
  for (int c0 = warp * CHUNK; c0 < num_slots; c0 += kDecodeWarps * CHUNK) {
    // Issue every key and value load of this chunk before the first use.
    uint4 rk[kDecodeUnroll], rv[kDecodeUnroll];
    bool ok[kDecodeUnroll];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const int j = c0 + u * TPW + slot;
      ok[u] = j < num_slots;
      int tok = 0;
      if (ok[u]) {
        tok = (page_ids[j >> p.log2_page] << p.log2_page) + (j & (p.page_size - 1));
        ok[u] = tok < len && (valid_row == nullptr || valid_row[tok]);
      }
      if (ok[u]) {
        rk[u] = load16(kbase + tok * p.k_stride_t);
        rv[u] = load16(vbase + tok * p.v_stride_t);
      } else {
        rk[u] = make_uint4(0, 0, 0, 0);
        rv[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float x[kDecodeUnroll][NQ];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      float kf[kVec];
      unpack8<T>(rk[u], kf);
#pragma unroll
      for (int h = 0; h < NQ; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot += q[h][i] * kf[i];
        dot = group_sum<LPT>(dot);
        x[u][h] = ok[u] ? dot : -INFINITY;
      }
    }
    float vf[kDecodeUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) unpack8<T>(rv[u], vf[u]);
#pragma unroll
    for (int h = 0; h < NQ; ++h) {
      float mn = m[h];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) mn = fmaxf(mn, x[u][h]);
      if (mn == -INFINITY) continue;
      const float corr = exp2f(m[h] - mn);
      l[h] *= corr;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[h][i] *= corr;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const float pu = exp2f(x[u][h] - mn);
        l[h] += pu;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[h][i] += pu * vf[u][i];
      }
      m[h] = mn;
    }
  }

  // Merge the token slots of the warp (lanes that share `sub`), then the warps through shared memory.
#pragma unroll
  for (int offset = LPT; offset < 32; offset *= 2) {
#pragma unroll
    for (int h = 0; h < NQ; ++h) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float lo = __shfl_xor_sync(0xffffffffu, l[h], offset);
      float acc_o[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc_o[i] = __shfl_xor_sync(0xffffffffu, acc[h][i], offset);
      merge_state(m[h], l[h], acc[h], mo, lo, acc_o);
    }
  }
  if (slot == 0) {
#pragma unroll
    for (int h = 0; h < NQ; ++h) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sm_o[warp][h][sub * kVec + i] = acc[h][i];
      if (sub == 0) {
        sm_m[warp][h] = m[h];
        sm_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nq * D; idx += blockDim.x) {
    const int h = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sm_m[w][h]);
    float sum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float scale = exp2f(sm_m[w][h] - mx);
        sum += sm_l[w][h] * scale;
        o += sm_o[w][h][d] * scale;
      }
    }
    const int row = b * p.q_heads + q0 + h;
    if (p.num_splits == 1) {
      p.out[b * p.o_stride_b + (q0 + h) * p.o_stride_h + d] = from_float<T>(o / sum);
    } else {
      p.part_o[(static_cast<int64_t>(row) * p.num_splits + split) * D + d] = o;
      if (d == 0) p.part_ml[static_cast<int64_t>(row) * p.num_splits + split] = make_float2(mx, sum);
    }
  }
  if (p.num_splits == 1) return;

  // Publish this split; the last split of the row to finish merges them all.
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counters + blockIdx.y, 1) == p.num_splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // Split weights in shared memory, one warp per head: exp2(m_split - m_max), and 1 / the weighted sum.
  __shared__ float sm_weight[NQ][kMaxSplits];
  __shared__ float sm_inverse[NQ];
  for (int h = warp; h < nq; h += kDecodeWarps) {
    const float2* ml = p.part_ml + (static_cast<int64_t>(b) * p.q_heads + q0 + h) * p.num_splits;
    const float2 none = make_float2(-INFINITY, 0.f);
    const float2 v0 = lane < p.num_splits ? __ldcg(ml + lane) : none;
    const float2 v1 = lane + 32 < p.num_splits ? __ldcg(ml + lane + 32) : none;
    float mx = fmaxf(v0.x, v1.x);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
    const float w0 = v0.x == -INFINITY ? 0.f : exp2f(v0.x - mx);
    const float w1 = v1.x == -INFINITY ? 0.f : exp2f(v1.x - mx);
    float sum = w0 * v0.y + w1 * v1.y;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane < p.num_splits) sm_weight[h][lane] = w0;
    if (lane + 32 < p.num_splits) sm_weight[h][lane + 32] = w1;
    if (lane == 0) sm_inverse[h] = 1.f / sum;
  }
  __syncthreads();
  // One thread per (head, 4 dims): 16-byte loads of the partial outputs, several splits in flight.
  constexpr int D4 = D / 4;
  for (int idx = threadIdx.x; idx < nq * D4; idx += blockDim.x) {
    const int h = idx / D4, d4 = idx % D4;
    const float4* po =
        reinterpret_cast<const float4*>(p.part_o + (static_cast<int64_t>(b) * p.q_heads + q0 + h) * p.num_splits * D) +
        d4;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int sp = 0; sp < p.num_splits; ++sp) {
      const float w = sm_weight[h][sp];
      const float4 v = __ldcg(po + sp * D4);
      o.x += w * v.x;
      o.y += w * v.y;
      o.z += w * v.z;
      o.w += w * v.w;
    }
    const float inv = sm_inverse[h];
    T* dst = p.out + b * p.o_stride_b + (q0 + h) * p.o_stride_h + d4 * 4;
    dst[0] = from_float<T>(o.x * inv);
    dst[1] = from_float<T>(o.y * inv);
    dst[2] = from_float<T>(o.z * inv);
    dst[3] = from_float<T>(o.w * inv);
  }
  if (threadIdx.x == 0) p.counters[blockIdx.y] = 0;  // ready for the next launch (and graph replay)
}

}  // namespace quest

void sparse_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                   const at::Tensor& indices, const std::optional<at::Tensor>& key_valid,
                   const std::optional<at::Tensor>& seq_lens, int64_t max_len, double scale, int64_t page_size,
                   bool per_query_head) {
  using namespace quest;
  check_vectors(query, "query");
  check_vectors(keys, "keys");
  check_vectors(values, "values");
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 4 && values.dim() == 4,
              "query must be [B, Hq, D], keys and values [B, Hkv, L, D]");
  TORCH_CHECK(keys.scalar_type() == query.scalar_type() && values.scalar_type() == query.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, keys, values and out must share a dtype");
  const int64_t batch = query.size(0), q_heads = query.size(1), dim = query.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(keys.sizes() == values.sizes(), "keys and values must have the same shape");
  TORCH_CHECK(keys.size(0) == batch && keys.size(3) == dim, "keys must be [B, Hkv, L, D] like query");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(out.is_cuda() && out.dim() == 3 && out.size(0) == batch && out.size(1) == q_heads &&
                  out.size(2) == dim && out.stride(2) == 1,
              "out must be [B, Hq, D] contiguous in its last dimension");
  const int64_t sel_heads = per_query_head ? q_heads : kv_heads;
  TORCH_CHECK(indices.is_cuda() && indices.scalar_type() == at::kInt && indices.is_contiguous() && indices.dim() == 3 &&
                  indices.size(0) == batch && indices.size(1) == sel_heads && indices.size(2) >= 1,
              "indices must be a contiguous int32 CUDA tensor [", batch, ", ", sel_heads, ", K >= 1]");
  TORCH_CHECK(max_len >= 1 && max_len <= keys.size(2), "need 1 <= max_len <= keys.size(2), got ", max_len);
  const int log2_page = log2_exact(page_size, "page_size");
  check_key_valid(key_valid, batch, max_len);
  check_seq_lens(seq_lens, batch);
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());

  // GQA with one selection per KV head, few selected bytes: one block row per query head. The group's blocks read
  // the same pages (all but the first from L2), and each block's chain of dependent work is a group's fraction as
  // long (Llama-3-8B shape, batch 1: 1-1.7 us less at budget 512, up to 1 us at 2048). With more bytes the repeated
  // reads cost more than that (batch 8, budget 2048: +10 us), so above 8 MiB of selected keys and values one block
  // row serves a KV head's query heads. QUEST_KERNELS_SPLIT_HEADS=0 always does the latter.
  static const bool split_enabled = env_switch_on("QUEST_KERNELS_SPLIT_HEADS");
  const int64_t k = indices.size(2);
  const int64_t selected_bytes = batch * kv_heads * k * page_size * dim * query.element_size() * 2;
  const bool split_heads =
      split_enabled && !per_query_head && q_heads > kv_heads && selected_bytes <= kMaxSplitHeadsBytes;
  const int64_t rows = batch * (split_heads ? q_heads : sel_heads);
  TORCH_CHECK(k <= int64_t{kMaxSplits} * kMaxPagesPerSplit, "at most ", kMaxSplits * kMaxPagesPerSplit,
              " selected pages, got ", k);
  // One wave of blocks (as many as fit on the GPU at this kernel's register use), at most kMaxSplits splits of at
  // most kMaxPagesPerSplit pages each.
  const int group = q_heads / kv_heads;
  const int served = per_query_head || split_heads ? 1 : group;
  const int resident = served <= 2 ? 4 : served <= 4 ? 3 : 2;  // blocks per SM at the register use
  const int64_t target = int64_t{multiprocessor_count(query.get_device())} * resident;
  int64_t splits = std::min<int64_t>({k, int64_t{kMaxSplits}, std::max<int64_t>(1, target / rows)});
  splits = std::max<int64_t>(splits, (k + kMaxPagesPerSplit - 1) / kMaxPagesPerSplit);
  int64_t pages_per_split = (k + splits - 1) / splits;
  // Whole rounds of the main loop: a split of 3 pages takes as many dependent rounds as one of 4 (Llama-3-8B shape,
  // 128 pages: 43 splits of 3 pages measured 14.9 us, 32 splits of 4 pages 14.0 us).
  const int64_t round_pages = std::max<int64_t>(1, decode_round_tokens(dim, served) / page_size);
  const int64_t whole_rounds = (pages_per_split + round_pages - 1) / round_pages * round_pages;
  if (whole_rounds <= kMaxPagesPerSplit) pages_per_split = whole_rounds;
  splits = (k + pages_per_split - 1) / pages_per_split;
  at::Tensor part_o, part_ml;
  if (splits > 1) {
    const auto opts = query.options().dtype(at::kFloat);
    part_o = at::empty({batch * q_heads, splits, dim}, opts);
    part_ml = at::empty({batch * q_heads, splits, 2}, opts);
  }
  auto stream = c10::cuda::getCurrentCUDAStream();

  QUEST_DISPATCH_DTYPE(query.scalar_type(), T, [&] {
    QUEST_DISPATCH_HEAD_DIM(dim, D, [&] {
      QUEST_DISPATCH_HEADS(served, NQ, [&] {
        DecodeParams<T> p;
        p.query = reinterpret_cast<const T*>(query.data_ptr());
        p.q_stride_b = query.stride(0);
        p.q_stride_h = query.stride(1);
        p.keys = reinterpret_cast<const T*>(keys.data_ptr());
        p.k_stride_b = keys.stride(0);
        p.k_stride_h = keys.stride(1);
        p.k_stride_t = keys.stride(2);
        p.values = reinterpret_cast<const T*>(values.data_ptr());
        p.v_stride_b = values.stride(0);
        p.v_stride_h = values.stride(1);
        p.v_stride_t = values.stride(2);
        p.indices = indices.data_ptr<int>();
        p.num_selected = k;
        p.key_valid = key_valid.has_value() ? key_valid->data_ptr<bool>() : nullptr;
        p.kv_stride_b = key_valid.has_value() ? key_valid->stride(0) : 0;
        p.seq_lens = seq_lens.has_value() ? seq_lens->data_ptr<int>() : nullptr;
        p.max_len = max_len;
        p.sel_heads = sel_heads;
        p.q_heads = q_heads;
        p.group = group;
        p.per_query_head = per_query_head;
        p.split_heads = split_heads;
        p.page_size = page_size;
        p.log2_page = log2_page;
        p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
        p.pages_per_split = pages_per_split;
        p.num_splits = splits;
        p.part_o = splits > 1 ? part_o.data_ptr<float>() : nullptr;
        p.part_ml = splits > 1 ? reinterpret_cast<float2*>(part_ml.data_ptr<float>()) : nullptr;
        p.counters = splits > 1 ? zeroed_counters(query.device(), rows) : nullptr;
        p.out = reinterpret_cast<T*>(out.data_ptr());
        p.o_stride_b = out.stride(0);
        p.o_stride_h = out.stride(1);
        launch_pdl(sparse_decode_kernel<T, D, NQ>, dim3(splits, rows), dim3(kDecodeWarps * 32), 0, stream, p);
      });
    });
  });
}
