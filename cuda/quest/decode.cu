// Sparse paged decode attention: one query token attends, with an exact fp32 softmax, to the tokens of the
// selected pages only.
//
// Split-K: block (split, b * Hs + s) reads pages [split * pages_per_split, ...) of selection row s and serves every
// query head that uses that selection (the G heads of a KV head, or one head when each query head selects), so
// a KV page is read once per group. For small GQA selections (split_heads) the block rows are the query heads
// instead, each reading its KV head's selection: the group's repeated reads then come from L2. Each split leaves an
// unnormalised partial output with its running max and sum (log2 domain); the last block to finish a row (counted in
// a per-device counter it resets) merges the splits of that row, so the whole step is one launch. With one split
// the block writes the output directly.
//
// Two kernels share that frame: sparse_decode_kernel on CUDA cores for rows serving one head, and
// sparse_decode_mma_kernel on tensor cores for rows serving a GQA group of 2-8 heads, whose per-token arithmetic
// on CUDA cores grows with the group (batch 8, budget 4096: 65 against 39 us for groups of 7;
// QUEST_KERNELS_MMA=0 runs those rows on CUDA cores too).
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

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

// After each warp left its state (running max, sum, unnormalised output per head) in shared memory: merge the warps,
// then write the output (one split) or this split's partial; the last split of the row to finish merges them.
template <typename T, int D, int NQ>
__device__ __forceinline__ void finish_block(const DecodeParams<T>& p, const float (&sm_m)[kDecodeWarps][NQ],
                                             const float (&sm_l)[kDecodeWarps][NQ],
                                             const float (&sm_o)[kDecodeWarps][NQ][D], int b, int q0, int nq,
                                             int split) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
  finish_block<T, D, NQ>(p, sm_m, sm_l, sm_o, b, q0, nq, split);
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core form for a group of 2-8 query heads per KV head (GQA). A warp takes 16 token slots at a time:
//   S = Q K^T as mma.m16n8k16 (rows: the group's heads, padded to 16; columns: 8 slots; k: 16 dims), then
//   O += P V (rows: heads; k: the 16 slots; columns: 8 output dims), P kept in registers between the two.
// The dot product is invariant to a consistent permutation of the dims, so lane c of a quad holds the contiguous
// dims [D/4 c, D/4 (c+1)) of Q and K (16-byte loads straight into the operand layout); P V's columns are mapped so
// that lane group g loads the contiguous dims [D/8 g, D/8 (g+1)) of V for its 4 slots, and pairs of slots are
// interleaved with byte permutes. Each lane ends with 2 D/8 contiguous output dims of its head.
// bf16 keeps 8 bits of P, so P goes in as hi + lo (two MMAs); fp16 keeps 11 bits, as SDPA's kernels do.
constexpr int kTile = 16;  // token slots of one MMA tile

template <typename T>
__device__ __forceinline__ void mma_heads(float& d0, float& d1, uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_heads<__half>(float& d0, float& d1, uint32_t a0, uint32_t a2, uint32_t b0,
                                                  uint32_t b1) {
  float d2, d3;  // rows 8-15: no head there (a1 = a3 = 0)
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(d0), "f"(d1), "f"(0.f), "f"(0.f));
}

template <>
__device__ __forceinline__ void mma_heads<__nv_bfloat16>(float& d0, float& d1, uint32_t a0, uint32_t a2, uint32_t b0,
                                                         uint32_t b1) {
  float d2, d3;
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(d0), "f"(d1), "f"(0.f), "f"(0.f));
}

