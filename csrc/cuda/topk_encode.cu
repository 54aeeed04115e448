// TopK encode (pre = x @ W_enc + b_enc, k largest per row, ReLU, sorted descending) and its backward
// (CUDA). Semantics: concept_ext/reference.py (topk_encode, topk_encode_backward).
//
// Forward, the *unfused* first version: rows are processed in chunks so that the scratch stays under
// kScratchBytes. Per chunk, the pre-activations are one cuBLAS GEMM with the accumulation dtype's output
// (fp32; fp64 for float64 inputs: the reference's precision) into an [R, m] scratch. For bfloat16/float16
// x and W_enc that GEMM is aten::mm.dtype: tensor cores, fp32 accumulation and output, and no widened
// copies of x and W_enc; where that overload is missing (PyTorch < 2.8) or fails, both are widened to fp32
// first, once per process after the first failure. Float32 inputs use an fp32 GEMM (TF32 only if the
// user allowed it globally); then one block per row selects the k largest of pre + b_enc (topk_select_kernel: a
// histogram pass and, usually, one compaction pass into shared memory; a radix select where one bucket
// is too crowded) and sorts them with a stable block-wide LSD radix sort, so the output order is
// (value desc, index asc) and deterministic. NaN sorts as the largest value, as in torch.topk; the Python
// wrapper rejects non-finite inputs outside graph capture. No host syncs.
// CONCEPT_EXT_TOPK_SELECT=radix (read per call) forces the general path, for A/B benchmarks and tests.
//
// Layout: W_enc is read in place whether it is [d, m] row-major or, as TopKSAE holds it, the transpose
// of a row-major [m, d] matrix; the GEMM takes either, and grad_W_enc comes back in W_enc's layout.
//
// Backward: one block per (row, column tile): grad_x by a gather of W_enc^T rows (W_enc^T is W_enc's own
// memory in the transposed layout, a transposed copy otherwise, so that the gather is coalesced);
// grad_W_enc^T and grad_b_enc by fp32/fp64 atomics over the N*k selected
// pairs (so the summation order, hence the last bits, is not deterministic), or, with `deterministic`
// (PyTorch's deterministic mode), by the sorted bucket reduction of buckets.cuh; no [N, m] tensor.
#include "buckets.cuh"
#include "common.cuh"
#include "concept_ext/kernels.h"

#include <array>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

