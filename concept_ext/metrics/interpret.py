"""Interpretability metrics that need only activations and sentence embeddings (method.md 6.5-6.7).

Inputs everywhere: ``acts`` [N, F], the activations of the F selected concepts on the N test sentences
(dense), and ``embeddings`` [N, e], sentence-encoder vectors (normalised here, in float64 or the compute
dtype). Every result is a dataclass of plain Python numbers and lists with ``to_dict()`` for JSON.

* :func:`activating_sets` - A_j = {i : a_ij > t_j}, t_j the exact two-class Jenks break (jenks.py).
* :func:`concept_sim` - ConceptSim(j), the weighted (reported) and unweighted aggregates, via sums of
  embeddings: mean pairwise cosine = (||sum e||^2 - sum ||e||^2) / (n (n - 1)), no n x n matrix.
* :func:`mean_pairwise_cosine` - the dataset-wide baseline (and the variance of the pairwise cosines).
* :func:`sentence_sim` - SentenceSim(k), k = 1..4, blockwise with O(block * N) memory (oddity 16).
* :func:`set_overlap` - Jaccard, redundancy and coverage of the A_j.
* :func:`top_activating` - the top sentences of each concept inside A_j.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from concept_ext.metrics.jenks import jenks2_breaks

__all__ = [
    "ActivatingSets", "ConceptSimResult", "CosineBaseline", "SentenceSimResult", "SetOverlap",
    "TopActivating", "activating_sets", "concept_sim", "mean_pairwise_cosine", "sentence_sim",
    "set_overlap", "top_activating", "top_concept_mask",
]

logger = logging.getLogger("concept_ext")

#: np.allclose(a, a[0]) tolerances of the reference: a concept with all values "equal" has no split (6.5).
CONSTANT_RTOL, CONSTANT_ATOL = 1e-5, 1e-8


class _Result:
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def _check_2d(x: Tensor, name: str, n: Optional[int] = None) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {n} (one per sentence)")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")
    return x.detach()


def _normalise(embeddings: Tensor, dtype: torch.dtype) -> Tensor:
    e = embeddings.to(dtype)
    return e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ActivatingSets(NamedTuple):
    """The activating set of each concept (method.md 6.5 step 1)."""

    mask: Tensor
    """[N, F] bool: sentence i is in A_j (a_ij > t_j); all False for a constant concept."""
    breaks: Tensor
    """[F] float64: the Jenks break t_j."""
    constant: Tensor
    """[F] bool: all values equal within the reference's np.allclose tolerance (no split)."""


def activating_sets(acts: Tensor) -> ActivatingSets:  # acts: [N, F]
    """A_j = {i : a_ij > t_j} with t_j the exact two-class Jenks break of column j."""
    acts = _check_2d(acts, "acts")
    if acts.shape[0] == 0:
        raise ValueError("acts must have at least one sentence")
    a = acts.to(torch.float64)
    split = jenks2_breaks(a.T.contiguous())
    breaks = split.breaks.to(a.device)
    first = a[:1]  # [1, F]
    constant = ((a - first).abs() <= CONSTANT_ATOL + CONSTANT_RTOL * first.abs()).all(dim=0)  # [F]
    mask = (a > breaks) & ~constant
    return ActivatingSets(mask, breaks, constant)


@dataclass
class ConceptSimResult(_Result):
    """ConceptSim per concept and its aggregates (method.md 6.5)."""

    weighted: float
    """Reported ConceptSim: sum_j w_j CS_j / sum_j w_j, w_j = |A_j|(|A_j|-1)/2 > 0 (0.0 if no such j)."""
    unweighted: float
    """Mean of CS_j over all F concepts, zeros included (stored; the authors call it flawed)."""
    per_concept: list[float]
    """CS_j: mean cosine over distinct pairs of A_j; 0 for constant concepts or |A_j| <= 1."""
    n_active: list[int]
    """|A_j| per concept (0 for constant concepts)."""
    n_pairs: list[int]
    """w_j = |A_j|(|A_j|-1)/2 per concept."""
    breaks: list[float]
    """Jenks break t_j per concept."""
    constant: list[bool]
    """True where the concept's values are all equal (np.allclose), hence no split."""


