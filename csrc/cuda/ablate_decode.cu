// Concept-ablation decode of the conditional causality sweep (method.md sections 3.1, 6.3) (CUDA).
// Semantics: concept_ext/reference.py (ablate_decode).
//
// 1. base_acc [N, d] = b_dec + the kept latents' decode (one block per (row, column tile)), in the
//    accumulation dtype so the pairs are corrected from the unrounded reconstruction.
// 2. Counting pass, one block per row: an entry represents a (row, concept) pair when its latent is kept,
//    its value is > 0 and no earlier entry of the row has the same latent with a value > 0 (O(k^2) per
//    row, fine for SAE k; pathological for k ~ m).
// 3. Exclusive scan of the counts on device; the total P is then copied to the host: the output size is
//    data-dependent, so this form synchronises once and cannot be captured in a CUDA graph (the padded
//    form below can). It is an evaluation op; the training ops never synchronise.
// 4. Fill pass, one block per row: each representative's slot is its rank by position in `keep`
//    (pairs ordered by row, then keep position, as in the reference); its coefficient sums every entry
//    of the row with that latent.
// 5. One block per output row (base rows, then pairs): the rank-1 correction, the optional rescale to
//    target_norm (block-reduced norm) and the cast.
//
// ablate_decode_padded skips steps 2-3 and the synchronisation: in step 4 every code entry owns output
// slot row * k + j, filled by its own thread when the entry is its pair's representative and marked -1
// (zero row) otherwise. Its output sizes depend only on N, k and d, so it captures in a CUDA graph.
#include "common.cuh"
#include "concept_ext/kernels.h"

#include <cmath>

namespace concept_ext {
namespace {

using namespace cuda;

constexpr double kRescaleEps = 1e-9;  // reference.RESCALE_EPS

__global__ void keep_pos_kernel(const int64_t* __restrict__ keep, int64_t f, int64_t m, int32_t* __restrict__ pos) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (c < f) {
    CONCEPT_EXT_DEVICE_CHECK_INDEX(keep[c], m, "keep");
    pos[keep[c]] = static_cast<int32_t>(c);
  }
}

template <typename T, typename I>
__global__ void base_kernel(const T* __restrict__ values, const I* __restrict__ indices,
                            const int32_t* __restrict__ pos, const T* __restrict__ W, const T* __restrict__ b,
                            acc_t<T>* __restrict__ base, int64_t k, int64_t d, int64_t m) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x;
  if (c >= d) return;
  A acc = static_cast<A>(b[c]);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t l = static_cast<int64_t>(indices[row * k + j]);
    CONCEPT_EXT_DEVICE_CHECK_INDEX(l, m, "indices");
    if (pos[l] >= 0) acc += static_cast<A>(values[row * k + j]) * static_cast<A>(W[l * d + c]);
  }
  base[row * d + c] = acc;
}

// Every id of the row is in range before any thread looks one up in `pos` (the pair tests read other
// threads' entries); a failing thread traps before the barrier, so nobody passes it.
template <typename I>
__device__ __forceinline__ void check_row(const I* idx, int64_t k, int64_t m) {
  for (int64_t j = threadIdx.x; j < k; j += kBlock) CONCEPT_EXT_DEVICE_CHECK_INDEX(idx[j], m, "indices");
  __syncthreads();
}

// Is entry j of this row the representative of its (row, concept) pair?
template <typename T, typename I>
__device__ __forceinline__ bool is_rep(const T* v, const I* idx, const int32_t* pos, int64_t j) {
  using A = acc_t<T>;
  if (pos[idx[j]] < 0 || !(static_cast<A>(v[j]) > A(0))) return false;
  for (int64_t q = 0; q < j; ++q)
    if (idx[q] == idx[j] && static_cast<A>(v[q]) > A(0)) return false;
  return true;
}

