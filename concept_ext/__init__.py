"""concept_ext: C++/CUDA-accelerated ClassifSAE concept extraction for LLM sentence classifiers.

Table of contents (heavy modules load on first use):

* ops, with C++/CUDA kernels: :func:`topk_encode`, :func:`sparse_decode`, :func:`activation_rate_loss`,
  :func:`ablate_decode`; ``concept_ext.ops.reference`` holds their pure-PyTorch oracle;
* SAEs: :class:`TopKSAE`, :class:`ClassifSAE`, :class:`SAEConfig`, :class:`TrainConfig`, :func:`train_sae`,
  :func:`save_checkpoint`, :func:`load_checkpoint`;
* classifier side: :func:`load_backbone`, :class:`Classifier`, :func:`load_dataset`, :func:`build_cache`,
  :func:`load_cache`, :class:`SingleTokenTail`, :class:`ContextTail`, ``concept_ext.classifier.finetune.finetune``,
  and the hooks in ``concept_ext.classifier.hooks``;
* concept models: :class:`ConceptModel`, :func:`load_concept_model`, ``concept_ext.concepts`` (ICA,
  ConceptSHAP, HI-Concept, probe selection, :class:`SAEConcepts`);
* metrics: ``concept_ext.metrics`` (completeness, causality, interpretability);
* the main job: :class:`RunConfig`, :class:`Pipeline`, :func:`run`; ``concept_ext.pipeline.explain.explain``;
* ``concept_ext.info``: which kernel serves each op on each device.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from concept_ext import ops  # schemas, reference kernels, fakes and autograd: the ops work without _C
from concept_ext.ops import (AblationBatch, TopKCode, ablate_decode, activation_rate_loss, sparse_decode, topk_encode,
                  unchecked)

__version__ = "0.1.0"

logger = logging.getLogger("concept_ext")

#: Environment switch: set to ``1`` (as ``make test`` and CI do) to turn a missing or broken compiled extension
#: into an ImportError instead of the users' graceful fallback to the reference ops, so that a broken build
#: cannot pass the test suite on the references.
REQUIRE_KERNELS_ENV = "CONCEPT_EXT_REQUIRE_KERNELS"
#: Whether this process runs with the switch set (read once, at import).
KERNELS_REQUIRED = os.environ.get(REQUIRE_KERNELS_ENV) == "1"

try:  # the compiled kernels register themselves with the dispatcher on import
    from concept_ext import _C  # noqa: F401

    HAS_C_EXTENSION = True
    C_EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised when the extension is not built
    HAS_C_EXTENSION = False
    if "cannot import name '_C'" in str(exc) or "No module named" in str(exc):
        C_EXTENSION_ERROR = ("the compiled extension is not built (run `make` or "
                             "`pip install --no-build-isolation -e .`)")
    else:  # e.g. a build for another torch version
        C_EXTENSION_ERROR = str(exc)
    if KERNELS_REQUIRED:
        raise ImportError(f"concept_ext._C unavailable: {C_EXTENSION_ERROR} ({REQUIRE_KERNELS_ENV}=1 forbids the "
                          "fallback to the pure-PyTorch reference ops)") from exc
    logger.warning("concept_ext._C unavailable: %s; the pure-PyTorch reference ops serve.", C_EXTENSION_ERROR)

if HAS_C_EXTENSION and KERNELS_REQUIRED:
    # _C loaded but a partial build (an op left out of csrc/) would still fall back for that op.
    import torch

    _missing = [op for op in ops.OP_NAMES
                if not torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", "CPU")]
    if _missing:
        raise ImportError(f"concept_ext._C has no CPU kernel for {_missing} ({REQUIRE_KERNELS_ENV}=1 forbids the "
                          "fallback to the pure-PyTorch reference ops)")

from concept_ext import info  # noqa: E402  (info reads HAS_C_EXTENSION at call time)
from concept_ext.ops import reference  # noqa: E402  (concept_ext.reference: the oracle, as before)

# Public name -> defining module, imported lazily so that `import concept_ext` stays light (no
# transformers / scikit-learn import until a name that needs them is used).
_LAZY = {
    "TopKSAE": "sae.model", "ClassifSAE": "sae.model", "SparseCode": "sae.model", "SAEOutput": "sae.model",
    "build_sae": "sae.model",
    "SAEConfig": "config.sae", "TrainConfig": "config.sae",
    "Trainer": "sae.trainer", "train_sae": "sae.trainer", "TrainResult": "sae.trainer",
    "save_checkpoint": "sae.checkpoint", "load_checkpoint": "sae.checkpoint",
    "load_backbone": "classifier.backbones", "Backbone": "classifier.backbones",
    "Classifier": "classifier.model", "load_dataset": "text.data", "TextDataset": "text.data",
    "build_cache": "cache.activations", "load_cache": "cache.activations", "ActivationCache": "cache.activations",
    "SingleTokenTail": "classifier.tail", "ContextTail": "classifier.tail",
    "PromptConfig": "config.clf", "FineTuneConfig": "config.clf", "CacheConfig": "config.clf",
    "ConceptModel": "concepts.base", "load_concept_model": "concepts.base",
    "SAEConcepts": "concepts", "ICAConcepts": "concepts", "ConceptSHAPConcepts": "concepts",
    "HIConceptConcepts": "concepts", "make_concept_model": "concepts",
    "RunConfig": "config.run", "Pipeline": "pipeline.stages", "run": "pipeline.stages",
    "load_sae": "interop", "export_sae": "interop", "accelerate": "interop",
    # modules exposed under a name of their own (value: the module path)
    "metrics": "=metrics", "baselines": "=concepts", "hooks": "=classifier.hooks",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'concept_ext' has no attribute {name!r}")
    mod = _LAZY[name]
    if mod.startswith("="):
        return importlib.import_module(f".{mod[1:]}", __name__)
    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    "__version__",
    "HAS_C_EXTENSION",
    "KERNELS_REQUIRED",
    "TopKCode",
    "AblationBatch",
    "topk_encode",
    "sparse_decode",
    "activation_rate_loss",
    "ablate_decode",
    "unchecked",
    *sorted(_LAZY),
]
