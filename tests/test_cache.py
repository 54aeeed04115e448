"""Activation cache: one pass == batch-1 predictions, sharded atomic resumable writes, key refusal,
SHA-checked shards, and the splice spot check on load."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_neox, needs_shared

from concept_ext.cache.activations import CacheError, CacheKeyMismatch, build_cache, load_cache, spot_check
from concept_ext.classifier.model import Classifier
from concept_ext.config.clf import CacheConfig
from concept_ext.text.data import load_dataset

pytestmark = needs_shared
CFG = CacheConfig(shard_size=4, batch_size=3)


@pytest.fixture(scope="module")
def ds():
    return load_dataset("ag_news", "test", max_rows=10)


@pytest.fixture(scope="module")
def clf(tiny_neox, ds):
    return Classifier(tiny_neox, ds.class_names)


def test_cache_roundtrip_matches_batch1(clf, ds, tmp_path):
    h = build_cache(clf, ds, "test", out_dir=tmp_path / "c", config=CFG)
    assert h.n_rows == 10 and sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "cache.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    c = h.load(classifier=clf, spot_check_rows=3)
    ref = clf.predict(ds.texts, batch_size=1)
    torch.testing.assert_close(c.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.h, ref.hidden, rtol=1e-4, atol=1e-5)
    assert c.h.dtype == torch.float32 and c.h.shape == (10, 32) and c.logits.shape == (10, 4)
    assert torch.equal(c.pred, c.logits.argmax(-1)) and c.label.tolist() == ds.labels.tolist()
    assert c.texts == ds.texts and c.class_names == ["World", "Sports", "Business", "SciTech"]
    assert c.meta["key"]["split"] == "test" and c.meta["key"]["layer"] == 1
    assert c.meta["key"]["dataset_fingerprint"] == ds.fingerprint and c.meta["spot_check_max_abs_err"] < 1e-4
    # same request again: nothing rewritten, same id
    assert build_cache(clf, ds, "test", out_dir=tmp_path / "c", config=CFG).cache_id == h.cache_id


def test_resume_after_interruption(clf, ds, tmp_path):
    d = tmp_path / "r"
    build_cache(clf, ds, "test", out_dir=d, config=CFG, max_shards=1)
    with pytest.raises(CacheError, match="incomplete"):
        load_cache(d)
    (d / ".shard_00001.safetensors.tmp-999").write_bytes(b"half-written garbage")  # a crash mid-write
    first = (d / "shard_00000.safetensors").stat().st_mtime_ns
    build_cache(clf, ds, "test", out_dir=d, config=CFG)
    assert (d / "shard_00000.safetensors").stat().st_mtime_ns == first  # resumed, not redone
    fresh = build_cache(clf, ds, "test", out_dir=tmp_path / "f", config=CFG).load()
    got = load_cache(d)
    assert torch.equal(got.h, fresh.h) and got.texts == fresh.texts


def test_key_mismatch_and_corruption_refused(clf, tiny_neox, ds, tmp_path, pythia_tokenizer):
    d = tmp_path / "k"
    build_cache(clf, ds, "test", out_dir=d, config=CFG)
    other_layer = Classifier(tiny_neox, ds.class_names, layer=0)
    with pytest.raises(CacheKeyMismatch, match="layer"):
        build_cache(other_layer, ds, "test", out_dir=d, config=CFG)
    with pytest.raises(CacheKeyMismatch, match="split"):
        build_cache(clf, ds, "train", out_dir=d, config=CFG)
    with pytest.raises(CacheKeyMismatch, match="split"):
        load_cache(d, expect_key={"split": "train"})
    other = Classifier(make_tiny_neox(pythia_tokenizer, seed=1), ds.class_names)
    with pytest.raises(CacheKeyMismatch, match="weights"):
        load_cache(d, classifier=other)
    c = load_cache(d)
    bad = c._replace(h=c.h + torch.randn_like(c.h) * c.h.std())  # (a constant shift would vanish in LN)
    with pytest.raises(CacheError, match="spot check"):
        spot_check(bad, clf, rows=2)
    man = json.loads((d / "cache.json").read_text())
    shard = d / man["shards"]["1"]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="SHA-256"):
        load_cache(d)


def test_encoder_cache(tiny_bert, ds, tmp_path):
    clf = Classifier(tiny_bert, ds.class_names)
    c = build_cache(clf, ds, "test", out_dir=tmp_path / "e", config=CFG, max_rows=6).load(classifier=clf)
    assert c.h.shape == (6, 32) and c.meta["key"]["position_rule"] == "cls_position_0"
    torch.testing.assert_close(c.logits, clf.predict(c.texts, batch_size=1).logits, rtol=1e-4, atol=1e-5)
