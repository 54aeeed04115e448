"""Undefined numbers (issue 22, item 4): the reference's conventional 0 stays in metrics.json with its pair
count, every table (report.md, the README block of tools/publish_results.py) prints "—" with a footnote,
and the seeds' mean leaves out the seeds where the number is undefined."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from concept_ext.pipeline.results import aggregate_seeds
from concept_ext.report.markdown import headline_table, interpret_table
from concept_ext.report.undefined import undefined_map

ROOT = Path(__file__).resolve().parents[1]


def _method(ss, pairs, *, n_selected=3, seed=42):
    return {"seed": seed, "n_selected": n_selected, "selected": list(range(n_selected)),
            "protocols": {"tail": {"completeness": {"racc": 0.9, "ceiling": 0.95, "avg_act_rate": 0.0 if not
                                                    n_selected else 12.5},
                                   "conditional": {"delta_f_cond": None if not n_selected else 0.1,
                                                   "tvd_cond": None if not n_selected else 0.1}}},
            "interpret": {"sentence_sim": {"k": [1, 2, 3, 4], "sentence_sim": ss, "n_pairs": pairs, "top": 5},
                          "concept_sim": {"weighted": 0.0 if not n_selected else 0.2,
                                          "unweighted": 0.0 if not n_selected else 0.2,
                                          "per_concept": [0.2] * n_selected, "n_pairs": [10] * n_selected,
                                          "n_active": [5] * n_selected},
                          "overlap": {"jaccard": 0.0 if n_selected < 2 else 0.1, "redundancy": 0.0 if not
                                      n_selected else 1.2, "coverage": 0.5 if n_selected else 0.0,
                                      "n_covered": 10 if n_selected else 0}}}


def _results():
    methods = {"SAE": _method([0.0, 0.3, 0.2, 0.0], [0, 40, 12, 0]),
               "ConceptSHAP": _method([0.0] * 4, [0] * 4, n_selected=0)}
    for m in methods.values():
        m["undefined"] = undefined_map(m)
    return {"run": {"protocols": ["tail"], "class_names": ["a", "b"]}, "methods": methods,
            "baseline_cosine": {"mean": 0.05}}


def _row(lines, name):
    """The cells of a table row; columns in METHOD_ORDER: ConceptSHAP, then SAE."""
    return next(line for line in lines if line.startswith(f"| {name} |")).strip("|").split(" | ")[1:]


def test_tables_print_a_dash_with_the_reason():
    res = _results()
    lines = interpret_table(res)
    sae, shap = res["methods"]["SAE"], res["methods"]["ConceptSHAP"]
    assert "interpret.sentence_sim.sentence_sim.0" in sae["undefined"]
    assert "interpret.sentence_sim.sentence_sim.1" not in sae["undefined"]
    cells = [_row(lines, f"SentenceSim({k})")[1].strip() for k in (1, 2, 3, 4)]
    assert cells[1:3] == ["0.300", "0.200"] and cells[0].startswith("—<sup>") and cells[3].startswith("—<sup>")
    note = cells[0][len("—<sup>"):-len("</sup>")]
    assert any(line.startswith(f"<sup>{note}</sup> n/a: SentenceSim(1): no two test sentences") for line in lines)
    for name in ("ConceptSim (unweighted)", "Jaccard of A_j", "redundancy"):
        assert _row(lines, name)[0].strip().startswith("—<sup>"), name  # ConceptSHAP keeps no concept
    head = headline_table(res, "tail")
    for name in ("Avg. Act. Rate (%)", "Δf_cond (a) paper", "Δf_cond (c) weighted", "ConceptSim (weighted)"):
        assert _row(head, name)[0].strip().startswith("—<sup>"), name
    assert _row(head, "ConceptSim (weighted)")[1].strip() == "0.200"
    assert any("the method keeps no concept" in line for line in head)


def test_publish_results_readme_block_prints_the_dash(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import publish_results

    res = _results()
    res["run"].update(backbone="x", dataset="y")
    res["classifier"] = {}
    (tmp_path / "metrics.json").write_text(json.dumps(res))
    block = publish_results.run_section(tmp_path)
    assert _row(block, "SentenceSim(1)")[1].strip().startswith("—<sup>")
    assert any("n/a: SentenceSim(1): no two test sentences" in line for line in block)


def test_seed_mean_leaves_out_undefined_seeds():
    a = _method([0.0, 0.3, 0.2, 0.0], [0, 40, 12, 0], seed=42)
    b = _method([0.5, 0.1, 0.2, 0.0], [8, 30, 12, 0], seed=43)
    agg = aggregate_seeds([a, b])["interpret"]["sentence_sim"]
    assert agg["sentence_sim"][0] == 0.5  # seed 42 has no pair at k = 1: only seed 43 counts
    assert abs(agg["sentence_sim"][1] - 0.2) < 1e-12 and agg["sentence_sim"][3] == 0.0
    assert agg["n_pairs"] == [8, 70, 24, 0] and agg["n_pairs_per_seed"] == [[0, 40, 12, 0], [8, 30, 12, 0]]
    assert "interpret.sentence_sim.sentence_sim.3" in undefined_map(aggregate_seeds([a, b]))