// Two floats as one register of T pairs (lo in the low half); `rest` gets what the rounding left out.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, float& rest_lo, float& rest_hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi, float& rest_lo, float& rest_hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  const float2 back = __half22float2(h);
  rest_lo = lo - back.x;
  rest_hi = hi - back.y;
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi, float& rest_lo, float& rest_hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  const float2 back = __bfloat1622float2(h);
  rest_lo = lo - back.x;
  rest_hi = hi - back.y;
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T, int D, int NQ>
__global__ void __launch_bounds__(kDecodeWarps * 32) sparse_decode_mma_kernel(const DecodeParams<T> p) {
  static_assert(NQ >= 2 && NQ <= 8, "the group's heads are rows 0-7 of the MMA tile");
  constexpr int KS = D / 16;       // k-steps of Q K^T
  constexpr int QUARTER = D / 4;   // dims of Q and K a lane holds
  constexpr int NB = D / 8;        // n-blocks of P V (8 output dims each), and the dims of V a lane loads
  constexpr bool kSplitP = std::is_same<T, __nv_bfloat16>::value;
  __shared__ int page_ids[kMaxPagesPerSplit];
  __shared__ float sm_m[kDecodeWarps][NQ], sm_l[kDecodeWarps][NQ];
  __shared__ float sm_o[kDecodeWarps][NQ][D];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;  // group: a head row, a key slot, a V column; c: lane in the quad
  const int split = blockIdx.x;
  const int b = blockIdx.y / p.sel_heads, kvh = blockIdx.y % p.sel_heads;  // one selection row per KV head
  const int q0 = kvh * p.group, nq = p.group;
  pdl_wait();  // the query, keys, values and page indices come from the kernels before
  pdl_launch_dependents();

  const int page_begin = split * p.pages_per_split;
  const int split_pages = min(p.pages_per_split, p.num_selected - page_begin);
  const int* sel = p.indices + static_cast<int64_t>(blockIdx.y) * p.num_selected + page_begin;
  for (int i = threadIdx.x; i < split_pages; i += blockDim.x) page_ids[i] = sel[i];

  // Q as the A operand: head g, dims [QUARTER c, QUARTER (c + 1)); k-step ks takes words 2 ks (a0) and 2 ks + 1 (a2).
  uint32_t qa[KS][2];
#pragma unroll
  for (int v = 0; v < QUARTER / kVec; ++v) {
    const uint4 raw = g < nq ? load16(p.query + b * p.q_stride_b + (q0 + g) * p.q_stride_h + QUARTER * c + v * kVec)
                             : make_uint4(0, 0, 0, 0);
    qa[2 * v][0] = raw.x;
    qa[2 * v][1] = raw.y;
    qa[2 * v + 1][0] = raw.z;
    qa[2 * v + 1][1] = raw.w;
  }
  __syncthreads();

  const int len = p.seq_lens != nullptr ? min(p.seq_lens[b], p.max_len) : p.max_len;
  const T* kbase = p.keys + b * p.k_stride_b + kvh * p.k_stride_h + QUARTER * c;
  const T* vbase = p.values + b * p.v_stride_b + kvh * p.v_stride_h + NB * g;
  const bool* valid_row = p.key_valid != nullptr ? p.key_valid + b * p.kv_stride_b : nullptr;
  const int num_slots = split_pages << p.log2_page;
  auto token_of = [&](int slot) {
    return (page_ids[slot >> p.log2_page] << p.log2_page) + (slot & (p.page_size - 1));
  };

  float m = -INFINITY, l = 0.f;  // head g's running max (log2 domain) and this lane's share of the sum
  float o_lo[NB], o_hi[NB];      // head g's output dims 2 NB c + j and 2 NB c + NB + j
#pragma unroll
  for (int j = 0; j < NB; ++j) o_lo[j] = o_hi[j] = 0.f;

  const int num_tiles = (num_slots + kTile - 1) / kTile;
  for (int tile = warp; tile < num_tiles; tile += kDecodeWarps) {
    const int base = tile * kTile;
    // Keys of slots base + g and base + 8 + g (the columns of S this lane group supplies). Out-of-range slots
    // read nothing; their scores are masked by the lanes that hold them.
    uint4 kraw[2][QUARTER / kVec];
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      const int slot = base + 8 * nb + g;
      const int tok = slot < num_slots ? token_of(slot) : len;
#pragma unroll
      for (int v = 0; v < QUARTER / kVec; ++v) {
        kraw[nb][v] = tok < len ? load16(kbase + tok * p.k_stride_t + v * kVec) : make_uint4(0, 0, 0, 0);
      }
    }
    // Values of slots base + 2c + {0, 1, 8, 9} (the rows of P this lane holds), dims [NB g, NB (g + 1)).
    uint4 vraw[4][NB / kVec];
    bool valid[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int slot = base + 2 * c + (i & 1) + 8 * (i >> 1);
      const int tok = slot < num_slots ? token_of(slot) : len;
      valid[i] = tok < len && (valid_row == nullptr || valid_row[tok]);
#pragma unroll
      for (int v = 0; v < NB / kVec; ++v) {
        vraw[i][v] = valid[i] ? load16(vbase + tok * p.v_stride_t + v * kVec) : make_uint4(0, 0, 0, 0);
      }
    }

    // S: n-block nb gives head g's scores of slots base + 8 nb + 2c and + 1.
    float x[4];
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      const uint32_t* kw = reinterpret_cast<const uint32_t*>(kraw[nb]);
      // Even and odd k-steps accumulate apart: two dependent MMA chains of half the length.
      float d0[2] = {0.f, 0.f}, d1[2] = {0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        mma_heads<T>(d0[ks & 1], d1[ks & 1], qa[ks][0], qa[ks][1], kw[2 * ks], kw[2 * ks + 1]);
      }
      x[2 * nb] = valid[2 * nb] ? (d0[0] + d0[1]) * p.scale_log2 : -INFINITY;
      x[2 * nb + 1] = valid[2 * nb + 1] ? (d1[0] + d1[1]) * p.scale_log2 : -INFINITY;
    }
    // Online softmax over the tile (the quad holds all 16 slots of head g). Every lane runs the MMAs below,
    // even with nothing valid yet: they are warp-wide.
    float tile_max = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float mn = fmaxf(m, tile_max);
    const bool any = mn != -INFINITY;
    const float corr = any ? exp2f(m - mn) : 1.f;
    float pr[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) pr[i] = any ? exp2f(x[i] - mn) : 0.f;
    l = l * corr + ((pr[0] + pr[1]) + (pr[2] + pr[3]));
    m = mn;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      o_lo[j] *= corr;
      o_hi[j] *= corr;
    }

    // O += P V: A = P (slots 2c, 2c + 1 in a0; 8 + 2c, 9 + 2c in a2), B = V with slot pairs interleaved.
    float rest[4];
    const uint32_t pa0 = pack_pair<T>(pr[0], pr[1], rest[0], rest[1]);
    const uint32_t pa2 = pack_pair<T>(pr[2], pr[3], rest[2], rest[3]);
    float unused[4];
    const uint32_t pl0 = pack_pair<T>(rest[0], rest[1], unused[0], unused[1]);
    const uint32_t pl2 = pack_pair<T>(rest[2], rest[3], unused[2], unused[3]);
    const uint32_t* v0 = reinterpret_cast<const uint32_t*>(vraw[0]);
    const uint32_t* v1 = reinterpret_cast<const uint32_t*>(vraw[1]);
    const uint32_t* v2 = reinterpret_cast<const uint32_t*>(vraw[2]);
    const uint32_t* v3 = reinterpret_cast<const uint32_t*>(vraw[3]);
