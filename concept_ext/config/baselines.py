"""Configuration of the baselines (method.md sections 4, 5 and 8) and of the common selection step.

Every field has a docstring underneath it. :func:`baselines_preset` builds the ``v2`` (default, alias
``paper``) and ``v1`` presets; ``reference_quirks=True`` turns on every "reproduce the reference code"
switch of method.md section 9 that concerns the baselines (oddities 4, 21, 23, 25).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Literal

from concept_ext.config.build import check_choices

logger = logging.getLogger("concept_ext")

__all__ = [
    "ICAConfig",
    "BottleneckConfig",
    "HIConceptConfig",
    "ShapleyConfig",
    "ProbeConfig",
    "SelectConfig",
    "BaselinesConfig",
    "baselines_preset",
    "V1_CONCEPTSHAP_THRES",
]

#: v1 ConceptSHAP thresholds per (model, dataset) (method.md section 8, configs at d5286e9).
V1_CONCEPTSHAP_THRES: dict[tuple[str, str], float] = {
    ("pythia-70m", "ag_news"): 0.2,
    ("pythia-160m", "ag_news"): 0.15,
    ("pythia-410m", "ag_news"): 0.1,
    ("pythia-1b", "ag_news"): 0.15,
    ("pythia-70m", "imdb"): 0.2,
    ("pythia-160m", "imdb"): 0.2,
    ("pythia-410m", "imdb"): 0.2,
    ("pythia-1b", "imdb"): 0.2,
}


@dataclass
class ICAConfig:
    """FastICA baseline (method.md 4.1); the values are the paper's scikit-learn arguments."""

    n_components: int = 20
    """Number of independent components (= concepts)."""
    whiten: str = "unit-variance"
    """scikit-learn ``whiten`` argument."""
    algorithm: str = "parallel"
    """scikit-learn ``algorithm`` argument."""
    fun: str = "logcosh"
    """scikit-learn contrast function."""
    max_iter: int = 1000
    """Maximum FastICA iterations."""
    tol: float = 1e-4
    """FastICA tolerance (scikit-learn default; the reference does not set it)."""
    random_state: int = 42
    """Seed of FastICA's initial unmixing matrix."""

    def __post_init__(self) -> None:
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")


