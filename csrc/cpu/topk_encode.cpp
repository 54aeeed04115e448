// CPU kernels of concept_ext::topk_encode and concept_ext::topk_encode_backward. The semantics are
// those of concept_ext/reference.py (topk_encode, topk_encode_backward).
//
// Forward. pre = x @ W_enc + b_enc is never materialised as [N, m]. Rows are taken in blocks of RB
// and latents in tiles of CT; each [RB, CT] tile comes from the BLAS (aten::mm.out into a small reused
// buffer that stays in L2) and is merged at once into a running top-k per row (topk_select.h): a
// buffer of ~2k (value, latent) candidates and a threshold (the current k-th largest); an AVX2 compare
// rejects 16 pre-activations at a time and only values >= threshold are appended; a full buffer is
// compacted with nth_element. After the first tiles the selection costs about one compare per entry.
//
// Threading, two strategies (CONCEPT_EXT_TOPK_STRATEGY=rows|tiles forces one; auto picks):
//  * rows:  parallel_for over row super-blocks (handed out dynamically); each thread walks the latent
//           tiles of its super-block and runs single-threaded GEMMs of rb rows (nested in the parallel
//           region, the BLAS runs on one thread) followed by the selection.
//  * tiles: one GEMM per tile using all threads (BLAS-internal), then the selection.
// "rows" was faster at the benchmark sizes (fewer fork/joins, no shared tile; on the loaded 2-core dev
// box "tiles" with a parallel selection was 1.5-2.5x slower). Auto uses "rows" unless there are too few
// rows to give every thread >= 16; then the BLAS threads the GEMM and the selection (only n * m
// compares) runs serially. CONCEPT_EXT_TOPK_RB / _CT override the block sizes (tuning and tests only);
// they are read per call.
//
// Layouts and dtypes. W_enc is [d, m] row-major, or the transpose of a row-major [m, d] matrix
// (nn.Linear's layout, which TopKSAE keeps): the latter is read in place, a latent tile being one
// contiguous block of rows, and its gradient is returned in the same layout so that autograd stores it
// without a copy (the former copy of W_enc per call and of grad_W_enc per step cost ~80-150 ms at paper
// scale, torch.profiler). A bfloat16 W_enc with float32 x (the opt-in weight_dtype path) stays bf16 in
// memory and is widened to fp32 one [d, ct] tile at a time; the GEMM and the selection run in fp32.
//
// Backward. g = grad_values masked by values > 0. The selected pairs are bucketed by latent with a
// serial counting sort (order within a latent = row-major order of [N, k], so sums are deterministic);
// a parallel_for over chunks of latents then builds grad_b and grad_W_enc (each thread owns whole
// latents; with the [m, d] layout each latent's gradient row is accumulated in place, with the [d, m]
// layout in an [L, d] tile written out by 8x8 register transposes) and, for the [d, m] layout only,
// transposes the used columns of W_enc into a per-thread [m, d] scratch kept between calls; a second
// parallel_for over rows gathers grad_x from the W_enc^T rows. No dense [N, m] or [N*k, d] tensor.
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "concept_ext/checks.h"
#include "concept_ext/kernels.h"
#include "sparse_util.h"
#include "topk_select.h"

namespace concept_ext {
namespace {

namespace ts = torch::stable;
using torch::headeronly::ScalarType;

template <typename T>
ScalarType scalar_type_of() {
  return std::is_same_v<T, double> ? ScalarType::Double : ScalarType::Float;
}

// out = a @ b through the dispatcher (BLAS). `out` is a preallocated contiguous view of the right shape.
void mm_out(const Tensor& a, const Tensor& b, const Tensor& out) {
  std::array<StableIValue, 3> stack{ts::detail::from(a), ts::detail::from(b), ts::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  (void)ts::detail::to<Tensor>(stack[0]);
}

// A [rows, cols] view of raw CPU memory with the given row stride (no dispatcher call, no copy).
template <typename T>
Tensor view2d(const T* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride = 1) {
  return ts::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, col_stride},
                       ts::Device(torch::headeronly::DeviceType::CPU), scalar_type_of<T>());
}

// The [d, cols] slice of W_enc starting at latent c0: W_enc is [d, m] row-major, or (w_t) the transpose
// of a row-major [m, d] matrix, nn.Linear's layout, where the slice is one contiguous block of rows.
template <typename T>
Tensor w_tile(const T* w, bool w_t, int64_t d, int64_t m, int64_t c0, int64_t cols) {
  return w_t ? view2d(w + c0 * d, d, cols, 1, d) : view2d(w + c0, d, cols, m);
}

struct Tuning {
  int64_t rb = 256;   // rows per block
  int64_t ct = 512;   // latents per tile ([256, 512] fp32 = 512 KiB: fits a 1 MiB L2)
  int strategy = 0;   // 0 auto, 1 rows, 2 tiles
};

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return (s && *s) ? std::max<int64_t>(1, std::atoll(s)) : fallback;
}