template <typename T, typename I>
__global__ void count_kernel(const T* __restrict__ values, const I* __restrict__ indices,
                             const int32_t* __restrict__ pos, int32_t* __restrict__ counts, int64_t k,
                             int64_t m) {
  __shared__ int red[kWarps];
  const T* v = values + static_cast<int64_t>(blockIdx.x) * k;
  const I* idx = indices + static_cast<int64_t>(blockIdx.x) * k;
  check_row(idx, k, m);
  int n = 0;
  for (int64_t j = threadIdx.x; j < k; j += kBlock) n += is_rep(v, idx, pos, j) ? 1 : 0;
  n = block_sum(n, red);
  if (threadIdx.x == 0) counts[blockIdx.x] = n;
}

// One block per row. Compact form (offsets != nullptr): each pair goes to slot offsets[row] + its rank
// among the row's pairs in keep order. Padded form (offsets == nullptr): entry j owns slot row * k + j,
// marked -1 with a zero coefficient when it is not its pair's representative.
template <typename T, typename I>
__global__ void fill_kernel(const T* __restrict__ values, const I* __restrict__ indices,
                            const int32_t* __restrict__ pos, const int64_t* __restrict__ offsets,
                            int64_t* __restrict__ pair_row, int64_t* __restrict__ pair_concept,
                            acc_t<T>* __restrict__ coef, int64_t k, int64_t m) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* v = values + row * k;
  const I* idx = indices + row * k;
  check_row(idx, k, m);
  for (int64_t j = threadIdx.x; j < k; j += kBlock) {
    if (!is_rep(v, idx, pos, j)) {
      if (offsets == nullptr) {
        pair_row[row * k + j] = -1;
        pair_concept[row * k + j] = -1;
        coef[row * k + j] = A(0);
      }
      continue;
    }
    const int32_t pj = pos[idx[j]];
    int64_t rank = 0;
    A s = 0;
    for (int64_t q = 0; q < k; ++q) {
      if (idx[q] == idx[j]) s += static_cast<A>(v[q]);
      else if (offsets != nullptr && pos[idx[q]] >= 0 && pos[idx[q]] < pj && is_rep(v, idx, pos, q)) ++rank;
    }
    const int64_t slot = offsets != nullptr ? offsets[row] + rank : row * k + j;
    pair_row[slot] = row;
    pair_concept[slot] = pj;
    coef[slot] = s;
  }
}

