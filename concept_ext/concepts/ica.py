"""ICA baseline (method.md 4.1): scikit-learn FastICA with the paper's arguments.

Concept activations are the signed, dense sources ``s = (h - mean_) components_^T``; the reconstruction
is ``s_masked mixing_^T + mean_``; concept j's direction is ``mixing_[:, j]`` (ablating s_j moves the
reconstruction by ``s_j mixing_[:, j]``). The fitted state is stored as three arrays and the transform
is rebuilt from them on load, so no scikit-learn object is ever pickled.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from concept_ext.concepts.base import ConceptModel, Tail, check_activations, register_concept_model
from concept_ext.config.baselines import ICAConfig
from concept_ext.config.build import build_config

logger = logging.getLogger("concept_ext")

__all__ = ["ICAConcepts"]


@register_concept_model
class ICAConcepts(ConceptModel):
    """FastICA concepts; ``selected`` starts as all components (method.md 4.1 and 5)."""

    method = "ica"

    def __init__(self, config: Optional[ICAConfig] = None) -> None:
        super().__init__()
        self.config = config if config is not None else ICAConfig()
        self.mixing: Optional[Tensor] = None  # [d, n] mixing_
        self.components: Optional[Tensor] = None  # [n, d] components_ (unmixing incl. whitening)
        self.mean: Optional[Tensor] = None  # [d] mean_

    @property
    def n_concepts(self) -> int:
        return self.config.n_components

    def fit(self, h: Tensor, *, labels: Optional[Tensor] = None, tail: Optional[Tail] = None
            ) -> "ICAConcepts":
        """Fit FastICA on ``h [N, d]`` (labels, tail unused); needs N > n_components <= d."""
        from sklearn.decomposition import FastICA

        n = self.config.n_components
        h = check_activations(h, name="h", min_rows=n + 1)
        if h.shape[1] < n:
            raise ValueError(f"h has d={h.shape[1]} < n_components={n}")
        ica = FastICA(
            n_components=n,
            whiten=self.config.whiten,
            algorithm=self.config.algorithm,
            fun=self.config.fun,
            max_iter=self.config.max_iter,
            tol=self.config.tol,
            random_state=self.config.random_state,
        )
        x = h.detach().cpu().double().numpy()
        ica.fit(x)
        n_iter = int(getattr(ica, "n_iter_", -1))
        if n_iter >= self.config.max_iter:
            logger.warning("FastICA did not converge in %d iterations", self.config.max_iter)
        self.mixing = torch.from_numpy(np.ascontiguousarray(ica.mixing_)).double()
        self.components = torch.from_numpy(np.ascontiguousarray(ica.components_)).double()
        self.mean = torch.from_numpy(np.ascontiguousarray(ica.mean_)).double()
        self.d = int(h.shape[1])
        self.selected = list(range(n))
        self.info = {"n_iter": n_iter, "n_train": int(h.shape[0])}
        return self

    def encode(self, h: Tensor) -> Tensor:  # [N, d] -> [N, n] signed sources
        """``(h - mean_) components_^T`` (= ``transform``) in float64, returned in ``h``'s dtype/device."""
        self._require_fitted()
        h = check_activations(h, name="h", d=self.d)
        comp, mean = self.components.to(h.device), self.mean.to(h.device)
        return ((h.double() - mean) @ comp.T).to(h.dtype)

    def reconstruct(self, acts: Tensor) -> Tensor:  # [N, n] -> [N, d]
        """``acts mixing_^T + mean_`` (= ``inverse_transform``)."""
        self._require_fitted()
        self._check_acts(acts)
        mix, mean = self.mixing.to(acts.device), self.mean.to(acts.device)
        return (acts.double() @ mix.T + mean).to(acts.dtype)

    def directions(self) -> Tensor:  # [n, d]
        """Columns of ``mixing_`` as rows."""
        self._require_fitted()
        return self.mixing.T.float().contiguous()

    def _config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"mixing": self.mixing, "components": self.components, "mean": self.mean}

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor], **kwargs: Any) -> "ICAConcepts":
        model = cls(build_config(ICAConfig, config))
        for key in ("mixing", "components", "mean"):
            if key not in tensors:
                raise ValueError(f"ICA checkpoint lacks tensor {key!r}")
        model.mixing = tensors["mixing"].double()
        model.components = tensors["components"].double()
        model.mean = tensors["mean"].double()
        return model
