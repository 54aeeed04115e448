// Sparse decode x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec and its backward (CUDA).
// Semantics: concept_ext/reference.py (sparse_decode, sparse_decode_backward).
//
// Forward: one block per (row, column tile); the row's k (value, index) pairs are staged in shared
// memory and every thread accumulates VEC consecutive columns in registers, loading them 16 bytes at a
// time where the rows allow it (d a multiple of VEC and W_dec 16-byte aligned): 4 float32 or 8 bfloat16 /
// float16 values per load. Backward: grad_values by one warp per (row, j) dot product;
// grad_W_dec by fp32/fp64 atomics into an [m, d] accumulator (row-parallel scatter; the summation order
// of a latent hit by several rows is therefore not deterministic), no [N, k, d] tensor; or, with
// `deterministic` (PyTorch's deterministic mode), by the sorted bucket reduction of buckets.cuh.
#include "buckets.cuh"
#include "common.cuh"
#include "concept_ext/kernels.h"

namespace concept_ext {
namespace {

using namespace cuda;

template <typename T, int VEC>
struct Vec {
  using A = acc_t<T>;
  __device__ static void load(const T* p, A* out) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) out[u] = static_cast<A>(p[u]);
  }
};
template <>
struct Vec<float, 4> {
  __device__ static void load(const float* p, float* out) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    out[0] = f.x, out[1] = f.y, out[2] = f.z, out[3] = f.w;
  }
};
// Eight 16-bit values (bfloat16 or float16) in one 16-byte load, widened to float.
template <typename T>
struct Vec16 {
  __device__ static void load(const T* p, float* out) {
    static_assert(sizeof(T) == 2, "Vec16 is for 16-bit types");
    alignas(16) T h[8];
    *reinterpret_cast<uint4*>(h) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int u = 0; u < 8; ++u) out[u] = static_cast<float>(h[u]);
  }
};
template <>
struct Vec<c10::BFloat16, 8> : Vec16<c10::BFloat16> {};
template <>
struct Vec<c10::Half, 8> : Vec16<c10::Half> {};

template <typename T, typename I, int VEC>
__global__ void decode_kernel(const T* __restrict__ values, const I* __restrict__ indices,
                              const T* __restrict__ W, const T* __restrict__ b, T* __restrict__ out,
                              int64_t k, int64_t d, int64_t m) {
  using A = acc_t<T>;
  __shared__ A s_val[kBlock];
  __shared__ int64_t s_idx[kBlock];
  const int64_t row = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x) * VEC;
  const bool live = c0 < d;
  A acc[VEC];
#pragma unroll
  for (int u = 0; u < VEC; ++u) acc[u] = 0;
  for (int64_t j0 = 0; j0 < k; j0 += kBlock) {
    const int64_t n = min(static_cast<int64_t>(kBlock), k - j0);
    __syncthreads();
    if (threadIdx.x < n) {
      s_val[threadIdx.x] = static_cast<A>(values[row * k + j0 + threadIdx.x]);
      s_idx[threadIdx.x] = static_cast<int64_t>(indices[row * k + j0 + threadIdx.x]);
      CONCEPT_EXT_DEVICE_CHECK_INDEX(s_idx[threadIdx.x], m, "indices");
    }
    __syncthreads();
    if (live) {
      for (int j = 0; j < n; ++j) {
        A w[VEC];
        Vec<T, VEC>::load(W + s_idx[j] * d + c0, w);
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] += s_val[j] * w[u];
      }
    }
  }
  if (live) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) out[row * d + c0 + u] = static_cast<T>(acc[u] + static_cast<A>(b[c0 + u]));
  }
}

// grad_values[p] = <grad_out[row(p)], W[indices[p]]>, one warp per flat pair p.
template <typename T, typename I>
__global__ void grad_values_kernel(const T* __restrict__ grad_out, const I* __restrict__ indices,
                                   const T* __restrict__ W, T* __restrict__ grad_values, int64_t pairs,
                                   int64_t k, int64_t d, int64_t m) {
  using A = acc_t<T>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (p >= pairs) return;
  const T* g = grad_out + (p / k) * d;
  CONCEPT_EXT_DEVICE_CHECK_INDEX(indices[p], m, "indices");
  const T* w = W + static_cast<int64_t>(indices[p]) * d;
  A acc = 0;
  for (int64_t c = lane; c < d; c += 32) acc += static_cast<A>(g[c]) * static_cast<A>(w[c]);
  acc = warp_sum(acc);
  if (lane == 0) grad_values[p] = static_cast<T>(acc);
}

