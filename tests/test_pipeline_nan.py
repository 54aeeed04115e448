"""A NaN or inf in cached activations stops the main job where the cache is loaded (the fit stage for the
train split, the embed stage for the test split), with the split and row named, and nothing downstream of
it (fit, evaluation, metrics.json, report.md) is written."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import needs_shared
from safetensors.torch import load_file, save_file

from concept_ext.cache.activations import MANIFEST, CacheError
from concept_ext.config.run import load_run_config
from concept_ext.pipeline.stages import Pipeline
from concept_ext.runstate import output_digests, read_record, write_record
from concept_ext.text.data import sha256_file
from test_pipeline import TINY

pytestmark = needs_shared

SMALL = {**TINY, "train_rows": 48, "test_rows": 24, "methods": ["ICA"], "finetune": {"steps": 2, "batch_size": 8}}


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder whose finetune and cache stages are done (config file, out folder)."""
    tmp = tmp_path_factory.mktemp("nan")
    cfg_path = tmp / "small.json"
    cfg_path.write_text(json.dumps(SMALL))
    p = Pipeline(load_run_config(cfg_path), tmp / "out", progress=False)
    p.finetune()
    p.cache()
    return cfg_path, tmp / "out"


def poison(cache_dir: Path, name: str, row: int, value: float) -> None:
    """Write ``value`` into row ``row`` of tensor ``name`` of the first shard, as a build that produced it
    would (the manifest's SHA-256 updated, so that only the finiteness check can catch it)."""
    man = json.loads((cache_dir / MANIFEST).read_text())
    entry = man["shards"]["0"]
    path = cache_dir / entry["file"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[name][row, -1] = value
    save_file(tensors, str(path), metadata=meta)
    entry["sha256"] = sha256_file(path)
    (cache_dir / MANIFEST).write_text(json.dumps(man))
    # ... and the cache stage's record of its outputs too, so that the rerun trusts the stage (a changed file
    # would otherwise make it redo the cache) and only the finiteness check can catch the value.
    stage_dir = cache_dir.parent
    record = read_record(stage_dir)
    write_record(stage_dir, dataclasses.replace(record, outputs=output_digests(stage_dir)))


@pytest.mark.slow
@pytest.mark.parametrize("split,name,row,value", [("train", "h", 5, float("nan")),
                                                  ("test", "logits", 11, float("inf"))])
def test_nonfinite_cache_stops_the_run_naming_split_and_row(cached_run, tmp_path, split, name, row, value):
    cfg_path, done = cached_run
    out = tmp_path / "out"
    shutil.copytree(done, out)
    poison(out / "cache" / split, name, row, value)
    with pytest.raises(CacheError, match=rf"the cached {name} of the {split} split is not finite \(NaN or inf\) "
                                         rf"in row\(s\) {row} \(row {row}: '"):
        Pipeline(load_run_config(cfg_path), out, progress=False).run()
    assert read_record(out / "cache") is not None  # the stage before is intact
    for stage in ("fit/ICA-s42", "evaluate/ICA-s42") + (("embed",) if split == "test" else ()):
        assert read_record(out / stage) is None, f"{stage} was recorded from a non-finite cache"
    fitted = out / "fit" / "ICA-s42"
    assert not fitted.exists() or not [f for f in fitted.rglob("*") if f.is_file() and f.name != "stage.pending"]
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()


def test_finite_cache_loads(cached_run, tmp_path):
    """Control: the same run folder unpoisoned loads, with finite values (the check does not fire falsely)."""
    from concept_ext.cache.activations import load_cache

    _, done = cached_run
    for split in ("train", "test"):
        c = load_cache(done / "cache" / split)
        assert torch.isfinite(c.h).all() and torch.isfinite(c.logits).all() and len(c.texts) == c.h.shape[0]
