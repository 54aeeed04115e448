"""One interface for every concept extractor: ICA, ConceptSHAP, HI-Concept, SAEs (method.md 4-5).

A :class:`ConceptModel` is fitted on cached train activations ``h [N, d]`` (plus LLM-predicted labels and
the classifier tail where supervised) and then exposes

* ``encode(h [N, d]) -> [N, n_concepts]``: concept activations (ICA: signed sources s; ConceptSHAP and
  HI-Concept: p; SAEs: z over all m latents);
* ``reconstruct(acts [N, n_concepts]) -> [N, d]``: the activation-space reconstruction from (masked)
  concept activations;
* ``directions() -> [n_concepts, d]``: one direction per concept in activation space;
* ``selected``: the selected concept set F (indices into the ``n_concepts`` columns), and
  ``segmentation``: the class of each selected concept (set by :mod:`concept_ext.concepts.select`);
* ``save(dir)`` / :func:`load_concept_model` ``(dir)``: ``cfg.json`` + ``concepts.safetensors``, arrays
  only (scikit-learn state included), never pickle; every file is written atomically.
"""
from __future__ import annotations

import abc
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from concept_ext.ops import check_finite
from concept_ext.runstate import atomic_write_json, default_file_mode  # noqa: F401  (atomic_write_json: re-exported for the baselines)

logger = logging.getLogger("concept_ext")

__all__ = [
    "ConceptModel",
    "Tail",
    "FORMAT_VERSION",
    "load_concept_model",
    "register_concept_model",
    "concept_class",
    "check_activations",
    "check_labels",
    "atomic_write_json",
    "n_batches",
]

#: A classifier tail: [P, d] hidden vectors -> [P, C] label logits (method.md 3.1).
Tail = Callable[[Tensor], Tensor]

FORMAT_VERSION = 1
CFG_NAME = "cfg.json"
TENSORS_NAME = "concepts.safetensors"

#: The one registry of concept methods: ``cls.method`` -> class (filled by :func:`register_concept_model`).
_REGISTRY: dict[str, type["ConceptModel"]] = {}


def register_concept_model(cls: type["ConceptModel"]) -> type["ConceptModel"]:
    """Class decorator: make ``cls`` buildable (:func:`~concept_ext.concepts.make_concept_model`) and
    loadable (:func:`load_concept_model`) under ``cls.method``."""
    _REGISTRY[cls.method] = cls
    return cls


def concept_class(method: str) -> type["ConceptModel"]:
    """The registered class of ``method`` (``ica``, ``conceptshap``, ``hiconcept``, ``sae``); ValueError
    listing the known names otherwise."""
    from concept_ext import concepts  # noqa: F401 - importing the package registers every class

    if method not in _REGISTRY:
        raise ValueError(f"unknown concept method {method!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[method]


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def check_activations(h: Any, *, name: str = "h", d: Optional[int] = None, min_rows: int = 1) -> Tensor:
    """Validate cached activations: a finite floating [N, d] tensor (or array) with N >= min_rows."""
    if not isinstance(h, Tensor):
        try:
            h = torch.as_tensor(h)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(f"{name} must be a tensor or array, got {type(h).__name__}") from exc
    if h.dim() != 2:
        raise ValueError(f"{name} must have shape [N, d], got {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {h.dtype}")
    if d is not None and h.shape[1] != d:
        raise ValueError(f"{name} has d={h.shape[1]} but the model was fitted with d={d}")
    if h.shape[0] < min_rows:
        raise ValueError(f"{name} has {h.shape[0]} rows; at least {min_rows} are needed")
    check_finite(h, name)
    return h


def check_labels(labels: Any, n: int, *, name: str = "labels", n_classes: Optional[int] = None) -> Tensor:
    """Validate integer class labels of length ``n`` in ``[0, n_classes)``."""
    if labels is None:
        raise ValueError(f"{name} is required")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices, got {labels.dtype}")
    labels = labels.long()
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} has negative entries")
    if n_classes is not None and n and int(labels.max()) >= n_classes:
        raise ValueError(f"{name} has class {int(labels.max())} >= n_classes={n_classes}")
    return labels


def n_batches(n_rows: int, batch_size: int, *, quirk: bool = False) -> int:
    """Batches per epoch: floor(N/B); the reference loop gives floor((N-1)/B) (method.md oddity 23)."""
    return max(n_rows - 1, 0) // batch_size if quirk else n_rows // batch_size


# ---------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------