namespace concept_ext {
namespace {

using namespace cuda;

// Bound on the per-chunk scratch (pre-activations + sort buffers) of the forward. The CPU emulation
// build (tools/cuda_emulate.py) lowers it so that its small test inputs run through several chunks.
#ifndef CONCEPT_EXT_TOPK_SCRATCH_BYTES
#define CONCEPT_EXT_TOPK_SCRATCH_BYTES (int64_t(256) << 20)
#endif
constexpr int64_t kScratchBytes = CONCEPT_EXT_TOPK_SCRATCH_BYTES;

// Selection, one block per row, over v[j] = pre[j] + b[j] (recomputed on each read: `pre` is never
// written back). Keys are the monotone unsigned images of the values (float_key).
//
// Pass 1 histograms the top kHistBits bits of every value's float32 key (2048 bins: sign, exponent and two
// mantissa bits, i.e. buckets a factor 2^(1/4) wide; a float64 value is rounded to float32 first, which
// is monotone, so the buckets stay ordered) and finds the bucket d1 that holds the k-th largest; the nsel
// values in buckets >= d1 are a superset of the top k. Fast path (nsel <= cand_cap): pass 2 compacts
// those nsel (key, id) pairs in index order into shared memory, a stable block radix sort orders them by
// (key desc, index asc), and the first k are the answer: two passes over the row, none of them a write.
// Otherwise (a bucket too crowded, or k > cand_cap) the general path: a 4-pass (8 for fp64) 8-bit radix
// select over the row, a compaction of the winners in index order (ties at the threshold go to the
// lowest ids) into global scratch, and the same stable sort. Both give (value desc, index asc).
constexpr int kHistBits = 11;
constexpr int kHistBins = 1 << kHistBits;
constexpr int kCandCap = 1024;  // shared-memory candidates of the fast path
static_assert(kHistBins == kWarps * 256, "the pass-1 histogram shares its memory with the sort's");

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock) topk_select_kernel(
    const A* __restrict__ pre,  // [rows, m], without the bias
    const T* __restrict__ b, int64_t rows, int64_t m, int64_t k, int64_t cand_cap,
    typename KeyOf<A>::type* __restrict__ keys,  // [2, rows, k] scratch of the general path
    int32_t* __restrict__ ids,                   // [2, rows, k] scratch of the general path
    T* __restrict__ out_v, int64_t* __restrict__ out_i) {
  using Key = typename KeyOf<A>::type;
  constexpr int kTopShift = 32 - kHistBits;
  auto bucket = [](A v) { return float_key(static_cast<float>(v)) >> kTopShift; };
  // The pass-1 histogram, then the sort's per-warp digit counts (never live at the same time).
  __shared__ unsigned hist[kHistBins];
  __shared__ unsigned wtot[kWarps];
  __shared__ unsigned long long bcast[2];
  __shared__ int cnt[kWarps];
  __shared__ Key s_key[2][kCandCap];
  __shared__ int32_t s_id[2][kCandCap];
  unsigned(*whist)[256] = reinterpret_cast<unsigned(*)[256]>(hist);
  const int64_t row = blockIdx.x;
  const A* p = pre + row * m;
  auto val = [&](int64_t j) { return p[j] + static_cast<A>(b[j]); };

  for (int i = threadIdx.x; i < kHistBins; i += kBlock) hist[i] = 0;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < m; j += kBlock) atomicAdd(&hist[bucket(val(j))], 1u);
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t cum = 0;
    int d = kHistBins - 1;
    for (; d > 0; --d) {
      if (cum + hist[d] >= k) break;
      cum += hist[d];
    }
    bcast[0] = static_cast<unsigned long long>(d);
    bcast[1] = static_cast<unsigned long long>(cum + hist[d]);
  }
  __syncthreads();
  const uint32_t d1 = static_cast<uint32_t>(bcast[0]);
  const int64_t nsel = static_cast<int64_t>(bcast[1]);

  Key* ka;
  int32_t* ia;
  if (nsel <= cand_cap) {  // block-uniform
    int64_t taken = 0;
    for (int64_t base = 0; base < m; base += kBlock) {
      const int64_t j = base + threadIdx.x;
      const A v = j < m ? val(j) : A(0);
      const bool sel = j < m && bucket(v) >= d1;
      const Key key = float_key(v);
      int total;
      const int r = block_rank(sel, cnt, &total);
      if (sel) {
        s_key[0][taken + r] = key;
        s_id[0][taken + r] = static_cast<int32_t>(j);
      }
      taken += total;
    }
    __syncthreads();
    if (nsel > 1) block_sort_desc<Key>(s_key[0], s_id[0], s_key[1], s_id[1], nsel, whist, wtot);
    ka = s_key[0];
    ia = s_id[0];
  } else {
    Key thresh;
    int64_t need_eq;
    block_radix_select<Key>([&](int64_t j) { return float_key(val(j)); }, m, k, hist, bcast, &thresh, &need_eq);
    ka = keys + row * k;
    ia = ids + row * k;
    Key* kb = keys + (rows + row) * k;
    int32_t* ib = ids + (rows + row) * k;
    int64_t taken = 0, eq_seen = 0;
    for (int64_t base = 0; base < m && taken < k; base += kBlock) {
      const int64_t j = base + threadIdx.x;
      const Key key = j < m ? float_key(val(j)) : Key(0);
      const bool gt = j < m && key > thresh, eq = j < m && key == thresh;
      int eq_total, take_total;
      const int er = block_rank(eq, cnt, &eq_total);
      const bool take = gt || (eq && eq_seen + er < need_eq);
      const int tr = block_rank(take, cnt, &take_total);
      if (take) {
        ka[taken + tr] = key;
        ia[taken + tr] = static_cast<int32_t>(j);
      }
      taken += take_total;
      eq_seen += eq_total;
    }
    __syncthreads();
    if (k > 1) block_sort_desc<Key>(ka, ia, kb, ib, k, whist, wtot);
  }
  for (int64_t r = threadIdx.x; r < k; r += kBlock) {
    const int32_t j = ia[r];
    const A v = val(j);
    out_v[row * k + r] = static_cast<T>(v > A(0) || v != v ? v : A(0));
    out_i[row * k + r] = j;
  }
}

