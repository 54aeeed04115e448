"""Completeness score and Shapley-value concept importance (Yeh et al. 2020, "ConceptSHAP").

Completeness of a concept subset S (method.md oddity 25, package decision):

    eta(S) = (acc_S - 1/C) / (acc_orig - 1/C)

where acc_S is the accuracy of argmax tail(reconstruct(acts masked to S)) against the labels (the LLM's
predicted labels by default) and acc_orig that of argmax tail(h). The v1 reference logs a count form,
(n_S - 1/C)/(n_orig - 1/C) with counts of correct predictions (``form="count"``). The reconstruction
network is **not** retrained per subset: a subset is evaluated by zeroing the other concept activations
before g, the standard cheap approximation of ConceptSHAP's value function.

Shapley importance of concept i for a value function v over subsets of n players:

    phi_i = sum_{S subset of N \\ {i}} |S|! (n-|S|-1)! / n! * (v(S + i) - v(S))

* :func:`shapley_exact` enumerates all 2^n subsets (n <= ~16).
* :func:`shapley_permutation` is the Monte-Carlo permutation estimator (Castro, Gomez & Tejada 2009):
  draw T uniform random orderings; for each, walk the ordering and record every player's marginal
  contribution v(predecessors + i) - v(predecessors). phi_i is estimated by the mean of its T
  contributions, unbiased, with standard error std_i / sqrt(T) (sample std, ddof = 1). Each ordering
  costs n + 1 value evaluations (memoised by subset). The estimates sum exactly to v(N) - v(empty)
  for every T (efficiency holds per ordering).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from concept_ext.concepts.base import Tail

__all__ = [
    "ShapleyResult",
    "shapley_exact",
    "shapley_permutation",
    "completeness_score",
    "subset_accuracy_fn",
]

#: A value function over subsets, given as a boolean membership mask of length n.
ValueFn = Callable[[np.ndarray], float]


class ShapleyResult(NamedTuple):
    """Shapley values of n players."""

    values: np.ndarray
    """[n] estimated (or exact) Shapley value of each player."""
    stderr: np.ndarray
    """[n] standard error of each estimate (zeros when exact)."""
    n_permutations: int
    """Orderings sampled (0 when exact)."""
    n_evaluations: int
    """Distinct subsets at which the value function was evaluated."""
    exact: bool
    """True when computed by full enumeration."""


class _Memo:
    def __init__(self, fn: ValueFn, n: int) -> None:
        self.fn, self.n, self.cache = fn, n, {}

    def __call__(self, mask: np.ndarray) -> float:
        key = mask.tobytes()
        if key not in self.cache:
            self.cache[key] = float(self.fn(mask.copy()))
        return self.cache[key]


def shapley_exact(value_fn: ValueFn, n: int) -> ShapleyResult:
    """Exact Shapley values by enumerating every subset (2^n evaluations)."""
    if n < 1 or n > 20:
        raise ValueError(f"n must be in [1, 20] for exact enumeration, got {n}")
    v = np.empty(1 << n)
    bits = np.arange(n)
    for code in range(1 << n):
        v[code] = float(value_fn(((code >> bits) & 1).astype(bool)))
    phi = np.zeros(n)
    fact = [math.factorial(k) for k in range(n + 1)]
    for code in range(1 << n):
        size = bin(code).count("1")
        for i in range(n):
            if not (code >> i) & 1:
                w = fact[size] * fact[n - size - 1] / fact[n]
                phi[i] += w * (v[code | (1 << i)] - v[code])
    return ShapleyResult(phi, np.zeros(n), 0, 1 << n, True)


def shapley_permutation(value_fn: ValueFn, n: int, *, n_permutations: int = 200, seed: int = 0
                        ) -> ShapleyResult:
    """Monte-Carlo permutation estimate of the Shapley values with standard errors (module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n_permutations < 2:
        raise ValueError(f"n_permutations must be >= 2, got {n_permutations}")
    rng = np.random.default_rng(seed)
    memo = _Memo(value_fn, n)
    contrib = np.empty((n_permutations, n))  # [T, n] marginal contributions
    for t in range(n_permutations):
        mask = np.zeros(n, dtype=bool)
        prev = memo(mask)
        for i in rng.permutation(n):
            mask[i] = True
            cur = memo(mask)
            contrib[t, i] = cur - prev
            prev = cur
    phi = contrib.mean(axis=0)
    se = contrib.std(axis=0, ddof=1) / math.sqrt(n_permutations)
    return ShapleyResult(phi, se, n_permutations, len(memo.cache), False)


def completeness_score(n_correct_new: float, n_correct_orig: float, n_rows: int, n_classes: int, *,
                       form: str = "accuracy") -> float:
    """eta = (acc_new - 1/C)/(acc_orig - 1/C); ``form="count"`` uses raw counts (v1 reference, oddity 25)."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    chance = 1.0 / n_classes
    if form == "accuracy":
        if n_rows < 1:
            raise ValueError("n_rows must be >= 1")
        new, orig = n_correct_new / n_rows, n_correct_orig / n_rows
    elif form == "count":
        new, orig = float(n_correct_new), float(n_correct_orig)
    else:
        raise ValueError(f"form must be 'accuracy' or 'count', got {form!r}")
    if orig == chance:
        return float("nan")
    return (new - chance) / (orig - chance)


def subset_accuracy_fn(
    acts: Tensor,  # [N, n] concept activations
    reconstruct: Callable[[Tensor], Tensor],  # [N, n] -> [N, d]
    tail: Tail,  # [N, d] -> [N, C]
    labels: Tensor,  # [N]
    *,
    n_classes: int,
    n_correct_orig: int,
    form: str = "accuracy",
    players: Optional[Sequence[int]] = None,
) -> ValueFn:
    """Value function v(S) = completeness of the concepts in S (others zeroed) for the estimators above.

    ``players`` maps mask positions to concept columns (default: all columns); columns that are not
    players are always zeroed.
    """
    cols = list(range(acts.shape[1])) if players is None else [int(j) for j in players]
    labels = labels.to(acts.device)

    @torch.no_grad()
    def value(mask: np.ndarray) -> float:
        keep = torch.zeros(acts.shape[1], dtype=acts.dtype, device=acts.device)
        on = [cols[i] for i in np.flatnonzero(mask)]
        if on:
            keep[torch.as_tensor(on, device=acts.device)] = 1
        logits = tail(reconstruct(acts * keep))
        n_new = int((logits.argmax(dim=1).to(labels.device) == labels).sum())
        return completeness_score(n_new, n_correct_orig, acts.shape[0], n_classes, form=form)

    return value
