// Running top-k of many rows, fed one slice of columns at a time (used by csrc/cpu/topk_encode.cpp).
//
// Each row keeps a buffer of up to `cap` ~ 2k (value, column) candidates and a threshold `th`, the
// k-th largest value seen so far once the buffer has been compacted at least once (-inf before). A
// slice is scanned with AVX2 compares (16 floats / 8 doubles per branch); only values >= th are
// appended, so after the first slices almost nothing passes and the scan is about one compare per
// entry. When the buffer is full, nth_element keeps the k best and th becomes the k-th of them.
// Values equal to th are appended as well, so columns whose value is -inf or ties at th are never
// lost. A NaN never passes the compare; it is reported (push returns false) so the caller can raise.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace concept_ext {

template <typename T>
struct Cand {
  T v;        // pre-activation
  int32_t i;  // column (latent id)
};

// Strict total order: larger value first, then smaller column (makes every result deterministic).
template <typename T>
inline bool cand_before(const Cand<T>& a, const Cand<T>& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

template <typename T>
class TopKRows {
 public:
  TopKRows(int64_t rows, int64_t k)
      : k_(k), cap_(std::max<int64_t>(2 * k, k + 16)), buf_(static_cast<size_t>(rows * cap_)),
        n_(static_cast<size_t>(rows)), th_(static_cast<size_t>(rows)) {}

  // Forget the first `rows` rows' candidates.
  void reset(int64_t rows) {
    std::fill(n_.begin(), n_.begin() + rows, 0);
    std::fill(th_.begin(), th_.begin() + rows, -std::numeric_limits<T>::infinity());
  }

  // Merge pre[j] + bias[j] (column col0 + j), j < len, into row r. Returns false if a NaN was seen.
  bool push(int64_t r, const T* pre, const T* bias, int64_t len, int32_t col0) {
    Cand<T>* buf = buf_.data() + r * cap_;
    int64_t n = n_[r];
    T th = th_[r];
    bool ok = true;
    // Appends one value that passed the vector compare (th may have risen since).
    auto offer = [&](T v, int64_t j) {
      if (v >= th) {
        buf[n++] = Cand<T>{v, static_cast<int32_t>(col0 + j)};
        if (n == cap_) {
          std::nth_element(buf, buf + k_ - 1, buf + n, cand_before<T>);
          n = k_;
          th = buf[k_ - 1].v;
        }
      } else if (v != v) {
        ok = false;
      }
    };
    int64_t j = 0;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, float>) {
      __m256 thv = _mm256_set1_ps(th);
      for (; j + 16 <= len; j += 16) {
        const __m256 a = _mm256_add_ps(_mm256_loadu_ps(pre + j), _mm256_loadu_ps(bias + j));
        const __m256 b = _mm256_add_ps(_mm256_loadu_ps(pre + j + 8), _mm256_loadu_ps(bias + j + 8));
        // >= th, or unordered (NaN): either needs a look.
        const __m256 ha = _mm256_or_ps(_mm256_cmp_ps(a, thv, _CMP_GE_OQ), _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        const __m256 hb = _mm256_or_ps(_mm256_cmp_ps(b, thv, _CMP_GE_OQ), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
        int mask = _mm256_movemask_ps(ha) | (_mm256_movemask_ps(hb) << 8);
        if (mask) {
          alignas(32) float tmp[16];
          _mm256_store_ps(tmp, a);
          _mm256_store_ps(tmp + 8, b);
          while (mask) {
            const int bit = __builtin_ctz(static_cast<unsigned>(mask));
            mask &= mask - 1;
            offer(tmp[bit], j + bit);
          }
          thv = _mm256_set1_ps(th);
        }
      }
    } else if constexpr (std::is_same_v<T, double>) {
      __m256d thv = _mm256_set1_pd(th);
      for (; j + 8 <= len; j += 8) {
        const __m256d a = _mm256_add_pd(_mm256_loadu_pd(pre + j), _mm256_loadu_pd(bias + j));
        const __m256d b = _mm256_add_pd(_mm256_loadu_pd(pre + j + 4), _mm256_loadu_pd(bias + j + 4));
        const __m256d ha = _mm256_or_pd(_mm256_cmp_pd(a, thv, _CMP_GE_OQ), _mm256_cmp_pd(a, a, _CMP_UNORD_Q));
        const __m256d hb = _mm256_or_pd(_mm256_cmp_pd(b, thv, _CMP_GE_OQ), _mm256_cmp_pd(b, b, _CMP_UNORD_Q));
        int mask = _mm256_movemask_pd(ha) | (_mm256_movemask_pd(hb) << 4);
        if (mask) {
          alignas(32) double tmp[8];
          _mm256_store_pd(tmp, a);
          _mm256_store_pd(tmp + 4, b);
          while (mask) {
            const int bit = __builtin_ctz(static_cast<unsigned>(mask));
            mask &= mask - 1;
            offer(tmp[bit], j + bit);
          }
          thv = _mm256_set1_pd(th);
        }
      }
    }
#endif
    for (; j < len; ++j) offer(pre[j] + bias[j], j);
    n_[r] = n;
    th_[r] = th;
    return ok;
  }

  // Write row r's top k, sorted descending and ReLU'd, to out_v[0:k] / out_i[0:k].
  void finish(int64_t r, T* out_v, int64_t* out_i) {
    Cand<T>* buf = buf_.data() + r * cap_;
    const int64_t n = n_[r];
    const int64_t kk = std::min(k_, n);  // n < k only after a NaN (the caller raises)
    if (n > kk) std::nth_element(buf, buf + kk - 1, buf + n, cand_before<T>);
    std::sort(buf, buf + kk, cand_before<T>);
    for (int64_t j = 0; j < kk; ++j) {
      out_v[j] = buf[j].v > T(0) ? buf[j].v : T(0);
      out_i[j] = buf[j].i;
    }
    for (int64_t j = kk; j < k_; ++j) {
      out_v[j] = T(0);
      out_i[j] = 0;
    }
  }

 private:
  int64_t k_, cap_;
  std::vector<Cand<T>> buf_;  // [rows, cap]
  std::vector<int64_t> n_;    // [rows] candidates held
  std::vector<T> th_;         // [rows] current threshold
};

}  // namespace concept_ext
