"""The main job: text dataset -> fine-tuned classifier -> activation cache -> five concept methods ->
metrics -> report (``python -m concept_ext run``).

Stages and their folders under the run directory::

    finetune/            the classifier (HF folder in finetune/model) + train/test accuracy
    cache/{train,test}/  one-pass activation caches (sharded safetensors + manifest)
    embed/               sentence-encoder embeddings of the test texts (interpretability metrics)
    fit/<method>-s<seed>/       the fitted concept model (and the SAE checkpoint for SAE methods)
    evaluate/<method>-s<seed>/  every metric as JSON, under each readout protocol
    metrics.json, report.md, figures/   the report

Each stage writes its outputs atomically, then a ``stage.json`` record with the fingerprint of its
inputs (its config section and the records of the stages it reads). A stage whose record matches is
skipped; ``force`` redoes one (and, through the fingerprints, everything downstream of it). An
interrupted run, started again, continues at the first unfinished stage; caching and SAE training
also resume inside the stage.

Under torchrun (``distributed.enabled()``) rank 0 decides whether a stage runs and prepares its folder,
every rank runs it (fine-tuning and SAE training data-parallel, caching sharded), and rank 0 writes the
record. Stages with rank-0-only outputs give the other ranks a private scratch folder (``fit``). With
``fit_parallel="tasks"`` the fit and evaluate stages are instead dealt out whole, one (method, seed) pair
at a time, to the ranks (:meth:`Pipeline.fit_tasks`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from concept_ext import distributed, runstate
from concept_ext.config.run import METHODS, RunConfig

logger = logging.getLogger("concept_ext")

__all__ = ["Pipeline", "run", "STAGES"]

#: Stage names accepted by ``force``.
STAGES = ("finetune", "cache", "embed", "fit", "evaluate", "report")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Pipeline:
    """Runs (or resumes) every stage of a :class:`RunConfig` in ``out``.

    Args:
        config: the run configuration.
        out: the run directory (created).
        force: stage names to redo even when their record matches (see :data:`STAGES`).
        progress: show progress bars.
    """

    def __init__(self, config: RunConfig, out: str | Path, *, force: Sequence[str] = (), progress: bool = True):
        bad = [s for s in force if s not in STAGES]
        if bad:
            raise ValueError(f"force: unknown stage(s) {bad}; stages are {list(STAGES)}")
        self.cfg = config
        self.out = Path(out)
        self.force = set(force)
        self.progress = progress
        self.device = _device(config.device)
        self.timings: dict[str, float] = {}
        self._clf = None
        self._caches: dict[str, Any] = {}
        self.out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            runstate.clean_stale_tmp(self.out)
        distributed.barrier()  # distributed: nobody writes before the cleanup

    # ------------------------------------------------------------------------------------------------
    # Stage machinery
    # ------------------------------------------------------------------------------------------------

    def _stage(self, name: str, kind: str, inputs: Any, fn: Callable[[Path], dict], *,
               scratch_for_others: bool = False) -> runstate.StageRecord:
        """Run ``fn(stage_dir) -> extra`` unless a finished record with the same fingerprint exists.

        Distributed: rank 0's record decides for every rank; with ``scratch_for_others`` the ranks other
        than 0 run ``fn`` on a private scratch folder (removed afterwards) instead of the stage folder."""
        stage_dir = self.out / name
        fp = runstate.fingerprint(name, inputs)
        main = distributed.is_main()
        rec = runstate.read_record(stage_dir) if main else None
        if rec is not None and rec.fingerprint == fp and kind not in self.force:
            problem = runstate.verify_outputs(stage_dir, rec)  # a corrupted output is not trusted
            if problem is not None:
                logger.warning("stage %s: %s; the stage is redone", name, problem)
                rec = dataclasses.replace(rec, fingerprint="outputs-corrupted")  # cleaned and redone below
        rec = distributed.broadcast_object(rec)
        if rec is not None and rec.fingerprint == fp and kind not in self.force:
            logger.info("stage %s: up to date, skipped", name)
            self.timings[name] = rec.seconds
            return rec
        pending = stage_dir / runstate.PENDING
        if main:  # distributed: rank 0 alone prepares the folder
            started = pending.read_text().strip() if pending.is_file() else None
            if rec is not None or (started is not None and started != fp) or kind in self.force:
                # Outputs of other inputs (or forced): start clean. A stage interrupted with the *same*
                # inputs keeps its partial outputs, so caching and SAE training resume inside the stage.
                shutil.rmtree(stage_dir, ignore_errors=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
            runstate.clean_stale_tmp(stage_dir)
            runstate.atomic_write_text(pending, fp)
        distributed.barrier()
        work = stage_dir
        scratch = self.out / f".tmp-rank{distributed.rank()}"  # removed by clean_stale_tmp if left behind
        if scratch_for_others and not main:
            work = scratch / name
            work.mkdir(parents=True, exist_ok=True)
        logger.info("stage %s: running", name)
        t0 = time.perf_counter()
        extra = fn(work)
        if work != stage_dir:
            shutil.rmtree(scratch, ignore_errors=True)
        rec = runstate.StageRecord(stage=name, fingerprint=fp, seconds=time.perf_counter() - t0, extra=extra)
        if main:
            rec.outputs = runstate.output_digests(stage_dir)
            runstate.write_record(stage_dir, rec)
            pending.unlink(missing_ok=True)
        rec = distributed.broadcast_object(rec)  # every rank continues with rank 0's record
        self.timings[name] = rec.seconds
        return rec

    @staticmethod
    def _token(rec: runstate.StageRecord) -> list:
        """What a downstream stage depends on: the upstream fingerprint and when it last finished."""
        return [rec.fingerprint, rec.finished_at]

    # ------------------------------------------------------------------------------------------------
    # Data and classifier
    # ------------------------------------------------------------------------------------------------

    def _dataset(self, split: str):
        from concept_ext.text.data import load_dataset

        rows = self.cfg.train_rows if split == "train" else self.cfg.test_rows
        return load_dataset(self.cfg.dataset, split, class_names=self.cfg.class_names, max_rows=rows)

    def _load_classifier(self, model_dir: Optional[Path], class_names: list[str]):
        from concept_ext.classifier.backbones import load_backbone
        from concept_ext.classifier.model import Classifier

        src = str(model_dir) if model_dir is not None else self.cfg.backbone
        overrides = self.cfg.config_overrides if model_dir is None else None
        bb = load_backbone(src, num_labels=len(class_names), device=self.device, config_overrides=overrides,
                           seed=self.cfg.seeds[0])
        return Classifier(bb, class_names, layer=self.cfg.cache.layer, prompt=self.cfg.cache.prompt)

    def finetune(self) -> runstate.StageRecord:
        """Fine-tune the backbone into a classifier (or keep it as is with ``finetune.steps = 0``)."""

        def fn(d: Path) -> dict:
            from concept_ext.classifier.finetune import accuracy, finetune

            from concept_ext.text.data import check_splits

            train, test = self._dataset("train"), self._dataset("test")
            check_splits(train, test)  # bad data is refused here, before any model is loaded
            clf = self._load_classifier(None, train.class_names)
            model_dir = d / "model"
            if self.cfg.finetune.steps > 0:
                res = finetune(clf, train, config=self.cfg.finetune, test=test, out_dir=d / "work",
                               progress=self.progress)
                if distributed.is_main():  # distributed: the ranks hold the same weights; rank 0 saves
                    with runstate.atomic_dir(model_dir) as tmp:
                        clf.model.save_pretrained(tmp)
                        clf.tokenizer.save_pretrained(tmp)
                    shutil.rmtree(d / "work", ignore_errors=True)
                train_acc, test_acc, steps = res.train_acc, res.test_acc, res.steps
            else:
                if distributed.is_main():
                    with runstate.atomic_dir(model_dir) as tmp:
                        clf.model.save_pretrained(tmp)
                        clf.tokenizer.save_pretrained(tmp)
                train_acc = accuracy(clf, train, max_rows=self.cfg.finetune.max_eval_rows)
                test_acc = accuracy(clf, test)
                steps = 0
            cap = self.cfg.finetune.max_eval_rows
            return {"model_dir": "model", "train_accuracy": train_acc, "test_accuracy": test_acc, "steps": steps,
                    "n_train_eval": len(train) if cap is None else min(cap, len(train)),
                    "class_names": list(train.class_names), "n_train": len(train), "n_test": len(test)}

        # finetune.parallel (ddp / fsdp) changes how, not what, is trained: left out of the fingerprint.
        ft = {k: v for k, v in dataclasses.asdict(self.cfg.finetune).items() if k != "parallel"}
        inputs = [self.cfg.backbone, self.cfg.config_overrides, self.cfg.dataset, self.cfg.class_names,
                  self.cfg.train_rows, self.cfg.test_rows, ft, self.cfg.cache.prompt, self.cfg.seeds[0]]
        self.rec_finetune = self._stage("finetune", "finetune", inputs, fn)
        return self.rec_finetune

    @property
    def class_names(self) -> list[str]:
        return list(self.rec_finetune.extra["class_names"])

    @property
    def classifier(self):
        if self._clf is None:
            self._clf = self._load_classifier(self.out / "finetune" / "model", self.class_names)
        return self._clf

    def cache(self) -> runstate.StageRecord:
        """One batched pass per split -> activation caches (resumable inside the stage)."""

        def fn(d: Path) -> dict:
            from concept_ext.cache.activations import build_cache

            sizes = {}
            for split in ("train", "test"):
                handle = build_cache(self.classifier, self._dataset(split), split, out_dir=d / split,
                                     config=self.cfg.cache, device=self.device, progress=self.progress)
                sizes[split] = handle.n_rows
            return {"rows": sizes}

        self.rec_cache = self._stage("cache", "cache", [self._token(self.rec_finetune), self.cfg.cache], fn)
        return self.rec_cache

    def load_split(self, split: str):
        """The cached split (loaded once per pipeline)."""
        if split not in self._caches:
            from concept_ext.cache.activations import load_cache

            self._caches[split] = load_cache(self.out / "cache" / split, classifier=self.classifier if split == "test"
                                             else None)
        return self._caches[split]

    def embed(self) -> runstate.StageRecord:
        """Sentence-encoder embeddings of the test texts (normalised, float32)."""

        def fn(d: Path) -> dict:
            from safetensors.torch import save_file

            from concept_ext.cache.embed import embed_texts

            texts = self.load_split("test").texts
            e = embed_texts(texts, model_name=self.cfg.eval.encoder, batch_size=self.cfg.eval.embed_batch_size,
                            device=self.device, show_progress=self.progress)
            tmp = d / ".embeddings.tmp"
            save_file({"embeddings": e.float().contiguous().cpu()}, str(tmp))
            tmp.replace(d / "embeddings.safetensors")
            return {"n": int(e.shape[0]), "dim": int(e.shape[1])}

        self.rec_embed = self._stage("embed", "embed", [self._token(self.rec_cache), self.cfg.eval.encoder], fn)
        return self.rec_embed

    def embeddings(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.out / "embed" / "embeddings.safetensors"))["embeddings"]

    # ------------------------------------------------------------------------------------------------
    # Concept methods
    # ------------------------------------------------------------------------------------------------

    def _method_config(self, method: str) -> Any:
        c = self.cfg

        def how_not_what(t: Any) -> dict:
            # TrainConfig.cuda_graph changes how, not what, is trained (the same step up to rounding): left
            # out of the fingerprint, so that turning it on (or a run from before it existed) resumes.
            return {k: v for k, v in dataclasses.asdict(t).items() if k != "cuda_graph"}

        return {"ClassifSAE": [c.sae, how_not_what(c.train_classifsae)],
                "SAE": [c.sae, how_not_what(c.train_sae), c.baselines.probe],
                "ICA": [c.baselines.ica], "ConceptSHAP": [c.baselines.conceptshap],
                "HI-Concept": [c.baselines.hiconcept]}[method] + [c.baselines.select]

    def fit(self, method: str, seed: int) -> runstate.StageRecord:
        """Fit one concept method with one seed, select and segment its concepts, save it."""
        from concept_ext.pipeline.methods import fit_method

        name = f"fit/{method}-s{seed}"

        def fn(d: Path) -> dict:
            return fit_method(self, method, seed, d)

        return self._stage(name, "fit", [self._token(self.rec_cache), self._method_config(method), seed], fn,
                           scratch_for_others=True)

    def evaluate(self, method: str, seed: int, fit_rec: runstate.StageRecord) -> runstate.StageRecord:
        """Every metric for one fitted method under each readout protocol."""
        from concept_ext.pipeline.methods import evaluate_method

        name = f"evaluate/{method}-s{seed}"

        def fn(d: Path) -> dict:
            res = evaluate_method(self, method, seed, self.out / f"fit/{method}-s{seed}")
            runstate.atomic_write_json(d / "results.json", res)
            return {"protocols": list(res.get("protocols", {}))}

        inputs = [self._token(fit_rec), self._token(self.rec_embed), self.cfg.eval, self.cfg.protocols]
        return self._stage(name, "evaluate", inputs, fn)

    def tasks(self) -> list[tuple[str, int]]:
        """Every (method, seed) pair of the run, method-major in the order of :data:`METHODS`."""
        return [(m, s) for m in METHODS if m in self.cfg.methods for s in self.cfg.seeds]

    def fit_tasks(self, *, evaluate: bool) -> list[tuple[str, int]]:
        """Task-parallel fits under torchrun (``fit_parallel="tasks"``); call it on every rank.

        Rank r owns tasks r, r+N, r+2N, ... of :meth:`tasks` and fits them (then, with ``evaluate``,
        evaluates them) as single-process stages on its own device: the results are those of a
        single-process run, task by task. With ``evaluate``, rank 0 first computes the sentence
        embeddings, which every evaluation reads. Every rank then waits (under the task timeout,
        :func:`distributed.task_timeout`) until all tasks are done, so rank 0 can write the report.
        Returns this rank's tasks. Single-process, it runs every task in order."""
        everything = self.tasks()
        mine = [everything[i] for i in distributed.owned_tasks(len(everything))]
        rank, world = distributed.rank(), distributed.world_size()
        wait = distributed.task_group()  # collective: every rank is here, none has started a task
        if evaluate:
            if distributed.is_main():
                with distributed.local():
                    self.embed()
            distributed.barrier(group=wait)
            if not distributed.is_main():
                with distributed.local():
                    self.embed()  # rank 0's record is up to date: only sets self.rec_embed
        with distributed.local():
            for method, seed in mine:
                logger.info("task %s-s%d on rank %d of %d", method, seed, rank, world)
                fit_rec = self.fit(method, seed)
                if evaluate:
                    self.evaluate(method, seed, fit_rec)
        distributed.barrier(group=wait)  # every task's stage record is written
        return mine

    # ------------------------------------------------------------------------------------------------
    # Everything
    # ------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Run or resume every stage; returns the path of ``report.md``."""
        runstate.atomic_write_json(self.out / "config.json", self.cfg.to_dict())
        self.finetune()
        self.cache()
        self.embed()
        eval_recs = []
        for method in [m for m in METHODS if m in self.cfg.methods]:
            for seed in self.cfg.seeds:
                fit_rec = self.fit(method, seed)
                eval_recs.append(self.evaluate(method, seed, fit_rec))
        return self.report(eval_recs)

    def report(self, eval_recs: list[runstate.StageRecord]) -> Path:
        """metrics.json + report.md + figures, from every evaluation's results."""
        from concept_ext.report.markdown import write_report
        from concept_ext.pipeline.results import assemble_results

        results = assemble_results(self)
        results["run"]["versions"] = _versions()
        runstate.atomic_write_json(self.out / "metrics.json", results)
        t0 = time.perf_counter()
        path = write_report(self.out, results)
        self.timings["report"] = time.perf_counter() - t0
        return path


def _versions() -> dict[str, str]:
    import concept_ext

    out = {"concept_ext": concept_ext.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("transformers", "sentence_transformers", "sklearn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - versions are informational
            pass
    return out


def run(config: Optional[RunConfig] = None, out: str | Path = "runs/default", *, force: Sequence[str] = (),
        progress: bool = True) -> Path:
    """Run the whole pipeline (see the module docstring); returns the path of ``report.md``."""
    return Pipeline(config if config is not None else RunConfig(), out, force=force, progress=progress).run()
