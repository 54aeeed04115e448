"""Putting reconstructions back into the LLM (method.md section 3): readout protocols and the bottleneck.

A *readout* maps vectors that replace the hidden state h at the hook point to the C label logits. Two
protocols share one calling convention, ``readout(vectors [P, d], rows [P]) -> logits [P, C]``:

- :class:`TailReadout` (section 3.1, the paper's protocol): a fixed per-vector function (the model from
  block L on a length-1 sequence); ``rows`` is ignored.
- :class:`ContextReadout` (section 3.3, our extension): ``rows[p]`` names the test sentence whose real
  prefix the vector is placed after (the vector replaces the residual entering block L at that sentence's
  last prompt position).

Both evaluate in large batches (default 8,192 vectors) under ``torch.no_grad``; every metric of
``concept_ext.metrics`` takes any object with this call signature.

The rest of the file is the *bottleneck* shared by the completeness and causality metrics: encode the
test set once, keep the selected concepts F (section 5), zero what must be zeroed, decode, and rescale to
``||h||`` (section 3.1 step 2). Concept models are used through small protocols (:class:`ReadoutModel`,
:class:`SparseReadoutModel`), never imported.
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger("concept_ext")

#: method.md section 3.1 step 2: h_hat * ||h|| / (||h_hat|| + 1e-9).
RESCALE_EPS = 1e-9


@runtime_checkable
class Readout(Protocol):
    """Anything mapping replacement vectors to label logits."""

    def __call__(self, vectors: Tensor, rows: Tensor) -> Tensor:  # [P, d], [P] int64 -> [P, C]
        ...


class _Batched:
    def __init__(self, fn: Callable, *, batch_size: int, progress: bool, protocol: str) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.fn = fn
        self.batch_size = batch_size
        self.progress = progress
        self.protocol = protocol

    def _run(self, vectors: Tensor, rows: Tensor, call: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        if vectors.dim() != 2:
            raise ValueError(f"vectors must be [P, d], got shape {tuple(vectors.shape)}")
        if rows.dim() != 1 or rows.shape[0] != vectors.shape[0]:
            raise ValueError(f"rows must be [P] with P = {vectors.shape[0]}, got shape {tuple(rows.shape)}")
        p = vectors.shape[0]
        starts = range(0, p, self.batch_size)
        # The bar only appears for multi-batch calls on a terminal (disable=None hides it elsewhere).
        bar = tqdm(starts, desc=f"{self.protocol} readout", unit="batch", leave=False,
                   disable=None if (self.progress and p > self.batch_size) else True)
        out = []
        with torch.no_grad():
            for s in bar:
                out.append(call(vectors[s:s + self.batch_size], rows[s:s + self.batch_size]))
        if not out:
            raise ValueError("a readout was called on an empty selection (P = 0)")
        return torch.cat(out)


class TailReadout(_Batched):
    """Tail protocol (method.md section 3.1): ``tail_fn(vectors [B, d]) -> logits [B, C]``; rows ignored."""

    def __init__(self, tail_fn: Callable[[Tensor], Tensor], *, batch_size: int = 8192,
                 progress: bool = True) -> None:
        super().__init__(tail_fn, batch_size=batch_size, progress=progress, protocol="tail")

    def __call__(self, vectors: Tensor, rows: Tensor) -> Tensor:  # [P, d], [P] -> [P, C]
        return self._run(vectors, rows, lambda v, _r: self.fn(v))


class ContextReadout(_Batched):
    """In-context protocol (method.md section 3.3): ``ctx_fn(vectors [B, d], rows [B]) -> logits [B, C]``.

    With ``sort_by_row`` (default) the vectors are grouped by sentence (stable order) before batching, so
    that each batch touches few prefixes, and the logits are returned in the caller's order.
    """

    def __init__(self, ctx_fn: Callable[[Tensor, Tensor], Tensor], *, batch_size: int = 8192,
                 progress: bool = True, sort_by_row: bool = True) -> None:
        super().__init__(ctx_fn, batch_size=batch_size, progress=progress, protocol="context")
        self.sort_by_row = sort_by_row

    def __call__(self, vectors: Tensor, rows: Tensor) -> Tensor:  # [P, d], [P] -> [P, C]
        if not self.sort_by_row:
            return self._run(vectors, rows, self.fn)
        order = torch.argsort(rows, stable=True)
        logits_sorted = self._run(vectors[order], rows[order], self.fn)
        logits = torch.empty_like(logits_sorted)
        logits[order] = logits_sorted
        return logits


def protocol_name(readout: Readout) -> str:
    """``"tail"``, ``"context"`` or ``"custom"`` (a readout without a ``protocol`` attribute)."""
    return str(getattr(readout, "protocol", "custom"))


# --------------------------------------------------------------------------------------------------
# Concept-model protocols and the bottleneck
# --------------------------------------------------------------------------------------------------


class ReadoutModel(Protocol):
    """What the metrics use of a concept model (ICA, ConceptSHAP, HI-Concept, SAE, ClassifSAE)."""

    selected: Sequence[int]
    """Selected concept ids F after dead-feature dropping (method.md section 5)."""
    segmentation: Sequence[int]
    """Class of each selected concept, aligned with ``selected`` (section 5 step 3)."""

    def encode(self, h: Tensor) -> Tensor:  # [N, d] -> [N, n_concepts]
        ...

    def reconstruct(self, acts: Tensor) -> Tensor:  # [N, n_concepts] -> [N, d], before any rescale
        ...


class SparseReadoutModel(ReadoutModel, Protocol):
    """An SAE-type model that also exposes its TopK code (enables the ``ablate_decode`` fast path)."""

    W_dec: Tensor  # [m, d]
    b_dec: Tensor  # [d]

    def sparse_code(self, h: Tensor) -> tuple[Tensor, Tensor]:  # [N, d] -> values, indices [N, k]
        ...


def is_sparse_model(model: object) -> bool:
    """True when ``model`` exposes ``sparse_code``, ``W_dec`` and ``b_dec`` (SAE fast path)."""
    has_code = callable(getattr(model, "sparse_code", None))
    return has_code and hasattr(model, "W_dec") and hasattr(model, "b_dec")


class SelectedCode(NamedTuple):
    """The test set encoded once, restricted to the selected concepts."""

    acts: Tensor
    """``[N, |F|]`` activations of the selected concepts, in the order of ``selected``."""
    selected: Tensor
    """``[|F|]`` int64 concept ids F."""
    n_concepts: int
    """Width of the model's full code (the ``encode`` output)."""
    values: Optional[Tensor]
    """``[N, k]`` sparse-code values (SAE-type models only, else None)."""
    indices: Optional[Tensor]
    """``[N, k]`` sparse-code latent ids (SAE-type models only, else None)."""


