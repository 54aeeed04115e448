"""The run context and the stage records: a stage reads its upstream stages' records from disk, so it runs
the same whether or not the stages before it ran in this process (issue 23 item 2)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import needs_shared
from concept_ext.config.run import load_run_config
from concept_ext.pipeline.context import RunContext, open_run
from concept_ext.pipeline.results import assemble_results
from concept_ext.pipeline.stages import Pipeline
from concept_ext.runstate import StageRecord, read_record

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()

# A tiny random GPT-NeoX fine-tuned for two steps: the finetune stage takes seconds.
TINY = ["backbone=config:" + str(SHARED / "models" / "pythia-configs" / "pythia-14m"),
        'config_overrides={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, '
        '"intermediate_size": 64, "pad_token_id": 1}',
        "dataset=ag_news", "train_rows=24", "test_rows=12", "finetune.steps=2", "finetune.batch_size=4", "device=cpu"]


@needs_shared
def test_stage_reads_upstream_record_from_disk(tmp_path):
    cfg = load_run_config(None, TINY)
    out = tmp_path / "run"
    ft = Pipeline(cfg, out, progress=False).finetune()
    # A second pipeline object (as in a second process): its cache stage depends on the finetune record
    # found on disk, not on an attribute set by a finetune() call on this object.
    later = Pipeline(cfg, out, progress=False)
    rec = later.cache()
    assert rec.extra["rows"] == {"train": 24, "test": 12}
    assert later.record("finetune").finished_at == ft.finished_at
    ctx = later.context()
    assert ctx.class_names == ft.extra["class_names"]
    assert ctx.load_split("test").h.shape[0] == 12
    # open_run builds the same context from the folder alone (explain's path); no config.json yet.
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_run(out)


@needs_shared
def test_stage_without_upstream_record_names_it(tmp_path):
    cfg = load_run_config(None, TINY)
    with pytest.raises(FileNotFoundError, match="stage 'finetune' has not finished"):
        Pipeline(cfg, tmp_path / "empty", progress=False).cache()


def test_results_timings_come_from_the_records(tmp_path, monkeypatch):
    """assemble_results takes the stage records explicitly: the timings are theirs, in their order."""
    cfg = load_run_config(None, ['methods=["ICA"]'])
    ctx = RunContext(cfg=cfg, out=tmp_path, device="cpu", progress=False, class_names=["a", "b"])

    class Split:  # the fields of an ActivationCache that assemble_results reads
        import torch

        pred = torch.tensor([0, 1, 1])
        label = torch.tensor([0, 1, 0])

    class Clf:
        layer = 3

    import torch

    monkeypatch.setitem(ctx._memo, "split:test", Split())
    monkeypatch.setitem(ctx._memo, "classifier", Clf())
    monkeypatch.setattr(ctx, "embeddings", lambda: torch.eye(3))
    (tmp_path / "evaluate" / "ICA-s42").mkdir(parents=True)
    (tmp_path / "evaluate" / "ICA-s42" / "results.json").write_text('{"method": "ICA", "seed": 42}')
    records = {"finetune": StageRecord("finetune", "f", 2.5, extra={"train_accuracy": 0.5, "steps": 0}),
               "cache": StageRecord("cache", "c", 1.25, extra={"rows": {"train": 10, "test": 3}}),
               "fit/ICA-s42": StageRecord("fit/ICA-s42", "x", 4.0)}
    res = assemble_results(ctx, records)
    assert res["run"]["timings"] == {"finetune": 2.5, "cache": 1.25, "fit/ICA-s42": 4.0}
    assert res["classifier"]["n_train"] == 10 and res["classifier"]["n_test"] == 3
    assert res["classifier"]["test_accuracy"] == pytest.approx(2 / 3)
    assert res["run"]["hook_layer"] == 3 and res["run"]["class_names"] == ["a", "b"]
    assert list(res["methods"]) == ["ICA"]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level and TYPE_CHECKING imports included)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_methods_and_results_do_not_import_the_stages():
    """methods.py, results.py and context.py never import the stage machinery (the knot of issue 23)."""
    for name in ("methods.py", "results.py", "context.py"):
        imports = _imports(ROOT / "concept_ext" / "pipeline" / name)
        assert "concept_ext.pipeline.stages" not in imports, f"{name} imports the stages"
