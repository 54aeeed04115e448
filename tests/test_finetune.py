"""Fine-tuning: restricted-head CE trains the model, schedule values, data order, optimiser fallback,
atomic checkpoints and exact resumption, and the saved model reloads through load_backbone."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_bert, make_tiny_neox, needs_shared

from concept_ext.classifier.backbones import load_backbone, weights_hash
from concept_ext.classifier.model import Classifier
from concept_ext.config.clf import FineTuneConfig
from concept_ext.text.data import TextDataset, load_dataset
from concept_ext.classifier.finetune import _lr_lambda, batch_order, finetune

QUICK = dict(steps=4, batch_size=4, lr=1e-3, warmup_ratio=0.25, eval_batch_size=16)


@pytest.fixture(scope="module")
def sst():
    return load_dataset("sst2", "validation", max_rows=32)


# A planted two-class task in the tiny BERT's vocabulary: each sentence holds four cue words of its class
# among one to three filler words, so the class is learnable from any sentence and a held-out split is fair.
_FILL = "the a of to and is in it for on with this that was".split()
_CUES = {0: "bad lost stock price market".split(), 1: "good great win sports team".split()}


def planted(n: int, seed: int) -> TextDataset:
    """``n`` planted sentences, alternating labels, drawn with ``seed``."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        words = [rng.choice(_FILL) for _ in range(rng.randint(1, 3))] + [rng.choice(_CUES[i % 2]) for _ in range(4)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(i % 2)
    return TextDataset(texts=texts, labels=np.array(labels, dtype=np.int64), class_names=["negative", "positive"],
                       key="planted", split=f"seed{seed}", fingerprint=f"planted-{n}-{seed}")


@pytest.mark.parametrize("seed", [0, 1])
def test_finetune_loss_falls_and_beats_chance_held_out(tmp_path, seed):
    """80 steps on 64 planted sentences: the loss falls (measured: mean of the first 10 steps 0.69, of the
    last 10 about 0.2-0.3 for seeds 0-2) and the accuracy on 48 other sentences is far above chance (0.5;
    measured 1.0), while the untrained model is at chance there."""
    train, test = planted(64, seed=2 * seed), planted(48, seed=2 * seed + 1)
    assert not set(train.texts) & set(test.texts), "the held-out split must not repeat training sentences"
    clf = Classifier(make_tiny_bert(tmp_path, num_labels=2, seed=seed), train.class_names)
    before = float((clf.predict(test.texts).logits.argmax(1).numpy() == test.labels).mean())
    cfg = FineTuneConfig(steps=80, batch_size=8, lr=1e-3, warmup_ratio=0.1, eval_batch_size=32, seed=seed)
    res = finetune(clf, train, config=cfg, test=test)
    first, last = float(np.mean(res.losses[:10])), float(np.mean(res.losses[-10:]))
    msg = f"seed={seed} first={first:.3f} last={last:.3f} before={before:.3f} test_acc={res.test_acc:.3f}"
    assert last < 0.6 * first, msg
    assert res.test_acc >= 0.9 and before <= 0.7, msg


def test_presets_and_schedule():
    p = FineTuneConfig.preset("paper")
    assert (p.steps, p.batch_size, p.lr, p.warmup()) == (30_000, 2, 2e-6, 1500)  # method.md 1.4
    assert FineTuneConfig.preset("v1").warmup() == 3000
    assert FineTuneConfig.preset("paper", warmup_steps=500).warmup() == 500  # reference quirk (oddity 20)
    f = _lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    with pytest.raises(ValueError):
        FineTuneConfig(optimizer="sgd")


def test_batch_order_is_a_seeded_bucketed_permutation():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    it = batch_order(lengths, 2, seed=3, bucket_factor=5)
    epoch = [next(it) for _ in range(5)]
    assert sorted(sum(epoch, [])) == list(range(10))
    it2 = batch_order(lengths, 2, seed=3, bucket_factor=5)
    assert [next(it2) for _ in range(5)] == epoch
    assert [next(it) for _ in range(5)] != epoch  # the next epoch reshuffles


