// Kernels that break CUDA's barrier rules on purpose, for tests/test_cuda_emulated.py: the emulator
// (csrc/emu) must report them rather than hang or return a number. Built only by the emulator
// (tools/cuda_emulate.py build_extra), never by nvcc or setup.py.
#include <cuda_runtime.h>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

using torch::stable::Tensor;

// Sum of x[0..n) by one block of 256 threads. mode 0: correct. 1: the first warp waits at a different
// __syncthreads than the others. 2: lanes 200..255 exit before a full-mask shuffle. 3: a thread reads its
// neighbour's shared slot without a barrier in between (a race whose result depends on thread order).
// 4: thread 0 also reads x[n], one element past the end (AddressSanitizer's heap-buffer-overflow).
// 5: threads 128..255 exit before the last __syncthreads, which the others wait at.
// 6: the warp partial sums are never stored, so the final sum reads shared memory nobody wrote.
__global__ void block_sum_kernel(const double* x, int64_t n, int64_t mode, double* out) {
  __shared__ double red[8];
  __shared__ double s[256];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  if (mode == 2 && t >= 200) return;
  if (mode == 1 && t < 32) __syncthreads();
  double v = 0;
  for (int64_t i = t; i < n; i += blockDim.x) v += x[i];
  if (mode == 4 && t == 0) v += x[n];
  if (mode == 3) {
    s[t] = 0;
    __syncthreads();
    s[t] = v;
    v = s[(t + 1) % 256];
  }
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  if (mode == 5 && t >= 128) return;
  if (lane == 0 && mode != 6) red[warp] = v;
  __syncthreads();
  if (t == 0) {
    double total = 0;
    for (int w = 0; w < 8; ++w) total += red[w];
    *out = total;
  }
}

Tensor block_sum(Tensor x, int64_t mode) {
  Tensor xc = torch::stable::contiguous(x);
  Tensor out = torch::stable::new_empty(xc, {1});
  block_sum_kernel<<<1, 256>>>(reinterpret_cast<const double*>(xc.data_ptr()), xc.numel(), mode,
                               reinterpret_cast<double*>(out.data_ptr()));
  return out;
}

STABLE_TORCH_LIBRARY(concept_ext_emu_faults, m) { m.def("block_sum(Tensor x, int mode) -> Tensor"); }

STABLE_TORCH_LIBRARY_IMPL(concept_ext_emu_faults, CPU, m) { m.impl("block_sum", TORCH_BOX(&block_sum)); }
