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
from concept_ext.pipeline.context import RunContext, load_classifier, resolve_device

logger = logging.getLogger("concept_ext")

__all__ = ["Pipeline", "run", "STAGES", "UPTO"]

#: Stage names accepted by ``force``.
STAGES = ("finetune", "cache", "embed", "fit", "evaluate", "report")

#: Where :meth:`Pipeline.run` may stop, in stage order (the CLI's pipeline commands; its ``train`` is ``fit``).
UPTO = ("finetune", "cache", "fit", "evaluate", "report")


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
        self.device = resolve_device(config.device)
        self.timings: dict[str, float] = {}
        self._ctx: Optional[RunContext] = None
        self._ctx_key: Optional[tuple] = None  # (fingerprint, finished_at) of the finetune record it was built from
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

    def record(self, stage: str) -> runstate.StageRecord:
        """The ``stage.json`` record of a finished stage, read from disk (rank 0's, on every rank): a stage
        depends on its upstream stages' records, never on which stage methods ran in this process.

        Raises FileNotFoundError naming the stage when it has not finished."""
        from concept_ext.pipeline.context import require_record

        main = distributed.is_main()
        rec = None
        if main:
            try:
                rec = require_record(self.out, stage)
            except FileNotFoundError as exc:
                rec = exc
        rec = distributed.broadcast_object(rec)  # collective: every rank gets rank 0's answer
        if isinstance(rec, FileNotFoundError):
            raise rec
        return rec

    def context(self) -> RunContext:
        """The :class:`RunContext` the concept methods read (rebuilt when the finetune record changes, so
        its loaded classifier and caches are never those of an earlier fine-tuning)."""
        ft = self.record("finetune")
        if self._ctx is None or self._ctx_key != (ft.fingerprint, ft.finished_at):
            self._ctx = RunContext(cfg=self.cfg, out=self.out, device=self.device, progress=self.progress,
                                   class_names=list(ft.extra["class_names"]))
            self._ctx_key = (ft.fingerprint, ft.finished_at)
        return self._ctx

    # ------------------------------------------------------------------------------------------------
    # Data and classifier
    # ------------------------------------------------------------------------------------------------

    def _dataset(self, split: str):
        from concept_ext.text.data import load_dataset

        rows = self.cfg.train_rows if split == "train" else self.cfg.test_rows
        return load_dataset(self.cfg.dataset, split, class_names=self.cfg.class_names, max_rows=rows)

    def finetune(self) -> runstate.StageRecord:
        """Fine-tune the backbone into a classifier (or keep it as is with ``finetune.steps = 0``)."""

        def fn(d: Path) -> dict:
            from concept_ext.classifier.finetune import accuracy, finetune

            from concept_ext.text.data import check_splits

            train, test = self._dataset("train"), self._dataset("test")
            check_splits(train, test)  # bad data is refused here, before any model is loaded
            clf = load_classifier(self.cfg, self.device, None, train.class_names)
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
        return self._stage("finetune", "finetune", inputs, fn)

    def cache(self) -> runstate.StageRecord:
        """One batched pass per split -> activation caches (resumable inside the stage)."""
        ctx = self.context()

        def fn(d: Path) -> dict:
            from concept_ext.cache.activations import build_cache

            sizes = {}
            for split in ("train", "test"):
                handle = build_cache(ctx.classifier, self._dataset(split), split, out_dir=d / split,
                                     config=self.cfg.cache, device=self.device, progress=self.progress)
                sizes[split] = handle.n_rows
            return {"rows": sizes}

        return self._stage("cache", "cache", [self._token(self.record("finetune")), self.cfg.cache], fn)

    def embed(self) -> runstate.StageRecord:
        """Sentence-encoder embeddings of the test texts (normalised, float32)."""
        ctx = self.context()

        def fn(d: Path) -> dict:
            from safetensors.torch import save_file

            from concept_ext.cache.embed import embed_texts

            texts = ctx.load_split("test").texts
            e = embed_texts(texts, model_name=self.cfg.eval.encoder, batch_size=self.cfg.eval.embed_batch_size,
                            device=self.device, show_progress=self.progress)
            tmp = d / ".embeddings.tmp"
            save_file({"embeddings": e.float().contiguous().cpu()}, str(tmp))
            tmp.replace(d / "embeddings.safetensors")
            return {"n": int(e.shape[0]), "dim": int(e.shape[1])}

        return self._stage("embed", "embed", [self._token(self.record("cache")), self.cfg.eval.encoder], fn)

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
        ctx = self.context()

        def fn(d: Path) -> dict:
            return fit_method(ctx, method, seed, d)

        return self._stage(name, "fit", [self._token(self.record("cache")), self._method_config(method), seed], fn,
                           scratch_for_others=True)

    def evaluate(self, method: str, seed: int) -> runstate.StageRecord:
        """Every metric for one fitted method under each readout protocol (its fit and the embeddings must
        have finished: their records are read from disk)."""
        from concept_ext.pipeline.methods import evaluate_method

        name = f"evaluate/{method}-s{seed}"
        ctx = self.context()

        def fn(d: Path) -> dict:
            res = evaluate_method(ctx, method, seed, self.out / f"fit/{method}-s{seed}")
            runstate.atomic_write_json(d / "results.json", res)
            return {"protocols": list(res.get("protocols", {}))}

        fit_rec, embed_rec = self.record(f"fit/{method}-s{seed}"), self.record("embed")
        inputs = [self._token(fit_rec), self._token(embed_rec), self.cfg.eval, self.cfg.protocols]
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
            distributed.barrier(group=wait)  # the evaluations below read the embed record from disk
        with distributed.local():
            for method, seed in mine:
                logger.info("task %s-s%d on rank %d of %d", method, seed, rank, world)
                self.fit(method, seed)
                if evaluate:
                    self.evaluate(method, seed)
        distributed.barrier(group=wait)  # every task's stage record is written
        return mine

    # ------------------------------------------------------------------------------------------------
    # Everything
    # ------------------------------------------------------------------------------------------------

    def run(self, upto: str = "report") -> Optional[Path]:
        """Run or resume every stage in order, up to and including ``upto`` (one of :data:`UPTO`).

        The one stage sequence: the CLI's pipeline commands, :func:`run` and torchrun jobs all come here.
        ``config.json`` is written first, so a run folder is usable (``explain``) as soon as its fits are.
        Under torchrun the SAE fits run data-parallel on every rank (``fit_parallel="data"``) or every
        (method, seed) task is dealt out to the ranks (``"tasks"``, :meth:`fit_tasks`); then the other ranks
        leave and rank 0 runs the rest single-process (finished stages are skipped by their records).

        Returns the path of ``report.md`` when this call wrote the report (rank 0), else None."""
        if upto not in UPTO:
            raise ValueError(f"upto: unknown stage {upto!r}; choose from {list(UPTO)}")
        cut = UPTO.index(upto)
        if distributed.is_main():
            runstate.atomic_write_json(self.out / "config.json", self.cfg.to_dict())
        self.finetune()
        if cut < UPTO.index("cache"):
            return None
        self.cache()
        if cut < UPTO.index("fit"):
            return None
        evaluate = cut >= UPTO.index("evaluate")
        if distributed.enabled():
            if self.cfg.fit_parallel == "tasks":
                self.fit_tasks(evaluate=evaluate)
            else:  # data-parallel SAE training on every rank; the baselines run on rank 0 below
                from concept_ext.pipeline.methods import SAE_METHODS

                for method, seed in self.tasks():
                    if method in SAE_METHODS:
                        self.fit(method, seed)
            main = distributed.is_main()
            distributed.shutdown()
            if not main:
                return None
        if evaluate:
            self.embed()
        for method, seed in self.tasks():
            self.fit(method, seed)
            if evaluate:
                self.evaluate(method, seed)
        if cut < UPTO.index("report"):
            return None
        return self.report()

    def report(self) -> Path:
        """metrics.json + report.md + figures, from every evaluation's results (every stage before the
        report must have finished: their records are read from disk)."""
        from concept_ext.report.markdown import write_report
        from concept_ext.pipeline.results import assemble_results

        names = ["finetune", "cache", "embed"] + [f"{kind}/{m}-s{s}" for m, s in self.tasks()
                                                  for kind in ("fit", "evaluate")]
        records = {name: self.record(name) for name in names}
        results = assemble_results(self.context(), records)
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
        progress: bool = True, upto: str = "report") -> Optional[Path]:
    """Run the pipeline up to ``upto`` (see :meth:`Pipeline.run`); returns the path of ``report.md`` (None
    when stopped before the report)."""
    return Pipeline(config if config is not None else RunConfig(), out, force=force, progress=progress).run(upto)
