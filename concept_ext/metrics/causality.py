"""Causality metrics (method.md sections 6.3, 6.4; oddity 17).

- :func:`conditional_ablation`: for each selected concept j, zero it on the sentences where it is active
  (S_j = {i : |z_ij| > 1e-8}) and compare the bottleneck prediction q_i^(-j) with the un-ablated
  bottleneck q_i: flip rate, TVD, accuracy change; means over j with |S_j| > 0 (the v2 headline, (a)),
  over the concepts active on fewer than 99 % of the sentences ((b), the package's selective mean), and
  weighted by |S_j| ((c)).
- :func:`segment_ablation`: ablate jointly the first 25/50/75/100 % of each class segment on all
  sentences (the v1 headline), averaged over all C classes.

Both encode the test set once and push every reconstruction (the N un-ablated ones and all ablations)
through the readout in large batches, chunked by sentence: never one sweep over the data per concept,
never a readout on an empty selection (the reference runs |F| + 1 sweeps in batches of 4). For SAE-type
models the single-concept ablations come from ``concept_ext.ablate_decode`` on the cached TopK code
(rank-1 corrections, no re-encode, no dense code). Any readout works, so the same functions give the tail
and in-context protocols side by side.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from concept_ext.metrics.readout import (
    ReadoutModel, Readout, SelectedCode, bottleneck_vectors, decode_selected, encode_selected,
    protocol_name, rescale_to, row_norm,
)

log = logging.getLogger("concept_ext")

#: method.md section 6.3: concept j is active on sentence i when |z_ij| > 1e-8.
ACTIVE_THRESHOLD = 1e-8
#: A concept active on at least this share of the test sentences is "always on": it carries the
#: sentence-independent part of the representation, and ablating it moves every prediction alike, so the
#: selective means (b) leave it out (issue 21: such latents inflated the plain SAE's flip rate).
ALWAYS_ON_SHARE = 0.99
#: method.md section 6.4: fractions (percent) of each class segment ablated jointly.
SEGMENT_FRACTIONS = (25, 50, 75, 100)


def _mean(xs: Sequence[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


@dataclass
class ConceptAblation:
    """Conditional single-concept ablation of one selected concept j."""

    concept: int
    """Concept id j."""
    position: int
    """Position of j in the selected list F."""
    segment: Optional[int]
    """Class segment of j (section 5), or None when the model has no segmentation."""
    n_active: int
    """|S_j|, the number of test sentences with |z_ij| > threshold."""
    flip_rate: Optional[float]
    """Delta f_cond(j): share of S_j where argmax q_i != argmax q_i^(-j) (None when S_j is empty)."""
    tvd: Optional[float]
    """TVD_cond(j): mean over S_j of 0.5 * ||q_i - q_i^(-j)||_1 (None when S_j is empty)."""
    delta_acc: Optional[float]
    """Delta Acc_cond(j) = acc_{S_j}(q^(-j), y) - acc_{S_j}(q, y) (None when S_j is empty)."""


@dataclass
class ConditionalAblationResult:
    """Conditional single-concept ablation over F (method.md section 6.3)."""

    protocol: str
    """Readout protocol: ``"tail"`` or ``"context"`` (our extension)."""
    n_sentences: int
    """N, the number of test sentences."""
    n_selected: int
    """|F|."""
    n_pairs: int
    """Sum over j of |S_j|: the number of ablated reconstructions read out."""
    n_evaluated: int
    """Number of concepts with |S_j| > 0 (the divisor of the means)."""
    active_threshold: float
    """Activity threshold defining S_j."""
    delta_f_cond: Optional[float]
    """Mean flip rate over concepts with |S_j| > 0 (headline; None when there is none)."""
    tvd_cond: Optional[float]
    """Mean TVD over concepts with |S_j| > 0 (headline; None when there is none)."""
    delta_acc_cond: Optional[float]
    """Mean accuracy change over concepts with |S_j| > 0 (stored only)."""
    bottleneck_accuracy: float
    """Ground-truth accuracy of the un-ablated bottleneck q (the reference point)."""
    per_concept: list[ConceptAblation]
    """One entry per selected concept, in the order of F."""
    path: str
    """``"sparse"`` (ablate_decode on the cached TopK code) or ``"generic"`` (re-decoding)."""
    rescaled: bool
    """Whether reconstructions were rescaled to ||h|| (v2)."""
    always_on: list[int] = dataclasses.field(default_factory=list)
    """Concept ids active on >= ALWAYS_ON_SHARE of the test sentences."""
    delta_f_cond_selective: Optional[float] = None
    """(b) Mean flip rate over concepts with 0 < |S_j| < ALWAYS_ON_SHARE * N (None when there is none)."""
    tvd_cond_selective: Optional[float] = None
    """(b) Mean TVD over the same concepts."""
    delta_f_cond_weighted: Optional[float] = None
    """(c) Flip rate weighted by |S_j|: all flips over all (sentence, concept) pairs (None without pairs)."""
    tvd_cond_weighted: Optional[float] = None
    """(c) TVD weighted by |S_j|."""

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


def _prepare(model, h, labels, code):
    if h.dim() != 2:
        raise ValueError(f"h must be [N, d], got shape {tuple(h.shape)}")
    if labels.dim() != 1 or labels.shape[0] != h.shape[0]:
        raise ValueError(f"labels must be [N] with N = {h.shape[0]}, got shape {tuple(labels.shape)}")
    return code if code is not None else encode_selected(model, h)


def _segments_of(model, code: SelectedCode, segmentation) -> Optional[list[int]]:
    seg = segmentation if segmentation is not None else getattr(model, "segmentation", None)
    if seg is None:
        return None
    seg = [int(c) for c in (seg.tolist() if isinstance(seg, Tensor) else seg)]
    if len(seg) != code.selected.numel():
        raise ValueError(f"segmentation must give one class per selected concept ({code.selected.numel()}), "
                         f"got {len(seg)}")
    return seg


def _pairs_chunk(model, code: SelectedCode, s: int, e: int, target: Optional[Tensor], thr: float,
                 sparse: bool):
    """Base vectors of rows s..e-1 and the ablated vectors of their active (row, concept) pairs."""
    rows = torch.arange(s, e, device=code.acts.device)
    if sparse:
        from concept_ext.ops import ablate_decode

        W = model.W_dec
        out = ablate_decode(code.values[s:e], code.indices[s:e], W, model.b_dec, code.selected,
                            target_norm=target[s:e].to(W.dtype))
        pr, pc = out.pair_row, out.pair_concept
        # ablate_decode pairs every positive entry; S_j keeps |z| > thr (section 6.3).
        hit = code.indices[s:e][pr] == code.selected[pc][:, None]  # [P, k]
        coef = (code.values[s:e][pr] * hit).sum(1)
        ok = coef.abs() > thr
        return rows, out.base, out.ablated[ok], pr[ok], pc[ok]
    a = code.acts[s:e]  # [b, |F|]
    nz = torch.nonzero(a.abs() > thr)  # row-major: by row, then position in F (ablate_decode's order)
    pr, pc = nz[:, 0], nz[:, 1]
    base = bottleneck_vectors(model, code, rows, target_norm=None if target is None else target[s:e],
                              fast=False)
    a_p = a[pr].clone()
    a_p[torch.arange(pr.numel(), device=a.device), pc] = 0
    abl = decode_selected(model, code, a_p) if pr.numel() else base[:0]
    if target is not None and pr.numel():
        abl = rescale_to(abl, target[s:e][pr])
    return rows, base, abl, pr, pc


def conditional_ablation(
    model: ReadoutModel,
    h: Tensor,  # [N, d] cached hidden states
    labels: Tensor,  # [N] ground-truth labels y
    readout: Readout,
    *,
    rescale: bool = True,
    active_threshold: float = ACTIVE_THRESHOLD,
    rows_per_chunk: int = 4096,
    fast: bool = True,
    code: Optional[SelectedCode] = None,
    segmentation: Optional[Sequence[int]] = None,
) -> ConditionalAblationResult:
    """Conditional single-concept ablation (method.md section 6.3) in one batched pass.

    ``rows_per_chunk`` sentences are processed at a time: their un-ablated reconstructions and all their
    active (sentence, concept) ablations go through ``readout`` together. ``fast`` uses
    ``ablate_decode`` for SAE-type models (with ``rescale`` only, where the input scale cancels).
    ``code``: a shared :func:`encode_selected` of ``h``.
    """
    code = _prepare(model, h, labels, code)
    n, n_f = h.shape[0], int(code.selected.numel())
    seg = _segments_of(model, code, segmentation)
    sparse = fast and rescale and code.values is not None
    target = row_norm(h) if rescale else None
    stats = torch.zeros((5, n_f), dtype=torch.float64, device=h.device)  # count, flips, tvd, acc_abl, acc
    base_correct, n_pairs = 0, 0
    bar = tqdm(range(0, n, rows_per_chunk), desc="conditional ablation", unit="chunk", leave=False,
               disable=None if n > rows_per_chunk else True)
    for s in bar:
        e = min(s + rows_per_chunk, n)
        rows, base, abl, pr, pc = _pairs_chunk(model, code, s, e, target, active_threshold, sparse)
        logits = readout(torch.cat([base.to(h.dtype), abl.to(h.dtype)]), torch.cat([rows, pr + s]))
        q = torch.softmax(logits.double(), dim=1)
        y = labels[s:e].to(q.device).long()
        qb, qa = q[: e - s], q[e - s:]
        pb, pa = qb.argmax(1), qa.argmax(1)
        base_correct += int((pb == y).sum())
        n_pairs += int(pr.numel())
        if pr.numel() == 0:
            continue
        pr, pc = pr.to(q.device), pc.to(stats.device)
        per_pair = torch.stack([
            torch.ones_like(pa, dtype=torch.float64),
            (pb[pr] != pa).double(),
            0.5 * (qb[pr] - qa).abs().sum(1),
            (pa == y[pr]).double(),
            (pb[pr] == y[pr]).double(),
        ]).to(stats.device)  # [5, P]
        stats.index_add_(1, pc, per_pair)
    stats = stats.cpu()
    concepts = []
    for f in range(n_f):
        cnt = int(stats[0, f])
        concepts.append(ConceptAblation(
            concept=int(code.selected[f]), position=f, segment=None if seg is None else seg[f], n_active=cnt,
            flip_rate=float(stats[1, f] / cnt) if cnt else None,
            tvd=float(stats[2, f] / cnt) if cnt else None,
            delta_acc=float((stats[3, f] - stats[4, f]) / cnt) if cnt else None,
        ))
    live = [c for c in concepts if c.n_active > 0]
    always = [c for c in live if c.n_active >= ALWAYS_ON_SHARE * n]
    selective = [c for c in live if c.n_active < ALWAYS_ON_SHARE * n]
    pairs = float(stats[0].sum())
    return ConditionalAblationResult(
        protocol=protocol_name(readout), n_sentences=n, n_selected=n_f, n_pairs=n_pairs,
        n_evaluated=len(live), active_threshold=float(active_threshold),
        delta_f_cond=_mean([c.flip_rate for c in live]), tvd_cond=_mean([c.tvd for c in live]),
        delta_acc_cond=_mean([c.delta_acc for c in live]), bottleneck_accuracy=base_correct / n,
        per_concept=concepts, path="sparse" if sparse else "generic", rescaled=rescale,
        always_on=[c.concept for c in always],
        delta_f_cond_selective=_mean([c.flip_rate for c in selective]),
        tvd_cond_selective=_mean([c.tvd for c in selective]),
        delta_f_cond_weighted=float(stats[1].sum() / pairs) if pairs else None,
        tvd_cond_weighted=float(stats[2].sum() / pairs) if pairs else None,
    )


# --------------------------------------------------------------------------------------------------
# Global segment ablation (section 6.4)
# --------------------------------------------------------------------------------------------------


@dataclass
class SegmentAblation:
    """Joint ablation of the first ``n_ablated`` concepts of one class segment, on all sentences."""

    cls: int
    """Class c of the segment F_c."""
    fraction: int
    """Percentage p of the segment: n_ablated = floor(p * |F_c| / 100)."""
    n_ablated: int
    """Number of concepts ablated (0: nothing to ablate, every score 0)."""
    ablated: list[int]
    """Ablated concept ids, most active first."""
    delta_acc: float
    """acc(q_abl, y) - acc(q, y) over all N sentences."""
    flip_rate: float
    """Share of sentences where argmax q != argmax q_abl."""
    tvd: float
    """Mean over sentences of 0.5 * ||q - q_abl||_1."""


@dataclass
class SegmentFractionMean:
    """Scores at one fraction, averaged over all C classes (empty ablations count as 0)."""

    fraction: int
    """Percentage p."""
    delta_acc: float
    """Mean over classes of delta_acc (the v1 headline at p = 100)."""
    flip_rate: float
    """Mean over classes of flip_rate."""
    tvd: float
    """Mean over classes of tvd."""


@dataclass
class SegmentAblationResult:
    """Global segment ablation (method.md section 6.4)."""

    protocol: str
    """Readout protocol: ``"tail"`` or ``"context"``."""
    n_sentences: int
    """N."""
    n_classes: int
    """C (the divisor of every class average)."""
    segments: list[list[int]]
    """Concept ids of each class segment F_c in ablation order (mean |activation| descending)."""
    bottleneck_accuracy: float
    """Ground-truth accuracy of the un-ablated bottleneck."""
    means: list[SegmentFractionMean]
    """Class-averaged scores, one per fraction."""
    entries: list[SegmentAblation]
    """Per (class, fraction) scores."""
    rescaled: bool
    """Whether reconstructions were rescaled to ||h|| (v1: no)."""

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


def segment_order(acts: Tensor, segmentation: Sequence[int], n_classes: int) -> list[list[int]]:
    """Positions in F of each class segment, by mean |activation| descending (ties: lower position)."""
    strength = acts.abs().double().mean(dim=0).tolist()  # [|F|]
    segs: list[list[int]] = [[] for _ in range(n_classes)]
    for f, c in enumerate(segmentation):
        if not 0 <= c < n_classes:
            raise ValueError(f"segmentation class {c} of concept position {f} is outside [0, {n_classes})")
        segs[c].append(f)
    return [sorted(s, key=lambda f: (-strength[f], f)) for s in segs]


def segment_ablation(
    model: ReadoutModel,
    h: Tensor,  # [N, d]
    labels: Tensor,  # [N]
    readout: Readout,
    *,
    n_classes: Optional[int] = None,
    fractions: Sequence[int] = SEGMENT_FRACTIONS,
    rescale: bool = True,
    max_vectors_per_call: int = 65536,
    fast: bool = True,
    code: Optional[SelectedCode] = None,
    segmentation: Optional[Sequence[int]] = None,
) -> SegmentAblationResult:
    """Global segment ablation (method.md section 6.4); v1 uses ``rescale=False``.

    Every distinct ablated set is read out once; sentences go in chunks so that each readout call holds
    at most about ``max_vectors_per_call`` vectors. ``n_classes`` defaults to the readout's logit width.
    """
    code = _prepare(model, h, labels, code)
    seg = _segments_of(model, code, segmentation)
    if seg is None:
        raise ValueError("segment_ablation needs a segmentation (model.segmentation or segmentation=)")
    n, n_f = h.shape[0], int(code.selected.numel())
    target = row_norm(h) if rescale else None
    if n_classes is None:
        probe = bottleneck_vectors(model, code, torch.arange(1, device=h.device),
                                   target_norm=None if target is None else target[:1], fast=fast)
        zero_row = torch.zeros(1, dtype=torch.int64, device=h.device)
        n_classes = int(readout(probe.to(h.dtype), zero_row).shape[1])
    order = segment_order(code.acts, seg, n_classes)
    configs: dict[tuple[int, ...], int] = {}  # distinct ablated position sets -> slot
    plan = []  # (class, fraction, positions)
    for c in range(n_classes):
        for p in fractions:
            cut = (int(p) * len(order[c])) // 100
            pos = tuple(order[c][:cut])
            if pos and pos not in configs:
                configs[pos] = len(configs)
            plan.append((c, int(p), pos))
    drops = []
    for pos in configs:
        m = torch.zeros(n_f, dtype=torch.bool, device=h.device)
        m[list(pos)] = True
        drops.append(m)
    n_cfg = len(drops)
    sums = torch.zeros((max(n_cfg, 1), 3), dtype=torch.float64)  # acc_abl, flips, tvd per set
    base_correct = 0
    rows_per_chunk = max(1, max_vectors_per_call // (n_cfg + 1))
    for s in range(0, n, rows_per_chunk):
        rows = torch.arange(s, min(s + rows_per_chunk, n), device=h.device)
        t = None if target is None else target[rows]
        vecs = [bottleneck_vectors(model, code, rows, target_norm=t, fast=fast)]
        vecs += [bottleneck_vectors(model, code, rows, target_norm=t, drop=m, fast=fast) for m in drops]
        logits = readout(torch.cat([v.to(h.dtype) for v in vecs]), rows.repeat(n_cfg + 1))
        q = torch.softmax(logits.double(), dim=1).view(n_cfg + 1, rows.numel(), -1)
        y = labels[rows.to(labels.device)].to(q.device).long()
        pred = q.argmax(2)  # [n_cfg + 1, b]
        base_correct += int((pred[0] == y).sum())
        if n_cfg:
            sums[:n_cfg, 0] += (pred[1:] == y).double().sum(1).cpu()
            sums[:n_cfg, 1] += (pred[1:] != pred[0]).double().sum(1).cpu()
            sums[:n_cfg, 2] += (0.5 * (q[1:] - q[0]).abs().sum(2)).sum(1).cpu()
    base_acc = base_correct / n
    entries = []
    for c, p, pos in plan:
        if not pos:
            entries.append(SegmentAblation(c, p, 0, [], 0.0, 0.0, 0.0))
            continue
        k = configs[pos]
        entries.append(SegmentAblation(
            c, p, len(pos), [int(code.selected[f]) for f in pos],
            delta_acc=float(sums[k, 0]) / n - base_acc, flip_rate=float(sums[k, 1]) / n,
            tvd=float(sums[k, 2]) / n,
        ))
    means = []
    for p in fractions:
        at = [e for e in entries if e.fraction == int(p)]
        means.append(SegmentFractionMean(
            int(p), delta_acc=sum(e.delta_acc for e in at) / n_classes,
            flip_rate=sum(e.flip_rate for e in at) / n_classes, tvd=sum(e.tvd for e in at) / n_classes,
        ))
    return SegmentAblationResult(
        protocol=protocol_name(readout), n_sentences=n, n_classes=n_classes,
        segments=[[int(code.selected[f]) for f in o] for o in order], bottleneck_accuracy=base_acc,
        means=means, entries=entries, rescaled=rescale,
    )
