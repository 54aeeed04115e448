"""Hooks on the input of block L: the hooked vector equals output_hidden_states[L]; tensor and tuple
layer forms; replacement edits only the decision position; handles are removed even on error."""
from __future__ import annotations

import pytest
import torch
from conftest import needs_shared
from torch import nn

from concept_ext.classifier.model import Classifier
from concept_ext.classifier.hooks import capture_layer_call, capture_resid_pre, join_hidden, replace_resid_pre, split_hidden

pytestmark = needs_shared
TEXTS = ["The stock market fell sharply today.", "A short one.", "Team wins the final game in overtime!"]


@pytest.mark.parametrize("layer", [0, 1])
def test_hook_equals_hidden_states(tiny_neox, layer):
    clf = Classifier(tiny_neox, ["World", "Sports", "Business", "SciTech"], layer=layer)
    b = clf.batch(clf.encode(TEXTS).ids)
    with torch.no_grad(), capture_resid_pre(clf.resolved.layers[layer], b["positions"]) as st:
        out = tiny_neox.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              position_ids=b["position_ids"], output_hidden_states=True)
    ref = out.hidden_states[layer][torch.arange(3), b["positions"]]
    assert st["h"].shape == (3, 32)
    torch.testing.assert_close(st["h"], ref, rtol=0, atol=0)
    assert not clf.resolved.layers[layer]._forward_pre_hooks


def test_hook_equals_hidden_states_bert(tiny_bert):
    clf = Classifier(tiny_bert, ["a", "b", "c", "d"], layer=1)
    b = clf.batch(clf.encode(TEXTS).ids)
    assert b["positions"].tolist() == [0, 0, 0]
    with torch.no_grad(), capture_resid_pre(clf.resolved.layers[1], b["positions"]) as st:
        out = tiny_bert.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    torch.testing.assert_close(st["h"], out.hidden_states[1][:, 0], rtol=0, atol=1e-6)


class _TupleLayer(nn.Module):
    """Old-style layer: takes hidden_states= as keyword and returns a tuple."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states, extra=None):
        return (self.lin(hidden_states), "aux")


def test_tuple_forms_and_replacement():
    torch.manual_seed(0)
    layer = _TupleLayer()
    x = torch.randn(2, 3, 4)
    pos = torch.tensor([2, 1])
    with capture_resid_pre(layer, pos) as st:
        out = layer(hidden_states=x)
    assert isinstance(out, tuple) and torch.equal(st["h"], x[torch.arange(2), pos])
    v = torch.randn(2, 4)
    with replace_resid_pre(layer, pos, v):
        new = layer(hidden_states=x)[0]
        new_pos = layer(x)[0]
    x2 = x.clone()
    x2[torch.arange(2), pos] = v
    torch.testing.assert_close(new, layer.lin(x2))
    torch.testing.assert_close(new_pos, layer.lin(x2))
    assert torch.equal(split_hidden((x, 1)), x) and join_hidden((x, "a"), v)[1] == "a"
    assert join_hidden(x, v) is v
    with pytest.raises(TypeError):
        split_hidden("nope")


def test_handles_removed_when_forward_raises(tiny_neox):
    layer = tiny_neox.resolved.layers[1]
    for cm in (capture_resid_pre(layer, torch.tensor([0])), replace_resid_pre(layer, torch.tensor([0]),
                                                                              torch.zeros(1, 32)),
               capture_layer_call(layer)):
        with pytest.raises(RuntimeError, match="boom"):
            with cm:
                assert layer._forward_pre_hooks
                raise RuntimeError("boom")
        assert not layer._forward_pre_hooks


def test_replacement_is_causal(tiny_neox):
    """Editing the last position at block L leaves every earlier position's logits unchanged."""
    clf = Classifier(tiny_neox, ["a", "b"], layer=0)
    b = clf.batch(clf.encode(TEXTS[:1]).ids)
    with torch.no_grad():
        clean = tiny_neox.model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        with replace_resid_pre(clf.resolved.layers[0], b["positions"], torch.randn(1, 32) * 3):
            edit = tiny_neox.model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    torch.testing.assert_close(edit[:, :-1], clean[:, :-1])
    assert (edit[:, -1] - clean[:, -1]).abs().max() > 1e-3
