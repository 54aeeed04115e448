"""The README's command-line flow, run exactly as written (``python -m concept_ext ...`` in a subprocess):
a run that stopped after ``train``, then ``explain``; the same folder finished with ``run``, then
``explain`` again (issue 22 item 1: the CLI had its own copy of the stage order that never wrote
config.json, so ``explain`` failed after every CLI run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_shared

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()

# A tiny random GPT-NeoX (see test_pipeline.py), ClassifSAE only: the flow, not the science, is tested.
TINY = {
    "backbone": "config:" + str(SHARED / "models" / "pythia-configs" / "pythia-14m"),
    "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 64, "pad_token_id": 1},
    "dataset": "ag_news", "train_rows": 64, "test_rows": 24, "methods": ["ClassifSAE"], "device": "cpu",
    "finetune": {"steps": 4, "batch_size": 8, "lr": 1e-3},
    "sae": {"expansion": 2, "k": 4, "n_concepts": 6},
    "train_classifsae": {"total_samples": 1280, "batch_size": 64, "progress": False},
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "concept_ext", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
@needs_shared
def test_train_then_explain_then_run_then_explain(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "runs" / "demo"
    text = "I love this phone"

    _ok(_cli("train", "--config", str(config), "--out", str(out), "--quiet"))
    assert (out / "config.json").is_file(), "the CLI must write config.json (explain reads it)"
    assert not (out / "metrics.json").exists(), "train stops before the report"
    shown = _ok(_cli("explain", "--run", str(out), text))
    assert f"text: {text!r}" in shown and "prediction:" in shown and "method: ClassifSAE" in shown

    printed = _ok(_cli("run", "--config", str(config), "--out", str(out), "--quiet"))
    assert f"report: {out / 'report.md'}" in printed and (out / "metrics.json").is_file()
    ex = json.loads(_ok(_cli("explain", "--run", str(out), "--json", text)))
    assert ex["prediction"] in ex["class_names"] and ex["method"] == "ClassifSAE"