Tuning tuning() {
  Tuning t;
  t.rb = env_int("CONCEPT_EXT_TOPK_RB", t.rb);
  t.ct = env_int("CONCEPT_EXT_TOPK_CT", t.ct);
  const char* s = std::getenv("CONCEPT_EXT_TOPK_STRATEGY");
  if (s && std::string(s) == "rows") t.strategy = 1;
  if (s && std::string(s) == "tiles") t.strategy = 2;
  return t;
}

// Forward for float/double on contiguous inputs. out_v/out_i: [n, k]. Sets `nan` when a NaN is seen.
template <typename T>
void encode(const T* x, const T* w, const uint16_t* w16, bool w_t, const T* b, int64_t n, int64_t d, int64_t m,
            int64_t k, T* out_v, int64_t* out_i, std::atomic<bool>& nan) {
  const Tuning tune = tuning();
  const int64_t threads = std::max<int64_t>(1, ts::get_num_threads());
  const int64_t ct = std::min(tune.ct, m);
  // Rows per block: no larger than needed to give every thread a block.
  int64_t rb = std::min(tune.rb, (n + threads - 1) / threads);
  // Keep the candidate buffers (rb * ~2k pairs) modest when k is large.
  rb = std::max<int64_t>(1, std::min(rb, (int64_t{1} << 20) / (2 * k + 16)));
  const bool by_rows = tune.strategy == 1 || (tune.strategy == 0 && (threads == 1 || rb >= 16));
  // Few rows (auto): the BLAS threads the GEMM; the selection (n * m compares) stays serial.
  const bool select_in_parallel = tune.strategy == 2;

  // The W_enc tile as an fp32 [d, cols] view: in place, or (bfloat16 weights, w16) widened into `buf`
  // (d * ct floats, reused for every tile; the GEMM then reads it from cache sb / rb times).
  auto tile_view = [&](int64_t c0, int64_t cols, std::vector<T>& buf) -> Tensor {
    if (w16 == nullptr) return w_tile(w, w_t, d, m, c0, cols);
    if constexpr (std::is_same_v<T, float>) {
      if (buf.size() < static_cast<size_t>(d * cols)) buf.resize(static_cast<size_t>(d * ct));
      uint32_t* out = reinterpret_cast<uint32_t*>(buf.data());
      if (w_t) {  // rows c0 .. c0 + cols of the row-major [m, d] storage: one contiguous block
        const uint16_t* src = w16 + c0 * d;
        const int64_t total = cols * d;
#pragma omp simd
        for (int64_t t = 0; t < total; ++t) out[t] = static_cast<uint32_t>(src[t]) << 16;
        return view2d(buf.data(), d, cols, 1, d);
      }
      for (int64_t e = 0; e < d; ++e) {
        const uint16_t* src = w16 + e * m + c0;
        uint32_t* o = out + e * cols;
#pragma omp simd
        for (int64_t t = 0; t < cols; ++t) o[t] = static_cast<uint32_t>(src[t]) << 16;
      }
      return view2d(buf.data(), d, cols, cols);
    } else {
      STD_TORCH_CHECK(false, "topk_encode: bfloat16 weights need float32 inputs");
      return w_tile(w, w_t, d, m, c0, cols);
    }
  };

  // The one GEMM -> select loop: rows [r0, r0 + rows) of x against every latent tile, GEMM-ing `step` rows
  // at a time into `tile` ([step, ct]) and pushing each row's scores into `sel` (top-k candidates), then
  // writing the k winners of each row. parallel_select: the selection of a GEMM's rows is spread over the
  // threads (the few-rows path, where the BLAS threads the GEMM).
  auto encode_rows = [&](int64_t r0, int64_t rows, int64_t step, T* tile, std::vector<T>& wbuf, TopKRows<T>& sel,
                         bool parallel_select) {
    sel.reset(rows);
    for (int64_t c0 = 0; c0 < m; c0 += ct) {
      const int64_t cols = std::min(ct, m - c0);
      const Tensor wt = tile_view(c0, cols, wbuf);
      for (int64_t s0 = 0; s0 < rows; s0 += step) {
        const int64_t sr = std::min(step, rows - s0);
        mm_out(view2d(x + (r0 + s0) * d, sr, d, d), wt, view2d(tile, sr, cols, cols));
        auto select = [&](int64_t a, int64_t z) {
          for (int64_t r = a; r < z; ++r)
            if (!sel.push(s0 + r, tile + r * cols, b + c0, cols, static_cast<int32_t>(c0))) nan.store(true);
        };
        if (parallel_select) ts::parallel_for(0, sr, 8, select);
        else select(0, sr);
      }
    }
    auto finish = [&](int64_t a, int64_t z) {
      for (int64_t r = a; r < z; ++r) sel.finish(r, out_v + (r0 + r) * k, out_i + (r0 + r) * k);
    };
    if (parallel_select) ts::parallel_for(0, rows, 8, finish);
    else finish(0, rows);
  };

  if (by_rows) {
    // Each thread takes a super-block of rows (x slice of ~4 MiB, so it stays in L3 while re-read)
    // and walks the latent tiles outermost, GEMM-ing rb rows at a time: a W_enc tile is then read
    // from memory once per super-block, not once per rb rows (W_enc is often larger than L3).
    // Super-blocks are handed out dynamically (an atomic counter): on a shared machine a descheduled
    // thread delays only the super-block it holds.
    // bf16 weights: every super-block widens all of W_enc once, so take super-blocks twice as tall
    // (8 MiB of x) to halve that work (it was ~4% of the encode at paper scale, 2 threads).
    const int64_t x_bytes = (w16 ? int64_t{8} : int64_t{4}) << 20;
    const int64_t x_budget = std::max<int64_t>(rb, x_bytes / (d * int64_t(sizeof(T))) / rb * rb);
    const int64_t sb = std::max<int64_t>(
        1, std::min({(n + threads - 1) / threads, x_budget, (int64_t{1} << 21) / (2 * k + 16)}));
    const int64_t blocks = (n + sb - 1) / sb;
    std::atomic<int64_t> next{0};
    ts::parallel_for(0, std::min(threads, blocks), 1, [&](int64_t, int64_t) {
      std::vector<T> tile(static_cast<size_t>(rb * ct)), wbuf;
      TopKRows<T> sel(sb, k);
      for (int64_t blk = next++; blk < blocks; blk = next++)
        encode_rows(blk * sb, std::min(sb, n - blk * sb), rb, tile.data(), wbuf, sel, false);
    });
  } else {
    const int64_t rbt = std::max<int64_t>(1, std::min({n, tune.rb * threads, (int64_t{1} << 20) / (2 * k + 16)}));
    std::vector<T> tile(static_cast<size_t>(rbt * ct)), wbuf;
    TopKRows<T> sel(rbt, k);
    for (int64_t r0 = 0; r0 < n; r0 += rbt) {
      const int64_t rows = std::min(rbt, n - r0);
      encode_rows(r0, rows, rows, tile.data(), wbuf, sel, select_in_parallel);
    }
  }
}

// dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols, in 8x8 blocks (AVX2 register transposes
// for float). src_rows_inner: loop over row blocks inside each column block (complete output rows first)
// or the other way round (complete input rows first). col_used (optional, indexed by c): output rows of
// blocks whose columns are all unused may be skipped.
template <typename T>
void transpose(const T* src, int64_t ss, int64_t rows, int64_t cols, T* dst, int64_t ds, bool src_rows_inner,
               const bool* col_used) {
  constexpr int64_t B = 8;
  auto block = [&](int64_t r0, int64_t c0) {
    const int64_t nr = std::min(B, rows - r0), nc = std::min(B, cols - c0);
    if (col_used) {
      bool any = false;
      for (int64_t c = 0; c < nc; ++c) any = any || col_used[c0 + c];
      if (!any) return;
    }
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, float>) {
      if (nr == B && nc == B) {
        const float* s0 = src + r0 * ss + c0;
        __m256 a0 = _mm256_loadu_ps(s0), a1 = _mm256_loadu_ps(s0 + ss), a2 = _mm256_loadu_ps(s0 + 2 * ss),
               a3 = _mm256_loadu_ps(s0 + 3 * ss), a4 = _mm256_loadu_ps(s0 + 4 * ss),
               a5 = _mm256_loadu_ps(s0 + 5 * ss), a6 = _mm256_loadu_ps(s0 + 6 * ss),
               a7 = _mm256_loadu_ps(s0 + 7 * ss);
        const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
        const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
        const __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
        const __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
        float* d0 = dst + c0 * ds + r0;
        _mm256_storeu_ps(d0, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(d0 + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(d0 + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(d0 + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(d0 + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(d0 + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(d0 + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(d0 + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
        return;
      }
    }
#endif
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * ds + r0 + r] = src[(r0 + r) * ss + c0 + c];
  };
  if (src_rows_inner) {
    for (int64_t c0 = 0; c0 < cols; c0 += B)
      for (int64_t r0 = 0; r0 < rows; r0 += B) block(r0, c0);
  } else {
    for (int64_t r0 = 0; r0 < rows; r0 += B)
      for (int64_t c0 = 0; c0 < cols; c0 += B) block(r0, c0);
  }
}

// Backward for float/double on contiguous inputs (see the file comment).
template <typename T>
void encode_backward(const T* gv, const T* val, const int64_t* idx, const T* x, const T* w, bool w_t, int64_t n,
                     int64_t d, int64_t m, int64_t k, T* gx, T* gw, T* gb, T* wt) {
  const int64_t pairs = n * k;
  std::vector<T> g(static_cast<size_t>(pairs));
  std::vector<int64_t> start(static_cast<size_t>(m + 1), 0);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t j = idx[p];
    STD_TORCH_CHECK(j >= 0 && j < m, "topk_encode_backward: indices must lie in [0, ", m, "), got ", j);
    g[p] = val[p] > T(0) ? gv[p] : T(0);
    if (g[p] != T(0)) ++start[j + 1];
  }
  for (int64_t j = 0; j < m; ++j) start[j + 1] += start[j];
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  std::vector<int64_t> prow(static_cast<size_t>(start[m]));
  std::vector<T> pg(static_cast<size_t>(start[m]));
  for (int64_t p = 0; p < pairs; ++p) {
    if (g[p] == T(0)) continue;
    const int64_t q = cursor[idx[p]]++;
    prow[q] = p / k;
    pg[q] = g[p];
  }

  constexpr int64_t L = 32;  // latents per chunk: an [L, d] accumulator, one 128-byte run per output row
  // The accumulator's row stride is padded off a power of two: with a stride of d floats (d = 1024,
  // 2048) its rows share one L1 set and the column reads of the transpose missed L1 on every load.
  const int64_t dp = d + 64 / int64_t(sizeof(T));
  const int64_t chunks = (m + L - 1) / L;
  ts::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> acc(static_cast<size_t>(L * dp));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * L, len = std::min(L, m - j0);
      for (int64_t l = 0; l < len; ++l) {
        // w_t: grad_W_enc has W_enc's layout, so latent j0 + l's gradient is one contiguous row.
        T* a = w_t ? gw + (j0 + l) * d : acc.data() + l * dp;
        std::fill(a, a + d, T(0));
        T sb = T(0);
        for (int64_t q = start[j0 + l]; q < start[j0 + l + 1]; ++q) {
          const T s = pg[q];
          const T* xr = x + prow[q] * d;
          sb += s;
          for (int64_t e = 0; e < d; ++e) a[e] += s * xr[e];
        }
        gb[j0 + l] = sb;
      }
      if (w_t) continue;  // rows written in place; W_enc^T is W_enc's own memory
      // grad_W_enc[e, j0 + l] = acc[l, e]: 8x8 register transposes, e-blocks outermost so that every
      // output row gets its whole 128-byte run at once.
      transpose(acc.data(), dp, len, d, gw + j0, m, /*src_rows_inner=*/true, nullptr);
      // W_enc^T rows of the used latents (read by the grad_x gather below).
      bool used[L];
      for (int64_t l = 0; l < len; ++l) used[l] = start[j0 + l + 1] > start[j0 + l];
      transpose(w + j0, m, d, len, wt + j0 * d, d, /*src_rows_inner=*/false, used);
    }
  });

  ts::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* o = gx + i * d;
      std::fill(o, o + d, T(0));
      for (int64_t r = 0; r < k; ++r) {
        const T s = g[i * k + r];
        if (s == T(0)) continue;
        const T* wr = wt + idx[i * k + r] * d;
        for (int64_t e = 0; e < d; ++e) o[e] += s * wr[e];
      }
    }
  });
}

