"""Completeness metrics (method.md sections 3.2, 6.1, 6.2): RAcc, its ceiling, activation rates.

``completeness(model, h, logits, labels, readout)`` encodes the test set once, reconstructs every
sentence from the selected concepts F only (all others zeroed), rescales to ``||h||`` (v2), and reads the
label logits through ``readout`` (tail or in-context protocol, see ``readout.py``). Everything returned
is a plain number or list (``CompletenessResult.to_dict()`` is JSON-serialisable).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from concept_ext.metrics.readout import (
    ReadoutModel, Readout, SelectedCode, bottleneck_vectors, encode_selected, protocol_name, row_norm,
)

log = logging.getLogger("concept_ext")

#: method.md section 6.2: |z| > 1e-6 counts as active in v2, 1e-8 in v1.
ACT_THRESHOLD_V2 = 1e-6
ACT_THRESHOLD_V1 = 1e-8
#: Oddity 11: the reference averages the CE per batch of 4 sentences.
REFERENCE_CE_BATCH = 4


@dataclass
class ClassScores:
    """Per-class scores of one predictor against the ground truth (zero when undefined, as sklearn's
    ``zero_division=0``)."""

    recall: list[float]
    """Recall of each class c = 0..C-1."""
    precision: list[float]
    """Precision of each class."""
    f1: list[float]
    """F1 score of each class."""
    support: list[int]
    """Number of test sentences whose ground-truth label is c."""


@dataclass
class CompletenessResult:
    """Completeness of one concept model under one readout protocol (method.md 6.1, 6.2, 3.2)."""

    protocol: str
    """Readout protocol: ``"tail"`` (paper, section 3.1) or ``"context"`` (our extension, section 3.3)."""
    n_sentences: int
    """N, the number of test sentences."""
    n_selected: int
    """|F|, the number of selected concepts used in the bottleneck."""
    selected: list[int]
    """The selected concept ids F."""
    racc: float
    """Recovery accuracy: share of sentences with argmax q_i = argmax o_i (bottleneck vs full model)."""
    ceiling: float
    """Agreement of readout(h_i) (the un-reconstructed hidden state) with argmax o_i (section 3.2)."""
    racc_ratio: Optional[float]
    """racc / ceiling (None when the ceiling is 0)."""
    original_accuracy: float
    """Ground-truth accuracy of the full model's predictions argmax o_i."""
    bottleneck_accuracy: float
    """Ground-truth accuracy of the bottleneck predictions argmax q_i."""
    original_ce: float
    """Mean cross-entropy of the full-model logits o against the ground truth."""
    bottleneck_ce: float
    """Mean cross-entropy of the bottleneck logits against the ground truth."""
    ce_averaging: str
    """``"sentence"`` (default) or ``"batch4"`` (reference quirk, oddity 11: mean of per-batch-of-4 means)."""
    original_scores: ClassScores
    """Per-class recall/precision/F1 of the full model against the ground truth."""
    bottleneck_scores: ClassScores
    """Per-class recall/precision/F1 of the bottleneck against the ground truth."""
    act_threshold: float
    """Activity threshold used for the activation rates (|z| > threshold)."""
    avg_act_rate: float
    """Mean over j in F of the percentage of sentences where concept j is active (section 6.2)."""
    max_act_rate: float
    """Maximum over j in F of that percentage."""
    act_rates: list[float] = field(default_factory=list)
    """Percentage of active sentences for each selected concept, in the order of ``selected``."""
    rescaled: bool = True
    """Whether reconstructions were rescaled to ||h|| before the readout (v2: yes; v1: no)."""

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