@dataclass
class BottleneckConfig:
    """Concept bottleneck shared by ConceptSHAP (method.md 4.2, v1 in section 8) and HI-Concept (4.3)."""

    n_concepts: int = 20
    """Number of concept vectors."""
    hidden: int = 512
    """Width of the reconstruction network g(p) = ReLU(p W1) W2."""
    init_range: float = 0.5
    """Parameters are initialised U(-init_range, init_range)."""
    thres: float = 0.3
    """ConceptSHAP cosine threshold of the concept mask (v1: per model/dataset, V1_CONCEPTSHAP_THRES)."""
    eps: float = 1e-3
    """Denominator guard of p = (M*S) / (sum_row + eps)."""
    lr: float = 3e-4
    """Adam learning rate (v1 ConceptSHAP: 1e-3, hard-coded in the v1 code)."""
    batch_size: int = 128
    """Rows per step; a partial last batch is dropped."""
    epochs: int = 100
    """Training epochs (v1 ConceptSHAP: 30)."""
    seed: int = 42
    """Seed of the initialisation, the per-epoch permutations and the flip masks."""
    lambda_sim: float = 0.1
    """Weight of L_sim (v2) or of -R1 (v1)."""
    lambda_far: float = 0.5
    """Weight of L_far (v2) or of R2 (v1: 0.1)."""
    reg_start_epoch: int = 0
    """Regularisers are added from this epoch on (v1 ConceptSHAP: 2, CE alone in epochs 0 and 1)."""
    regularizer: Literal["v1", "v2"] = "v2"
    """"v2": batch top-(B/4) similarity + mean (c~^T c~ - I); "v1": kNN R1 over the train cache + R2."""
    knn_k: int = 64
    """v1 R1: neighbours per concept in the whole train cache."""
    unnormalized_scores: bool = False
    """v1 ConceptSHAP: S = H C_vec with the raw concept matrix (v2: normalised concept columns)."""
    batches_quirk: bool = False
    """Reference loop: floor((N-1)/B) batches per epoch instead of floor(N/B) (oddity 23)."""
    progress: bool = True
    """Show a tqdm bar over epochs."""
    center: bool = False
    """ConceptSHAP only (package decision): score the centred activations h - mu against the concepts (mu:
    the train mean, stored with the model) and reconstruct g(p) + mu. On anisotropic caches (||mean h||
    close to ||h||) every cosine with a random concept is near 0 and the 0.3 threshold never fires; in the
    centred space it does. Off in the paper presets."""
    init: Literal["uniform", "data"] = "uniform"
    """Concept vectors' start: ``"uniform"`` (U(-init_range, init_range), the reference) or ``"data"``
    (each column a distinct random training row, centred when ``center`` is on, scaled to the uniform
    draw's expected column norm)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.n_concepts < 1 or self.hidden < 1 or self.batch_size < 1 or self.epochs < 0:
            raise ValueError("n_concepts, hidden, batch_size must be >= 1 and epochs >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class HIConceptConfig(BottleneckConfig):
    """HI-Concept (method.md 4.3): the bottleneck plus L_ae and the causal flip loss."""

    flip_start_epoch: int = 50
    """L_flip is added from this epoch on (50 of 100)."""
    keep_prob: float = 0.8
    """Bernoulli keep probability of the flip mask, per sample and per concept."""
    lambda_ae: float = 1.0
    """Weight of L_ae."""
    lambda_pred: float = 1.0
    """Weight of L_pred."""
    lambda_flip: float = 1.0
    """Weight of L_flip."""
    consistent: bool = False
    """Our flagged variant (oddity 7): L_ae targets the un-normalised h that g(p) stands for, and the
    flip mask perturbs the thresholded p. False = the reference (the paper's baseline)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center:
            raise ValueError("center is a ConceptSHAP option; HI-Concept scores the raw activations")
        if not 0.0 <= self.keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in [0, 1], got {self.keep_prob}")


@dataclass
class ShapleyConfig:
    """ConceptSHAP quantities: completeness and Shapley importance (Yeh et al. 2020; v1 logs only)."""

    n_permutations: int = 200
    """Permutations sampled by the Monte-Carlo Shapley estimator (exact enumeration below exact_max)."""
    exact_max: int = 10
    """Use exact subset enumeration when n_concepts <= exact_max (2^n value evaluations)."""
    seed: int = 0
    """Seed of the permutation sampler."""
    completeness_form: Literal["accuracy", "count"] = "accuracy"
    """"accuracy": (acc_new - 1/C)/(acc_orig - 1/C); "count": the v1 count form (oddity 25)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.n_permutations < 2:
            raise ValueError("n_permutations must be >= 2 (a standard error needs two samples)")


@dataclass
class ProbeConfig:
    """L1 logistic probe selection of a plain TopK SAE's latents (method.md 4.4; v1 in section 8)."""

    n_select: int = 20
    """Number of latents kept (the largest coefficient norms)."""
    Cs: tuple = (0.01, 0.1, 1.0)
    """Inverse regularisation strengths searched, ascending (the smallest wins ties)."""
    n_folds: int = 3
    """Stratified CV folds."""
    shuffle: bool = True
    """Shuffle the folds (v2) or not (v1)."""
    random_state: int = 42
    """Seed of the folds and of saga (v1: 0)."""
    class_weight: Optional[str] = "balanced"
    """scikit-learn class_weight (v1: None)."""
    tol: float = 1e-3
    """saga tolerance."""
    max_iter: int = 1000
    """saga iteration cap."""
    standardize: bool = True
    """StandardScaler before the probe."""
    search: Literal["grid", "lrcv"] = "grid"
    """"grid": GridSearchCV + LogisticRegression (v2); "lrcv": LogisticRegressionCV (v1)."""
    tie_rule: Literal["lower", "higher", "numpy_reverse"] = "lower"
    """Equal scores: "lower" index wins (default), "higher" (v2 reference, oddity 21), "numpy_reverse"
    (v1 reference: reversed numpy default argsort)."""
    max_rows: Optional[int] = None
    """Seeded, stratified row cap for the probe (None: all rows)."""

    def __post_init__(self) -> None:
        check_choices(self)
        self.Cs = tuple(sorted(float(c) for c in self.Cs))
        if not self.Cs or self.n_select < 1 or self.n_folds < 2:
            raise ValueError("Cs must be non-empty, n_select >= 1 and n_folds >= 2")


@dataclass
class SelectConfig:
    """Common post-processing (method.md 5) and the split/label switch of oddity 4."""

    dead_threshold: float = 1e-6
    """A selected feature whose mean |activation| on the test set is <= this is dead (v1: 1e-5)."""
    segmentation: Literal["mean", "sum"] = "mean"
    """Per-class "mean" (v2) or "sum" (v1) of the activations."""
    selection_split: Literal["train", "test"] = "train"
    """Split used by the probe and the segmentation: "train" (default) or "test" (the paper)."""
    selection_labels: Literal["predicted", "ground_truth"] = "predicted"
    """Labels used by the probe and the segmentation: "predicted" (LLM) or "ground_truth" (the paper)."""

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class BaselinesConfig:
    """Every baseline setting, grouped; built by :func:`baselines_preset`."""

    preset: str = "v2"
    """Preset name ("v2" or "v1")."""
    reference_quirks: bool = False
    """Reproduce the reference code's quirks (method.md section 9)."""
    ica: ICAConfig = field(default_factory=ICAConfig)
    """ICA settings."""
    conceptshap: BottleneckConfig = field(default_factory=BottleneckConfig)
    """ConceptSHAP settings."""
    hiconcept: HIConceptConfig = field(default_factory=HIConceptConfig)
    """HI-Concept settings."""
    shapley: ShapleyConfig = field(default_factory=ShapleyConfig)
    """ConceptSHAP completeness / Shapley settings."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Probe selection settings."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Dead-feature drop and segmentation settings."""


def baselines_preset(
    name: str = "v2",
    *,
    reference_quirks: bool = False,
    model: Optional[str] = None,
    dataset: Optional[str] = None,
) -> BaselinesConfig:
    """The ``v2`` (alias ``paper``) or ``v1`` preset; ``model``/``dataset`` pick the v1 ConceptSHAP thres."""
    if name == "paper":
        name = "v2"
    if name not in ("v1", "v2"):
        raise ValueError(f"name must be 'v2', 'paper' or 'v1', got {name!r}")
    q = bool(reference_quirks)
    cfg = BaselinesConfig(preset=name, reference_quirks=q)
    cfg.conceptshap.batches_quirk = q
    cfg.hiconcept.batches_quirk = q
    if q:  # oddity 4: the paper selects on the test split with ground-truth labels
        cfg.select.selection_split, cfg.select.selection_labels = "test", "ground_truth"
        cfg.shapley.completeness_form = "count"  # oddity 25
    if name == "v2":
        cfg.probe.tie_rule = "higher" if q else "lower"  # oddity 21
        return cfg
    thres = 0.2
    if model is not None and dataset is not None:
        key = (model.lower(), dataset.lower())
        if key not in V1_CONCEPTSHAP_THRES:
            raise ValueError(f"no v1 ConceptSHAP threshold for model={model!r}, dataset={dataset!r}")
        thres = V1_CONCEPTSHAP_THRES[key]
    cfg.conceptshap = BottleneckConfig(
        thres=thres, lr=1e-3, epochs=30, lambda_sim=0.1, lambda_far=0.1, reg_start_epoch=2,
        regularizer="v1", unnormalized_scores=True, batches_quirk=q,
    )
    cfg.select.dead_threshold = 1e-5
    cfg.select.segmentation = "sum"
    cfg.probe = ProbeConfig(
        shuffle=False, random_state=0, class_weight=None, search="lrcv",
        tie_rule="numpy_reverse" if q else "lower",
    )
    return cfg
