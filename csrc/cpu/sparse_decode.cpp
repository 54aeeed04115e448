// CPU kernels of sparse_decode and sparse_decode_backward (semantics: concept_ext/reference.py).
//
// Forward: x_hat[i] = sum_j values[i, j] * W_dec[indices[i, j]] + b_dec, one row per task, the row
// accumulated in fp32 (fp64 for float64) in an L1-resident buffer, the k gathered decoder rows streamed
// through a vectorised axpy.
//
// Backward (performance.md section 1.2 (c)): the N*k pairs are bucketed by latent with a counting sort,
// then each thread owns a range of latents. For latent l it reads W_dec[l] once and walks its pairs in
// row-major order, computing in the same pass
//   grad_values[i, j] = <grad_out[i], W_dec[l]>      and      grad_W_dec[l] += values[i, j] * grad_out[i].
// No dense [N, m] product, no [N*k, d] tensor, no atomics: deterministic for any thread count.
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <vector>

#include "concept_ext/checks.h"
#include "concept_ext/dispatch.h"
#include "concept_ext/kernels.h"
#include "sparse_util.h"

namespace concept_ext {
namespace {

using cpu::ld;
using cpu::st;

template <typename T, typename I>
void decode_rows(const T* values, const I* indices, const T* W, const T* b, T* out, int64_t n, int64_t k,
                 int64_t d) {
  using A = acc_t<T>;
  // Rows are independent; ~k*d multiply-adds each, so a grain of a few rows keeps tiny batches serial.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * d));
  torch::stable::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(static_cast<size_t>(d));
    A* acc = buf.data();
    for (int64_t i = r0; i < r1; ++i) {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) acc[t] = ld(b[t]);
      const T* v = values + i * k;
      const I* ix = indices + i * k;
      int64_t j = 0;
      // Four (then two) gathered rows per sweep cut the read-modify-write traffic on acc.
      for (; j + 4 <= k; j += 4) {
        const A v0 = ld(v[j]), v1 = ld(v[j + 1]), v2 = ld(v[j + 2]), v3 = ld(v[j + 3]);
        const T* w0 = W + static_cast<int64_t>(ix[j]) * d;
        const T* w1 = W + static_cast<int64_t>(ix[j + 1]) * d;
        const T* w2 = W + static_cast<int64_t>(ix[j + 2]) * d;
        const T* w3 = W + static_cast<int64_t>(ix[j + 3]) * d;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t)
          acc[t] += (v0 * ld(w0[t]) + v1 * ld(w1[t])) + (v2 * ld(w2[t]) + v3 * ld(w3[t]));
      }
      for (; j + 2 <= k; j += 2) {
        const A v0 = ld(v[j]), v1 = ld(v[j + 1]);
        const T* w0 = W + static_cast<int64_t>(ix[j]) * d;
        const T* w1 = W + static_cast<int64_t>(ix[j + 1]) * d;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) acc[t] += v0 * ld(w0[t]) + v1 * ld(w1[t]);
      }
      for (; j < k; ++j) {
        const A v0 = ld(v[j]);
        const T* w0 = W + static_cast<int64_t>(ix[j]) * d;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) acc[t] += v0 * ld(w0[t]);
      }
      T* o = out + i * d;
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) o[t] = st<T>(acc[t]);
    }
  });
}

template <typename T, typename I>
void decode_backward(const T* grad_out, const T* values, const I* indices, const T* W, T* grad_values,
                     T* grad_W, int64_t n, int64_t k, int64_t m, int64_t d) {
  using A = acc_t<T>;
  const cpu::Buckets bk = cpu::bucket_by_latent(indices, n * k, m, [](int64_t) { return true; });
  // Writing one (possibly zero) grad row costs about as much as a quarter of a pair's work.
  const std::vector<int64_t> bounds = cpu::balanced_latent_chunks(bk.offsets, m, 0.25);
  const int64_t n_chunks = static_cast<int64_t>(bounds.size()) - 1;
  torch::stable::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<A> acc_buf(static_cast<size_t>(d)), w_buf(static_cast<size_t>(d));
    A* acc = acc_buf.data();
    A* w = w_buf.data();
    for (int64_t l = bounds[c0]; l < bounds[c1]; ++l) {
      const int64_t p0 = bk.offsets[l], p1 = bk.offsets[l + 1];
      T* gw = grad_W + l * d;
      if (p0 == p1) {
        std::fill(gw, gw + d, st<T>(A(0)));
        continue;
      }
      const T* wl = W + l * d;
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) {
        w[t] = ld(wl[t]);
        acc[t] = A(0);
      }
      for (int64_t q = p0; q < p1; ++q) {
        const int64_t p = bk.items[q];
        const T* g = grad_out + (p / k) * d;
        const A v = ld(values[p]);
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t t = 0; t < d; ++t) {
          const A gt = ld(g[t]);
          dot += gt * w[t];
          acc[t] += v * gt;
        }
        grad_values[p] = st<T>(dot);
      }
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) gw[t] = st<T>(acc[t]);
    }
  });
}