def class_scores(pred: Tensor, labels: Tensor, n_classes: int) -> ClassScores:  # [N], [N]
    """Per-class recall, precision and F1 (0 where undefined)."""
    rec, prec, f1, sup = [], [], [], []
    for c in range(n_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        n_true, n_pred = int((labels == c).sum()), int((pred == c).sum())
        r = tp / n_true if n_true else 0.0
        p = tp / n_pred if n_pred else 0.0
        rec.append(r)
        prec.append(p)
        f1.append(2 * r * p / (r + p) if (r + p) > 0 else 0.0)
        sup.append(n_true)
    return ClassScores(rec, prec, f1, sup)


def mean_ce(logits: Tensor, labels: Tensor, *, per_batch: Optional[int] = None) -> float:  # [N, C], [N]
    """Mean cross-entropy per sentence, or (``per_batch=b``) the mean of consecutive batch-of-b means."""
    ce = torch.nn.functional.cross_entropy(logits.double(), labels.long(), reduction="none")  # [N]
    if not per_batch:
        return float(ce.mean())
    means = torch.stack([chunk.mean() for chunk in torch.split(ce, per_batch)])
    return float(means.mean())


def activation_rates(acts: Tensor, threshold: float) -> Tensor:  # [N, |F|] -> [|F|] percent
    """Percentage of rows where each column satisfies |z| > threshold (method.md section 6.2)."""
    return 100.0 * (acts.abs() > threshold).double().mean(dim=0)


def _check_inputs(h: Tensor, logits: Tensor, labels: Tensor) -> None:
    if h.dim() != 2:
        raise ValueError(f"h must be [N, d], got shape {tuple(h.shape)}")
    if logits.dim() != 2 or logits.shape[0] != h.shape[0]:
        raise ValueError(f"logits must be [N, C] with N = {h.shape[0]}, got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != h.shape[0]:
        raise ValueError(f"labels must be [N] with N = {h.shape[0]}, got shape {tuple(labels.shape)}")


def completeness(
    model: ReadoutModel,
    h: Tensor,  # [N, d] cached hidden states at the hook
    logits: Tensor,  # [N, C] full-model label logits o
    labels: Tensor,  # [N] ground-truth labels y
    readout: Readout,
    *,
    rescale: bool = True,
    act_threshold: float = ACT_THRESHOLD_V2,
    reference_quirks: bool = False,
    code: Optional[SelectedCode] = None,
    fast: bool = True,
) -> CompletenessResult:
    """RAcc with its readout(h) ceiling, accuracies, CE, per-class scores and activation rates.

    ``rescale``: v2 rescales reconstructions to ``||h||`` (v1 does not). ``act_threshold``: 1e-6 (v2) or
    1e-8 (v1). ``reference_quirks``: CE averaged per batch of 4 (oddity 11). ``code``: a precomputed
    :func:`encode_selected` of ``h`` (to share one encode with the causality metrics). ``fast``: decode an
    SAE's cached TopK code sparsely (same numbers, no dense code).
    """
    _check_inputs(h, logits, labels)
    if code is None:
        code = encode_selected(model, h)
    n, n_cls = logits.shape
    rows = torch.arange(n, device=h.device)
    labels = labels.to(logits.device).long()
    target = row_norm(h) if rescale else None
    if code.selected.numel() == 0:
        log.warning("completeness: no selected concept; the bottleneck reconstructs from nothing")
    x_hat = bottleneck_vectors(model, code, rows, target_norm=target, fast=fast)  # [N, d]
    # One readout call over the reconstructions and the clean h (the ceiling), always (section 3.2).
    both = readout(torch.cat([x_hat.to(h.dtype), h]), torch.cat([rows, rows])).to(logits.device)
    q_logits, ceil_logits = both[:n], both[n:]
    o_pred, q_pred = logits.argmax(1), q_logits.argmax(1)
    racc = float((q_pred == o_pred).double().mean())
    ceiling = float((ceil_logits.argmax(1) == o_pred).double().mean())
    per_batch = REFERENCE_CE_BATCH if reference_quirks else None
    rates = activation_rates(code.acts, act_threshold)
    return CompletenessResult(
        protocol=protocol_name(readout),
        n_sentences=n,
        n_selected=int(code.selected.numel()),
        selected=[int(j) for j in code.selected.tolist()],
        racc=racc,
        ceiling=ceiling,
        racc_ratio=racc / ceiling if ceiling > 0 else None,
        original_accuracy=float((o_pred == labels).double().mean()),
        bottleneck_accuracy=float((q_pred == labels).double().mean()),
        original_ce=mean_ce(logits, labels, per_batch=per_batch),
        bottleneck_ce=mean_ce(q_logits, labels, per_batch=per_batch),
        ce_averaging="batch4" if reference_quirks else "sentence",
        original_scores=class_scores(o_pred, labels, n_cls),
        bottleneck_scores=class_scores(q_pred, labels, n_cls),
        act_threshold=float(act_threshold),
        avg_act_rate=float(rates.mean()) if rates.numel() else 0.0,
        max_act_rate=float(rates.max()) if rates.numel() else 0.0,
        act_rates=[float(r) for r in rates.tolist()],
        rescaled=rescale,
    )