@needs_shared
def test_finetune_trains_and_records_fallback(pythia_tokenizer, sst, tmp_path):
    bb = make_tiny_neox(pythia_tokenizer)
    clf = Classifier(bb, sst.class_names)
    before = weights_hash(bb.model)
    cfg = FineTuneConfig(**QUICK, optimizer="adamw8bit")
    res = finetune(clf, sst, config=cfg, test=sst, out_dir=tmp_path / "ft")
    assert res.steps == 4 and len(res.losses) == 4 and all(math.isfinite(x) for x in res.losses)
    assert res.optimizer_used.startswith("torch.optim.AdamW (fallback from adamw8bit")
    assert weights_hash(bb.model) != before and not bb.model.training
    assert 0.0 <= res.train_acc <= 1.0 and res.test_acc == res.train_acc
    # the saved model reloads from its folder and predicts the same
    again = Classifier(load_backbone(res.model_dir), sst.class_names)
    torch.testing.assert_close(again.predict(sst.texts[:4]).logits, clf.predict(sst.texts[:4]).logits)


@needs_shared
def test_resume_is_exact(pythia_tokenizer, sst, tmp_path, monkeypatch):
    cfg = FineTuneConfig(**QUICK, checkpoint_every=2)
    straight = Classifier(make_tiny_neox(pythia_tokenizer), sst.class_names)
    finetune(straight, sst, config=cfg, out_dir=tmp_path / "a")

    crashed = Classifier(make_tiny_neox(pythia_tokenizer), sst.class_names)
    calls = {"n": 0}
    real = crashed.forward_batch

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(crashed, "forward_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune(crashed, sst, config=cfg, out_dir=tmp_path / "b")
    assert (tmp_path / "b" / "ckpt-00000002").is_dir() and not list((tmp_path / "b").glob(".ckpt*"))
    resumed = Classifier(make_tiny_neox(pythia_tokenizer), sst.class_names)
    res = finetune(resumed, sst, config=cfg, out_dir=tmp_path / "b")
    assert res.resumed_from == 2 and len(res.losses) == 4
    assert weights_hash(resumed.model) == weights_hash(straight.model)


@needs_shared
def test_encoder_finetune(tmp_path, sst):
    bb = make_tiny_bert(tmp_path, num_labels=2)
    clf = Classifier(bb, sst.class_names)
    res = finetune(clf, sst, config=FineTuneConfig(**{**QUICK, "steps": 3}))
    assert len(res.losses) == 3 and res.optimizer_used == "torch.optim.AdamW"


class _Payload:
    """Unpickling it would create ``path`` (what a malicious trainer_state.pt could do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@needs_shared
def test_resume_refuses_a_pickled_callable(pythia_tokenizer, sst, tmp_path):
    """trainer_state.pt loads with weights_only=True: a crafted file holding a callable is refused, named,
    and never runs; a real checkpoint's state (optimizer, scheduler, RNG) loads under the same rule."""
    from concept_ext.classifier.finetune import load_trainer_state

    cfg = FineTuneConfig(**QUICK, checkpoint_every=2)
    out = tmp_path / "ft"
    finetune(Classifier(make_tiny_neox(pythia_tokenizer), sst.class_names), sst, config=cfg, out_dir=out)
    state_file = out / "ckpt-00000004" / "trainer_state.pt"
    assert load_trainer_state(state_file)["step"] == 4  # the real state needs no unpickling of code
    marker = tmp_path / "pwned"
    state = torch.load(state_file, weights_only=True)
    torch.save(dict(state, scheduler=_Payload(marker)), state_file)
    with pytest.raises(ValueError, match=r"trainer_state.pt: refusing to load"):
        finetune(Classifier(make_tiny_neox(pythia_tokenizer), sst.class_names), sst, config=cfg, out_dir=out)
    assert not marker.exists(), "the pickled callable ran"
