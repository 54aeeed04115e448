// Every CUDA kernel, registered in one place. The schemas live in concept_ext/ops.py.
#include <torch/csrc/stable/library.h>

#include "concept_ext/kernels.h"

STABLE_TORCH_LIBRARY_IMPL(concept_ext, CUDA, m) {
  m.impl("topk_encode", TORCH_BOX(&concept_ext::topk_encode_cuda));
  m.impl("topk_encode_backward", TORCH_BOX(&concept_ext::topk_encode_backward_cuda));
  m.impl("sparse_decode", TORCH_BOX(&concept_ext::sparse_decode_cuda));
  m.impl("sparse_decode_backward", TORCH_BOX(&concept_ext::sparse_decode_backward_cuda));
  m.impl("activation_rate_loss", TORCH_BOX(&concept_ext::activation_rate_loss_cuda));
  m.impl("activation_rate_loss_backward", TORCH_BOX(&concept_ext::activation_rate_loss_backward_cuda));
  m.impl("ablate_decode", TORCH_BOX(&concept_ext::ablate_decode_cuda));
  m.impl("ablate_decode_padded", TORCH_BOX(&concept_ext::ablate_decode_padded_cuda));
}