// A per-thread scratch buffer that only grows (huge-page advised, never shrunk while the thread lives).
// Its size is that of W_enc, so it costs one more copy of the weight while the thread lives.
void* scratch(size_t bytes) {
  struct Buf {
    void* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf buf;
  if (buf.n < bytes) {
    std::free(buf.p);
    buf.n = 0;
    buf.p = std::aligned_alloc(size_t(2) << 20, (bytes + (size_t(2) << 20) - 1) / (size_t(2) << 20) * (size_t(2) << 20));
    STD_TORCH_CHECK(buf.p != nullptr, "topk_encode_backward: out of memory for a ", bytes, "-byte scratch");
    buf.n = bytes;
    cpu::advise_huge_pages(buf.p, bytes);
  }
  return buf.p;
}

ScalarType acc_of(ScalarType s) { return s == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// Contiguous copy in the accumulation dtype (no copy when already so).
Tensor as_acc(const Tensor& t, ScalarType acc) { return ts::contiguous(ts::to(t, acc)); }

}  // namespace

std::tuple<Tensor, Tensor> topk_encode_cpu(Tensor x, Tensor W_enc, Tensor b_enc, int64_t k) {
  check_dim(x, 2, "x");
  check_dim(W_enc, 2, "W_enc");
  check_dim(b_enc, 1, "b_enc");
  check_cpu(x, "x");
  check_cpu(W_enc, "W_enc");
  check_cpu(b_enc, "b_enc");
  check_floating(x, "x");
  // bfloat16 weights with float32 inputs: the opt-in weight-only bf16 path (fp32 accumulation).
  const bool bf16_w = W_enc.scalar_type() == ScalarType::BFloat16 && x.scalar_type() == ScalarType::Float;
  if (!bf16_w) check_same_dtype(x, W_enc, "x", "W_enc");
  check_same_dtype(x, b_enc, "x", "b_enc");
  const int64_t n = x.size(0), d = x.size(1), m = W_enc.size(1);
  check_size(W_enc, 0, d, "W_enc");
  check_size(b_enc, 0, m, "b_enc");
  STD_TORCH_CHECK(k >= 1 && k <= m, "topk_encode: k must satisfy 1 <= k <= m = ", m, ", got ", k);
  STD_TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(), "topk_encode: m must fit in int32, got ", m);

  const ScalarType st = x.scalar_type(), acc = acc_of(st);
  Tensor values = ts::new_empty(x, {n, k}, acc);
  Tensor indices = ts::new_empty(x, {n, k}, ScalarType::Long);
  if (n > 0) {
    const bool w_t = is_transposed_contiguous(W_enc) && (W_enc.scalar_type() == acc || bf16_w);
    // bf16 weights stay bf16 (widened tile by tile inside the kernel): only a non-contiguous layout is copied.
    const Tensor wa = w_t ? W_enc : (bf16_w ? ts::contiguous(W_enc) : as_acc(W_enc, acc));
    const Tensor xa = as_acc(x, acc), ba = as_acc(b_enc, acc);
    const uint16_t* w16 = bf16_w ? static_cast<const uint16_t*>(wa.const_data_ptr()) : nullptr;
    std::atomic<bool> nan{false};
    auto* out_i = static_cast<int64_t*>(indices.mutable_data_ptr());
    if (acc == ScalarType::Double) {
      encode<double>(static_cast<const double*>(xa.const_data_ptr()), static_cast<const double*>(wa.const_data_ptr()), nullptr, w_t,
                     static_cast<const double*>(ba.const_data_ptr()), n, d, m, k,
                     static_cast<double*>(values.mutable_data_ptr()), out_i, nan);
    } else {
      encode<float>(static_cast<const float*>(xa.const_data_ptr()), bf16_w ? nullptr : static_cast<const float*>(wa.const_data_ptr()), w16, w_t,
                    static_cast<const float*>(ba.const_data_ptr()), n, d, m, k,
                    static_cast<float*>(values.mutable_data_ptr()), out_i, nan);
    }
    STD_TORCH_CHECK(!nan.load(),
                    "topk_encode: the pre-activations x @ W_enc + b_enc contain NaN (check x, W_enc and b_enc "
                    "for NaN or infinite values)");
  }
  if (st != acc) values = ts::to(values, st);
  return {values, indices};
}