// grad_W[indices[i, j]] += values[i, j] * grad_out[i]; one block per (row, column tile).
template <typename T, typename I>
__global__ void grad_w_kernel(const T* __restrict__ grad_out, const T* __restrict__ values,
                              const I* __restrict__ indices, acc_t<T>* __restrict__ grad_w, int64_t k,
                              int64_t d, int64_t m) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x;
  if (c >= d) return;
  const A g = static_cast<A>(grad_out[row * d + c]);
  for (int64_t j = 0; j < k; ++j) {
    const A v = static_cast<A>(values[row * k + j]);
    if (v == A(0)) continue;
    const int64_t l = static_cast<int64_t>(indices[row * k + j]);
    CONCEPT_EXT_DEVICE_CHECK_INDEX(l, m, "indices");
    atomicAdd(grad_w + l * d + c, v * g);
  }
}

// The coefficient of entry p in grad_W_dec: its value.
template <typename T>
struct ValueCoef {
  const T* v;
  __device__ acc_t<T> operator()(int64_t p) const { return static_cast<acc_t<T>>(v[p]); }
};

void check_code(const Tensor& values, const Tensor& indices, const Tensor& W_dec) {
  check_dim(values, 2, "values");
  check_dim(indices, 2, "indices");
  check_dim(W_dec, 2, "W_dec");
  check_floating(values, "values");
  check_index(indices, "indices");
  check_same_dtype(values, W_dec, "values", "W_dec");
  check_size(indices, 0, values.size(0), "indices");
  check_size(indices, 1, values.size(1), "indices");
  check_cuda(values, "values");
  check_same_device(values, indices, "values", "indices");
  check_same_device(values, W_dec, "values", "W_dec");
}

}  // namespace

Tensor sparse_decode_cuda(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec) {
  check_code(values, indices, W_dec);
  check_dim(b_dec, 1, "b_dec");
  check_same_dtype(b_dec, W_dec, "b_dec", "W_dec");
  check_size(b_dec, 0, W_dec.size(1), "b_dec");
  check_same_device(values, b_dec, "values", "b_dec");
  torch::stable::accelerator::DeviceGuard guard(values.get_device_index());
  const int64_t n = values.size(0), k = values.size(1), m = W_dec.size(0), d = W_dec.size(1);
  Tensor out = torch::stable::new_empty(W_dec, {n, d});
  if (n == 0 || d == 0) return out;
  Tensor v = contig(values), idx = contig(indices), w = contig(W_dec), b = contig(b_dec);
  cudaStream_t stream = current_stream(values);
  CONCEPT_EXT_DISPATCH_FLOATING(w.scalar_type(), "sparse_decode", [&] {
    CONCEPT_EXT_DISPATCH_INDEX(idx.scalar_type(), "sparse_decode", [&] {
      // 16-byte loads need every W_dec row 16-byte aligned (a contiguous view may start anywhere).
      const bool aligned = reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (d % 4 == 0 && aligned) {
          dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(ceil_div(d, kBlock * 4)));
          decode_kernel<float, index_t, 4><<<grid, kBlock, 0, stream>>>(
              ptr<float>(v), ptr<index_t>(idx), ptr<float>(w), ptr<float>(b), ptr<float>(out), k, d, m);
          return;
        }
      }
      if constexpr (sizeof(scalar_t) == 2) {
        if (d % 8 == 0 && aligned) {
          dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(ceil_div(d, kBlock * 8)));
          decode_kernel<scalar_t, index_t, 8><<<grid, kBlock, 0, stream>>>(
              ptr<scalar_t>(v), ptr<index_t>(idx), ptr<scalar_t>(w), ptr<scalar_t>(b), ptr<scalar_t>(out), k, d, m);
          return;
        }
      }
      dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(ceil_div(d, kBlock)));
      decode_kernel<scalar_t, index_t, 1><<<grid, kBlock, 0, stream>>>(
          ptr<scalar_t>(v), ptr<index_t>(idx), ptr<scalar_t>(w), ptr<scalar_t>(b), ptr<scalar_t>(out), k, d, m);
    });
  });
  CONCEPT_EXT_CHECK_LAUNCH("sparse_decode");
  return out;
}

