"""Configuration of the SAEs (:class:`SAEConfig`) and of their training (:class:`TrainConfig`).

Values come from method.md sections 2.1-2.7 (v2, the default) and 8 (v1). Presets are selected by name:

* ``"paper-v2"`` (aliases ``"v2"``, ``"paper"``): the v2 recipe per model and dataset, 10M samples;
* ``"v1"``: the v1 loss (input noise, linear-decay weight) and v1 coefficients;
* ``"quick"``: a few thousand small batches, minutes on a 2-core CPU (smoke runs, tests, demos);
* ``"default"``: the paper-v2 recipe plus the package's decisions (pre-encoder centring, method.md 2.1).

``quick`` and ``default`` centre the SAE's inputs; the paper-parity presets do not.

Per-(model, dataset) coefficients live in the tables :data:`V2_COEFFICIENTS` and :data:`V1_COEFFICIENTS`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from concept_ext.config.build import check_choices

logger = logging.getLogger("concept_ext")

__all__ = ["SAEConfig", "TrainConfig", "MODELS", "V2_COEFFICIENTS", "V1_COEFFICIENTS", "PRESETS"]

#: Hooked backbones: d_model and the hook layer L = n_layers - 1 (method.md sections 0 and 1.5).
MODELS: dict[str, dict[str, int]] = {
    "pythia-70m": {"d": 512, "hook_layer": 5},
    "pythia-160m": {"d": 768, "hook_layer": 11},
    "pythia-410m": {"d": 1024, "hook_layer": 23},
    "pythia-1b": {"d": 2048, "hook_layer": 15},
}

#: method.md section 2.6: (model, dataset) -> (lambda_mse, lambda_ar, lambda_cls, batch_size). tau = 0.1.
V2_COEFFICIENTS: dict[tuple[str, str], tuple[float, float, float, int]] = {
    ("pythia-410m", "ag_news"): (0.02, 0.02, 1.0, 500),
    ("pythia-410m", "imdb"): (0.02, 0.02, 1.0, 500),
    ("pythia-410m", "tweeteval_offensive"): (0.02, 0.02, 1.0, 2000),
    ("pythia-410m", "tweeteval_sentiment"): (0.02, 0.02, 1.0, 1000),
    ("pythia-1b", "ag_news"): (0.02, 0.02, 1.0, 500),
    ("pythia-1b", "imdb"): (0.02, 0.02, 1.0, 500),
    ("pythia-1b", "tweeteval_offensive"): (0.01, 0.01, 1.0, 2000),
    ("pythia-1b", "tweeteval_sentiment"): (0.01, 0.01, 1.0, 2000),
}

#: method.md section 8, v1 column: AG News 0.1/0.1 for every model; IMDB 1/1, except 0.2/0.1 at 1B.
#: The batch size follows v2 (500) for these two datasets.
V1_COEFFICIENTS: dict[tuple[str, str], tuple[float, float, float, int]] = {
    **{(mdl, "ag_news"): (0.1, 0.1, 1.0, 500) for mdl in MODELS},
    **{(mdl, "imdb"): (1.0, 1.0, 1.0, 500) for mdl in ("pythia-70m", "pythia-160m", "pythia-410m")},
    ("pythia-1b", "imdb"): (0.2, 0.1, 1.0, 500),
}

#: Preset names and their aliases. ``default`` is the paper-v2 recipe with the package's decisions (pre-encoder
#: centring); ``paper-v2`` and ``v1`` are the parity presets.
PRESETS = {"paper-v2": "paper-v2", "v2": "paper-v2", "paper": "paper-v2", "v1": "v1", "quick": "quick",
           "default": "default"}

#: Version of the serialised configuration (bumped on incompatible changes; drives upgrades on load).
CONFIG_FORMAT_VERSION = 1


def _canonical(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def _model_entry(model: str) -> dict[str, int]:
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    return MODELS[model]


@dataclass
class SAEConfig:
    """Shape and architecture of a TopK SAE or ClassifSAE (method.md sections 2.1-2.2)."""

    d: int = 1024
    """Input width d (d_model of the hooked LLM)."""
    m: int = 0
    """Number of latents (d_sae); 0 means 2*d, the paper's width."""
    k: int = 10
    """Latents kept per sentence by the TopK activation (L0 <= k)."""
    n_concepts: int = 20
    """n: the first n latent indices form z_class, read by the classifier head."""
    n_classes: int = 2
    """C: number of classes of the classifier head (ignored by the plain TopK SAE)."""
    architecture: Literal["classif_topk", "topk"] = "classif_topk"
    """``"classif_topk"`` (ClassifSAE: TopK SAE + linear head on z_class) or ``"topk"`` (plain TopK SAE)."""
    normalize: Literal["constant_norm_rescale", "none"] = "constant_norm_rescale"
    """Input normalisation: ``"constant_norm_rescale"`` (x = h * sqrt(d)/||h||, inverted on the output) or
    ``"none"``."""
    seed: int = 42
    """Seed of the initialisation (method.md section 2.2: seed 42, draws in the reference's order)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter dtype (the paper trains in fp32)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.m == 0:
            self.m = 2 * self.d
        for name in ("d", "m", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {v!r}")
        if self.k > self.m:
            raise ValueError(f"SAEConfig.k must be <= m (number of latents) = {self.m}, got k = {self.k}")
        if not 0 <= self.n_concepts <= self.m:
            raise ValueError(f"SAEConfig.n_concepts must lie in [0, m = {self.m}], got {self.n_concepts}")
        if self.architecture == "classif_topk":
            if self.n_concepts < 1:
                raise ValueError(
                    "SAEConfig.n_concepts must be >= 1 for a ClassifSAE (architecture='classif_topk')"
                )
            if self.n_classes < 2:
                raise ValueError(f"SAEConfig.n_classes must be >= 2 for a ClassifSAE, got {self.n_classes}")

    @classmethod
    def for_model(
        cls, model: str, *, n_classes: int, architecture: str = "classif_topk", **overrides: Any
    ) -> "SAEConfig":
        """The paper's SAE for a backbone: d from :data:`MODELS`, m = 2d, k = 10, n = 20."""
        return cls(d=_model_entry(model)["d"], n_classes=n_classes, architecture=architecture, **overrides)


