// CPU kernel of ablate_decode (method.md sections 3.1 and 6.3; exact semantics: concept_ext/reference.py).
//
// For each row i: base x_F[i] = sum over the entries whose latent is in keep of values * W_dec[latent]
// + b_dec. A pair is (row i, position c in keep) where latent keep[c] has an entry with value > 0 in
// row i; its output is x_F[i] - coef * W_dec[keep[c]], coef = the sum of all entries of that latent in
// the row (a rank-1 correction, O(d) per pair). Pairs are ordered by row, then by c.
//
// The number of pairs P depends on the data, so a first parallel pass counts the pairs of each row, a
// prefix sum gives every row its output offset, and a second parallel pass fills base and the pairs.
// With target_norm, every output row r of row i becomes r * target_norm[i] / (||r|| + 1e-9) (the v2
// evaluation rescale, method.md section 3.1); the ablated rows are formed from the unscaled base.
//
// ablate_decode_padded gives every code entry its own output slot (slot i*k + j = entry j of row i):
// no counting pass, shapes fixed by N, k, d. A slot holds a pair when its entry is the pair's
// representative (kept latent, value > 0, no earlier active entry of the same latent in the row);
// other slots get row/concept -1 and a zero row.
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "concept_ext/checks.h"
#include "concept_ext/dispatch.h"
#include "concept_ext/kernels.h"
#include "sparse_util.h"

namespace concept_ext {
namespace {

using cpu::ld;
using cpu::st;

// Added to the norm before rescaling (reference.RESCALE_EPS, method.md section 3.1).
constexpr double kRescaleEps = 1e-9;

// Sorted distinct keep positions of the active kept latents of one row, written to `act`.
template <typename T, typename I>
int64_t active_positions(const T* v, const I* ix, int64_t k, const int64_t* pos_in_keep, int64_t* act) {
  using A = acc_t<T>;
  int64_t c = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t p = pos_in_keep[static_cast<int64_t>(ix[j])];
    if (p >= 0 && ld(v[j]) > A(0)) act[c++] = p;
  }
  std::sort(act, act + c);
  return std::unique(act, act + c) - act;
}

// out[t] = src[t] * scale, in the output dtype; scale = t_i / (||src|| + eps) when rescaling, else 1.
template <typename T>
void write_row(const acc_t<T>* src, T* out, int64_t d, const double* target, int64_t i) {
  using A = acc_t<T>;
  A scale = A(1);
  if (target != nullptr) {
    A sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t t = 0; t < d; ++t) sq += src[t] * src[t];
    scale = static_cast<A>(target[i]) / (std::sqrt(sq) + static_cast<A>(kRescaleEps));
  }
#pragma omp simd
  for (int64_t t = 0; t < d; ++t) out[t] = st<T>(src[t] * scale);
}

// Is entry j of this row the representative of its (row, concept) pair? (The CUDA kernel's is_rep.)
template <typename T, typename I>
bool is_rep(const T* v, const I* ix, const int64_t* pos_in_keep, int64_t j) {
  using A = acc_t<T>;
  if (pos_in_keep[static_cast<int64_t>(ix[j])] < 0 || !(ld(v[j]) > A(0))) return false;
  for (int64_t q = 0; q < j; ++q)
    if (ix[q] == ix[j] && ld(v[q]) > A(0)) return false;
  return true;
}

