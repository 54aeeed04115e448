"""Running ``python -m concept_ext ...`` as the README writes it, in a subprocess, on a tiny offline config.

``tiny_config(tmp, **fields)`` writes the tiny run of tests/test_pipeline.py (random 2-layer GPT-NeoX, AG
News slice) with ``fields`` overriding it; ``run_cli(args)`` runs the command from the repository root and
returns the finished process (stdout and stderr as text).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the checkout; a worktree elsewhere points at it with CONCEPT_EXT_SHARED_DIR.
SHARED = Path(os.environ.get("CONCEPT_EXT_SHARED_DIR") or (ROOT / ".." / "shared")).resolve()

TINY = {
    "backbone": "config:" + str(SHARED / "models" / "pythia-configs" / "pythia-14m"),
    "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 64, "pad_token_id": 1},
    "dataset": "ag_news", "train_rows": 160, "test_rows": 64,
    "finetune": {"steps": 40, "batch_size": 8, "lr": 1e-3},
    "sae": {"expansion": 4, "k": 4, "n_concepts": 6},
    "train_classifsae": {"total_samples": 6400, "batch_size": 64, "progress": False},
    "train_sae": {"total_samples": 6400, "batch_size": 64, "progress": False},
    "baselines": {"select": {"selection_labels": "ground_truth"},
                  "conceptshap": {"epochs": 2, "batch_size": 32, "progress": False},
                  "hiconcept": {"epochs": 2, "flip_start_epoch": 1, "batch_size": 32, "progress": False}},
}
"""The tiny run of tests/test_pipeline.py (a few seconds per stage on one CPU core)."""


def tiny_config(tmp: Path, name: str = "tiny.json", **fields) -> Path:
    """Write the tiny config with ``fields`` replacing top-level keys; returns its path."""
    cfg = copy.deepcopy(TINY)
    cfg.update(fields)
    path = Path(tmp) / name
    path.write_text(json.dumps(cfg))
    return path


def write_split(folder: Path, split: str, texts: list, labels: list) -> Path:
    """``folder/<split>.csv`` with ``text`` and ``label`` columns (a header only when both are empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: offline, the checkout on PYTHONPATH, ../shared located."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CONCEPT_EXT_SHARED_DIR=str(SHARED), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    return env


def run_cli(args: list[str], *, timeout: float = 600, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``python -m concept_ext <args>`` from the repository root; never raises on a non-zero exit.

    ``max_file_bytes`` caps the size of any file the command writes (RLIMIT_FSIZE; Python ignores SIGXFSZ,
    so a write past it fails with EFBIG, as on a full disk)."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "concept_ext", *map(str, args)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if max_file_bytes is not None else None)


def popen_cli(args: list[str]) -> subprocess.Popen:
    """The same command started in the background (stdout and stderr piped, as text)."""
    return subprocess.Popen([sys.executable, "-m", "concept_ext", *map(str, args)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
