// A hand-written dtype switch: the stable ABI has no AT_DISPATCH_* macros (design.md section 4).
// Usage:
//   CONCEPT_EXT_DISPATCH_FLOATING(t.scalar_type(), "op_name", [&] { kernel<scalar_t>(...); });
#pragma once

#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#define CONCEPT_EXT_DISPATCH_CASE(ENUM, TYPE, ...)    \
  case torch::headeronly::ScalarType::ENUM: {         \
    using scalar_t = TYPE;                            \
    __VA_ARGS__();                                    \
    break;                                            \
  }

// float32, float64, bfloat16, float16.
#define CONCEPT_EXT_DISPATCH_FLOATING(STYPE, NAME, ...)                                   \
  [&] {                                                                                   \
    switch (STYPE) {                                                                      \
      CONCEPT_EXT_DISPATCH_CASE(Float, float, __VA_ARGS__)                                \
      CONCEPT_EXT_DISPATCH_CASE(Double, double, __VA_ARGS__)                              \
      CONCEPT_EXT_DISPATCH_CASE(BFloat16, c10::BFloat16, __VA_ARGS__)                     \
      CONCEPT_EXT_DISPATCH_CASE(Half, c10::Half, __VA_ARGS__)                             \
      default:                                                                            \
        STD_TORCH_CHECK(false, NAME, ": unsupported dtype (expected a floating type)");   \
    }                                                                                     \
  }()

// int64 or int32 index tensors; binds index_t.
#define CONCEPT_EXT_DISPATCH_INDEX(STYPE, NAME, ...)                                      \
  [&] {                                                                                   \
    switch (STYPE) {                                                                      \
      case torch::headeronly::ScalarType::Long: {                                         \
        using index_t = int64_t;                                                          \
        __VA_ARGS__();                                                                    \
        break;                                                                            \
      }                                                                                   \
      case torch::headeronly::ScalarType::Int: {                                          \
        using index_t = int32_t;                                                          \
        __VA_ARGS__();                                                                    \
        break;                                                                            \
      }                                                                                   \
      default:                                                                            \
        STD_TORCH_CHECK(false, NAME, ": indices must be int64 or int32");                 \
    }                                                                                     \
  }()

// Accumulation type: float for the 16-bit types and float32, double for float64.
namespace concept_ext {
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;
}  // namespace concept_ext