std::tuple<Tensor, Tensor> sparse_decode_backward_cuda(Tensor grad_out, Tensor values, Tensor indices,
                                                       Tensor W_dec, bool deterministic) {
  check_code(values, indices, W_dec);
  check_dim(grad_out, 2, "grad_out");
  check_same_dtype(grad_out, W_dec, "grad_out", "W_dec");
  check_size(grad_out, 0, values.size(0), "grad_out");
  check_size(grad_out, 1, W_dec.size(1), "grad_out");
  check_same_device(values, grad_out, "values", "grad_out");
  torch::stable::accelerator::DeviceGuard guard(values.get_device_index());
  const int64_t n = values.size(0), k = values.size(1), m = W_dec.size(0), d = W_dec.size(1);
  const ScalarType acc = acc_scalar_type(W_dec.scalar_type());
  // Zeros when no kernel runs (d == 0: every dot product over d is empty).
  Tensor grad_values = d > 0 ? torch::stable::new_empty(values, {n, k}) : torch::stable::new_zeros(values, {n, k});
  // The atomic path accumulates into zeros; the deterministic one writes every element itself.
  Tensor grad_w = deterministic && n > 0 && k > 0 && d > 0
                      ? torch::stable::new_empty(W_dec, {m, d}, std::optional<ScalarType>(acc))
                      : torch::stable::new_zeros(W_dec, {m, d}, std::optional<ScalarType>(acc));
  if (n > 0 && k > 0 && d > 0) {
    Tensor g = contig(grad_out), v = contig(values), idx = contig(indices), w = contig(W_dec);
    cudaStream_t stream = current_stream(values);
    CONCEPT_EXT_DISPATCH_FLOATING(w.scalar_type(), "sparse_decode_backward", [&] {
      CONCEPT_EXT_DISPATCH_INDEX(idx.scalar_type(), "sparse_decode_backward", [&] {
        const int64_t pairs = n * k;
        grad_values_kernel<scalar_t, index_t><<<static_cast<unsigned>(ceil_div(pairs, kWarps)), kBlock, 0,
                                                stream>>>(ptr<scalar_t>(g), ptr<index_t>(idx), ptr<scalar_t>(w),
                                                          ptr<scalar_t>(grad_values), pairs, k, d, m);
        CONCEPT_EXT_CHECK_LAUNCH("sparse_decode_backward (grad_values)");
        if (deterministic) {
          auto [starts, keys] = bucket_by_latent<index_t>(values, ptr<index_t>(idx), pairs, m, stream);
          dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(ceil_div(d, kBlock)));
          bucket_reduce_kernel<scalar_t, ValueCoef<scalar_t>><<<grid, kBlock, 0, stream>>>(
              ptr<int64_t>(starts), ptr<uint32_t>(keys), k, ptr<scalar_t>(g), d, ValueCoef<scalar_t>{ptr<scalar_t>(v)},
              ptr<acc_t<scalar_t>>(grad_w), static_cast<acc_t<scalar_t>*>(nullptr));
        } else {
          dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(ceil_div(d, kBlock)));
          grad_w_kernel<scalar_t, index_t><<<grid, kBlock, 0, stream>>>(
              ptr<scalar_t>(g), ptr<scalar_t>(v), ptr<index_t>(idx), ptr<acc_t<scalar_t>>(grad_w), k, d, m);
        }
        CONCEPT_EXT_CHECK_LAUNCH("sparse_decode_backward (grad_W_dec)");
      });
    });
  }
  return {grad_values, to_dtype(grad_w, W_dec.scalar_type())};
}

}  // namespace concept_ext
