// Small helpers shared by the sparse-code CPU kernels (sparse_decode.cpp, activation_rate.cpp,
// ablate_decode.cpp): scalar load/store with fp32 accumulation, a cheap parallel index-range check,
// a stable counting sort of the N*k (row, position) pairs by latent, and a work-balanced split of a
// bucketed latent range across threads.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "concept_ext/checks.h"
#include "concept_ext/dispatch.h"

namespace concept_ext::cpu {

// Load one element in its accumulation type. bfloat16 is widened by a shift on its raw bits so the
// compiler can vectorise the loops (the c10 conversion goes through memcpy and does too, but this is
// explicit and branch free).
template <typename T>
inline acc_t<T> ld(const T& x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return static_cast<acc_t<T>>(x);
  }
}

// Store with round-to-nearest-even (the c10 constructors do that for the 16-bit types).
template <typename T>
inline T st(acc_t<T> v) {
  return static_cast<T>(v);
}

// Ask the kernel to back a freshly allocated, not yet touched output with transparent huge pages.
// Why: a large torch.empty is a fresh mmap, and faulting it in 4 KiB pages dominated the kernels on the
// development VM (a 32 MiB grad_W: ~85 ms of page faults vs ~25 ms with huge pages, measured). With THP
// in "madvise" mode (a common default) nothing happens without this hint; in "always" or "never" mode,
// or for memory that is already mapped, it is a harmless no-op. Only outputs of >= 4 MiB are advised.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kPage = 4096, kMin = size_t(4) << 20;
  if (ptr == nullptr || bytes < kMin) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr) & ~(uintptr_t(kPage) - 1);
  const uintptr_t stop = reinterpret_cast<uintptr_t>(ptr) + bytes;
  (void)madvise(reinterpret_cast<void*>(start), stop - start, MADV_HUGEPAGE);  // advisory: errors ignored
#else
  (void)ptr;
  (void)bytes;
#endif
}

// Same, for a whole freshly created tensor.
inline void advise_huge_pages(const torch::stable::Tensor& t, size_t element_size) {
  advise_huge_pages(t.mutable_data_ptr(), static_cast<size_t>(t.numel()) * element_size);
}

// True when every index lies in [0, m). Serial on purpose: a branch-free min/max pass over N*k indices
// costs ~0.1 ms at N*k = 1.3e5, less than waking the thread pool, and on an oversubscribed machine
// every extra parallel region risks waiting a whole time slice for a descheduled worker (measured:
// 0.2 ms kernels turning into 40-80 ms ones at 2 threads under load). No exception is thrown here,
// the caller raises with the argument's name.
template <typename I>
inline bool indices_in_range(const I* idx, int64_t count, int64_t m) {
  int64_t lo = 0, hi = 0;
  for (int64_t p = 0; p < count; ++p) {
    const int64_t v = static_cast<int64_t>(idx[p]);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  return lo >= 0 && (count == 0 || hi < m);
}

// Pairs grouped by latent: the flat positions (i*k + j) of latent l are items[offsets[l] .. offsets[l+1]),
// in increasing position order (stable), so every consumer is deterministic.
struct Buckets {
  std::vector<int64_t> offsets;  // [m + 1]
  std::vector<int64_t> items;    // [number of kept pairs]
};

// Counting sort of the `count` flat positions by latent id, keeping those for which keep(p) is true.
// O(count + m) work; serial, because at N*k ~ 1e5 it costs well under a millisecond.
template <typename I, typename Keep>
inline Buckets bucket_by_latent(const I* idx, int64_t count, int64_t m, Keep keep) {
  Buckets b;
  b.offsets.assign(static_cast<size_t>(m) + 1, 0);
  int64_t* off = b.offsets.data();
  for (int64_t p = 0; p < count; ++p) {
    if (keep(p)) ++off[static_cast<int64_t>(idx[p]) + 1];
  }
  for (int64_t l = 0; l < m; ++l) off[l + 1] += off[l];
  b.items.resize(static_cast<size_t>(off[m]));
  std::vector<int64_t> cursor(b.offsets.begin(), b.offsets.end() - 1);
  for (int64_t p = 0; p < count; ++p) {
    if (keep(p)) b.items[cursor[static_cast<int64_t>(idx[p])]++] = p;
  }
  return b;
}

// Split latents [0, m) into about 4 chunks per thread of similar cost, where a latent costs
// (its number of pairs) + row_cost (writing its output row). Returns chunk boundaries [0 .. m].
inline std::vector<int64_t> balanced_latent_chunks(const std::vector<int64_t>& offsets, int64_t m,
                                                   double row_cost) {
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(m, 1), threads * 4);
  const double total = static_cast<double>(offsets[m]) + row_cost * static_cast<double>(m);
  std::vector<int64_t> bounds{0};
  int64_t l = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const double target = total * static_cast<double>(c) / static_cast<double>(chunks);
    while (l < m && static_cast<double>(offsets[l]) + row_cost * static_cast<double>(l) < target) ++l;
    if (l > bounds.back()) bounds.push_back(l);
  }
  if (bounds.back() != m) bounds.push_back(m);
  return bounds;
}

// The checks shared by every op that reads a sparse code against a decoder: CPU tensors, values [N, k]
// floating with the dtype of W_dec [m, d], indices [N, k] int32/int64 (sparse_decode, ablate_decode).
inline void check_code(const torch::stable::Tensor& values, const torch::stable::Tensor& indices,
                       const torch::stable::Tensor& W_dec) {
  check_cpu(values, "values");
  check_cpu(indices, "indices");
  check_cpu(W_dec, "W_dec");
  check_dim(values, 2, "values");
  check_dim(indices, 2, "indices");
  check_dim(W_dec, 2, "W_dec");
  check_floating(values, "values");
  check_index(indices, "indices");
  check_floating(W_dec, "W_dec");
  check_same_dtype(values, W_dec, "values", "W_dec");
  check_size(indices, 0, values.size(0), "indices");
  check_size(indices, 1, values.size(1), "indices");
}

}  // namespace concept_ext::cpu
