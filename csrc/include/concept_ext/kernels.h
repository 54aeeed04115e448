// Every kernel the extension registers, one declaration per op and backend. The contract of each op
// (shapes, dtypes, semantics) is written once, in concept_ext/reference.py; kernels must match it.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace concept_ext {

using torch::stable::Tensor;

#define CONCEPT_EXT_DECLARE_KERNELS(SUFFIX)                                                             \
  /* x [N,d], W_enc [d,m], b_enc [m] -> values [N,k] (ReLU, sorted desc), indices [N,k] int64 */      \
  std::tuple<Tensor, Tensor> topk_encode_##SUFFIX(Tensor x, Tensor W_enc, Tensor b_enc, int64_t k);    \
  /* -> grad_x [N,d], grad_W_enc [d,m], grad_b_enc [m]; deterministic: bitwise-reproducible sums */  \
  std::tuple<Tensor, Tensor, Tensor> topk_encode_backward_##SUFFIX(                                    \
      Tensor grad_values, Tensor values, Tensor indices, Tensor x, Tensor W_enc, bool deterministic);  \
  /* values [N,k], indices [N,k], W_dec [m,d], b_dec [d] -> x_hat [N,d] */                             \
  Tensor sparse_decode_##SUFFIX(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec);            \
  /* grad_out [N,d] -> grad_values [N,k], grad_W_dec [m,d] */                                          \
  std::tuple<Tensor, Tensor> sparse_decode_backward_##SUFFIX(                                          \
      Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec, bool deterministic);               \
  /* -> scalar loss (0-dim, dtype of values) */                                                        \
  Tensor activation_rate_loss_##SUFFIX(Tensor values, Tensor indices, int64_t n_latents, double rate); \
  /* grad [] -> grad_values [N,k] */                                                                   \
  Tensor activation_rate_loss_backward_##SUFFIX(                                                       \
      Tensor grad, Tensor values, Tensor indices, int64_t n_latents, double rate);                     \
  /* -> base [N,d], ablated [P,d], pair_row [P] int64, pair_concept [P] int64 (position in keep) */    \
  std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_##SUFFIX(                                   \
      Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec, Tensor keep,                          \
      std::optional<Tensor> target_norm);                                                              \
  /* -> base [N,d], ablated [N*k,d], pair_row [N*k], pair_concept [N*k]: one slot per code entry */    \
  std::tuple<Tensor, Tensor, Tensor, Tensor> ablate_decode_padded_##SUFFIX(                            \
      Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec, Tensor keep,                          \
      std::optional<Tensor> target_norm);

CONCEPT_EXT_DECLARE_KERNELS(cpu)
CONCEPT_EXT_DECLARE_KERNELS(cuda)

#undef CONCEPT_EXT_DECLARE_KERNELS

}  // namespace concept_ext