@dataclass
class TrainConfig:
    """Training recipe (method.md sections 2.3-2.7 and 8). Defaults are the v2 paper values."""

    preset_name: str = "paper-v2"
    """Name of the preset these values came from (recorded in checkpoints)."""
    loss_version: Literal["v1", "v2"] = "v2"
    """``"v2"``: method.md 2.3 with the two-phase stop-gradient. ``"v1"``: input noise and the linear-decay
    weight of method.md section 8, no stop-gradient."""
    total_samples: int = 10_000_000
    """Training budget in sentences; T = total_samples // batch_size steps (method.md 2.4)."""
    batch_size: int = 500
    """B: rows per batch (true batches; see ``alternate_half_batches``)."""
    lr: float = 5e-5
    """Peak learning rate of Adam (no warmup)."""
    lr_end: float = 5e-7
    """Learning rate at the end of the cosine phase (the reference's 1% floor)."""
    schedule: Literal["paper", "cosine", "constant"] = "paper"
    """``"paper"``: cosine to lr_end then a linear tail of ``decay_steps`` steps (oddity 10);
    ``"cosine"``: plain cosine from lr to lr_end over T steps; ``"constant"``."""
    decay_steps: int = 2
    """Length of the linear tail of the ``"paper"`` schedule (the reference's placeholder value 2)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Maximum global gradient norm (clip_grad_norm_); 0 disables clipping."""
    project_decoder_grad: bool = True
    """Remove from grad W_dec the component parallel to each decoder row before clipping (method.md 2.4)."""
    lambda_mse: float = 0.02
    """Weight of the reconstruction term (and of the ghost/AuxK term inside the same bracket)."""
    lambda_ar: float = 0.02
    """Weight of the activation-rate loss L_ar."""
    lambda_cls: float = 1.0
    """Weight of the classifier cross-entropy L_CE (ClassifSAE only)."""
    target_rate: float = 0.1
    """tau: each latent may fire freely on floor(tau * B) sentences of a batch (L_ar)."""
    mse_normalization: Literal["dense_batch", "fvu"] = "dense_batch"
    """``"dense_batch"``: squared error over the un-squared norm of the batch-centred target (oddity 9);
    ``"fvu"``: sum of squared errors over the total variance of the batch."""
    dead_latents: Literal["ghost", "auxk", "none"] = "ghost"
    """``"ghost"`` (SAELens 3.13 ghost grads), ``"auxk"`` (method.md 2.7) or ``"none"``."""
    dead_window: int = 100
    """A latent is dead when it has not fired for more than this many steps."""
    auxk_alpha: float = 1.0 / 32.0
    """Weight of the AuxK loss inside the lambda_mse bracket (Gao et al. 2024)."""
    stopgrad_class: bool = True
    """Two-phase decoding: from epoch floor(E_total/2) on, decode from [sg(z_class), z_ctx] (v2)."""
    stopgrad_plain_sae: bool = False
    """Also apply the two-phase stop-gradient to the plain TopK SAE (the reference does, oddity 3)."""
    center: Literal["none", "mean", "geometric_median"] = "none"
    """Pre-encoder centring (package decision, method.md 2.1): ``"none"`` (the reference: pre = x W_enc +
    b_enc), ``"mean"`` (pre = (x - mu) W_enc + b_enc with mu the mean of the rescaled training inputs, and
    b_dec initialised to mu) or ``"geometric_median"`` (mu the geometric median, Weiszfeld iterations).
    Set once before the first step; stored in the checkpoint. On in ``quick`` and ``default``, off in the
    paper-parity presets ``paper-v2`` and ``v1``."""
    input_noise: float = 0.0
    """v1 input noise: std as a fraction of the per-dimension batch std (0.2 in v1, 0 in v2)."""
    alternate_half_batches: bool = False
    """Alternate B and B/2-row batches while counting B per step (oddity 19, B = 2000 runs)."""
    reference_quirks: bool = False
    """Turn on every reproduce-the-reference switch of method.md section 9 that concerns training."""
    seed: int = 42
    """Seed of the data order and of the v1 noise (the initialisation seed is SAEConfig.seed)."""
    device: str = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; the activations are held there."""
    cuda_graph: bool = False
    """Run each step as one CUDA graph replay (CUDA devices): fixed-shape dead-latent terms over all m
    latents, no host synchronisation in the step (a new data permutation is still uploaded once per pass),
    and the loss checked for finiteness at log steps, checkpoints and the end instead of every step. On a
    CPU device the same step runs eagerly. Not with torchrun (distributed) training. Not part of the
    pipeline's stage fingerprints: it changes how, not what, is trained."""
    log_every: int = 50
    """Steps between metric logs (progress bar, logger, wandb)."""
    checkpoint_every: int = 0
    """Samples between periodic checkpoints (0: only the final one, when an output folder is given)."""
    save_trainer_state: bool = True
    """Store optimiser state, RNG and data position in each checkpoint, for an exact resume."""
    progress: bool = True
    """Show a tqdm progress bar."""
    wandb: bool = False
    """Log metrics to Weights & Biases (optional dependency; off by default)."""
    wandb_project: str = "concept_ext"
    """wandb project name when ``wandb`` is on."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata carried into checkpoints (never read by the trainer)."""

    def __post_init__(self) -> None:
        check_choices(self)
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # JSON round trips give lists
        if self.batch_size < 1 or self.total_samples < self.batch_size:
            raise ValueError(
                f"TrainConfig needs batch_size >= 1 and total_samples >= batch_size, got "
                f"batch_size={self.batch_size}, total_samples={self.total_samples}"
            )
        if not 0.0 <= self.target_rate <= 1.0:
            raise ValueError(f"TrainConfig.target_rate must lie in [0, 1], got {self.target_rate}")
        if self.lr <= 0 or self.lr_end < 0:
            raise ValueError(f"TrainConfig.lr must be > 0 and lr_end >= 0, got {self.lr}, {self.lr_end}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.reference_quirks:
            self.stopgrad_plain_sae = True
            if self.loss_version == "v1":
                self.project_decoder_grad = False  # oddity 22: the v1 projection was a no-op
            if self.batch_size == 2000:
                self.alternate_half_batches = True  # oddity 19

    @property
    def total_steps(self) -> int:
        """T = total_samples // batch_size."""
        return self.total_samples // self.batch_size

    @classmethod
    def preset(
        cls,
        name: str = "paper-v2",
        *,
        model: str = "pythia-410m",
        dataset: str = "ag_news",
        method: str = "classifsae",
        **overrides: Any,
    ) -> "TrainConfig":
        """A named recipe for ``model`` x ``dataset``; ``method`` is ``"classifsae"`` or ``"sae"`` (plain).

        Keyword ``overrides`` replace single fields afterwards (validated again).
        """
        canon = _canonical(name)
        if method not in ("classifsae", "sae"):
            raise ValueError(f"method must be 'classifsae' or 'sae', got {method!r}")
        _model_entry(model)
        vals: dict[str, Any] = {"preset_name": canon}
        if canon == "quick":
            # Small batches and a high lr so that a few thousand steps already give a usable SAE.
            vals.update(
                total_samples=256 * 1500,
                batch_size=256,
                lr=1e-3,
                lr_end=1e-5,
                schedule="cosine",
                lambda_mse=1.0,
                lambda_ar=0.1 if method == "classifsae" else 0.0,
                lambda_cls=1.0 if method == "classifsae" else 0.0,
                dead_window=50,
                log_every=25,
                center="mean",
            )
        else:
            table = V1_COEFFICIENTS if canon == "v1" else V2_COEFFICIENTS
            if (model, dataset) not in table:
                known = sorted({ds for (_, ds) in table})
                raise ValueError(f"no {canon} coefficients for ({model!r}, {dataset!r}); datasets: {known}")
            l_mse, l_ar, l_cls, batch = table[(model, dataset)]
            if method == "sae":  # method.md 2.6 and 4.4: plain SAE baseline
                l_mse, l_ar, l_cls, batch = 1.0, 0.0, 0.0, 500
            vals.update(lambda_mse=l_mse, lambda_ar=l_ar, lambda_cls=l_cls, batch_size=batch)
            if canon == "v1":
                vals.update(loss_version="v1", input_noise=0.2, stopgrad_class=False)
            if canon == "default":
                vals.update(center="mean")
        vals["extra"] = {"model": model, "dataset": dataset, "method": method}
        vals.update(overrides)
        return cls(**vals)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
