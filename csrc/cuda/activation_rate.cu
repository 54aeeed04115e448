// Activation-rate sparsity loss (method.md section 2.3) on a sparse code, and its backward (CUDA).
// Semantics: concept_ext/reference.py (activation_rate_loss, activation_rate_top_mask).
//
// Both directions first build the [N*k] "top" mask: the active (value > 0) entries are bucketed by
// latent with a counting sort (atomic histogram, one-block exclusive scan, atomic scatter of flat
// positions); then one block per latent selects its floor(rate*N) largest entries with two block radix
// selects: one on the value (the threshold value and how many ties at it are still needed), one on the
// flat position among the tied entries (the earliest row-major entries win, as in the reference). The
// bucket order from the atomic scatter does not matter: selection uses the positions explicitly, so
// the mask is deterministic. The loss is then a fixed-grid two-level sum (deterministic); the backward
// writes grad/N outside the mask. O(N*k + m) work and memory, no [N, m], no host synchronisation.
#include "common.cuh"
#include "concept_ext/kernels.h"

#include <climits>
#include <cmath>

namespace concept_ext {
namespace {

using namespace cuda;

constexpr int kSumBlocks = 512;  // fixed grid of the loss reduction, so its order never changes

int64_t m_keep_of(int64_t n, double rate) {
  // floor(rate * N); the epsilon guards against 0.1 * 500 = 49.999..., as in the reference.
  return static_cast<int64_t>(std::floor(rate * static_cast<double>(n) + 1e-9));
}

template <typename T, typename I>
__global__ void count_kernel(const T* __restrict__ values, const I* __restrict__ indices, int64_t total,
                             int32_t* __restrict__ counts, int64_t n_latents) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (e < total && static_cast<acc_t<T>>(values[e]) > acc_t<T>(0)) {
    // The bucket pass below reads the same (active) entries after this kernel: one check covers both.
    CONCEPT_EXT_DEVICE_CHECK_INDEX(indices[e], n_latents, "indices");
    atomicAdd(counts + indices[e], 1);
  }
}

template <typename T, typename I>
__global__ void bucket_kernel(const T* __restrict__ values, const I* __restrict__ indices, int64_t total,
                              const int64_t* __restrict__ starts, int32_t* __restrict__ fill,
                              int32_t* __restrict__ bucket) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (e < total && static_cast<acc_t<T>>(values[e]) > acc_t<T>(0)) {
    const int64_t l = static_cast<int64_t>(indices[e]);
    bucket[starts[l] + atomicAdd(fill + l, 1)] = static_cast<int32_t>(e);
  }
}

// One block per latent: mark the m_keep largest entries of its bucket.
template <typename T>
__global__ void __launch_bounds__(kBlock) select_kernel(const T* __restrict__ values,
                                                        const int64_t* __restrict__ starts,
                                                        const int32_t* __restrict__ bucket, int64_t m_keep,
                                                        uint8_t* __restrict__ top) {
  using A = acc_t<T>;
  using Key = typename KeyOf<A>::type;
  __shared__ unsigned hist[256];
  __shared__ unsigned long long bcast[2];
  const int32_t* b = bucket + starts[blockIdx.x];
  const int64_t c = starts[blockIdx.x + 1] - starts[blockIdx.x];
  if (c == 0) return;
  if (c <= m_keep) {
    for (int64_t i = threadIdx.x; i < c; i += kBlock) top[b[i]] = 1;
    return;
  }
  auto vkey = [&](int64_t i) { return float_key(static_cast<A>(values[b[i]])); };
  Key vt;
  int64_t need_eq;
  block_radix_select<Key>(vkey, c, m_keep, hist, bcast, &vt, &need_eq);
  // Among the entries equal to the threshold, the need_eq earliest positions: the largest ~pos. Other
  // entries get key 0, below every ~pos (positions are < 2^31).
  auto pkey = [&](int64_t i) { return vkey(i) == vt ? ~static_cast<uint32_t>(b[i]) : 0u; };
  uint32_t pt;
  int64_t unused;
  block_radix_select<uint32_t>(pkey, c, need_eq, hist, bcast, &pt, &unused);
  for (int64_t i = threadIdx.x; i < c; i += kBlock) {
    const Key key = vkey(i);
    if (key > vt || (key == vt && ~static_cast<uint32_t>(b[i]) >= pt)) top[b[i]] = 1;
  }
}

