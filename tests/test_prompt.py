"""Prompt template, single-token label digits under the real Pythia tokenizer, truncation, padding,
position ids and decision positions."""
from __future__ import annotations

import pytest
import torch
from conftest import needs_shared

from concept_ext.config.clf import PromptConfig
from concept_ext.text.prompt import (build_prompt, decision_positions, encode_texts, label_token_ids, pad_batch,
                                position_ids_from_mask)

AG = ["World", "Sports", "Business", "SciTech"]


def test_template_exact():
    assert build_prompt("Hi there.", AG) == (
        "Hi there.\n\nOPTIONS:\n0(World)\n1(Sports)\n2(Business)\n3(SciTech)\n")
    with pytest.raises(ValueError, match="template"):
        build_prompt("x", AG, template="nope")


@needs_shared
@pytest.mark.parametrize("names", [AG, ["negative", "positive"], ["non-offensive", "offensive"],
                                   ["negative", "neutral", "positive"]])
def test_pythia_label_digits_are_single_tokens(pythia_tokenizer, names):
    tok = pythia_tokenizer
    assert tok("Hello, my dog is cute", add_special_tokens=False)["input_ids"] == [12092, 13, 619, 4370, 310, 20295]
    ids = label_token_ids(tok, len(names), class_names=names)
    assert ids == [17, 18, 19, 20][:len(names)]  # offline.md 2.1
    prompt = build_prompt("Some text here", names)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert p_ids[-1] == 187  # the "\n" ending the option list = position -2 of prompt+digit
    for c in range(len(names)):
        full = tok(prompt + str(c), add_special_tokens=False)["input_ids"]
        assert full[:-1] == p_ids and full[-1] == ids[c] and len(full) == len(p_ids) + 1


class _MultiTokenDigits:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text] + ([0] if text.isdigit() else [])}


def test_multi_token_digit_is_rejected():
    with pytest.raises(ValueError, match="single-token"):
        label_token_ids(_MultiTokenDigits(), 2)
    with pytest.raises(ValueError, match="n_classes"):
        label_token_ids(_MultiTokenDigits(), 11)


@needs_shared
def test_left_truncation_keeps_options_and_reports_seen_text(pythia_tokenizer):
    tok = pythia_tokenizer
    long = " ".join(f"word{i}" for i in range(200))
    cfg = PromptConfig(max_length=40)
    enc = encode_texts(tok, [long, "short text"], AG, cfg)
    full = tok(build_prompt(long, AG), add_special_tokens=False)["input_ids"]
    assert enc.ids[0] == full[-40:] and enc.truncated == [True, False]
    assert long.endswith(enc.seen_texts[0]) and len(enc.seen_texts[0]) < len(long)
    assert enc.seen_texts[1] == "short text"
    right = encode_texts(tok, [long], AG, PromptConfig(max_length=40, truncation_side="right"))
    assert right.ids[0] == full[:40] and long.startswith(right.seen_texts[0])
    eos = encode_texts(tok, ["short text"], AG, PromptConfig(append_eos=True))
    assert eos.ids[0][-1] == tok.eos_token_id and eos.ids[0][:-1] == enc.ids[1]
    html = encode_texts(tok, ["a<br />b"], AG, PromptConfig(strip_html=True))
    assert html.seen_texts[0] == "a b"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_positions_and_decision(side):
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=1, side=side)
    if side == "left":
        assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
        assert decision_positions(mask).tolist() == [2, 2]
    else:
        assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]
        assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
        assert decision_positions(mask).tolist() == [2, 0]
    assert decision_positions(mask, kind="encoder").tolist() == ([0, 2] if side == "left" else [0, 0])
    with pytest.raises(ValueError):
        pad_batch([], pad_id=0)
    with pytest.raises(ValueError):
        PromptConfig(padding_side="middle")
    assert torch.equal(pad_batch([[1]], pad_id=0)[1], torch.ones(1, 1, dtype=torch.long))
