"""concept_ext: C++/CUDA-accelerated ClassifSAE concept extraction for LLM sentence classifiers.

Table of contents (heavy modules load on first use):

* ops, with C++/CUDA kernels: :func:`topk_encode`, :func:`sparse_decode`, :func:`activation_rate_loss`,
  :func:`ablate_decode`; ``concept_ext.reference`` holds their pure-PyTorch oracle;
* SAEs: :class:`TopKSAE`, :class:`ClassifSAE`, :class:`SAEConfig`, :class:`TrainConfig`, :func:`train_sae`,
  :func:`save_checkpoint`, :func:`load_checkpoint`;
* classifier side: :func:`load_backbone`, :class:`Classifier`, :func:`load_dataset`, :func:`build_cache`,
  :func:`load_cache`, :class:`SingleTokenTail`, :class:`ContextTail`, ``concept_ext.finetune.finetune``,
  and the hooks in ``concept_ext.hooks``;
* concept models: :class:`ConceptModel`, :func:`load_concept_model`, ``concept_ext.baselines`` (ICA,
  ConceptSHAP, HI-Concept, probe selection, :class:`SAEConcepts`);
* metrics: ``concept_ext.metrics`` (completeness, causality, interpretability);
* the main job: :class:`RunConfig`, :class:`Pipeline`, :func:`run`; ``concept_ext.explain.explain``;
* ``concept_ext.info``: which kernel serves each op on each device.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from . import ops  # schemas, reference kernels, fakes and autograd: the ops work without _C
from .ops import (AblationBatch, TopKCode, ablate_decode, activation_rate_loss, sparse_decode, topk_encode,
                  unchecked)

__version__ = "0.1.0"

logger = logging.getLogger("concept_ext")

try:  # the compiled kernels register themselves with the dispatcher on import
    from . import _C  # noqa: F401

    HAS_C_EXTENSION = True
    C_EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised when the extension is not built
    HAS_C_EXTENSION = False
    if "cannot import name '_C'" in str(exc) or "No module named" in str(exc):
        C_EXTENSION_ERROR = ("the compiled extension is not built (run `make` or "
                             "`pip install --no-build-isolation -e .`)")
    else:  # e.g. a build for another torch version
        C_EXTENSION_ERROR = str(exc)
    logger.warning("concept_ext._C unavailable: %s; the pure-PyTorch reference ops serve.", C_EXTENSION_ERROR)

from . import info, reference  # noqa: E402  (info reads HAS_C_EXTENSION at call time)

# Public name -> defining module, imported lazily so that `import concept_ext` stays light (no
# transformers / scikit-learn import until a name that needs them is used).
_LAZY = {
    "TopKSAE": "sae", "ClassifSAE": "sae", "SparseCode": "sae", "SAEOutput": "sae", "build_sae": "sae",
    "SAEConfig": "config_sae", "TrainConfig": "config_sae",
    "Trainer": "train", "train_sae": "train", "TrainResult": "train",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "load_backbone": "backbones", "Backbone": "backbones",
    "Classifier": "classifier", "load_dataset": "data", "TextDataset": "data",
    "build_cache": "cache", "load_cache": "cache", "ActivationCache": "cache",
    "SingleTokenTail": "tail", "ContextTail": "tail",
    "PromptConfig": "config_clf", "FineTuneConfig": "config_clf", "CacheConfig": "config_clf",
    "ConceptModel": "concepts", "load_concept_model": "concepts",
    "SAEConcepts": "baselines", "ICAConcepts": "baselines", "ConceptSHAPConcepts": "baselines",
    "HIConceptConcepts": "baselines", "make_concept_model": "baselines",
    "RunConfig": "config_run", "Pipeline": "pipeline", "run": "pipeline",
    "metrics": None, "baselines": None, "hooks": None,
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'concept_ext' has no attribute {name!r}")
    mod = _LAZY[name]
    if mod is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    "__version__",
    "HAS_C_EXTENSION",
    "TopKCode",
    "AblationBatch",
    "topk_encode",
    "sparse_decode",
    "activation_rate_loss",
    "ablate_decode",
    "unchecked",
    *sorted(_LAZY),
]