template <typename T>
__global__ void partial_sum_kernel(const T* __restrict__ values, const uint8_t* __restrict__ top,
                                   int64_t total, acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  A s = 0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kBlock) {
    const A v = static_cast<A>(values[e]);
    if (!top[e] && v > A(0)) s += v;
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename T>
__global__ void final_sum_kernel(const acc_t<T>* __restrict__ partial, int nparts, acc_t<T> n_rows,
                                 T* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  A s = 0;
  for (int i = threadIdx.x; i < nparts; i += kBlock) s += partial[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) *out = static_cast<T>(s / n_rows);
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ top, int64_t total,
                                acc_t<T> n_rows, T* __restrict__ grad_values) {
  using A = acc_t<T>;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (e < total) grad_values[e] = static_cast<T>(top[e] ? A(0) : static_cast<A>(*grad) / n_rows);
}

void check_args(const Tensor& values, const Tensor& indices, int64_t n_latents, double rate) {
  check_dim(values, 2, "values");
  check_dim(indices, 2, "indices");
  check_floating(values, "values");
  check_index(indices, "indices");
  check_size(indices, 0, values.size(0), "indices");
  check_size(indices, 1, values.size(1), "indices");
  check_cuda(values, "values");
  check_same_device(values, indices, "values", "indices");
  STD_TORCH_CHECK(n_latents >= 1, "n_latents must be positive, got ", n_latents);
  STD_TORCH_CHECK(rate >= 0.0 && rate <= 1.0, "rate must lie in [0, 1], got ", rate);
  STD_TORCH_CHECK(values.numel() < INT_MAX, "values: N*k must be < 2^31 for the CUDA kernel");
}

// uint8 [N*k] mask of the entries in their latent's top set (all zero when m_keep == 0).
Tensor top_mask(const Tensor& v, const Tensor& idx, int64_t n_latents, double rate, cudaStream_t stream) {
  const int64_t total = v.numel(), m_keep = m_keep_of(v.size(0), rate);
  const auto i32 = std::optional<ScalarType>(ScalarType::Int);
  Tensor top = torch::stable::new_zeros(v, {total}, std::optional<ScalarType>(ScalarType::Byte));
  if (total == 0 || m_keep == 0) return top;
  Tensor counts = torch::stable::new_zeros(v, {n_latents}, i32);
  Tensor fill = torch::stable::new_zeros(v, {n_latents}, i32);
  Tensor starts = torch::stable::new_empty(v, {n_latents + 1}, std::optional<ScalarType>(ScalarType::Long));
  Tensor bucket = torch::stable::new_empty(v, {total}, i32);
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, kBlock));
  CONCEPT_EXT_DISPATCH_FLOATING(v.scalar_type(), "activation_rate_loss", [&] {
    CONCEPT_EXT_DISPATCH_INDEX(idx.scalar_type(), "activation_rate_loss", [&] {
      count_kernel<scalar_t, index_t>
          <<<blocks, kBlock, 0, stream>>>(ptr<scalar_t>(v), ptr<index_t>(idx), total, ptr<int32_t>(counts),
                                          n_latents);
      exclusive_scan_kernel<int32_t><<<1, kBlock, 0, stream>>>(ptr<int32_t>(counts), ptr<int64_t>(starts),
                                                               n_latents);
      bucket_kernel<scalar_t, index_t><<<blocks, kBlock, 0, stream>>>(
          ptr<scalar_t>(v), ptr<index_t>(idx), total, ptr<int64_t>(starts), ptr<int32_t>(fill),
          ptr<int32_t>(bucket));
    });
    select_kernel<scalar_t><<<static_cast<unsigned>(n_latents), kBlock, 0, stream>>>(
        ptr<scalar_t>(v), ptr<int64_t>(starts), ptr<int32_t>(bucket), m_keep, ptr<uint8_t>(top));
  });
  CONCEPT_EXT_CHECK_LAUNCH("activation_rate_loss (top mask)");
  return top;
}

}  // namespace

Tensor activation_rate_loss_cuda(Tensor values, Tensor indices, int64_t n_latents, double rate) {
  check_args(values, indices, n_latents, rate);
  torch::stable::accelerator::DeviceGuard guard(values.get_device_index());
  Tensor out = torch::stable::new_empty(values, {});
  const int64_t n = values.size(0);
  if (n == 0 || values.numel() == 0) return torch::stable::zero_(out);
  Tensor v = contig(values), idx = contig(indices);
  cudaStream_t stream = current_stream(values);
  Tensor top = top_mask(v, idx, n_latents, rate, stream);
  const int64_t total = v.numel();
  const int parts = static_cast<int>(std::min<int64_t>(kSumBlocks, ceil_div(total, kBlock)));
  Tensor partial = torch::stable::new_empty(v, {parts}, std::optional<ScalarType>(acc_scalar_type(v.scalar_type())));
  CONCEPT_EXT_DISPATCH_FLOATING(v.scalar_type(), "activation_rate_loss", [&] {
    using A = acc_t<scalar_t>;
    partial_sum_kernel<scalar_t><<<parts, kBlock, 0, stream>>>(ptr<scalar_t>(v), ptr<uint8_t>(top), total,
                                                               ptr<A>(partial));
    final_sum_kernel<scalar_t><<<1, kBlock, 0, stream>>>(ptr<A>(partial), parts, A(n), ptr<scalar_t>(out));
  });
  CONCEPT_EXT_CHECK_LAUNCH("activation_rate_loss");
  return out;
}

Tensor activation_rate_loss_backward_cuda(Tensor grad, Tensor values, Tensor indices, int64_t n_latents,
                                          double rate) {
  check_args(values, indices, n_latents, rate);
  STD_TORCH_CHECK(grad.numel() == 1, "grad must hold one element (the loss is a scalar), got ", grad.numel());
  check_same_device(values, grad, "values", "grad");
  torch::stable::accelerator::DeviceGuard guard(values.get_device_index());
  Tensor grad_values = torch::stable::new_empty(values, {values.size(0), values.size(1)});
  const int64_t total = values.numel();
  if (total == 0) return grad_values;
  Tensor v = contig(values), idx = contig(indices);
  Tensor g = contig(to_dtype(grad, values.scalar_type()));
  cudaStream_t stream = current_stream(values);
  Tensor top = top_mask(v, idx, n_latents, rate, stream);
  CONCEPT_EXT_DISPATCH_FLOATING(v.scalar_type(), "activation_rate_loss_backward", [&] {
    using A = acc_t<scalar_t>;
    backward_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(total, kBlock)), kBlock, 0, stream>>>(
        ptr<scalar_t>(g), ptr<uint8_t>(top), total, A(values.size(0)), ptr<scalar_t>(grad_values));
  });
  CONCEPT_EXT_CHECK_LAUNCH("activation_rate_loss_backward");
  return grad_values;
}

}  // namespace concept_ext
