"""concept_ext: C++/CUDA-accelerated ClassifSAE concept extraction for LLM sentence classifiers.

Table of contents:

* ops (custom ``torch.library`` operators with C++/CUDA kernels): :func:`topk_encode`,
  :func:`sparse_decode`, :func:`activation_rate_loss`, :func:`ablate_decode`;
* ``concept_ext.reference``: the pure-PyTorch oracle of every op;
* ``concept_ext.info``: which kernel serves each op on each device.
"""
from __future__ import annotations

import logging

from . import ops  # schemas, reference kernels, fakes and autograd: the ops work without _C
from .ops import AblationBatch, TopKCode, ablate_decode, activation_rate_loss, sparse_decode, topk_encode

__version__ = "0.1.0"

logger = logging.getLogger("concept_ext")

try:  # the compiled kernels register themselves with the dispatcher on import
    from . import _C  # noqa: F401

    HAS_C_EXTENSION = True
    C_EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised when the extension is not built
    HAS_C_EXTENSION = False
    C_EXTENSION_ERROR = str(exc)
    logger.warning("concept_ext._C could not be loaded (%s); the pure-PyTorch reference ops serve.", exc)

from . import info, reference  # noqa: E402  (info reads HAS_C_EXTENSION at call time)

__all__ = [
    "__version__",
    "HAS_C_EXTENSION",
    "TopKCode",
    "AblationBatch",
    "topk_encode",
    "sparse_decode",
    "activation_rate_loss",
    "ablate_decode",
]