template <typename I>
void check_range(const Tensor& indices, int64_t m) {
  STD_TORCH_CHECK(cpu::indices_in_range(indices.const_data_ptr<I>(), indices.numel(), m),
                  "indices must lie in [0, ", m, ") (W_dec has m = ", m, " rows)");
}

}  // namespace

Tensor sparse_decode_cpu(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec) {
  cpu::check_code(values, indices, W_dec);
  check_cpu(b_dec, "b_dec");
  check_dim(b_dec, 1, "b_dec");
  check_same_dtype(b_dec, W_dec, "b_dec", "W_dec");
  const int64_t n = values.size(0), k = values.size(1), m = W_dec.size(0), d = W_dec.size(1);
  check_size(b_dec, 0, d, "b_dec");
  values = torch::stable::contiguous(values);
  indices = torch::stable::contiguous(indices);
  W_dec = torch::stable::contiguous(W_dec);
  b_dec = torch::stable::contiguous(b_dec);
  Tensor out = torch::stable::new_empty(W_dec, {n, d});
  if (n == 0 || d == 0) return out;
  CONCEPT_EXT_DISPATCH_INDEX(indices.scalar_type(), "sparse_decode", [&] {
    check_range<index_t>(indices, m);
    CONCEPT_EXT_DISPATCH_FLOATING(W_dec.scalar_type(), "sparse_decode", [&] {
      cpu::advise_huge_pages(out, sizeof(scalar_t));
      decode_rows<scalar_t, index_t>(values.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(),
                                     W_dec.const_data_ptr<scalar_t>(), b_dec.const_data_ptr<scalar_t>(),
                                     out.mutable_data_ptr<scalar_t>(), n, k, d);
    });
  });
  return out;
}

// `deterministic` is accepted for the schema's sake: the bucketed CPU backward always is.
std::tuple<Tensor, Tensor> sparse_decode_backward_cpu(Tensor grad_out, Tensor values, Tensor indices,
                                                      Tensor W_dec, bool /*deterministic*/) {
  cpu::check_code(values, indices, W_dec);
  check_cpu(grad_out, "grad_out");
  check_dim(grad_out, 2, "grad_out");
  const int64_t n = values.size(0), k = values.size(1), m = W_dec.size(0), d = W_dec.size(1);
  check_size(grad_out, 0, n, "grad_out");
  check_size(grad_out, 1, d, "grad_out");
  check_floating(grad_out, "grad_out");
  if (grad_out.scalar_type() != W_dec.scalar_type()) grad_out = torch::stable::to(grad_out, W_dec.scalar_type());
  grad_out = torch::stable::contiguous(grad_out);
  values = torch::stable::contiguous(values);
  indices = torch::stable::contiguous(indices);
  W_dec = torch::stable::contiguous(W_dec);
  Tensor grad_values = torch::stable::new_empty(values, {n, k});
  if (n == 0 || k == 0) {
    Tensor grad_W = torch::stable::new_zeros(W_dec, {m, d});
    return {grad_values, grad_W};
  }
  Tensor grad_W = torch::stable::new_empty(W_dec, {m, d});
  CONCEPT_EXT_DISPATCH_INDEX(indices.scalar_type(), "sparse_decode_backward", [&] {
    check_range<index_t>(indices, m);
    CONCEPT_EXT_DISPATCH_FLOATING(W_dec.scalar_type(), "sparse_decode_backward", [&] {
      cpu::advise_huge_pages(grad_W, sizeof(scalar_t));
      decode_backward<scalar_t, index_t>(
          grad_out.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
          indices.const_data_ptr<index_t>(), W_dec.const_data_ptr<scalar_t>(),
          grad_values.mutable_data_ptr<scalar_t>(), grad_W.mutable_data_ptr<scalar_t>(), n, k, m, d);
    });
  });
  return {grad_values, grad_W};
}

}  // namespace concept_ext