#pragma unroll
    for (int w = 0; w < NB / 2; ++w) {  // word w of a slot: dims NB g + 2w (n-block 2w) and + 1 (n-block 2w + 1)
      const uint32_t b0_even = __byte_perm(v0[w], v1[w], 0x5410), b1_even = __byte_perm(v2[w], v3[w], 0x5410);
      const uint32_t b0_odd = __byte_perm(v0[w], v1[w], 0x7632), b1_odd = __byte_perm(v2[w], v3[w], 0x7632);
      mma_heads<T>(o_lo[2 * w], o_hi[2 * w], pa0, pa2, b0_even, b1_even);
      mma_heads<T>(o_lo[2 * w + 1], o_hi[2 * w + 1], pa0, pa2, b0_odd, b1_odd);
      if constexpr (kSplitP) {
        mma_heads<T>(o_lo[2 * w], o_hi[2 * w], pl0, pl2, b0_even, b1_even);
        mma_heads<T>(o_lo[2 * w + 1], o_hi[2 * w + 1], pl0, pl2, b0_odd, b1_odd);
      }
    }
  }

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (g < nq) {
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      sm_o[warp][g][2 * NB * c + j] = o_lo[j];
      sm_o[warp][g][2 * NB * c + NB + j] = o_hi[j];
    }
    if (c == 0) {
      sm_m[warp][g] = m;
      sm_l[warp][g] = l;
    }
  }
  finish_block<T, D, NQ>(p, sm_m, sm_l, sm_o, b, q0, nq, split);
}

// Blocks of a decode kernel that fit on one multiprocessor (on the current device, which the caller set).
template <auto kKernel>
int resident_decode_blocks(int device) {
  return cached_per_device(device, [] {
    int count = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kKernel, kDecodeWarps * 32, 0));
    return std::max(count, 1);
  });
}