// The coefficient of entry p in grad_W_enc and grad_b_enc: its gradient where the ReLU let it through.
template <typename T>
struct ReluGradCoef {
  const T* g;
  const T* v;
  __device__ acc_t<T> operator()(int64_t p) const {
    return static_cast<acc_t<T>>(v[p]) > acc_t<T>(0) ? static_cast<acc_t<T>>(g[p]) : acc_t<T>(0);
  }
};

// One block per (row, column tile of W_enc^T): grad_x, and (kAtomics) atomics into grad_W_enc^T and
// grad_b_enc.
template <typename T, typename I, bool kAtomics>
__global__ void topk_backward_kernel(const T* __restrict__ grad_values, const T* __restrict__ values,
                                     const I* __restrict__ indices, const T* __restrict__ x,
                                     const T* __restrict__ w_t,  // [m, d]
                                     T* __restrict__ grad_x, acc_t<T>* __restrict__ grad_w_t,  // [m, d]
                                     acc_t<T>* __restrict__ grad_b, int64_t k, int64_t d, int64_t m) {
  using A = acc_t<T>;
  __shared__ A s_g[kBlock];
  __shared__ int64_t s_idx[kBlock];
  const int64_t row = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x;
  const bool live = c < d;
  const A xv = live ? static_cast<A>(x[row * d + c]) : A(0);
  A acc = 0;
  for (int64_t j0 = 0; j0 < k; j0 += kBlock) {
    const int64_t n = min(static_cast<int64_t>(kBlock), k - j0);
    __syncthreads();
    if (threadIdx.x < n) {
      const int64_t e = row * k + j0 + threadIdx.x;
      // Only entries the ReLU let through (values > 0) receive gradient.
      const A g = static_cast<A>(values[e]) > A(0) ? static_cast<A>(grad_values[e]) : A(0);
      s_g[threadIdx.x] = g;
      s_idx[threadIdx.x] = static_cast<int64_t>(indices[e]);
      CONCEPT_EXT_DEVICE_CHECK_INDEX(s_idx[threadIdx.x], m, "indices");
      if (kAtomics && blockIdx.y == 0 && g != A(0)) atomicAdd(grad_b + s_idx[threadIdx.x], g);
    }
    __syncthreads();
    if (live) {
      for (int j = 0; j < n; ++j) {
        const A g = s_g[j];
        if (g == A(0)) continue;
        acc += g * static_cast<A>(w_t[s_idx[j] * d + c]);
        if (kAtomics) atomicAdd(grad_w_t + s_idx[j] * d + c, g * xv);
      }
    }
  }
  if (live) grad_x[row * d + c] = static_cast<T>(acc);
}

void check_encode_args(const Tensor& x, const Tensor& W_enc) {
  check_dim(x, 2, "x");
  check_dim(W_enc, 2, "W_enc");
  check_floating(x, "x");
  // The opt-in bfloat16-weights form (ops.topk_encode(weight_dtype=torch.bfloat16)): float32 x and b_enc,
  // bfloat16 W_enc, widened to the accumulation dtype before use.
  if (!(x.scalar_type() == ScalarType::Float && W_enc.scalar_type() == ScalarType::BFloat16))
    check_same_dtype(x, W_enc, "x", "W_enc");
  check_size(x, 1, W_enc.size(0), "x");
  check_cuda(x, "x");
  check_same_device(x, W_enc, "x", "W_enc");
  STD_TORCH_CHECK(W_enc.size(1) < INT_MAX, "W_enc: m must be < 2^31 for the CUDA kernel");
}

// out = a [r, d] @ b [d, m] in float32, for bfloat16/float16 a and b, by aten::mm.dtype. False (once per
// process; later calls do not retry) when the overload is not there or fails; the caller then widens.
bool mm_to_float32(const Tensor& a, const Tensor& b, Tensor* out) {
#ifdef CONCEPT_EXT_EMULATE
  (void)a, (void)b, (void)out;
  return false;  // a CUDA-only overload; the emulator runs on CPU tensors
#else
  static std::atomic<bool> unavailable{false};
  if (unavailable.load(std::memory_order_relaxed)) return false;
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(ScalarType::Float)};
  if (torch_call_dispatcher("aten::mm", "dtype", stack.data(), TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS) {
    unavailable.store(true, std::memory_order_relaxed);
    return false;
  }
  *out = torch::stable::detail::to<Tensor>(stack[0]);
  return true;
#endif
}

}  // namespace