template <typename T, typename I>
void ablate(const T* values, const I* indices, const T* W, const T* b, const int64_t* keep,
            const int64_t* pos_in_keep, const double* target, int64_t n, int64_t k, int64_t d,
            const int64_t* row_off, T* base, T* ablated, int64_t* pair_row, int64_t* pair_concept) {
  // row_off [N + 1]: output offset of each row's pairs (compact form); nullptr: padded form.
  using A = acc_t<T>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * d));
  torch::stable::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> acc_buf(static_cast<size_t>(d)), tmp_buf(static_cast<size_t>(d));
    std::vector<int64_t> act(static_cast<size_t>(k));
    A* acc = acc_buf.data();
    A* tmp = tmp_buf.data();
    for (int64_t i = r0; i < r1; ++i) {
      const T* v = values + i * k;
      const I* ix = indices + i * k;
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) acc[t] = ld(b[t]);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t l = static_cast<int64_t>(ix[j]);
        if (pos_in_keep[l] < 0) continue;
        const A vj = ld(v[j]);
        const T* w = W + l * d;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) acc[t] += vj * ld(w[t]);
      }
      write_row<T>(acc, base + i * d, d, target, i);
      // One pair: latent keep[c] into output slot `out`.
      auto emit = [&](int64_t c, int64_t out) {
        const int64_t lat = keep[c];
        A coef = 0;  // every entry of that latent in the row, active or not (reference: scatter_add)
        for (int64_t j = 0; j < k; ++j) coef += static_cast<int64_t>(ix[j]) == lat ? ld(v[j]) : A(0);
        const T* w = W + lat * d;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) tmp[t] = acc[t] - coef * ld(w[t]);
        write_row<T>(tmp, ablated + out * d, d, target, i);
        pair_row[out] = i;
        pair_concept[out] = c;
      };
      if (row_off != nullptr) {
        const int64_t n_act = active_positions(v, ix, k, pos_in_keep, act.data());
        for (int64_t r = 0; r < n_act; ++r) emit(act[r], row_off[i] + r);
        continue;
      }
      for (int64_t j = 0; j < k; ++j) {
        const int64_t out = i * k + j;
        if (is_rep(v, ix, pos_in_keep, j)) {
          emit(pos_in_keep[static_cast<int64_t>(ix[j])], out);
        } else {
          std::fill(ablated + out * d, ablated + (out + 1) * d, st<T>(A(0)));
          pair_row[out] = -1;
          pair_concept[out] = -1;
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_impl(Tensor values, Tensor indices, Tensor W_dec,
                                                              Tensor b_dec, Tensor keep,
                                                              std::optional<Tensor> target_norm, bool padded) {
  cpu::check_code(values, indices, W_dec);
  check_cpu(b_dec, "b_dec");
  check_cpu(keep, "keep");
  check_dim(b_dec, 1, "b_dec");
  check_dim(keep, 1, "keep");
  check_index(keep, "keep");
  check_same_dtype(b_dec, W_dec, "b_dec", "W_dec");
  const int64_t n = values.size(0), k = values.size(1), m = W_dec.size(0), d = W_dec.size(1);
  check_size(b_dec, 0, d, "b_dec");
  std::optional<Tensor> target;
  if (target_norm.has_value()) {
    check_cpu(*target_norm, "target_norm");
    check_dim(*target_norm, 1, "target_norm");
    check_floating(*target_norm, "target_norm");
    check_size(*target_norm, 0, n, "target_norm");
    target = torch::stable::contiguous(torch::stable::to(*target_norm, ScalarType::Double));
  }
  values = torch::stable::contiguous(values);
  indices = torch::stable::contiguous(indices);
  W_dec = torch::stable::contiguous(W_dec);
  b_dec = torch::stable::contiguous(b_dec);
  keep = torch::stable::contiguous(torch::stable::to(keep, ScalarType::Long));

  // Latent -> position in keep (-1 when not kept); also validates keep.
  const int64_t n_keep = keep.numel();
  const int64_t* kp = keep.const_data_ptr<int64_t>();
  std::vector<int64_t> pos_in_keep(static_cast<size_t>(m), -1);
  for (int64_t c = 0; c < n_keep; ++c) {
    STD_TORCH_CHECK(kp[c] >= 0 && kp[c] < m, "keep must lie in [0, ", m, "), got ", kp[c]);
    STD_TORCH_CHECK(pos_in_keep[kp[c]] < 0, "keep must hold distinct latent ids (", kp[c], " repeats)");
    pos_in_keep[kp[c]] = c;
  }

  Tensor base = torch::stable::new_empty(W_dec, {n, d});
  Tensor ablated, pair_row, pair_concept;
  CONCEPT_EXT_DISPATCH_INDEX(indices.scalar_type(), "ablate_decode", [&] {
    const index_t* ix = indices.const_data_ptr<index_t>();
    STD_TORCH_CHECK(cpu::indices_in_range(ix, n * k, m), "indices must lie in [0, ", m,
                    ") (W_dec has m = ", m, " rows)");
    CONCEPT_EXT_DISPATCH_FLOATING(W_dec.scalar_type(), "ablate_decode", [&] {
      const scalar_t* v = values.const_data_ptr<scalar_t>();
      // Pass 1 (compact form): pairs per row, then exclusive prefix sums -> output offset of each row.
      // Serial: O(N*k) and cheaper than a parallel region on a busy machine (sparse_util.h,
      // indices_in_range). The padded form has N*k slots and needs no count.
      std::vector<int64_t> row_off;
      int64_t pairs = n * k;
      if (!padded) {
        row_off.assign(static_cast<size_t>(n) + 1, 0);
        std::vector<int64_t> act(static_cast<size_t>(k));
        for (int64_t i = 0; i < n; ++i)
          row_off[i + 1] = active_positions(v + i * k, ix + i * k, k, pos_in_keep.data(), act.data());
        for (int64_t i = 0; i < n; ++i) row_off[i + 1] += row_off[i];
        pairs = row_off[n];
      }
      ablated = torch::stable::new_empty(W_dec, {pairs, d});
      pair_row = torch::stable::new_empty(W_dec, {pairs}, ScalarType::Long);
      pair_concept = torch::stable::new_empty(W_dec, {pairs}, ScalarType::Long);
      if (n == 0) return;
      cpu::advise_huge_pages(base, sizeof(scalar_t));
      cpu::advise_huge_pages(ablated, sizeof(scalar_t));
      // Pass 2: fill base and every pair, rows in parallel.
      ablate<scalar_t, index_t>(v, ix, W_dec.const_data_ptr<scalar_t>(), b_dec.const_data_ptr<scalar_t>(), kp,
                                pos_in_keep.data(), target ? target->const_data_ptr<double>() : nullptr, n,
                                k, d, padded ? nullptr : row_off.data(), base.mutable_data_ptr<scalar_t>(),
                                ablated.mutable_data_ptr<scalar_t>(), pair_row.mutable_data_ptr<int64_t>(),
                                pair_concept.mutable_data_ptr<int64_t>());
    });
  });
  return {base, ablated, pair_row, pair_concept};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_cpu(Tensor values, Tensor indices, Tensor W_dec,
                                                             Tensor b_dec, Tensor keep,
                                                             std::optional<Tensor> target_norm) {
  return ablate_decode_impl(values, indices, W_dec, b_dec, keep, target_norm, /*padded=*/false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_padded_cpu(Tensor values, Tensor indices, Tensor W_dec,
                                                                    Tensor b_dec, Tensor keep,
                                                                    std::optional<Tensor> target_norm) {
  return ablate_decode_impl(values, indices, W_dec, b_dec, keep, target_norm, /*padded=*/true);
}

}  // namespace concept_ext
