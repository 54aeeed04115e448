"""report.md and its figures from synthetic results dictionaries (concept_ext.report.markdown, concept_ext.report.plots)."""
from __future__ import annotations

import json
import math
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from concept_ext.report import plots

from concept_ext.report import markdown as report
from concept_ext.report.markdown import fmt, lookup, write_report

METHODS = ["ICA", "ConceptSHAP", "HI-Concept", "SAE", "ClassifSAE"]
CLASSES = ["World", "Sports", "Business"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(x: float) -> dict:
    return {"recall": [x] * 3, "precision": [x] * 3, "f1": [x] * 3, "support": [100] * 3}


def _completeness(rng: random.Random, protocol: str, selected: list[int]) -> dict:
    rates = [round(rng.uniform(1, 60), 3) for _ in selected]
    racc = round(rng.uniform(0.6, 0.95), 4)
    return {
        "protocol": protocol, "n_sentences": 500, "n_selected": len(selected), "selected": selected,
        "racc": racc, "ceiling": 0.991, "racc_ratio": racc / 0.991, "original_accuracy": 0.93,
        "bottleneck_accuracy": racc - 0.05, "original_ce": 0.2, "bottleneck_ce": 0.5,
        "ce_averaging": "sentence",
        "original_scores": _scores(0.9), "bottleneck_scores": _scores(0.8), "act_threshold": 1e-6,
        "avg_act_rate": sum(rates) / len(rates), "max_act_rate": max(rates),
        "act_rates": rates, "rescaled": True,
    }


def _conditional(rng: random.Random, protocol: str, selected: list[int], seg: list[int]) -> dict:
    per = [{"concept": c, "position": j, "segment": seg[j], "n_active": rng.randint(0, 300),
            "flip_rate": round(rng.uniform(0, 0.5), 4), "tvd": rng.uniform(0, 0.3), "delta_acc": -0.01}
           for j, c in enumerate(selected)]
    per[-1].update(n_active=0, flip_rate=None, tvd=None, delta_acc=None)
    return {"protocol": protocol, "n_sentences": 500, "n_selected": len(selected), "n_pairs": 900,
            "n_evaluated": len(selected) - 1, "active_threshold": 1e-8, "delta_f_cond": rng.uniform(0, 0.3),
            "tvd_cond": rng.uniform(0, 0.2), "delta_acc_cond": -0.02, "bottleneck_accuracy": 0.85,
            "per_concept": per, "path": "sparse", "rescaled": True}


def _segment(protocol: str) -> dict:
    means = [{"fraction": p, "delta_acc": -p / 400, "flip_rate": p / 300, "tvd": p / 500}
             for p in (25, 50, 75, 100)]
    return {"protocol": protocol, "n_sentences": 500, "n_classes": 3, "segments": [[0], [1], [2]],
            "bottleneck_accuracy": 0.85, "means": means, "entries": [], "rescaled": True}


def _method(rng: random.Random, name: str, n_f: int = 3, m: int = 64) -> dict:
    selected = sorted(rng.sample(range(m), n_f)) if name != "ClassifSAE" else list(range(n_f))
    seg = [j % 3 for j in range(n_f)]
    words = ["market", "stock", "team", "game", "election", "oil", "season", "coach", "bank", "profit",
             "minister", "league", "shares", "war", "goal", "quarter", "talks", "player"]
    texts = [[f"{name} sentence {j}-{r} about {rng.choice(words)} " + "word " * rng.randint(2, 50)
              for r in range(10)] for j in range(n_f)]
    texts[0][0] = "pipe | inside\nand a newline " + "x" * 300
    out = {
        "n_selected": n_f, "selected": selected, "dropped": [m - 1], "segmentation": seg,
        "protocols": {p: {"completeness": _completeness(rng, p, selected),
                          "conditional": _conditional(rng, p, selected, seg), "segment": _segment(p)}
                      for p in ("tail", "context")},
        "interpret": {
            "concept_sim": {"weighted": rng.uniform(0, 0.5), "unweighted": 0.2,
                            "per_concept": [rng.uniform(0, 0.6) for _ in selected],
                            "n_active": [rng.randint(2, 200) for _ in selected], "n_pairs": [1] * n_f,
                            "breaks": [0.1] * n_f, "constant": [False] * n_f},
            "sentence_sim": {"k": [1, 2, 3, 4], "sentence_sim": [0.12 + 0.05 * k + rng.uniform(0, 0.02)
                                                                 for k in range(4)],
                             "n_sentences": [500] * 4, "n_pairs": [1000] * 4, "top": 5, "top_clipped": False},
            "overlap": {"jaccard": 0.1, "redundancy": 1.3, "coverage": 0.9, "n_covered": 450},
            "top_sentences": {"indices": [[rng.randrange(500) for _ in range(10)] for _ in selected],
                              "values": [[rng.uniform(0, 5) for _ in range(10)] for _ in selected],
                              "texts": texts},
            "tfidf": {"terms": [rng.sample(words, 12) for _ in selected],
                      "weights": [sorted((rng.uniform(0.05, 0.6) for _ in range(12)), reverse=True)
                                  for _ in selected]},
        },
        "class_concept_means": [[rng.uniform(-1 if name == "ICA" else 0, 2) for _ in selected]
                                for _ in CLASSES],
        "act_values": [[0.0] * 30 + [rng.uniform(0, 3) for _ in range(70)] for _ in selected],
    }
    if name in ("SAE", "ClassifSAE"):
        out["decoder_pca"] = [[rng.gauss(0, 1), rng.gauss(0, 1)] for _ in range(m)]
    return out


def full_results() -> dict:
    rng = random.Random(0)
    return {
        "run": {"backbone": "pythia-14m", "dataset": "ag_news", "class_names": CLASSES, "preset": "v2",
                "protocols": ["tail", "context"], "config": {"sae": {"k": 10, "n_concepts": 5}, "seed": 0},
                "versions": {"concept_ext": "0.1.0", "torch": "2.13.0", "transformers": "5.23",
                             "python": "3.11.7"},
                "timings": {"finetune": 12.5, "cache": 3.25, "fit/classifsae": 250.0, "evaluate/tail": 4.0},
                "device": "cpu", "seeds": [0], "checkpoint": "ckpt_000010000000"},
        "classifier": {"train_accuracy": 0.971, "test_accuracy": 0.9234, "n_train": 4000, "n_test": 500},
        "baseline_cosine": {"mean": 0.0812, "var": 0.01, "n_sentences": 500},
        "methods": {name: _method(rng, name) for name in reversed(METHODS)},  # the report must reorder
    }


def minimal_results() -> dict:
    """Two methods, tail only, no optional keys, None values."""
    completeness = {"racc": 0.75, "ceiling": None, "avg_act_rate": None, "act_rates": [10.0, None]}
    return {
        "run": {"backbone": "pythia-14m", "dataset": "sst2", "class_names": ["neg", "pos"]},
        "classifier": {"test_accuracy": 0.8, "n_test": 100, "train_accuracy": None},
        "methods": {
            "ClassifSAE": {"n_selected": 2, "selected": [0, 1], "segmentation": [0, 1],
                           "protocols": {"tail": {"completeness": completeness,
                                                  "conditional": {"delta_f_cond": None, "tvd_cond": 0.05},
                                                  "segment": None}},
                           "interpret": {"concept_sim": {"weighted": None}}},
            "ICA": {"n_selected": 1, "protocols": {"tail": {"completeness": {"racc": 0.5, "ceiling": 0.9}}}},
            "SAE": {"n_selected": 0, "selected": [], "class_concept_means": [[], []], "act_values": [],
                    "decoder_pca": [[0.0, 1.0], [1.0, 0.0]],
                    "interpret": {"tfidf": {"terms": [], "scores": []}},
                    "protocols": {"tail": {"completeness": {"racc": None, "ceiling": 0.9, "act_rates": []}}}},
        },
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _links(text: str) -> list[str]:
    return re.findall(r"\]\((figures/[^)]+)\)", text)


def _row(text: str, label: str, occurrence: int = 0) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    cells = re.split(r"(?<!\\)\|", rows[occurrence])[1:-1]
    return [c.strip() for c in cells[1:]]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str, dict]:
    results = full_results()
    run_dir = tmp_path_factory.mktemp("run")
    path = write_report(run_dir, results)
    return run_dir, path.read_text(encoding="utf-8"), results


def test_table_has_every_method_in_paper_order(full_report):
    _, text, _ = full_report
    assert text.startswith("# concept_ext report — pythia-14m on ag_news")
    header = "| metric | ICA | ConceptSHAP | HI-Concept | SAE | ClassifSAE |"
    assert text.count(header) >= 3  # tail table, context table, interpretability table (+ details)
    assert "single-token tail (paper protocol)" in text and "in-context (our extension)" in text
    assert text.index("paper protocol") < text.index("in-context (our extension)")


def test_expected_formatted_numbers(full_report):
    _, text, results = full_report
    ms = [results["methods"][n] for n in METHODS]
    for occ, p in enumerate(("tail", "context")):
        comp = [m["protocols"][p]["completeness"] for m in ms]
        cond = [m["protocols"][p]["conditional"] for m in ms]
        assert _row(text, "RAcc", occ) == [f"{c['racc']:.3f} (ceiling 0.991)" for c in comp]
        assert _row(text, "Avg. Act. Rate (%)", occ) == [f"{c['avg_act_rate']:.1f}" for c in comp]
        assert _row(text, "Δf_cond (a) paper", occ) == [f"{c['delta_f_cond']:.3f}" for c in cond]
        assert _row(text, "TVD_cond (a) paper", occ) == [f"{c['tvd_cond']:.3f}" for c in cond]
        weighted = [f"{m['interpret']['concept_sim']['weighted']:.3f}" for m in ms]
        assert _row(text, "ConceptSim (weighted)", occ) == weighted
        assert _row(text, "\\|F\\|", occ) == ["3"] * 5
    for k in range(1, 5):
        curve = [f"{m['interpret']['sentence_sim']['sentence_sim'][k - 1]:.3f}" for m in ms]
        assert _row(text, f"SentenceSim({k})") == curve
    assert _row(text, "cosine baseline (all test pairs)") == ["0.081"] * 5
    assert "Test accuracy **0.923** on 500 sentences; train accuracy 0.971" in text
    assert "| fit/classifsae | 4 min 10 s |" in text and "| finetune | 12.5 s |" in text
    assert '"n_concepts": 5' in text and "<details><summary>Full configuration (JSON)</summary>" in text
    assert "| checkpoint | ckpt_000010000000 |" in text
    # per-concept table of ClassifSAE: position 0 is concept 0 in segment "World"
    cs = results["methods"]["ClassifSAE"]
    rate0 = cs["protocols"]["tail"]["completeness"]["act_rates"][0]
    c0 = cs["protocols"]["tail"]["conditional"]["per_concept"][0]
    assert f"| 0 | 0 | World | {rate0:.1f} | {c0['n_active']} / {c0['flip_rate']:.3f} / {c0['tvd']:.3f} |" in text


def test_sentences_are_escaped_and_truncated(full_report):
    _, text, _ = full_report
    line = next(ln for ln in text.splitlines() if "pipe \\| inside and a newline" in ln)
    shown = line.split("pipe \\| inside")[1].split(" |")[0]
    assert shown.endswith("…") and len("pipe | inside" + shown) <= 161
    assert "pipe | inside" not in text


def test_every_linked_figure_is_a_png(full_report):
    run_dir, text, results = full_report
    links = _links(text)
    names = {Path(link).name for link in links}
    expected = {"sentence_sim.png", "act_rate_hist.png", "decoder_pca_SAE.png", "decoder_pca_ClassifSAE.png"}
    expected |= {f"heatmap_{report.slug(n)}.png" for n in METHODS}
    for n in METHODS:
        expected |= {f"wordcloud_{report.slug(n)}_{c}.png" for c in results["methods"][n]["selected"]}
    assert expected <= names
    for link in links:
        f = run_dir / link
        assert f.is_file(), link
        w, h = _png_size(f)
        assert w >= 300 and h >= 200 and f.stat().st_size > 3000, link
    assert not list(run_dir.glob(".report-*")), "temporary folder left behind"


def test_minimal_results_do_not_crash(tmp_path):
    text = write_report(tmp_path, minimal_results()).read_text(encoding="utf-8")
    assert "| metric | ICA | SAE | ClassifSAE |" in text
    assert _row(text, "RAcc") == ["0.500 (ceiling 0.900)", "—", "0.750"]
    # SAE keeps no concept: its means over concepts are undefined, with the reason as a footnote (issue 22).
    assert _row(text, "Δf_cond (a) paper") == ["—", "—<sup>1</sup>", "—"]
    assert _row(text, "TVD_cond (a) paper") == ["—", "—<sup>1</sup>", "0.050"]
    assert "<sup>1</sup> n/a: a mean over concepts, and the method keeps no concept (|F| = 0)." in text
    assert _row(text, "\\|F\\|") == ["1", "0", "2"]
    assert "in-context" not in text
    assert "train accuracy — on — of the — training sentences" in text
    for link in _links(text):
        _png_size(tmp_path / link)


def test_empty_results(tmp_path):
    text = write_report(tmp_path, {}).read_text(encoding="utf-8")
    assert "No method results" in text


def test_mean_std_cells(tmp_path):
    results = minimal_results()
    cs = results["methods"]["ClassifSAE"]
    cs["protocols"]["tail"]["completeness"].update(racc={"mean": 0.9, "std": 0.0123}, ceiling=0.99)
    cs["seeds"] = {"interpret.concept_sim.weighted": [0.1, 0.2, 0.3],
                   "protocols.tail.conditional.tvd_cond": {"mean": 0.04, "std": 0.005}}
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert _row(text, "RAcc")[2] == "0.900 ± 0.012 (ceiling 0.990)"
    assert _row(text, "ConceptSim (weighted)")[2] == "0.200 ± 0.100"
    assert _row(text, "TVD_cond (a) paper")[2] == "0.040 ± 0.005"


@pytest.mark.parametrize("value,kwargs,expected", [
    (None, {}, "—"), (float("nan"), {}, "—"), (0.12345, {}, "0.123"), (12.34, {"digits": 1}, "12.3"),
    (7, {}, "7"), (True, {}, "yes"), ("tail", {}, "tail"), ({"mean": 0.5, "std": 0.25}, {}, "0.500 ± 0.250"),
    ({"mean": 0.5}, {}, "0.500"), ({"mean": None, "std": 1.0}, {}, "—"), ({"std": 1.0}, {}, "—"),
    ([1.0, 2.0, 3.0], {"digits": 2}, "2.00 ± 1.00"), ([4.0], {}, "4.000"), ([], {}, "—"),
    (np.int64(3), {}, "3"), (np.float32(0.25), {}, "0.250"), (np.bool_(False), {}, "no"),
])
def test_fmt(value, kwargs, expected):
    assert fmt(value, **kwargs) == expected


def test_per_seed_method_entries(tmp_path):
    results = minimal_results()
    runs = []
    for racc, tvd in ((0.70, 0.02), (0.80, 0.04), (0.90, None)):
        runs.append({"protocols": {"tail": {"completeness": {"racc": racc},
                                            "conditional": {"tvd_cond": tvd}}}})
    results["methods"]["ICA"]["seeds"] = {"0": runs[0], "1": runs[1], "2": runs[2]}
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert _row(text, "RAcc")[0] == "0.800 ± 0.100 (ceiling 0.900)"
    assert _row(text, "TVD_cond (a) paper")[0] == f"0.030 ± {math.sqrt(2) * 0.01:.3f}"


def test_lookup_paths_and_seed_override():
    m = {"a": {"b": [1, {"c": 2}]}, "seeds": {"a.x": [1.0, 3.0]}}
    assert lookup(m, "a.b.1.c") == 2
    assert lookup(m, "a.b.5", "d") == "d" and lookup(m, "a.z.q") is None
    s = lookup(m, "a.x")
    assert s["mean"] == 2.0 and math.isclose(s["std"], math.sqrt(2))


def test_write_is_atomic_when_a_figure_fails(tmp_path, monkeypatch):
    first = write_report(tmp_path, minimal_results()).read_text(encoding="utf-8")
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "figures").iterdir()}
    second = minimal_results()
    second["methods"]["ClassifSAE"]["class_concept_means"] = [[1.0, 0.0], [0.0, 1.0]]
    second["baseline_cosine"] = {"mean": 0.1}
    calls = {"n": 0}
    real = plots.plot_wordcloud

    def flaky(*args, **kwargs):  # the ICA cloud and the heat map exist when the second cloud fails
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("figure failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_wordcloud", flaky)
    with pytest.raises(RuntimeError, match="figure failed"):
        write_report(tmp_path, second)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == first
    after = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "figures").iterdir()}
    assert after == before, "figures of the failed report were moved in"
    assert not list(tmp_path.glob(".report-*")), "temporary folder left behind"
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "fresh", second)
    assert not (tmp_path / "fresh" / "report.md").exists()


def test_cli_rebuilds_from_metrics_json(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps(minimal_results()), encoding="utf-8")
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file()
    assert report.main([]) == 2


def test_wordcloud_layout_has_no_overlap():
    sizes = [(120.0 - 4 * i, 30.0 - i) for i in range(20)]
    spots = plots._spiral_layout(sizes, 520.0, 280.0)
    boxes = [(x - w / 2, y - h / 2, x + w / 2, y + h / 2)
             for (w, h), spot in zip(sizes, spots) if spot for x, y in [spot]]
    assert len(boxes) >= 10
    assert spots == plots._spiral_layout(sizes, 520.0, 280.0)  # deterministic
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= 520 and 0 <= a[1] and a[3] <= 280
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_module_entry_point_rebuilds_the_report(tmp_path):
    """``python -m concept_ext.report RUN_DIR`` (the command the README gives) still works after the move
    of the report code into concept_ext/report/."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "metrics.json").write_text(json.dumps(minimal_results()), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-m", "concept_ext.report", str(tmp_path)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and (tmp_path / "report.md").is_file(), r.stderr[-3000:]
    assert r.stdout.strip() == str(tmp_path / "report.md")