// How a row's k selected pages split over blocks: one wave of blocks, at most kMaxSplits splits of at most
// kMaxPagesPerSplit pages, each split a whole number of the kernel's rounds.
struct SplitPlan {
  int64_t splits, pages_per_split;
};
inline SplitPlan plan_splits(int64_t k, int64_t rows, int64_t wave_blocks, int64_t round_pages) {
  int64_t splits = std::min<int64_t>({k, int64_t{kMaxSplits}, std::max<int64_t>(1, wave_blocks / rows)});
  splits = std::max<int64_t>(splits, (k + kMaxPagesPerSplit - 1) / kMaxPagesPerSplit);
  int64_t pages_per_split = (k + splits - 1) / splits;
  // Whole rounds of the main loop: a split of 3 pages takes as many dependent rounds as one of 4 (Llama-3-8B shape,
  // 128 pages: 43 splits of 3 pages measured 14.9 us, 32 splits of 4 pages 14.0 us).
  const int64_t whole_rounds = (pages_per_split + round_pages - 1) / round_pages * round_pages;
  if (whole_rounds <= kMaxPagesPerSplit) pages_per_split = whole_rounds;
  return {(k + pages_per_split - 1) / pages_per_split, pages_per_split};
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
  // the same pages (all but the first from L2), and each block's chain of dependent work is shorter (batch 1,
  // against a block per group on tensor cores: Qwen2.5-0.5B shape 0.6-1.8 us less, SmolLM2-360M 0.8-1 us less at
  // budgets 2048-4096). With more bytes the repeated reads cost more than that (batch 8 at 8 MiB: 0.6-2 us more),
  // so above 8 MiB of selected keys and values one block row serves a KV head's query heads.
  // QUEST_KERNELS_SPLIT_HEADS=0 always does the latter.
  static const bool split_enabled = env_switch_on("QUEST_KERNELS_SPLIT_HEADS");
  const int64_t k = indices.size(2);
  const int64_t selected_bytes = batch * kv_heads * k * page_size * dim * query.element_size() * 2;
  const bool split_heads =
      split_enabled && !per_query_head && q_heads > kv_heads && selected_bytes <= kMaxSplitHeadsBytes;
  const int64_t rows = batch * (split_heads ? q_heads : sel_heads);
  TORCH_CHECK(k <= int64_t{kMaxSplits} * kMaxPagesPerSplit, "at most ", kMaxSplits * kMaxPagesPerSplit,
              " selected pages, got ", k);
  const int group = q_heads / kv_heads;
  const int served = per_query_head || split_heads ? 1 : group;
  static const bool mma_enabled = env_switch_on("QUEST_KERNELS_MMA");  // =0: GQA rows on CUDA cores (A/B)
  const bool tensor_cores = mma_enabled && served >= 2 && served <= 8;
  const int device = query.get_device();
  auto stream = c10::cuda::getCurrentCUDAStream();

  QUEST_DISPATCH_DTYPE(query.scalar_type(), T, [&] {
    QUEST_DISPATCH_HEAD_DIM(dim, D, [&] {
      QUEST_DISPATCH_HEADS(served, NQ, [&] {
        // The kernel for these rows, how many of its blocks fit a multiprocessor, and the tokens of one round.
        auto kernel = sparse_decode_kernel<T, D, NQ>;
        int resident = resident_decode_blocks<sparse_decode_kernel<T, D, NQ>>(device);
        int round_tokens = decode_round_tokens(dim, served);
        if constexpr (NQ >= 2) {
          if (tensor_cores) {
            kernel = sparse_decode_mma_kernel<T, D, NQ>;
            resident = resident_decode_blocks<sparse_decode_mma_kernel<T, D, NQ>>(device);
            round_tokens = kDecodeWarps * kTile;
          }
        }
        const SplitPlan plan = plan_splits(k, rows, int64_t{multiprocessor_count(device)} * resident,
                                           std::max<int64_t>(1, round_tokens / page_size));
        at::Tensor part_o, part_ml;
        if (plan.splits > 1) {
          const auto opts = query.options().dtype(at::kFloat);
          part_o = at::empty({batch * q_heads, plan.splits, dim}, opts);
          part_ml = at::empty({batch * q_heads, plan.splits, 2}, opts);
        }
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
        p.pages_per_split = plan.pages_per_split;
        p.num_splits = plan.splits;
        p.part_o = plan.splits > 1 ? part_o.data_ptr<float>() : nullptr;
        p.part_ml = plan.splits > 1 ? reinterpret_cast<float2*>(part_ml.data_ptr<float>()) : nullptr;
        p.counters = plan.splits > 1 ? zeroed_counters(query.device(), rows) : nullptr;
        p.out = reinterpret_cast<T*>(out.data_ptr());
        p.o_stride_b = out.stride(0);
        p.o_stride_h = out.stride(1);
        launch_pdl(kernel, dim3(plan.splits, rows), dim3(kDecodeWarps * 32), 0, stream, p);
      });
    });
  });
}