// Output row r: rows [0, N) are base rows, rows [N, N + P) are the pairs' ablated rows. A pair row
// whose pair_row is -1 (an empty padded slot) is written as zeros.
template <typename T>
__global__ void finish_kernel(const acc_t<T>* __restrict__ base, const T* __restrict__ W,
                              const int64_t* __restrict__ keep, const int64_t* __restrict__ pair_row,
                              const int64_t* __restrict__ pair_concept, const acc_t<T>* __restrict__ coef,
                              const T* __restrict__ target_norm, int64_t n, int64_t d, T* __restrict__ base_out,
                              T* __restrict__ ablated) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  const int64_t r = blockIdx.x;
  const bool is_pair = r >= n;
  const int64_t row = is_pair ? pair_row[r - n] : r;
  if (row < 0) {  // block-uniform: the whole block returns before any block_sum
    for (int64_t c = threadIdx.x; c < d; c += kBlock) ablated[(r - n) * d + c] = static_cast<T>(A(0));
    return;
  }
  const A cf = is_pair ? coef[r - n] : A(0);
  const T* w = is_pair ? W + keep[pair_concept[r - n]] * d : W;
  const A* src = base + row * d;
  T* dst = is_pair ? ablated + (r - n) * d : base_out + row * d;
  A scale = 1;
  if (target_norm != nullptr) {
    A sq = 0;
    for (int64_t c = threadIdx.x; c < d; c += kBlock) {
      const A x = src[c] - (is_pair ? cf * static_cast<A>(w[c]) : A(0));
      sq += x * x;
    }
    sq = block_sum(sq, red);
    scale = static_cast<A>(target_norm[row]) / (sqrt(sq) + static_cast<A>(kRescaleEps));
  }
  for (int64_t c = threadIdx.x; c < d; c += kBlock) {
    const A x = src[c] - (is_pair ? cf * static_cast<A>(w[c]) : A(0));
    dst[c] = static_cast<T>(x * scale);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_impl(Tensor values, Tensor indices, Tensor W_dec,
                                                              Tensor b_dec, Tensor keep,
                                                              std::optional<Tensor> target_norm, bool padded) {
  check_dim(values, 2, "values");
  check_dim(indices, 2, "indices");
  check_dim(W_dec, 2, "W_dec");
  check_dim(b_dec, 1, "b_dec");
  check_dim(keep, 1, "keep");
  check_floating(values, "values");
  check_index(indices, "indices");
  check_index(keep, "keep");
  check_same_dtype(values, W_dec, "values", "W_dec");
  check_same_dtype(b_dec, W_dec, "b_dec", "W_dec");
  check_size(indices, 0, values.size(0), "indices");
  check_size(indices, 1, values.size(1), "indices");
  check_size(b_dec, 0, W_dec.size(1), "b_dec");
  check_cuda(values, "values");
  for (const Tensor* t : {&indices, &W_dec, &b_dec, &keep}) check_same_device(values, *t, "values", "every input");
  if (target_norm.has_value()) {
    check_dim(*target_norm, 1, "target_norm");
    check_size(*target_norm, 0, values.size(0), "target_norm");
    check_same_dtype(*target_norm, W_dec, "target_norm", "W_dec");
    check_same_device(values, *target_norm, "values", "target_norm");
  }
  torch::stable::accelerator::DeviceGuard guard(values.get_device_index());
  const int64_t n = values.size(0), k = values.size(1), m = W_dec.size(0), d = W_dec.size(1);
  const int64_t f = keep.size(0);
  const ScalarType acc = acc_scalar_type(W_dec.scalar_type());
  const auto i64 = std::optional<ScalarType>(ScalarType::Long);
  Tensor v = contig(values), idx = contig(indices), w = contig(W_dec), b = contig(b_dec);
  Tensor kp = contig(to_dtype(keep, ScalarType::Long));
  Tensor tn = target_norm.has_value() ? contig(*target_norm) : Tensor();
  Tensor base_out = torch::stable::new_empty(w, {n, d});
  if (n == 0) {
    return {base_out, torch::stable::new_empty(w, {0, d}), torch::stable::new_empty(v, {0}, i64),
            torch::stable::new_empty(v, {0}, i64)};
  }
  cudaStream_t stream = current_stream(values);
  Tensor pos = torch::stable::new_empty(v, {m}, std::optional<ScalarType>(ScalarType::Int));
  torch::stable::fill_(pos, -1.0);
  if (f > 0) {
    keep_pos_kernel<<<static_cast<unsigned>(ceil_div(f, kBlock)), kBlock, 0, stream>>>(ptr<int64_t>(kp), f, m,
                                                                                       ptr<int32_t>(pos));
    CONCEPT_EXT_CHECK_LAUNCH("ablate_decode (keep)");
  }
  Tensor base = torch::stable::new_empty(w, {n, d}, std::optional<ScalarType>(acc));
  CONCEPT_EXT_DISPATCH_FLOATING(w.scalar_type(), "ablate_decode", [&] {
    CONCEPT_EXT_DISPATCH_INDEX(idx.scalar_type(), "ablate_decode", [&] {
      if (d > 0) {
        dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(ceil_div(d, kBlock)));
        base_kernel<scalar_t, index_t><<<grid, kBlock, 0, stream>>>(
            ptr<scalar_t>(v), ptr<index_t>(idx), ptr<int32_t>(pos), ptr<scalar_t>(w), ptr<scalar_t>(b),
            ptr<acc_t<scalar_t>>(base), k, d, m);
      }
    });
  });
  CONCEPT_EXT_CHECK_LAUNCH("ablate_decode (base)");
  // Padded form: static sizes, one slot per entry, no count, no scan, no host synchronisation.
  int64_t p = n * k;
  Tensor offsets;
  if (!padded) {
    Tensor counts = torch::stable::new_empty(v, {n}, std::optional<ScalarType>(ScalarType::Int));
    offsets = torch::stable::new_empty(v, {n + 1}, i64);
    CONCEPT_EXT_DISPATCH_FLOATING(w.scalar_type(), "ablate_decode", [&] {
      CONCEPT_EXT_DISPATCH_INDEX(idx.scalar_type(), "ablate_decode", [&] {
        count_kernel<scalar_t, index_t><<<static_cast<unsigned>(n), kBlock, 0, stream>>>(
            ptr<scalar_t>(v), ptr<index_t>(idx), ptr<int32_t>(pos), ptr<int32_t>(counts), k, m);
      });
    });
    exclusive_scan_kernel<int32_t><<<1, kBlock, 0, stream>>>(ptr<int32_t>(counts), ptr<int64_t>(offsets), n);
    CONCEPT_EXT_CHECK_LAUNCH("ablate_decode (count)");
    // The compact form's one host synchronisation: P sizes the outputs.
    cudaError_t err =
        cudaMemcpyAsync(&p, ptr<int64_t>(offsets) + n, sizeof(int64_t), cudaMemcpyDeviceToHost, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    STD_TORCH_CHECK(err == cudaSuccess, "ablate_decode: reading the pair count failed: ", cudaGetErrorString(err));
  }
  Tensor ablated = torch::stable::new_empty(w, {p, d});
  Tensor pair_row = torch::stable::new_empty(v, {p}, i64);
  Tensor pair_concept = torch::stable::new_empty(v, {p}, i64);
  Tensor coef = torch::stable::new_empty(w, {p}, std::optional<ScalarType>(acc));
  CONCEPT_EXT_DISPATCH_FLOATING(w.scalar_type(), "ablate_decode", [&] {
    using A = acc_t<scalar_t>;
    if (p > 0) {
      CONCEPT_EXT_DISPATCH_INDEX(idx.scalar_type(), "ablate_decode", [&] {
        fill_kernel<scalar_t, index_t><<<static_cast<unsigned>(n), kBlock, 0, stream>>>(
            ptr<scalar_t>(v), ptr<index_t>(idx), ptr<int32_t>(pos), padded ? nullptr : ptr<int64_t>(offsets),
            ptr<int64_t>(pair_row), ptr<int64_t>(pair_concept), ptr<A>(coef), k, m);
      });
    }
    if (d > 0) {
      finish_kernel<scalar_t><<<static_cast<unsigned>(n + p), kBlock, 0, stream>>>(
          ptr<A>(base), ptr<scalar_t>(w), ptr<int64_t>(kp), ptr<int64_t>(pair_row), ptr<int64_t>(pair_concept),
          ptr<A>(coef), target_norm.has_value() ? ptr<scalar_t>(tn) : nullptr, n, d, ptr<scalar_t>(base_out),
          ptr<scalar_t>(ablated));
    }
  });
  CONCEPT_EXT_CHECK_LAUNCH("ablate_decode (fill)");
  return {base_out, ablated, pair_row, pair_concept};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_cuda(Tensor values, Tensor indices, Tensor W_dec,
                                                              Tensor b_dec, Tensor keep,
                                                              std::optional<Tensor> target_norm) {
  return ablate_decode_impl(values, indices, W_dec, b_dec, keep, target_norm, /*padded=*/false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_padded_cuda(Tensor values, Tensor indices,
                                                                     Tensor W_dec, Tensor b_dec, Tensor keep,
                                                                     std::optional<Tensor> target_norm) {
  return ablate_decode_impl(values, indices, W_dec, b_dec, keep, target_norm, /*padded=*/true);
}

}  // namespace concept_ext
