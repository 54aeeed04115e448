"""Common post-processing of every method's selected concepts (method.md 5; oddities 4, 6, 8).

1. :func:`drop_dead`: on the encoded **test** activations, drop every selected feature whose mean
   |activation| is <= 1e-6 (v1: 1e-5). |F| can fall below 20; nothing is back-filled.
2. :func:`segment`: A[c, j] = mean (v1: sum) activation of feature j over the rows of class c;
   normalise each column by its sum over classes (uniform 1/C if that sum is 0); assign j to the argmax
   class (ties: the lowest class index); inside each segment sort by mean |activation|, descending.
3. :func:`apply_selection` runs both on a :class:`~concept_ext.concepts.base.ConceptModel` and stores F, the
   dropped indices and the segmentation on it; :func:`selection_data` picks the split and labels of
   the probe and the segmentation (train + predicted labels by default, test + ground truth for the
   paper's protocol).
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from concept_ext.concepts.base import ConceptModel, check_activations, check_labels
from concept_ext.config.baselines import SelectConfig

logger = logging.getLogger("concept_ext")

__all__ = ["DeadDrop", "Segmentation", "SelectionResult", "drop_dead", "segment", "apply_selection",
           "selection_data", "truncation"]


class DeadDrop(NamedTuple):
    """Result of the dead-feature filter."""

    kept: list[int]
    """Selected indices that stay, in their original order."""
    dropped: list[int]
    """Selected indices removed as dead."""
    mean_abs: Tensor
    """[len(selected)] mean |activation| of each selected feature."""


class Segmentation(NamedTuple):
    """Per-class segmentation of the selected features."""

    classes: list[int]
    """Class of each selected feature (same order as the input selection)."""
    segments: list[list[int]]
    """For each class c, its feature indices sorted by mean |activation|, descending."""
    shares: Tensor
    """[C, len(selected)] column-normalised per-class means (or sums)."""
    mixed_sign: list[int]
    """Features whose per-class values have mixed signs (ill-defined normalisation, oddity 8)."""


class SelectionResult(NamedTuple):
    """What :func:`apply_selection` stored on the model."""

    selected: list[int]
    """F after the dead drop."""
    dropped: list[int]
    """Indices dropped as dead."""
    segmentation: Segmentation
    """Segmentation of F."""


def truncation(n: int = 20) -> list[int]:
    """ClassifSAE selection: latents 0..n-1 (method.md 4.5)."""
    return list(range(n))


def _columns(acts: Tensor, selected: Sequence[int], name: str) -> Tensor:
    acts = check_activations(acts, name=name)
    sel = [int(j) for j in selected]
    if sel and (min(sel) < 0 or max(sel) >= acts.shape[1]):
        raise ValueError(f"selected indices must be in [0, {acts.shape[1]}), got {sel}")
    return acts[:, torch.as_tensor(sel, dtype=torch.long, device=acts.device)].double()


def drop_dead(acts: Tensor, selected: Sequence[int], *, threshold: float = 1e-6) -> DeadDrop:
    """Split ``selected`` into live and dead features of ``acts [N, n]`` (test-set encodings)."""
    cols = _columns(acts, selected, "acts")  # [N, |F|]
    mean_abs = cols.abs().mean(dim=0) if cols.shape[0] else torch.zeros(cols.shape[1], dtype=cols.dtype)
    live = (mean_abs > threshold).tolist()
    kept = [int(j) for j, ok in zip(selected, live) if ok]
    dropped = [int(j) for j, ok in zip(selected, live) if not ok]
    if dropped:
        logger.info("dropped %d dead features (mean |act| <= %g): %s", len(dropped), threshold, dropped)
    return DeadDrop(kept, dropped, mean_abs.cpu())


def segment(acts: Tensor, selected: Sequence[int], labels: Tensor, n_classes: int, *,
            mode: str = "mean") -> Segmentation:
    """Assign each selected feature of ``acts [N, n]`` to a class from ``labels [N]`` (module docstring)."""
    if mode not in ("mean", "sum"):
        raise ValueError(f"mode must be 'mean' or 'sum', got {mode!r}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    cols = _columns(acts, selected, "acts")  # [N, F]
    labels = check_labels(labels, cols.shape[0], name="labels", n_classes=n_classes).to(cols.device)
    onehot = torch.nn.functional.one_hot(labels, n_classes).double()  # [N, C]
    a = onehot.T @ cols  # [C, F] per-class sums
    if mode == "mean":  # an empty class has mean 0
        a = a / onehot.sum(dim=0).clamp_min(1).unsqueeze(1)
    total = a.sum(dim=0, keepdim=True)  # [1, F]
    shares = torch.where(total != 0, a / torch.where(total != 0, total, torch.ones_like(total)),
                         torch.full_like(a, 1.0 / n_classes))
    mixed = [int(j) for j, col in zip(selected, a.T) if bool((col > 0).any() and (col < 0).any())]
    if mixed:
        logger.warning("segmentation: %d features have per-class values of mixed sign (e.g. ICA); "
                       "their normalised shares are ill-defined: %s", len(mixed), mixed[:10])
    # argmax returns the first maximum, so ties go to the lowest class index
    classes = shares.argmax(dim=0).tolist() if cols.shape[1] else []
    mean_abs = cols.abs().mean(dim=0) if cols.shape[0] else torch.zeros(cols.shape[1], dtype=cols.dtype)
    segments: list[list[int]] = []
    for c in range(n_classes):
        members = [i for i, k in enumerate(classes) if k == c]
        members.sort(key=lambda i: (-float(mean_abs[i]), i))
        segments.append([int(selected[i]) for i in members])
    return Segmentation([int(c) for c in classes], segments, shares.cpu(), mixed)


def selection_data(config: SelectConfig, *, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
                   ) -> tuple[Tensor, Tensor]:
    """(h, labels) for the probe and the segmentation: ``train`` = (h_train, y_pred_train) by default,
    ``test`` = (h_test, y_true_test) when ``selection_split="test"`` (oddity 4). Mixed settings take the
    split from ``selection_split``; the labels must then be supplied in that split's tuple."""
    return test if config.selection_split == "test" else train


def apply_selection(
    model: ConceptModel,
    h_test: Tensor,  # [N_test, d]
    *,
    seg_h: Tensor,  # [N_s, d] activations used for the segmentation
    seg_labels: Tensor,  # [N_s] labels used for the segmentation
    n_classes: int,
    config: Optional[SelectConfig] = None,
    selected: Optional[Sequence[int]] = None,
) -> SelectionResult:
    """Drop dead features on ``h_test``, segment on (``seg_h``, ``seg_labels``), store on ``model``.

    ``selected`` defaults to ``model.selected`` (the method's own F before post-processing).
    """
    cfg = config if config is not None else SelectConfig()
    sel = list(model.selected if selected is None else selected)
    if not sel:
        raise ValueError("no selected features: fit the model (or pass selected=) first")
    drop = drop_dead(model.encode(h_test), sel, threshold=cfg.dead_threshold)
    seg_acts = model.encode(seg_h)
    seg = segment(seg_acts, drop.kept, seg_labels, n_classes, mode=cfg.segmentation)
    model.selected, model.dropped, model.segmentation = drop.kept, drop.dropped, seg.classes
    return SelectionResult(drop.kept, drop.dropped, seg)
