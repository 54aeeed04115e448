// CPU kernels of activation_rate_loss and its backward (method.md section 2.3; semantics and tie rule:
// concept_ext/reference.py, activation_rate_top_mask).
//
// L_ar = (1/N) * sum_l [ sum of latent l's positive activations - sum of its m_keep largest ones ],
// m_keep = floor(rate * N + 1e-9). A latent with at most m_keep positive entries contributes nothing (all
// of them are in its top set), so the work is O(N*k):
//   1. histogram of the positive entries per latent;
//   2. a counting sort (stable, row-major) of the positive entries of the "heavy" latents only, those
//      with more than m_keep of them;
//   3. per heavy latent, std::nth_element under the strict order (value desc, flat position asc), which
//      puts exactly the reference's top set (ties: earlier row-major entry wins) in front.
// The forward sums the rest per latent and adds the per-latent sums in latent order, so the result does
// not depend on the thread count. The backward is grad/N everywhere except on the top entries.
// Everything runs on the calling thread: the work is O(N*k) (~1 ms at N*k = 1.3e5), smaller than the
// cost of a parallel region on a busy 2-core machine (see sparse_util.h, indices_in_range).
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "concept_ext/checks.h"
#include "concept_ext/dispatch.h"
#include "concept_ext/kernels.h"
#include "sparse_util.h"

