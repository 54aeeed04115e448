"""The run context: what fitting, evaluating and summarising concept methods read of a run.

:class:`RunContext` is a leaf: it knows the run's configuration, its folder, the device and the class
names (from the finished ``finetune`` stage record), and loads the run's artefacts from disk on first
use (the classifier, the activation caches, the sentence embeddings). It holds no stage machinery and
no reference to the :class:`~concept_ext.pipeline.stages.Pipeline` that built it, so
:mod:`~concept_ext.pipeline.methods` and :mod:`~concept_ext.pipeline.results` depend on it alone, and
``explain`` opens a finished run with it (:func:`open_run`) without building a pipeline.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from concept_ext.config.run import RunConfig
from concept_ext.runstate import StageRecord, read_record

__all__ = ["RunContext", "load_classifier", "resolve_device", "require_record", "open_run"]


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_classifier(cfg: RunConfig, device: str, model_dir: Optional[Path], class_names: list[str]):
    """The run's classifier: the fine-tuned one in ``model_dir``, or (``model_dir=None``) the configured
    backbone as loaded before fine-tuning (``config_overrides`` apply to that random-init case only)."""
    from concept_ext.classifier.backbones import load_backbone
    from concept_ext.classifier.model import Classifier

    src = str(model_dir) if model_dir is not None else cfg.backbone
    overrides = cfg.config_overrides if model_dir is None else None
    bb = load_backbone(src, num_labels=len(class_names), device=device, config_overrides=overrides,
                       seed=cfg.seeds[0])
    return Classifier(bb, class_names, layer=cfg.cache.layer, prompt=cfg.cache.prompt)


def require_record(out: Path, stage: str) -> StageRecord:
    """The ``stage.json`` record of the finished ``stage`` of the run in ``out``; FileNotFoundError naming
    the stage and the folder when it has not finished."""
    rec = read_record(Path(out) / stage)
    if rec is None:
        raise FileNotFoundError(f"stage {stage!r} has not finished in {out} (no {Path(out) / stage / 'stage.json'}): "
                                "run the pipeline up to it first")
    return rec


@dataclasses.dataclass
class RunContext:
    """What a concept method's fit and evaluation read of a run (built by the pipeline or :func:`open_run`).

    The artefacts load lazily, once per context, from the run folder: nothing here depends on which stages
    ran in this process."""

    cfg: RunConfig
    """The run's configuration."""
    out: Path
    """The run folder."""
    device: str
    """Resolved device (``cpu``, ``cuda`` or ``cuda:<i>``)."""
    progress: bool
    """Show progress bars."""
    class_names: list[str]
    """Class names in label order (the ``finetune`` record's)."""
    _memo: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    """Loaded artefacts: ``classifier``, ``split:<name>``, ``context_tail``."""

    @property
    def classifier(self):
        """The fine-tuned classifier (``out/finetune/model``), loaded once."""
        if "classifier" not in self._memo:
            self._memo["classifier"] = load_classifier(self.cfg, self.device, self.out / "finetune" / "model",
                                                       self.class_names)
        return self._memo["classifier"]

    def load_split(self, split: str):
        """The cached ``split`` (``train`` or ``test``; loaded once; the test split carries the classifier)."""
        key = f"split:{split}"
        if key not in self._memo:
            from concept_ext.cache.activations import load_cache

            self._memo[key] = load_cache(self.out / "cache" / split,
                                         classifier=self.classifier if split == "test" else None)
        return self._memo[key]

    def embeddings(self) -> torch.Tensor:
        """Sentence-encoder embeddings of the test texts, ``[N_test, e]`` float32 (the ``embed`` stage's)."""
        from safetensors.torch import load_file

        return load_file(str(self.out / "embed" / "embeddings.safetensors"))["embeddings"]

    def shared(self, key: str, build: Any) -> Any:
        """A value built once per context by ``build()`` and shared by every method and seed evaluated with
        it (e.g. the in-context tail, whose clean pass is the same for all of them)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def open_run(run_dir: str | Path, *, progress: bool = False) -> RunContext:
    """The context of an existing run folder (its ``config.json`` and finished ``finetune`` stage)."""
    from concept_ext.config.run import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json); run `python -m concept_ext run` first")
    cfg = load_run_config(run_dir / "config.json")
    ft = require_record(run_dir, "finetune")
    return RunContext(cfg=cfg, out=run_dir, device=resolve_device(cfg.device), progress=progress,
                      class_names=list(ft.extra["class_names"]))