std::tuple<Tensor, Tensor> topk_encode_cuda(Tensor x, Tensor W_enc, Tensor b_enc, int64_t k) {
  check_encode_args(x, W_enc);
  check_dim(b_enc, 1, "b_enc");
  check_same_dtype(x, b_enc, "x", "b_enc");
  check_size(b_enc, 0, W_enc.size(1), "b_enc");
  check_same_device(x, b_enc, "x", "b_enc");
  const int64_t n = x.size(0), m = W_enc.size(1);
  STD_TORCH_CHECK(k >= 1 && k <= m, "k must satisfy 1 <= k <= m = ", m, ", got ", k);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor values = torch::stable::new_empty(x, {n, k});
  Tensor indices = torch::stable::new_empty(x, {n, k}, std::optional<ScalarType>(ScalarType::Long));
  if (n == 0) return {values, indices};
  const ScalarType acc = acc_scalar_type(x.scalar_type());
  const ScalarType key_dtype = acc == ScalarType::Double ? ScalarType::Long : ScalarType::Int;
  const int64_t acc_size = acc == ScalarType::Double ? 8 : 4;
  const int64_t per_row = m * acc_size + 2 * k * (acc_size + 4);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(n, kScratchBytes / per_row));
  // 16-bit x and W_enc go to the GEMM as they are (mm_to_float32); otherwise both are widened to acc.
  bool half_gemm = x.scalar_type() == W_enc.scalar_type() && x.scalar_type() != acc;
  Tensor xa = half_gemm ? contig(x) : contig(to_dtype(x, acc));
  // W_enc goes to the GEMM in its own layout: TopKSAE keeps it as nn.Linear's row-major [m, d] storage
  // seen transposed (strides (1, d)), which cuBLAS reads as a transposed operand. A contiguous copy here
  // would cost a full read and write of the weight on every call.
  Tensor wa = half_gemm ? W_enc : to_dtype(W_enc, acc);
  // A layout cuBLAS cannot take as it is (neither stride 1, e.g. W_enc[:, ::2]) is copied once here, not
  // by every row chunk's GEMM.
  if (wa.stride(0) != 1 && wa.stride(1) != 1) wa = contig(wa);
  Tensor b = contig(b_enc);
  Tensor keys = torch::stable::new_empty(x, {2, rows, k}, std::optional<ScalarType>(key_dtype));
  Tensor ids = torch::stable::new_empty(x, {2, rows, k}, std::optional<ScalarType>(ScalarType::Int));
  cudaStream_t stream = current_stream(x);
  const char* sel = std::getenv("CONCEPT_EXT_TOPK_SELECT");
  const int64_t cand_cap = sel != nullptr && std::strcmp(sel, "radix") == 0 ? 0 : kCandCap;
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t r = std::min(rows, n - start);
    Tensor xr = torch::stable::narrow(xa, 0, start, r);  // [r, d]
    Tensor pre;                                           // [r, m] in acc
    if (!(half_gemm && mm_to_float32(xr, wa, &pre))) {
      if (half_gemm) {  // the 16-bit GEMM is unavailable: widen both from now on
        xa = contig(to_dtype(xa, acc));
        wa = to_dtype(wa, acc);
        xr = torch::stable::narrow(xa, 0, start, r);
        half_gemm = false;
      }
      pre = torch::stable::matmul(xr, wa);
    }
    pre = contig(pre);
    CONCEPT_EXT_DISPATCH_FLOATING(x.scalar_type(), "topk_encode", [&] {
      using A = acc_t<scalar_t>;
      using Key = typename KeyOf<A>::type;
      topk_select_kernel<scalar_t, A><<<static_cast<unsigned>(r), kBlock, 0, stream>>>(
          ptr<A>(pre), ptr<scalar_t>(b), r, m, k, cand_cap, ptr<Key>(keys), ptr<int32_t>(ids),
          ptr<scalar_t>(values) + start * k, ptr<int64_t>(indices) + start * k);
    });
    CONCEPT_EXT_CHECK_LAUNCH("topk_encode");
  }
  return {values, indices};
}