namespace concept_ext {
namespace {

using cpu::ld;

// floor(rate * N), with the reference's epsilon against 0.1 * 500 = 49.999... (method.md section 2.3).
int64_t m_keep_of(int64_t n, double rate) {
  const double r = std::floor(rate * static_cast<double>(n) + 1e-9);
  return r <= 0.0 ? 0 : static_cast<int64_t>(std::min(r, static_cast<double>(n)));
}

// Positive entries of the heavy latents, bucketed by latent, after the per-latent selection: for each
// heavy latent l the first m_keep items of [offsets[l], offsets[l+1]) are its top set.
struct Selection {
  std::vector<uint8_t> heavy;    // [m] 1 when latent l has more than m_keep positive entries
  std::vector<int64_t> offsets;  // [m + 1] bucket offsets (empty buckets for light latents)
  std::vector<int64_t> items;    // flat positions i*k + j
};

template <typename T, typename I>
Selection select_top(const T* values, const I* indices, int64_t count, int64_t m, int64_t m_keep) {
  using A = acc_t<T>;
  Selection s;
  std::vector<int64_t> hist(static_cast<size_t>(m), 0);
  for (int64_t p = 0; p < count; ++p) hist[static_cast<int64_t>(indices[p])] += ld(values[p]) > A(0);
  s.heavy.assign(static_cast<size_t>(m), 0);
  s.offsets.assign(static_cast<size_t>(m) + 1, 0);
  for (int64_t l = 0; l < m; ++l) {
    s.heavy[l] = hist[l] > m_keep;
    s.offsets[l + 1] = s.offsets[l] + (s.heavy[l] ? hist[l] : 0);
  }
  if (s.offsets[m] == 0) return s;
  s.items.resize(static_cast<size_t>(s.offsets[m]));
  std::vector<int64_t> cursor(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t l = static_cast<int64_t>(indices[p]);
    if (s.heavy[l] && ld(values[p]) > A(0)) s.items[cursor[l]++] = p;
  }
  if (m_keep == 0) return s;  // nothing to select: every positive entry is outside the (empty) top set
  // Strict total order: larger value first, then earlier row-major position.
  auto before = [&](int64_t a, int64_t b) {
    const A va = ld(values[a]), vb = ld(values[b]);
    return va > vb || (va == vb && a < b);
  };
  for (int64_t l = 0; l < m; ++l) {
    if (!s.heavy[l]) continue;
    int64_t* first = s.items.data() + s.offsets[l];
    int64_t* last = s.items.data() + s.offsets[l + 1];
    std::nth_element(first, first + (m_keep - 1), last, before);
  }
  return s;
}

void check_args(const Tensor& values, const Tensor& indices, int64_t n_latents, double rate) {
  check_cpu(values, "values");
  check_cpu(indices, "indices");
  check_dim(values, 2, "values");
  check_dim(indices, 2, "indices");
  check_floating(values, "values");
  check_index(indices, "indices");
  check_size(indices, 0, values.size(0), "indices");
  check_size(indices, 1, values.size(1), "indices");
  STD_TORCH_CHECK(n_latents >= 1, "n_latents must be >= 1, got ", n_latents);
  STD_TORCH_CHECK(std::isfinite(rate) && rate >= 0.0, "rate must be a finite number >= 0, got ", rate);
}

template <typename I>
void check_range(const Tensor& indices, int64_t m) {
  STD_TORCH_CHECK(cpu::indices_in_range(indices.const_data_ptr<I>(), indices.numel(), m),
                  "indices must lie in [0, n_latents = ", m, ")");
}

}  // namespace

Tensor activation_rate_loss_cpu(Tensor values, Tensor indices, int64_t n_latents, double rate) {
  check_args(values, indices, n_latents, rate);
  values = torch::stable::contiguous(values);
  indices = torch::stable::contiguous(indices);
  const int64_t n = values.size(0), count = values.numel();
  Tensor loss = torch::stable::new_empty(values, {});
  const int64_t m_keep = m_keep_of(n, rate);
  CONCEPT_EXT_DISPATCH_INDEX(indices.scalar_type(), "activation_rate_loss", [&] {
    check_range<index_t>(indices, n_latents);
    CONCEPT_EXT_DISPATCH_FLOATING(values.scalar_type(), "activation_rate_loss", [&] {
      using A = acc_t<scalar_t>;
      const scalar_t* v = values.const_data_ptr<scalar_t>();
      double total = 0.0;
      if (n > 0) {
        const Selection s = select_top(v, indices.const_data_ptr<index_t>(), count, n_latents, m_keep);
        // Entries past the m_keep-th place of each heavy bucket are outside the top set; summed in
        // latent order (fp64), so the result is deterministic.
        for (int64_t l = 0; l < n_latents; ++l) {
          if (!s.heavy[l]) continue;
          for (int64_t q = s.offsets[l] + m_keep; q < s.offsets[l + 1]; ++q) total += ld(v[s.items[q]]);
        }
        total /= static_cast<double>(n);
      }
      loss.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(static_cast<A>(total));
    });
  });
  return loss;
}

Tensor activation_rate_loss_backward_cpu(Tensor grad, Tensor values, Tensor indices, int64_t n_latents,
                                         double rate) {
  check_args(values, indices, n_latents, rate);
  check_cpu(grad, "grad");
  check_floating(grad, "grad");
  STD_TORCH_CHECK(grad.numel() == 1, "grad must hold one element (the loss is a scalar), got ", grad.numel());
  values = torch::stable::contiguous(values);
  indices = torch::stable::contiguous(indices);
  const int64_t n = values.size(0), count = values.numel();
  Tensor out = torch::stable::new_empty(values, {values.size(0), values.size(1)});
  if (n == 0 || count == 0) return out;
  const double g = torch::stable::to(grad, ScalarType::Double).const_data_ptr<double>()[0];
  const int64_t m_keep = m_keep_of(n, rate);
  CONCEPT_EXT_DISPATCH_INDEX(indices.scalar_type(), "activation_rate_loss_backward", [&] {
    check_range<index_t>(indices, n_latents);
    CONCEPT_EXT_DISPATCH_FLOATING(values.scalar_type(), "activation_rate_loss_backward", [&] {
      using A = acc_t<scalar_t>;
      const scalar_t* v = values.const_data_ptr<scalar_t>();
      const index_t* ix = indices.const_data_ptr<index_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const Selection s = select_top(v, ix, count, n_latents, m_keep);
      // Same rounding as the reference: grad in the accumulation type, divided by N, then cast.
      const scalar_t g_n = static_cast<scalar_t>(static_cast<A>(g) / static_cast<A>(n));
      const scalar_t zero = static_cast<scalar_t>(A(0));
      // Positive entries of light latents are all in their top set; the rest get grad/N for now.
      for (int64_t p = 0; p < count; ++p) {
        const bool top = ld(v[p]) > A(0) && !s.heavy[static_cast<int64_t>(ix[p])];
        o[p] = top ? zero : g_n;
      }
      // Heavy latents: their first m_keep items (after the selection) are the top set.
      for (int64_t l = 0; l < n_latents && m_keep > 0; ++l) {
        if (!s.heavy[l]) continue;
        for (int64_t q = s.offsets[l]; q < s.offsets[l] + m_keep; ++q) o[s.items[q]] = zero;
      }
    });
  });
  return out;
}

}  // namespace concept_ext
