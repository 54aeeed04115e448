"""L1 logistic probe selection of SAE latents (method.md 4.4; v1 in section 8; oddities 4 and 21).

v2: Pipeline(StandardScaler, LogisticRegression(l1_ratio=1, saga, class_weight="balanced", tol 1e-3,
max_iter 1000, random_state 42)) in GridSearchCV over C in {0.01, 0.1, 1} with 3 shuffled stratified
folds (random_state 42), accuracy scoring; the smallest C wins equal CV means (grid order ascending).
v1: LogisticRegressionCV with the same solver settings, 3 unshuffled stratified folds, random_state 0,
no class weights. Score_j = ||coef[:, j]||_2 over classes; the top ``n_select`` scores are kept with the
configured tie rule.
"""
from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import numpy as np
from torch import Tensor

from concept_ext.concepts.base import check_activations, check_labels
from concept_ext.config.baselines import ProbeConfig

logger = logging.getLogger("concept_ext")

__all__ = ["ProbeResult", "fit_probe", "rank_scores", "cap_rows"]


class ProbeResult(NamedTuple):
    """Outcome of the probe selection."""

    selected: list[int]
    """The n_select chosen latent indices, best first."""
    scores: np.ndarray
    """[m] coefficient norm of every latent."""
    n_nonzero: int
    """Latents with a non-zero score."""
    n_tie_filled: int
    """Selected latents whose score is zero (picked by the tie rule)."""
    best_C: float
    """Chosen inverse regularisation strength."""
    cv_accuracy: float
    """Mean CV accuracy at best_C."""
    n_rows: int
    """Rows the probe was fitted on (after any cap)."""


def rank_scores(scores: np.ndarray, n_select: int, *, tie_rule: str = "lower") -> list[int]:
    """Indices of the ``n_select`` largest scores; ties per ``tie_rule`` (see ProbeConfig.tie_rule)."""
    scores = np.asarray(scores, dtype=np.float64)
    if tie_rule == "lower":  # stable sort of -score: lower index first among equals
        order = np.argsort(-scores, kind="stable")
    elif tie_rule == "higher":  # v2 reference: reversed stable ascending sort
        order = np.argsort(scores, kind="stable")[::-1]
    elif tie_rule == "numpy_reverse":  # v1 reference: reversed default (non-stable) sort
        order = np.argsort(scores)[::-1]
    else:
        raise ValueError(f"tie_rule must be lower|higher|numpy_reverse, got {tie_rule!r}")
    return [int(i) for i in order[:n_select]]


def cap_rows(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Seeded, stratified subset of at most ``max_rows`` row indices (sorted)."""
    from sklearn.model_selection import train_test_split

    n = labels.shape[0]
    if max_rows >= n:
        return np.arange(n)
    idx, _ = train_test_split(np.arange(n), train_size=max_rows, stratify=labels, random_state=seed)
    return np.sort(idx)


def fit_probe(acts: Tensor, labels: Tensor, *, config: ProbeConfig | None = None) -> ProbeResult:
    """Fit the probe on ``acts [N, m]`` (all latents' activations) vs ``labels [N]`` and select latents."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = config if config is not None else ProbeConfig()
    acts = check_activations(acts, name="acts", min_rows=2 * cfg.n_folds)
    y = check_labels(labels, acts.shape[0], name="labels").cpu().numpy()
    if np.unique(y).size < 2:
        raise ValueError("labels must contain at least two classes for the probe")
    if cfg.n_select > acts.shape[1]:
        raise ValueError(f"n_select={cfg.n_select} exceeds the {acts.shape[1]} latents")
    x = acts.detach().cpu().double().numpy()
    if cfg.max_rows is not None:
        rows = cap_rows(y, cfg.max_rows, cfg.random_state)
        x, y = x[rows], y[rows]
    folds = StratifiedKFold(cfg.n_folds, shuffle=cfg.shuffle,
                            random_state=cfg.random_state if cfg.shuffle else None)
    scaler = [StandardScaler()] if cfg.standardize else []
    common = dict(solver="saga", class_weight=cfg.class_weight, tol=cfg.tol, max_iter=cfg.max_iter,
                  random_state=cfg.random_state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(converge|max_iter).*")
        if cfg.search == "grid":
            pipe = make_pipeline(*scaler, LogisticRegression(l1_ratio=1.0, **common))
            grid = GridSearchCV(pipe, {pipe.steps[-1][0] + "__C": list(cfg.Cs)}, cv=folds,
                                scoring="accuracy", refit=True)
            grid.fit(x, y)
            clf = grid.best_estimator_.steps[-1][1]
            best_c = float(grid.best_params_[pipe.steps[-1][0] + "__C"])
            cv_acc = float(grid.best_score_)
        else:
            pipe = make_pipeline(*scaler, LogisticRegressionCV(
                Cs=list(cfg.Cs), l1_ratios=(1.0,), cv=folds, scoring="accuracy",
                use_legacy_attributes=False, **common))
            pipe.fit(x, y)
            clf = pipe.steps[-1][1]
            best_c = float(np.ravel(clf.C_)[0])
            cv_acc = float("nan")
            scores_ = getattr(clf, "scores_", None)
            if isinstance(scores_, dict):  # legacy attributes: {class: [n_folds, (n_l1_ratios,) n_cs]}, one per class
                scores_ = np.asarray(next(iter(scores_.values())))
            if isinstance(scores_, np.ndarray):  # [n_folds, n_l1_ratios, n_cs]
                cv_acc = float(scores_.reshape(scores_.shape[0], -1).mean(axis=0).max())
    coef = np.atleast_2d(clf.coef_)  # [n_classes or 1, m]
    score = np.linalg.norm(coef, axis=0)
    selected = rank_scores(score, cfg.n_select, tie_rule=cfg.tie_rule)
    n_nonzero = int((score > 0).sum())
    n_fill = int(sum(score[j] == 0 for j in selected))
    if n_fill:
        logger.info("probe: %d of %d selected latents have zero coefficients (tie rule %s)",
                    n_fill, cfg.n_select, cfg.tie_rule)
    return ProbeResult(selected, score, n_nonzero, n_fill, best_c, cv_acc, int(x.shape[0]))