def concept_sim(
    acts: Tensor,  # [N, F]
    embeddings: Tensor,  # [N, e]
    *,
    sets: Optional[ActivatingSets] = None,
) -> ConceptSimResult:
    """ConceptSim of every concept from sums of its activating sentences' unit embeddings."""
    acts = _check_2d(acts, "acts")
    emb = _check_2d(embeddings, "embeddings", acts.shape[0])
    sets = activating_sets(acts) if sets is None else sets
    e = _normalise(emb, torch.float64).to(acts.device)  # [N, e]
    m = sets.mask.to(torch.float64)  # [N, F]
    sums = m.T @ e  # [F, e]: sum of the activating embeddings
    self_dots = m.T @ (e * e).sum(dim=1)  # [F]: sum of ||e_i||^2 (= |A_j| up to rounding)
    n = sets.mask.sum(dim=0).to(torch.float64)  # [F]
    pair_sum = ((sums * sums).sum(dim=1) - self_dots) / 2  # [F]: sum of cosines over distinct pairs
    pairs = n * (n - 1) / 2
    valid = pairs > 0
    cs = torch.where(valid, pair_sum / pairs.clamp_min(1), torch.zeros_like(pairs))
    if bool(valid.any()):
        weighted = float(pair_sum[valid].sum() / pairs[valid].sum())
    else:
        logger.warning("concept_sim: no concept has two or more activating sentences; weighted = 0.0")
        weighted = 0.0
    f = acts.shape[1]
    return ConceptSimResult(
        weighted=weighted,
        unweighted=float(cs.mean()) if f else 0.0,
        per_concept=[float(v) for v in cs],
        n_active=[int(v) for v in n],
        n_pairs=[int(v) for v in pairs],
        breaks=[float(v) for v in sets.breaks],
        constant=[bool(v) for v in sets.constant],
    )


@dataclass
class CosineBaseline(_Result):
    """Pairwise cosine statistics over the whole test set (method.md 6.5, the ConceptSim baseline)."""

    mean: float
    """Mean cosine over all distinct pairs of sentences."""
    var: float
    """Variance of the pairwise cosines (over distinct pairs)."""
    n_sentences: int
    """N."""


def mean_pairwise_cosine(embeddings: Tensor) -> CosineBaseline:  # [N, e]
    """Mean (and variance) of cos(e_i, e_i') over i != i', from sum(e) and e^T e: O(N e^2)."""
    emb = _check_2d(embeddings, "embeddings")
    n = emb.shape[0]
    if n < 2:
        raise ValueError(f"embeddings needs at least two sentences, got {n}")
    e = _normalise(emb, torch.float64)
    sq = (e * e).sum(dim=1)  # [N]
    s = e.sum(dim=0)
    npairs = n * (n - 1)
    mean = (float(s @ s) - float(sq.sum())) / npairs
    gram = e.T @ e  # [e, e]: ||E E^T||_F^2 = ||E^T E||_F^2
    m2 = (float((gram * gram).sum()) - float((sq * sq).sum())) / npairs
    return CosineBaseline(mean=mean, var=m2 - mean * mean, n_sentences=n)


def top_concept_mask(acts: Tensor, *, top: int = 5) -> Tensor:  # [N, F] -> [N, F] bool
    """M_i: the ``top`` largest concepts of each sentence whose value is non-zero (method.md 6.6 step 1).

    For F < top every non-zero concept is taken (our extension; the reference fails there).
    """
    acts = _check_2d(acts, "acts")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if acts.shape[1] <= top:
        return acts != 0
    vals, idx = torch.topk(acts, top, dim=1)
    mask = torch.zeros(acts.shape, dtype=torch.bool, device=acts.device)
    mask.scatter_(1, idx, vals != 0)
    return mask


