// Shared input checks for every kernel (CPU and CUDA). Each message names the argument, so a bad call
// becomes a Python RuntimeError that says what is wrong instead of a crash. The Python wrappers in
// concept_ext/ops.py run friendlier checks first; these guard direct torch.ops calls.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

namespace concept_ext {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

inline void check_dim(const Tensor& t, int64_t dim, const char* name) {
  STD_TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

inline void check_size(const Tensor& t, int64_t dim, int64_t size, const char* name) {
  STD_TORCH_CHECK(t.size(dim) == size, name, ".size(", dim, ") must be ", size, ", got ", t.size(dim));
}

inline bool is_floating(ScalarType s) {
  return s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::BFloat16 ||
         s == ScalarType::Half;
}

inline void check_floating(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(is_floating(t.scalar_type()), name,
                  " must be a floating tensor (float32, float64, bfloat16 or float16)");
}

inline void check_index(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Long || t.scalar_type() == ScalarType::Int, name,
                  " must be an int64 or int32 tensor");
}

inline void check_same_dtype(const Tensor& a, const Tensor& b, const char* na, const char* nb) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), na, " and ", nb, " must have the same dtype");
}

inline void check_same_device(const Tensor& a, const Tensor& b, const char* na, const char* nb) {
  STD_TORCH_CHECK(a.get_device_index() == b.get_device_index() && a.is_cpu() == b.is_cpu(), na, " and ", nb,
                  " must be on the same device");
}

// True when the 2-D t is the transpose of a contiguous matrix (strides (1, rows), both sizes > 1): W_enc
// held as nn.Linear's [m, d] weight and passed transposed, as TopKSAE does. The topk_encode kernels read
// that layout in place and return grad_W_enc in it (reference.weight_grad_like states the same rule).
inline bool is_transposed_contiguous(const Tensor& t) {
  return t.dim() == 2 && t.size(0) > 1 && t.size(1) > 1 && t.stride(0) == 1 && t.stride(1) == t.size(0);
}

inline void check_cpu(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor for the CPU kernel");
}

inline void check_cuda(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel");
}

}  // namespace concept_ext