def _selected_tensor(model: ReadoutModel, device: torch.device) -> Tensor:
    sel = getattr(model, "selected", None)
    if sel is None:
        raise TypeError("model must have a `selected` attribute (the selected concept ids F)")
    sel = torch.as_tensor(list(sel) if not isinstance(sel, Tensor) else sel, dtype=torch.int64).to(device)
    if sel.dim() != 1:
        raise ValueError(f"model.selected must be a 1-D list of concept ids, got shape {tuple(sel.shape)}")
    if sel.numel() != torch.unique(sel).numel():
        raise ValueError("model.selected must hold distinct concept ids")
    return sel


def encode_selected(model: ReadoutModel, h: Tensor, *, batch_size: int = 8192,  # h: [N, d]
                    use_sparse: bool = True) -> SelectedCode:
    """Encode ``h`` once (in batches), keep the selected columns; also cache the sparse code if any."""
    if h.dim() != 2:
        raise ValueError(f"h must be [N, d], got shape {tuple(h.shape)}")
    sel = _selected_tensor(model, h.device)
    acts, vals, idxs, width = [], [], [], None
    sparse = use_sparse and is_sparse_model(model)
    with torch.no_grad():
        for s in range(0, h.shape[0], batch_size):
            full = model.encode(h[s:s + batch_size])  # [b, n_concepts]
            width = full.shape[1]
            if sel.numel() and int(sel.max()) >= width:
                raise ValueError(f"model.selected has id {int(sel.max())} >= n_concepts = {width}")
            acts.append(full[:, sel])
            if sparse:
                v, i = model.sparse_code(h[s:s + batch_size])
                vals.append(v)
                idxs.append(i)
    if width is None:
        raise ValueError("h must hold at least one row")
    return SelectedCode(torch.cat(acts), sel, int(width),
                        torch.cat(vals) if sparse else None, torch.cat(idxs) if sparse else None)


def row_norm(x: Tensor) -> Tensor:  # [B, d] -> [B]
    """Euclidean norm per row, accumulated in float32 at least (float64 stays float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(acc).norm(dim=1)


def rescale_to(x: Tensor, target_norm: Tensor) -> Tensor:  # [B, d], [B] -> [B, d]
    """``x * t / (||x|| + 1e-9)`` per row (method.md section 3.1 step 2)."""
    norm = row_norm(x)
    return x * (target_norm.to(norm.dtype) / (norm + RESCALE_EPS)).to(x.dtype)[:, None]


def decode_selected(model: ReadoutModel, code: SelectedCode, acts_sel: Tensor,  # [B, |F|]
                    *, batch_size: int = 8192) -> Tensor:
    """``model.reconstruct`` of rows whose only non-zero concepts are the selected ones (in batches)."""
    out = []
    with torch.no_grad():
        for s in range(0, acts_sel.shape[0], batch_size):
            a = acts_sel[s:s + batch_size]
            full = a.new_zeros((a.shape[0], code.n_concepts))
            full[:, code.selected] = a
            out.append(model.reconstruct(full))
    return torch.cat(out)


def bottleneck_vectors(model: ReadoutModel, code: SelectedCode, rows: Tensor,  # [B] int64
                       *, target_norm: Optional[Tensor], drop: Optional[Tensor] = None,  # [B], [|F|] bool
                       fast: bool = True) -> Tensor:
    """Reconstruction of ``rows`` from the selected concepts minus ``drop``, rescaled when asked.

    The sparse path decodes the cached TopK code with ``concept_ext.sparse_decode`` (no dense code); it
    is used only with a rescale, which cancels the SAE's per-sample input scale.
    """
    keep = torch.ones(code.selected.numel(), dtype=torch.bool, device=code.selected.device)
    if drop is not None:
        keep &= ~drop
    if fast and code.values is not None and target_norm is not None:
        from concept_ext.ops import sparse_decode  # local: the metrics do not need the ops otherwise

        latent_kept = torch.zeros(model.W_dec.shape[0], dtype=torch.bool, device=code.selected.device)
        latent_kept[code.selected[keep]] = True
        idx = code.indices[rows]
        vals = torch.where(latent_kept[idx], code.values[rows], torch.zeros((), dtype=code.values.dtype,
                                                                             device=code.values.device))
        x = sparse_decode(vals, idx, model.W_dec, model.b_dec)
    else:
        a = code.acts[rows] * keep.to(code.acts.dtype)
        x = decode_selected(model, code, a)
    return rescale_to(x, target_norm) if target_norm is not None else x
