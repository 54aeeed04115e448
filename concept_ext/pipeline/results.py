"""Assembling the per-method, per-seed evaluation results into the run's ``metrics.json`` structure.

With several seeds, every headline number (RAcc, ceiling, activation rate, flip rate, TVD, ConceptSim,
SentenceSim) becomes ``{"mean": x, "std": s, "values": [...]}``; the detailed per-concept outputs are
those of the first seed. Each method's ``"undefined"`` entry maps the paths of the numbers that are the
reference's convention rather than a measurement (e.g. SentenceSim(k) with no pair) to the reason.
"""
from __future__ import annotations

import json
import statistics
from typing import TYPE_CHECKING, Any, Mapping, Optional

from concept_ext.config.run import METHODS

if TYPE_CHECKING:  # pragma: no cover
    from concept_ext.pipeline.context import RunContext
    from concept_ext.runstate import StageRecord

# (path inside a method's results, as a tuple of keys) of every headline number aggregated over seeds.
_HEADLINE = [
    ("protocols", "*", "completeness", "racc"),
    ("protocols", "*", "completeness", "ceiling"),
    ("protocols", "*", "completeness", "avg_act_rate"),
    ("protocols", "*", "conditional", "delta_f_cond"),
    ("protocols", "*", "conditional", "tvd_cond"),
    ("protocols", "*", "conditional", "delta_f_cond_selective"),
    ("protocols", "*", "conditional", "tvd_cond_selective"),
    ("protocols", "*", "conditional", "delta_f_cond_weighted"),
    ("protocols", "*", "conditional", "tvd_cond_weighted"),
    ("interpret", "concept_sim", "weighted"),
    ("n_selected",),
]


def _get(d: Any, path: tuple) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _expand(path: tuple, example: dict) -> list[tuple]:
    if "*" not in path:
        return [path]
    i = path.index("*")
    keys = list((_get(example, path[:i]) or {}).keys())
    return [p for k in keys for p in _expand(path[:i] + (k,) + path[i + 1:], example)]


def _summary(values: list[Optional[float]]) -> Optional[dict]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "values": vals}


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """One method's results across seeds: the first seed's details, headline numbers as mean/std."""
    out = json.loads(json.dumps(per_seed[0]))
    if len(per_seed) == 1:
        return out
    for pattern in _HEADLINE:
        for path in _expand(pattern, out):
            _set(out, path, _summary([_get(r, path) for r in per_seed])) if _get(out, path) is not None else None
    ss = [_get(r, ("interpret", "sentence_sim", "sentence_sim")) for r in per_seed]
    if all(ss):
        # SentenceSim(k) of a seed where no pair shares exactly k concepts is the reference's conventional 0,
        # not a measurement: the mean and std are over the seeds that have pairs (0 when none has any), and
        # n_pairs becomes the total over seeds (0: undefined for every seed), with the per-seed counts kept.
        pairs = [_get(r, ("interpret", "sentence_sim", "n_pairs")) for r in per_seed]
        if not all(pairs):
            pairs = [[1] * len(v) for v in ss]  # results without pair counts: every seed counts
        means, stds = [], []
        for col, cnt in zip(zip(*ss), zip(*pairs)):
            vals = [v for v, c in zip(col, cnt) if c > 0]
            means.append(statistics.fmean(vals) if vals else 0.0)
            stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ssd = out["interpret"]["sentence_sim"]
        ssd["sentence_sim"], ssd["sentence_sim_std"] = means, stds
        if all(_get(r, ("interpret", "sentence_sim", "n_pairs")) for r in per_seed):
            ssd["n_pairs_per_seed"] = pairs
            ssd["n_pairs"] = [sum(col) for col in zip(*pairs)]
    out["seeds"] = [r["seed"] for r in per_seed]
    return out


def assemble_results(ctx: "RunContext", records: Mapping[str, "StageRecord"]) -> dict[str, Any]:
    """The ``metrics.json`` dictionary of a finished run (see ``concept_ext.report.markdown``).

    ``records``: stage name -> its ``stage.json`` record, for ``finetune`` and ``cache`` at least; every
    record's duration goes into the run's timings, in the mapping's order."""
    from concept_ext.metrics import mean_pairwise_cosine
    from concept_ext.report.undefined import undefined_map

    methods: dict[str, Any] = {}
    for method in [m for m in METHODS if m in ctx.cfg.methods]:
        per_seed = [json.loads((ctx.out / f"evaluate/{method}-s{s}" / "results.json").read_text())
                    for s in ctx.cfg.seeds]
        methods[method] = aggregate_seeds(per_seed)
        # Numbers the tables print as "—" (the stored value is the reference's convention): path -> reason.
        methods[method]["undefined"] = undefined_map(methods[method])
    ft, rows = records["finetune"].extra, records["cache"].extra["rows"]
    test = ctx.load_split("test")
    test_acc = float((test.pred == test.label).float().mean()) if len(test.label) else None
    return {
        "run": {"backbone": ctx.cfg.backbone, "dataset": ctx.cfg.dataset, "class_names": ctx.class_names,
                "preset": ctx.cfg.preset, "protocols": list(ctx.cfg.protocols), "config": ctx.cfg.to_dict(),
                "timings": {name: rec.seconds for name, rec in records.items()}, "device": ctx.device,
                "seeds": list(ctx.cfg.seeds), "hook_layer": ctx.classifier.layer},
        # Test accuracy over the whole cached test split (the fine-tuning log may use a capped subset).
        "classifier": {"train_accuracy": ft.get("train_accuracy"), "test_accuracy": test_acc,
                       "n_train": rows["train"], "n_test": rows["test"],
                       "n_train_eval": ft.get("n_train_eval"),
                       "finetune_steps": ft.get("steps")},
        "baseline_cosine": mean_pairwise_cosine(ctx.embeddings()).to_dict(),
        "methods": methods,
    }