// `deterministic` is accepted for the schema's sake: the CPU backward always is (fixed blocks, no atomics).
std::tuple<Tensor, Tensor, Tensor> topk_encode_backward_cpu(Tensor grad_values, Tensor values, Tensor indices,
                                                            Tensor x, Tensor W_enc, bool /*deterministic*/) {
  check_dim(grad_values, 2, "grad_values");
  check_dim(values, 2, "values");
  check_dim(indices, 2, "indices");
  check_dim(x, 2, "x");
  check_dim(W_enc, 2, "W_enc");
  for (const Tensor* t : {&grad_values, &values, &indices, &x, &W_enc}) check_cpu(*t, "every input");
  check_floating(grad_values, "grad_values");
  check_floating(values, "values");
  check_floating(x, "x");
  check_floating(W_enc, "W_enc");
  check_index(indices, "indices");
  const int64_t n = x.size(0), d = x.size(1), m = W_enc.size(1), k = values.size(1);
  check_size(W_enc, 0, d, "W_enc");
  check_size(values, 0, n, "values");
  check_size(indices, 0, n, "indices");
  check_size(indices, 1, k, "indices");
  check_size(grad_values, 0, n, "grad_values");
  check_size(grad_values, 1, k, "grad_values");

  const ScalarType acc = acc_of(x.scalar_type());  // as the reference: accumulate in x's acc dtype
  const bool w_t = is_transposed_contiguous(W_enc) && W_enc.scalar_type() == acc;
  const Tensor ga = as_acc(grad_values, acc), va = as_acc(values, acc), xa = as_acc(x, acc);
  const Tensor wa = w_t ? W_enc : as_acc(W_enc, acc);
  const Tensor ia = ts::contiguous(ts::to(indices, ScalarType::Long));
  Tensor gx = ts::new_empty(xa, {n, d});
  // grad_W_enc takes W_enc's layout (then autograd accumulates it into .grad without a copy).
  Tensor gw = w_t ? ts::transpose(ts::new_empty(xa, {m, d}), 0, 1) : ts::new_empty(xa, {d, m});
  Tensor gb = ts::new_empty(xa, {m});
  const size_t es = acc == ScalarType::Double ? sizeof(double) : sizeof(float);
  // Fresh outputs of several MiB: back them with huge pages (faulting a 32 MiB grad in 4 KiB pages cost
  // more than the whole scatter, see cpu::advise_huge_pages).
  cpu::advise_huge_pages(gw, es);
  cpu::advise_huge_pages(gx, es);
  // W_enc^T scratch ([m, d]; rows of used latents only are written and read), kept per calling thread
  // between calls so that its pages are faulted in once per training run, not once per step.
  void* wt = w_t ? const_cast<void*>(wa.const_data_ptr()) : scratch(static_cast<size_t>(m * d) * es);
  const auto* ip = static_cast<const int64_t*>(ia.const_data_ptr());
  if (acc == ScalarType::Double) {
    using T = double;
    encode_backward<T>(static_cast<const T*>(ga.const_data_ptr()), static_cast<const T*>(va.const_data_ptr()), ip,
                       static_cast<const T*>(xa.const_data_ptr()), static_cast<const T*>(wa.const_data_ptr()), w_t, n,
                       d, m, k, static_cast<T*>(gx.mutable_data_ptr()), static_cast<T*>(gw.mutable_data_ptr()),
                       static_cast<T*>(gb.mutable_data_ptr()), static_cast<T*>(wt));
  } else {
    using T = float;
    encode_backward<T>(static_cast<const T*>(ga.const_data_ptr()), static_cast<const T*>(va.const_data_ptr()), ip,
                       static_cast<const T*>(xa.const_data_ptr()), static_cast<const T*>(wa.const_data_ptr()), w_t, n,
                       d, m, k, static_cast<T*>(gx.mutable_data_ptr()), static_cast<T*>(gw.mutable_data_ptr()),
                       static_cast<T*>(gb.mutable_data_ptr()), static_cast<T*>(wt));
  }
  if (x.scalar_type() != acc) gx = ts::to(gx, x.scalar_type());
  if (W_enc.scalar_type() != acc) {
    gw = ts::to(gw, W_enc.scalar_type());
    gb = ts::to(gb, W_enc.scalar_type());
    // A 16-bit W_enc in the transposed layout went through a row-major fp32 copy: its gradient still
    // takes W_enc's layout (reference.weight_grad_like, the rule of every kernel and of the fake).
    if (is_transposed_contiguous(W_enc) && !w_t) gw = ts::transpose(ts::contiguous(ts::transpose(gw, 0, 1)), 0, 1);
  }
  return {gx, gw, gb};
}

}  // namespace concept_ext
