// Every CPU kernel, registered in one place. The schemas live in concept_ext/ops.py.
#include <torch/csrc/stable/library.h>

#include "concept_ext/kernels.h"

STABLE_TORCH_LIBRARY_IMPL(concept_ext, CPU, m) {
  m.impl("topk_encode", TORCH_BOX(&concept_ext::topk_encode_cpu));
  m.impl("topk_encode_backward", TORCH_BOX(&concept_ext::topk_encode_backward_cpu));
  m.impl("sparse_decode", TORCH_BOX(&concept_ext::sparse_decode_cpu));
  m.impl("sparse_decode_backward", TORCH_BOX(&concept_ext::sparse_decode_backward_cpu));
  m.impl("activation_rate_loss", TORCH_BOX(&concept_ext::activation_rate_loss_cpu));
  m.impl("activation_rate_loss_backward", TORCH_BOX(&concept_ext::activation_rate_loss_backward_cpu));
  m.impl("ablate_decode", TORCH_BOX(&concept_ext::ablate_decode_cpu));
  m.impl("ablate_decode_padded", TORCH_BOX(&concept_ext::ablate_decode_padded_cpu));
}
