// Deterministic reduction of the N*k code entries by latent, shared by the backward passes of
// topk_encode (grad W_enc, grad b_enc) and sparse_decode (grad W_dec) when PyTorch's deterministic mode is
// on (torch.use_deterministic_algorithms(True)). Their default path accumulates with floating-point
// atomics, whose summation order, and so the last bits of the result, changes from run to run.
//
// 1. count: counts[l] = number of entries with latent l (integer atomics: exact in any order);
// 2. exclusive scan: starts[0..m];
// 3. scatter: each entry's flat position p, stored as ~p, at a claimed slot of its latent's bucket (the
//    slot order is arbitrary);
// 4. sort: one block per latent sorts its bucket's keys descending, i.e. the positions ascending, which
//    fixes the order;
// 5. reduce: one block per (latent, column tile) sums coef(p) * src[p / k] over its bucket in that
//    order and writes every output row (an empty bucket gives zeros); column tile 0 also writes the sum of
//    the coefficients when asked.
// O(N*k*d + m*d) work and O(N*k + m) extra memory; no [N, m] or [N*k, d] tensor; every bit of the result
// is independent of scheduling. One block reduces a whole bucket, so a latent active in most rows makes
// a long tail (the atomic path spreads it over all rows' blocks).
#pragma once

#include "common.cuh"

#include <climits>

namespace concept_ext {
namespace cuda {

template <typename I>
__global__ void bucket_count_kernel(const I* __restrict__ idx, int64_t total, int64_t m,
                                    int32_t* __restrict__ counts) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (e >= total) return;
  CONCEPT_EXT_DEVICE_CHECK_INDEX(idx[e], m, "indices");
  atomicAdd(counts + idx[e], 1);
}

template <typename I>
__global__ void bucket_scatter_kernel(const I* __restrict__ idx, int64_t total, const int64_t* __restrict__ starts,
                                      int32_t* __restrict__ fill, uint32_t* __restrict__ keys) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (e >= total) return;
  const int64_t l = static_cast<int64_t>(idx[e]);
  keys[starts[l] + atomicAdd(fill + l, 1)] = ~static_cast<uint32_t>(e);
}

// (A template, like every kernel of a header, so that each translation unit may instantiate it.)
template <typename Key>
__global__ void __launch_bounds__(kBlock) bucket_sort_kernel(const int64_t* __restrict__ starts,
                                                             Key* __restrict__ keys, Key* __restrict__ scratch) {
  __shared__ unsigned whist[kWarps][256];
  __shared__ unsigned wtot[kWarps];
  const int64_t s0 = starts[blockIdx.x], c = starts[blockIdx.x + 1] - s0;
  if (c <= 1) return;  // block-uniform
  block_sort_desc<Key>(keys + s0, nullptr, scratch + s0, nullptr, c, whist, wtot);
}

// out[l, c] = sum over the bucket of l, in position order, of coef(p) * src[(p / k) * d + c]; with
// out_sum, column tile 0 also writes out_sum[l] = sum of coef(p) (in the same order).
template <typename T, typename Coef>
__global__ void bucket_reduce_kernel(const int64_t* __restrict__ starts, const uint32_t* __restrict__ keys,
                                     int64_t k, const T* __restrict__ src, int64_t d, Coef coef,
                                     acc_t<T>* __restrict__ out, acc_t<T>* __restrict__ out_sum) {
  using A = acc_t<T>;
  __shared__ A s_c[kBlock];
  __shared__ int64_t s_row[kBlock];
  const int64_t l = blockIdx.x, s0 = starts[l], s1 = starts[l + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x;
  const bool live = c < d, summer = out_sum != nullptr && blockIdx.y == 0 && threadIdx.x == 0;
  A acc = 0, sum = 0;
  for (int64_t base = s0; base < s1; base += kBlock) {
    const int64_t n = min(static_cast<int64_t>(kBlock), s1 - base);
    __syncthreads();
    if (threadIdx.x < n) {
      const int64_t p = static_cast<int64_t>(~keys[base + threadIdx.x]);
      s_c[threadIdx.x] = coef(p);
      s_row[threadIdx.x] = p / k;
    }
    __syncthreads();
    if (live) {
      for (int64_t j = 0; j < n; ++j)
        if (s_c[j] != A(0)) acc += s_c[j] * static_cast<A>(src[s_row[j] * d + c]);
    }
    if (summer)
      for (int64_t j = 0; j < n; ++j) sum += s_c[j];
  }
  if (live) out[l * d + c] = acc;
  if (summer) out_sum[l] = sum;
}

// Steps 1-4 for the `total` entries of idx (contiguous, int32 or int64, ids in [0, m)): returns
// starts [m + 1] (int64) and keys [max(total, 1)] (the complemented positions, bucket by bucket, as an
// int32 tensor holding uint32 bits). total must be < 2^31.
template <typename I>
inline std::tuple<Tensor, Tensor> bucket_by_latent(const Tensor& like, const I* idx, int64_t total, int64_t m,
                                                   cudaStream_t stream) {
  STD_TORCH_CHECK(total < INT_MAX, "N*k must be < 2^31 for the deterministic CUDA backward");
  const auto i32 = std::optional<ScalarType>(ScalarType::Int);
  Tensor starts = torch::stable::new_empty(like, {m + 1}, std::optional<ScalarType>(ScalarType::Long));
  Tensor keys = torch::stable::new_empty(like, {std::max<int64_t>(total, 1)}, i32);
  Tensor counts = torch::stable::new_zeros(like, {std::max<int64_t>(m, 1)}, i32);
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, kBlock));
  if (total > 0)
    bucket_count_kernel<I><<<blocks, kBlock, 0, stream>>>(idx, total, m, ptr<int32_t>(counts));
  exclusive_scan_kernel<int32_t><<<1, kBlock, 0, stream>>>(ptr<int32_t>(counts), ptr<int64_t>(starts), m);
  if (total > 0 && m > 0) {
    Tensor fill = torch::stable::new_zeros(like, {m}, i32);
    Tensor scratch = torch::stable::new_empty(like, {total}, i32);
    bucket_scatter_kernel<I><<<blocks, kBlock, 0, stream>>>(idx, total, ptr<int64_t>(starts), ptr<int32_t>(fill),
                                                             ptr<uint32_t>(keys));
    bucket_sort_kernel<uint32_t><<<static_cast<unsigned>(m), kBlock, 0, stream>>>(
        ptr<int64_t>(starts), ptr<uint32_t>(keys), ptr<uint32_t>(scratch));
  }
  CONCEPT_EXT_CHECK_LAUNCH("deterministic backward (buckets)");
  return {starts, keys};
}

}  // namespace cuda
}  // namespace concept_ext