@dataclass
class SentenceSimResult(_Result):
    """SentenceSim(k) curve (method.md 6.6)."""

    k: list[int]
    """The numbers of shared concepts, [1, 2, 3, 4]."""
    sentence_sim: list[float]
    """SentenceSim(k): mean over sentences i with N_k(i) non-empty of the mean cos to N_k(i); 0 if none."""
    n_sentences: list[int]
    """Number of sentences i with a non-empty N_k(i), per k."""
    n_pairs: list[int]
    """Number of ordered pairs (i, i'), i != i', sharing exactly k concepts, per k."""
    top: int
    """Concepts kept per sentence (5)."""
    top_clipped: bool
    """True when F < top, so all non-zero concepts were taken (our extension)."""


def sentence_sim(
    acts: Tensor,  # [N, F]
    embeddings: Tensor,  # [N, e]
    *,
    ks: Sequence[int] = (1, 2, 3, 4),
    top: int = 5,
    block_rows: Optional[int] = None,
    max_block_elems: int = 1 << 22,
    compute_dtype: torch.dtype = torch.float32,
) -> SentenceSimResult:
    """SentenceSim(k) without an N x N matrix.

    Sentences with identical masks are grouped first (P distinct masks <= N): the cosine sum of sentence i
    to a group q is e_i . S_q with S_q the sum of the group's unit embeddings. A row block R then needs
    C = E_R S^T and K = M_R M_P^T, both [b, P]; each entry's cosine sum and group size are added into bin
    K[i, q] (0..top) by a scatter-add, and the self pair is removed from bin |M_i|. Memory O(b P),
    b = ``block_rows`` or max_block_elems // P; work 2 N P (e + F) FLOPs plus one pass over N P entries.
    """
    acts = _check_2d(acts, "acts")
    emb = _check_2d(embeddings, "embeddings", acts.shape[0])
    n, f = acts.shape
    ks = [int(k) for k in ks]
    mask = top_concept_mask(acts, top=top)  # [N, F]
    n_bins = min(top, f) + 1
    if any(k < 0 for k in ks):
        raise ValueError(f"ks must be non-negative, got {ks}")
    e = _normalise(emb.to(acts.device), torch.float64)  # [N, e]
    if f <= 62:  # pack each mask into one int64: a 1-D unique is far cheaper than unique(dim=0)
        bits = torch.arange(f, device=mask.device)
        codes = (mask.to(torch.int64) << bits).sum(dim=1)  # [N]
        uniq, inverse, counts = torch.unique(codes, return_inverse=True, return_counts=True)
        patterns = ((uniq.unsqueeze(1) >> bits) & 1).to(torch.bool)  # [P, F]
    else:
        patterns, inverse, counts = torch.unique(mask, dim=0, return_inverse=True, return_counts=True)
    p = patterns.shape[0]
    group_sums = torch.zeros(p, e.shape[1], dtype=torch.float64, device=e.device).index_add_(0, inverse, e)
    s_groups = group_sums.to(compute_dtype)  # [P, e]
    m_groups = patterns.to(compute_dtype)  # [P, F]
    m_rows = mask.to(compute_dtype)  # [N, F]
    e_rows = e.to(compute_dtype)  # [N, e]
    self_dot = (e * e).sum(dim=1)  # [N] float64 (1 up to rounding)
    self_bin = mask.sum(dim=1)  # [N]
    sizes = counts.to(torch.float64)  # [P]
    b = block_rows or max(1, min(n, max_block_elems // max(p, 1)))
    total = torch.zeros(n_bins, dtype=torch.float64)
    contributing = torch.zeros(n_bins, dtype=torch.int64)
    pair_count = torch.zeros(n_bins, dtype=torch.int64)
    for start in range(0, n, b):
        stop = min(n, start + b)
        rows = stop - start
        cos_sum = (e_rows[start:stop] @ s_groups.T).to(torch.float64)  # [b, P]
        shared = torch.round(m_rows[start:stop] @ m_groups.T).to(torch.int64)  # [b, P]
        zeros = torch.zeros(rows, n_bins, dtype=torch.float64, device=e.device)
        sums = zeros.scatter_add(1, shared, cos_sum)
        cnt = torch.zeros(rows, n_bins, dtype=torch.float64, device=e.device).scatter_add_(
            1, shared, sizes.expand(rows, p)
        )
        own = self_bin[start:stop].unsqueeze(1)  # [b, 1]
        sums.scatter_add_(1, own, -self_dot[start:stop].unsqueeze(1))
        cnt.scatter_add_(1, own, torch.full((rows, 1), -1.0, dtype=torch.float64, device=e.device))
        has = cnt > 0.5
        mean = torch.where(has, sums / cnt.clamp_min(1), torch.zeros_like(sums))
        total += mean.sum(dim=0).cpu()
        contributing += has.sum(dim=0).cpu()
        pair_count += cnt.round().to(torch.int64).sum(dim=0).cpu()
    curve, n_sent, n_pairs = [], [], []
    for k in ks:
        if k >= n_bins:
            curve.append(0.0), n_sent.append(0), n_pairs.append(0)
            continue
        c = int(contributing[k])
        curve.append(float(total[k]) / c if c else 0.0)
        n_sent.append(c)
        n_pairs.append(int(pair_count[k]))
    return SentenceSimResult(ks, curve, n_sent, n_pairs, top, f < top)


@dataclass
class SetOverlap(_Result):
    """Overlap statistics of the activating sets (method.md 6.7)."""

    jaccard: float
    """Mean over concept pairs j < j' of |A_j & A_j'| / |A_j | A_j'| (0 for two empty sets; 0 if F < 2)."""
    redundancy: float
    """sum_j |A_j| / |union_j A_j| (0 if the union is empty)."""
    coverage: float
    """|union_j A_j| / N."""
    n_covered: int
    """|union_j A_j|."""


def set_overlap(mask: Tensor) -> SetOverlap:  # [N, F] bool
    """Jaccard, redundancy and coverage from the activating-set mask."""
    mask = _check_2d(mask, "mask").to(torch.bool)
    n, f = mask.shape
    m = mask.to(torch.float64)
    inter = m.T @ m  # [F, F]
    size = inter.diagonal()
    union = size[:, None] + size[None, :] - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    iu = torch.triu_indices(f, f, offset=1)
    jaccard = float(jac[iu[0], iu[1]].mean()) if f >= 2 else 0.0
    covered = int(mask.any(dim=1).sum())
    return SetOverlap(
        jaccard=jaccard,
        redundancy=float(size.sum()) / covered if covered else 0.0,
        coverage=covered / n if n else 0.0,
        n_covered=covered,
    )


@dataclass
class TopActivating(_Result):
    """Top-activating sentences of each concept, restricted to its activating set (method.md 6.7)."""

    indices: list[list[int]]
    """Per concept, sentence indices in A_j by decreasing activation (ties: lower index), at most k."""
    values: list[list[float]]
    """The matching activation values."""
    texts: Optional[list[list[str]]] = None
    """The matching texts, when texts were given."""


def top_activating(
    acts: Tensor,  # [N, F]
    mask: Tensor,  # [N, F] bool, the activating sets
    *,
    k: int = 10,
    texts: Optional[Sequence[str]] = None,
) -> TopActivating:
    """The k most activating sentences of each concept inside A_j (the reference's top-k of a_j, kept
    if in A_j; every member of A_j outranks every non-member, so this is the top-min(k, |A_j|) of A_j)."""
    acts = _check_2d(acts, "acts")
    mask = _check_2d(mask, "mask", acts.shape[0]).to(torch.bool)
    if texts is not None and len(texts) != acts.shape[0]:
        raise ValueError(f"texts has {len(texts)} entries, expected {acts.shape[0]}")
    a = acts.to(torch.float64).masked_fill(~mask, float("-inf"))
    # Stable descending sort: ties keep the lower sentence index first.
    order = torch.sort(a, dim=0, descending=True, stable=True).indices[:k]  # [k', F]
    idx_out, val_out = [], []
    for j in range(acts.shape[1]):
        sel = [int(i) for i in order[:, j] if bool(mask[i, j])]
        idx_out.append(sel)
        val_out.append([float(acts[i, j]) for i in sel])
    txt = [[texts[i] for i in sel] for sel in idx_out] if texts is not None else None
    return TopActivating(idx_out, val_out, txt)
