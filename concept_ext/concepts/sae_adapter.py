"""Adapter: any TopK-style SAE as a :class:`~concept_ext.concepts.base.ConceptModel` (method.md 4.4-4.5).

The SAE only has to satisfy :class:`SparseSAE`: ``encode(h) -> (values [N, k], indices [N, k])`` (a
NamedTuple with ``values``/``indices`` fields, such as ``concept_ext.TopKCode``, qualifies),
``decode(values, indices) -> [N, d]`` and ``W_dec [m, d]``; ``n_concepts`` (ClassifSAE: the classifier
latents) is optional. Concept activations are the dense codes z over all m latents.

Selection of F: ``"truncation"`` (ClassifSAE, 4.5) keeps latents 0..n-1; ``"probe"`` (plain TopK SAE,
4.4) runs :func:`~concept_ext.concepts.probe.fit_probe` on the codes of the activations given to
:meth:`SAEConcepts.fit`. The SAE itself is saved by its own module; :meth:`save` stores the adapter's
settings and selection, and :func:`~concept_ext.concepts.base.load_concept_model` needs ``sae=``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from concept_ext.concepts.base import ConceptModel, Tail, check_activations, check_labels, register_concept_model
from concept_ext.config.baselines import ProbeConfig
from concept_ext.config.build import build_config
from concept_ext.concepts.probe import fit_probe

__all__ = ["SparseSAE", "SAEConcepts"]


@runtime_checkable
class SparseSAE(Protocol):
    """What the adapter needs from an SAE."""

    W_dec: Tensor  # [m, d] decoder rows

    def encode(self, h: Tensor) -> Any:  # [N, d] -> (values [N, k], indices [N, k])
        ...

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:  # -> [N, d]
        ...


def _split_code(code: Any) -> tuple[Tensor, Tensor]:
    if hasattr(code, "values") and hasattr(code, "indices") and isinstance(code.values, Tensor):
        return code.values, code.indices
    if isinstance(code, (tuple, list)) and len(code) >= 2:
        return code[0], code[1]
    raise TypeError("sae.encode must return (values, indices) or an object with .values/.indices")


@register_concept_model
class SAEConcepts(ConceptModel):
    """A TopK SAE / ClassifSAE seen through the concept interface."""

    method = "sae"

    def __init__(self, sae: SparseSAE, *, selection: str = "truncation", n_select: Optional[int] = None,
                 probe: Optional[ProbeConfig] = None, input_norm_rescale: bool = True,
                 chunk_rows: int = 8192) -> None:
        """``selection``: "truncation" or "probe"; ``n_select``: |F| before the dead drop (truncation
        default: ``sae.n_concepts``, else 20; probe default: ``probe.n_select``);
        ``input_norm_rescale``: the SAE works on sqrt(d)/||h|| rescaled inputs (method.md 2.1), so
        ``reconstruct(acts, h=h)`` divides by that scale; ``chunk_rows``: rows per SAE call."""
        super().__init__()
        if not isinstance(sae, SparseSAE):
            raise TypeError("sae must expose encode(h) -> (values, indices), decode(values, indices), W_dec")
        if selection not in ("truncation", "probe"):
            raise ValueError(f"selection must be 'truncation' or 'probe', got {selection!r}")
        self.sae = sae
        self.selection = selection
        self.probe_config = probe if probe is not None else ProbeConfig()
        if n_select is None:
            n_select = (int(getattr(sae, "n_concepts", 20)) if selection == "truncation"
                        else self.probe_config.n_select)
        self.n_select = int(n_select)
        self.input_norm_rescale = bool(input_norm_rescale)
        self.chunk_rows = int(chunk_rows)
        w = sae.W_dec
        if w.dim() != 2 or not 1 <= self.n_select <= w.shape[0]:
            raise ValueError(f"n_select={self.n_select} must be in [1, m={w.shape[0]}]")
        self.d = int(w.shape[1])  # the SAE is already trained: the adapter is usable at once
        self.probe_scores: Optional[Tensor] = None
        if selection == "truncation":
            self.selected = list(range(self.n_select))

    @property
    def n_concepts(self) -> int:
        return int(self.sae.W_dec.shape[0])

    @torch.no_grad()
    def encode_sparse(self, h: Tensor) -> tuple[Tensor, Tensor]:  # -> values [N, k], indices [N, k]
        """The SAE's own sparse code of ``h``."""
        h = check_activations(h, name="h", d=self.d)
        parts = [_split_code(self.sae.encode(h[i:i + self.chunk_rows]))
                 for i in range(0, h.shape[0], self.chunk_rows)]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])

    @torch.no_grad()
    def encode(self, h: Tensor) -> Tensor:  # [N, d] -> [N, m] dense z
        values, indices = self.encode_sparse(h)
        z = torch.zeros(values.shape[0], self.n_concepts, dtype=values.dtype, device=values.device)
        return z.scatter_(1, indices.long(), values)

    @torch.no_grad()
    def reconstruct(self, acts: Tensor, *, h: Optional[Tensor] = None) -> Tensor:  # [N, m] -> [N, d]
        """Decode dense (masked) codes through ``sae.decode`` (b_dec included). With ``h`` and
        ``input_norm_rescale``, divide by the per-row input scale sqrt(d)/||h||."""
        self._check_acts(acts)
        k = max(int((acts != 0).sum(dim=1).max()) if acts.shape[0] else 1, 1)
        idx = acts.abs().topk(k, dim=1).indices  # [N, k]: every non-zero entry, zeros padding
        out = self.sae.decode(acts.gather(1, idx), idx)
        if h is not None and self.input_norm_rescale:
            h = check_activations(h, name="h", d=self.d)
            if h.shape[0] != acts.shape[0]:
                raise ValueError(f"h has {h.shape[0]} rows, acts {acts.shape[0]}")
            scale = math.sqrt(self.d) / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out = out / scale.to(out)
        return out

    @torch.no_grad()
    def directions(self) -> Tensor:  # [m, d]
        return self.sae.W_dec.detach().clone()

    def fit(self, h: Tensor, *, labels: Optional[Tensor] = None, tail: Optional[Tail] = None
            ) -> "SAEConcepts":
        """Truncation: nothing to fit. Probe: fit on the codes of ``h`` against ``labels`` (train split +
        predicted labels by default; pass test activations + ground truth for the paper's protocol)."""
        if self.selection == "truncation":
            self.selected = list(range(self.n_select))
            return self
        acts = self.encode(h)
        labels = check_labels(labels, acts.shape[0], name="labels")
        cfg = dataclasses.replace(self.probe_config, n_select=self.n_select)
        res = fit_probe(acts, labels, config=cfg)
        self.selected = res.selected
        self.probe_scores = torch.as_tensor(res.scores)
        self.info = {"probe_best_C": res.best_C, "probe_cv_accuracy": res.cv_accuracy,
                     "probe_n_nonzero": res.n_nonzero, "probe_n_tie_filled": res.n_tie_filled,
                     "probe_rows": res.n_rows}
        return self

    def _config_dict(self) -> dict[str, Any]:
        return {"selection": self.selection, "n_select": self.n_select,
                "probe": dataclasses.asdict(self.probe_config),
                "input_norm_rescale": self.input_norm_rescale, "chunk_rows": self.chunk_rows}

    def _state_tensors(self) -> dict[str, Tensor]:
        return {} if self.probe_scores is None else {"probe_scores": self.probe_scores}

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor], **kwargs: Any) -> "SAEConcepts":
        if "sae" not in kwargs:
            raise ValueError("loading an SAE concept model needs the SAE: load_concept_model(dir, sae=...)")
        model = cls(kwargs["sae"], selection=config["selection"], n_select=config["n_select"],
                    probe=build_config(ProbeConfig, config.get("probe", {})),
                    input_norm_rescale=config.get("input_norm_rescale", True),
                    chunk_rows=config.get("chunk_rows", 8192))
        model.probe_scores = tensors.get("probe_scores")
        return model
