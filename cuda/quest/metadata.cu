// Page metadata: element-wise min and max of the keys of every page, per batch row and KV head; with
// mean_box, the same box moved to be centred on the page's mean key (mean -+ (max - min) / 2), the slots of
// page_summary="mean".
//
// Both ops recompute a touched page from its keys (at most page_size of them) rather than folding incrementally,
// so a partial page always holds exactly the extrema of its tokens and the result is bit-identical to the
// reference (min/max of half-precision values are exact in fp32).
#include <c10/cuda/CUDAStream.h>

#include "check.h"
#include "common.cuh"
#include "launch.h"
#include "metadata.cuh"
#include "ops.h"

namespace quest {

template <typename T>
struct RefreshParams {
  T* page_min;
  T* page_max;
  const T* keys;
  int64_t m_stride_b, m_stride_h, m_stride_p;  // page_min and page_max share strides
  int64_t k_stride_b, k_stride_h, k_stride_t;
  int heads;
  int first_page, num_pages;  // pages [first_page, first_page + num_pages) when seq_lens is null
  int end;                    // tokens [0, end) exist when seq_lens is null
  int max_tokens;             // keys.size(2): lengths beyond it are ignored rather than read out of bounds
  const int* seq_lens;        // else: the one page holding token seq_lens[b] - 1
  int page_size, log2_page;
  int vecs;                   // D / 8
  bool mean_box;              // store mean -+ half-width instead of min / max
};

template <typename T>
__global__ void refresh_pages_kernel(const RefreshParams<T> p) {
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh - b * p.heads;
  const int item = blockIdx.x * blockDim.x + threadIdx.x;
  pdl_wait();  // the keys (and lengths) come from the kernels before
  pdl_launch_dependents();
  const int local_page = item / p.vecs, vec = item - local_page * p.vecs;
  int page, end;
  if (p.seq_lens != nullptr) {
    end = p.seq_lens[b];
    if (local_page > 0 || end <= 0 || end > p.max_tokens) return;
    page = (end - 1) >> p.log2_page;
  } else {
    if (local_page >= p.num_pages) return;
    page = p.first_page + local_page;
    end = p.end;
  }
  const int t0 = page << p.log2_page;
  const int t1 = min(t0 + p.page_size, end);
  const int64_t off = b * p.m_stride_b + h * p.m_stride_h + page * p.m_stride_p + vec * kVec;
  recompute_page_slice<T>(p.keys + b * p.k_stride_b + h * p.k_stride_h + vec * kVec, p.k_stride_t, t0, t1,
                          p.mean_box, p.page_min + off, p.page_max + off);
}

template <typename T>
void launch_refresh(at::Tensor& page_min, at::Tensor& page_max, const at::Tensor& keys, int first_page, int num_pages,
                    int end, const int* seq_lens, int page_size, bool mean_box) {
  RefreshParams<T> p;
  p.page_min = reinterpret_cast<T*>(page_min.data_ptr());
  p.page_max = reinterpret_cast<T*>(page_max.data_ptr());
  p.keys = reinterpret_cast<const T*>(keys.data_ptr());
  p.m_stride_b = page_min.stride(0);
  p.m_stride_h = page_min.stride(1);
  p.m_stride_p = page_min.stride(2);
  p.k_stride_b = keys.stride(0);
  p.k_stride_h = keys.stride(1);
  p.k_stride_t = keys.stride(2);
  p.heads = keys.size(1);
  p.first_page = first_page;
  p.num_pages = num_pages;
  p.end = end;
  p.max_tokens = keys.size(2);
  p.seq_lens = seq_lens;
  p.page_size = page_size;
  p.log2_page = log2_exact(page_size, "page_size");
  p.vecs = keys.size(3) / kVec;
  p.mean_box = mean_box;
  constexpr int threads = 128;
  const int items = num_pages * p.vecs;
  const dim3 grid((items + threads - 1) / threads, keys.size(0) * keys.size(1));
  launch_pdl(refresh_pages_kernel<T>, grid, dim3(threads), 0, c10::cuda::getCurrentCUDAStream(), p);
}

void check_metadata(const at::Tensor& page_min, const at::Tensor& page_max, const at::Tensor& keys) {
  check_vectors(keys, "keys");
  check_vectors(page_min, "page_min");
  check_vectors(page_max, "page_max");
  TORCH_CHECK(keys.dim() == 4 && page_min.dim() == 4, "keys and page_min must be 4-D [B, H, *, D]");
  TORCH_CHECK(page_min.sizes() == page_max.sizes() && page_min.strides() == page_max.strides(),
              "page_min and page_max must have the same shape and strides");
  TORCH_CHECK(page_min.scalar_type() == keys.scalar_type() && page_max.scalar_type() == keys.scalar_type(),
              "page_min/page_max must have the dtype of keys");
  TORCH_CHECK(page_min.size(0) == keys.size(0) && page_min.size(1) == keys.size(1) &&
                  page_min.size(3) == keys.size(3),
              "page_min [B, H, P, D] must match keys [B, H, L, D] in B, H and D");
  TORCH_CHECK(keys.size(3) % kVec == 0, "head dim must be a multiple of 8, got ", keys.size(3));
}

}  // namespace quest

void refresh_pages(at::Tensor& page_min, at::Tensor& page_max, const at::Tensor& keys, int64_t start, int64_t end,
                   int64_t page_size, int64_t summary) {
  TORCH_CHECK(summary == 0 || summary == 1, "summary must be 0 (min/max) or 1 (mean box), got ", summary);
  quest::check_metadata(page_min, page_max, keys);
  quest::log2_exact(page_size, "page_size");
  TORCH_CHECK(0 <= start && end <= keys.size(2), "need 0 <= start and end <= keys.size(2), got start=", start,
              " end=", end, " with ", keys.size(2), " tokens");
  if (end <= start || keys.size(0) == 0 || keys.size(1) == 0) return;
  const int64_t first = start / page_size, last = (end - 1) / page_size;
  TORCH_CHECK(last < page_min.size(2), "page_min holds ", page_min.size(2), " pages, token ", end - 1,
              " needs page ", last);
  const c10::cuda::CUDAGuard guard(keys.device());
  if (keys.scalar_type() == at::kHalf) {
    quest::launch_refresh<__half>(page_min, page_max, keys, first, last - first + 1, end, nullptr, page_size,
                                          summary == 1);
  } else {
    quest::launch_refresh<__nv_bfloat16>(page_min, page_max, keys, first, last - first + 1, end, nullptr, page_size,
                                          summary == 1);
  }
}

void append_pages(at::Tensor& page_min, at::Tensor& page_max, const at::Tensor& keys, const at::Tensor& seq_lens,
                  int64_t page_size, int64_t summary) {
  TORCH_CHECK(summary == 0 || summary == 1, "summary must be 0 (min/max) or 1 (mean box), got ", summary);
  quest::check_metadata(page_min, page_max, keys);
  quest::log2_exact(page_size, "page_size");
  quest::check_seq_lens(seq_lens, keys.size(0));
  TORCH_CHECK(page_min.size(2) * page_size >= keys.size(2), "page_min must cover every token of keys");
  if (keys.size(0) == 0 || keys.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(keys.device());
  const int* lens = seq_lens.data_ptr<int>();
  if (keys.scalar_type() == at::kHalf) {
    quest::launch_refresh<__half>(page_min, page_max, keys, 0, 1, 0, lens, page_size, summary == 1);
  } else {
    quest::launch_refresh<__nv_bfloat16>(page_min, page_max, keys, 0, 1, 0, lens, page_size, summary == 1);
  }
}