class ConceptModel(abc.ABC):
    """Base class of every concept extractor (see the module docstring for the contract)."""

    method: ClassVar[str] = "abstract"
    """Name stored in ``cfg.json`` and used by :func:`load_concept_model`."""

    def __init__(self) -> None:
        self.d: Optional[int] = None  # activation width, known after fit/load
        self.selected: list[int] = []  # F: indices into the encode() columns
        self.dropped: list[int] = []  # selected indices removed as dead (method.md 5)
        self.segmentation: Optional[list[int]] = None  # class of each entry of `selected`
        self.info: dict[str, Any] = {}  # JSON-able fit diagnostics (losses, probe C, ...)

    # -- to implement ------------------------------------------------------------------------------

    @abc.abstractmethod
    def fit(
        self,
        h: Tensor,  # [N, d] cached train activations
        *,
        labels: Optional[Tensor] = None,  # [N] LLM-predicted labels (supervised methods)
        tail: Optional[Tail] = None,  # [P, d] -> [P, C] (bottlenecks)
    ) -> "ConceptModel":
        """Fit on cached train activations; returns ``self``."""

    @property
    @abc.abstractmethod
    def n_concepts(self) -> int:
        """Number of concept activations returned by :meth:`encode`."""

    @abc.abstractmethod
    def encode(self, h: Tensor) -> Tensor:  # [N, d] -> [N, n_concepts]
        """Concept activations of activations ``h``."""

    @abc.abstractmethod
    def reconstruct(self, acts: Tensor) -> Tensor:  # [N, n_concepts] -> [N, d]
        """Activation-space reconstruction from (masked) concept activations."""

    @abc.abstractmethod
    def directions(self) -> Tensor:  # [n_concepts, d]
        """One direction per concept in activation space."""

    @abc.abstractmethod
    def _config_dict(self) -> dict[str, Any]:
        """JSON-able configuration, enough with :meth:`_state_tensors` to rebuild the model."""

    @abc.abstractmethod
    def _state_tensors(self) -> dict[str, Tensor]:
        """Fitted state as named tensors."""

    @classmethod
    @abc.abstractmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor], **kwargs: Any) -> "ConceptModel":
        """Rebuild from :meth:`_config_dict` and :meth:`_state_tensors`."""

    # -- shared ------------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        """True once fitted or loaded."""
        return self.d is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or load() first")

    def _check_acts(self, acts: Tensor, name: str = "acts") -> Tensor:
        if not isinstance(acts, Tensor) or acts.dim() != 2 or acts.shape[1] != self.n_concepts:
            shape = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"{name} must have shape [N, {self.n_concepts}], got {shape}")
        return acts

    def masked(self, acts: Tensor, keep: Optional[list[int]] = None) -> Tensor:  # [N, n_concepts]
        """``acts`` with every column outside ``keep`` (default: ``selected``) set to zero."""
        self._check_acts(acts)
        keep = self.selected if keep is None else keep
        mask = torch.zeros(self.n_concepts, dtype=torch.bool, device=acts.device)
        if len(keep):
            mask[torch.as_tensor(list(keep), dtype=torch.long, device=acts.device)] = True
        return acts * mask.to(acts.dtype)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``cfg.json`` + ``concepts.safetensors`` into ``directory`` (created; files atomic)."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": str(FORMAT_VERSION), "method": self.method}
        _atomic_save_tensors(directory / TENSORS_NAME, self._state_tensors(), meta)
        cfg = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "d": self.d,
            "n_concepts": self.n_concepts,
            "config": self._config_dict(),
            "selected": [int(i) for i in self.selected],
            "dropped": [int(i) for i in self.dropped],
            "segmentation": None if self.segmentation is None else [int(c) for c in self.segmentation],
            "info": _jsonable(self.info),
        }
        atomic_write_json(directory / CFG_NAME, cfg)  # written last: its presence marks a complete save
        return directory

    def _restore_common(self, cfg: dict[str, Any]) -> None:
        self.d = int(cfg["d"])
        self.selected = [int(i) for i in cfg.get("selected", [])]
        self.dropped = [int(i) for i in cfg.get("dropped", [])]
        seg = cfg.get("segmentation")
        self.segmentation = None if seg is None else [int(c) for c in seg]
        self.info = dict(cfg.get("info", {}))


def load_concept_model(directory: str | os.PathLike, **kwargs: Any) -> ConceptModel:
    """Load any saved :class:`ConceptModel`; ``kwargs`` go to the class (e.g. ``sae=`` for the adapter)."""
    directory = Path(directory)
    cfg_path = directory / CFG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CFG_NAME} in {directory} (missing or incomplete checkpoint)")
    cfg = json.loads(cfg_path.read_text())
    if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{directory} has format_version {cfg.get('format_version')} > {FORMAT_VERSION}")
    try:
        cls = concept_class(cfg.get("method"))
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from None
    tpath = directory / TENSORS_NAME
    try:
        tensors = load_file(str(tpath)) if tpath.is_file() else {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"concept checkpoint {tpath} is not a readable safetensors file ({exc}): corrupted "
                         "or half-written") from exc
    model = cls._from_state(cfg["config"], tensors, **kwargs)
    model._restore_common(cfg)
    return model


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