std::tuple<Tensor, Tensor, Tensor> topk_encode_backward_cuda(Tensor grad_values, Tensor values, Tensor indices,
                                                             Tensor x, Tensor W_enc, bool deterministic) {
  check_encode_args(x, W_enc);
  check_dim(values, 2, "values");
  check_dim(grad_values, 2, "grad_values");
  check_dim(indices, 2, "indices");
  check_index(indices, "indices");
  check_same_dtype(values, x, "values", "x");
  check_same_dtype(grad_values, x, "grad_values", "x");
  for (const Tensor* t : {&values, &grad_values, &indices}) {
    check_size(*t, 0, x.size(0), "values/grad_values/indices");
    check_size(*t, 1, values.size(1), "values/grad_values/indices");
    check_same_device(x, *t, "x", "values/grad_values/indices");
  }
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const int64_t n = x.size(0), d = x.size(1), m = W_enc.size(1), k = values.size(1);
  const ScalarType acc = acc_scalar_type(x.scalar_type());
  Tensor grad_x = torch::stable::new_empty(x, {n, d});
  // The atomic path accumulates into zeros; the deterministic one writes every element itself.
  const bool writes_all = deterministic && n > 0 && k > 0;
  Tensor grad_w_t = writes_all ? torch::stable::new_empty(x, {m, d}, std::optional<ScalarType>(acc))
                               : torch::stable::new_zeros(x, {m, d}, std::optional<ScalarType>(acc));
  Tensor grad_b = writes_all ? torch::stable::new_empty(x, {m}, std::optional<ScalarType>(acc))
                             : torch::stable::new_zeros(x, {m}, std::optional<ScalarType>(acc));
  if (n > 0 && k > 0) {
    Tensor gv = contig(grad_values), v = contig(values), idx = contig(indices), xc = contig(x);
    // [m, d]: coalesced gathers; in x's dtype (a bfloat16 W_enc is widened for the float32 kernel).
    Tensor w_t = contig(to_dtype(torch::stable::transpose(W_enc, 0, 1), x.scalar_type()));
    cudaStream_t stream = current_stream(x);
    // d == 0 still needs one column tile: its threads are all idle but it writes grad_b.
    dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(std::max<int64_t>(1, ceil_div(d, kBlock))));
    CONCEPT_EXT_DISPATCH_FLOATING(x.scalar_type(), "topk_encode_backward", [&] {
      CONCEPT_EXT_DISPATCH_INDEX(idx.scalar_type(), "topk_encode_backward", [&] {
        using A = acc_t<scalar_t>;
        if (!deterministic) {
          topk_backward_kernel<scalar_t, index_t, true><<<grid, kBlock, 0, stream>>>(
              ptr<scalar_t>(gv), ptr<scalar_t>(v), ptr<index_t>(idx), ptr<scalar_t>(xc), ptr<scalar_t>(w_t),
              ptr<scalar_t>(grad_x), ptr<A>(grad_w_t), ptr<A>(grad_b), k, d, m);
          return;
        }
        topk_backward_kernel<scalar_t, index_t, false><<<grid, kBlock, 0, stream>>>(
            ptr<scalar_t>(gv), ptr<scalar_t>(v), ptr<index_t>(idx), ptr<scalar_t>(xc), ptr<scalar_t>(w_t),
            ptr<scalar_t>(grad_x), ptr<A>(grad_w_t), ptr<A>(grad_b), k, d, m);
        auto [starts, keys] = bucket_by_latent<index_t>(x, ptr<index_t>(idx), n * k, m, stream);
        // d == 0 still needs column tile 0: it writes grad_b_enc.
        dim3 rgrid(static_cast<unsigned>(m), static_cast<unsigned>(std::max<int64_t>(1, ceil_div(d, kBlock))));
        bucket_reduce_kernel<scalar_t, ReluGradCoef<scalar_t>><<<rgrid, kBlock, 0, stream>>>(
            ptr<int64_t>(starts), ptr<uint32_t>(keys), k, ptr<scalar_t>(xc), d,
            ReluGradCoef<scalar_t>{ptr<scalar_t>(gv), ptr<scalar_t>(v)}, ptr<A>(grad_w_t), ptr<A>(grad_b));
      });
    });
    CONCEPT_EXT_CHECK_LAUNCH("topk_encode_backward");
  } else if (n > 0) {
    torch::stable::zero_(grad_x);
  }
  // [d, m] in W_enc's layout where that is the transposed one (then grad_w_t's own memory, no copy, and
  // autograd keeps it as the parameter's gradient without the copy its layout contract would make).
  Tensor grad_w = to_dtype(torch::stable::transpose(grad_w_t, 0, 1), W_enc.scalar_type());
  if (!is_transposed_contiguous(W_enc)) grad_w = contig(grad_w);
  return {grad_x, grad_w, to_dtype(grad_b, W_enc.scalar_type())};
}

}  // namespace concept_ext
