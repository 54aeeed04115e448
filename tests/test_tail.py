"""The single-token tail equals the HF model run on a one-token sequence with v injected at the hook;
the in-context variant reproduces the full-model logits from the cached layer-L inputs."""
from __future__ import annotations

import pytest
import torch
from conftest import needs_shared

from concept_ext.classifier.backbones import load_backbone
from concept_ext.classifier.model import Classifier
from concept_ext.config.clf import PromptConfig
from concept_ext.classifier.hooks import replace_resid_pre
from concept_ext.classifier.tail import ContextTail, SingleTokenTail, tail_ceiling

pytestmark = needs_shared
TEXTS = ["Stocks rallied after the earnings report.", "The match ended in a draw.", "New chip is faster.",
         "Rain expected all week across the region, officials said on Monday."]


def _one_token_reference(clf: Classifier, v: torch.Tensor) -> torch.Tensor:
    """Independent oracle: the whole HF model on a 1-token input, v replacing the input of block L."""
    tok = clf.tokenizer
    first = tok.cls_token_id if clf.kind == "encoder" else clf.pad_id
    rows = []
    for i in range(v.shape[0]):
        with torch.no_grad(), replace_resid_pre(clf.resolved.layers[clf.layer], torch.tensor([0]), v[i:i + 1]):
            out = clf.model(input_ids=torch.tensor([[first]]))
        rows.append(out.logits[0, -1, clf.label_ids] if clf.kind == "decoder" else out.logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("layer", [0, 1])
def test_tail_equals_one_token_model_neox(tiny_neox, layer):
    clf = Classifier(tiny_neox, ["a", "b", "c", "d"], layer=layer)
    tail = SingleTokenTail(clf, chunk=3)
    v = torch.randn(7, 32) * 2
    torch.testing.assert_close(tail(v), _one_token_reference(clf, v), rtol=1e-5, atol=1e-5)
    assert tail(v[:0]).shape == (0, 4)
    with pytest.raises(ValueError):
        tail(torch.randn(3, 31))


def test_tail_other_families(pythia_tokenizer, tiny_bert):
    from transformers import GPT2Config, LlamaConfig

    llama = load_backbone(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=50304),
                          tokenizer=pythia_tokenizer)
    gpt2 = load_backbone(GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=50304), tokenizer=pythia_tokenizer)
    for bb, names in ((llama, ["a", "b"]), (gpt2, ["a", "b", "c"]), (tiny_bert, ["a", "b", "c", "d"])):
        clf = Classifier(bb, names, layer=0)
        v = torch.randn(5, 32)
        torch.testing.assert_close(SingleTokenTail(clf)(v), _one_token_reference(clf, v), rtol=1e-5, atol=1e-5)
        ctx = ContextTail(clf, TEXTS)
        torch.testing.assert_close(ctx(ctx.h_clean), ctx.clean_logits, rtol=1e-5, atol=1e-5)


def test_tail_is_differentiable_and_ceiling(tiny_neox):
    clf = Classifier(tiny_neox, ["a", "b"])
    tail = SingleTokenTail(clf)
    v = torch.randn(4, 32, requires_grad=True)
    tail(v).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="empty"):
        tail_ceiling(tail, v[:0].detach(), torch.zeros(0, 2))


def _full_model_logits(clf: Classifier, texts: list[str]) -> torch.Tensor:
    """Independent oracle of o: the HF model itself, one unpadded sentence at a time (label digit appended
    for a decoder, whose label logits are read one position before it)."""
    digit = [clf.label_ids[0]] if clf.kind == "decoder" else []
    rows = []
    for ids in clf.encode(texts).ids:
        with torch.no_grad():
            out = clf.model(input_ids=torch.tensor([ids + digit]))
        rows.append(out.logits[0, -2, clf.label_ids] if clf.kind == "decoder" else out.logits[0])
    return torch.stack(rows)


def test_tail_ceiling_against_independent_forwards(tiny_neox):
    """tail_ceiling = share of rows where the one-token model (HF forward with v hooked in at block L)
    agrees with the full model's prediction. Half the rows carry h from another sentence or noise, so
    the ceiling is strictly between 0 and 1 and a wrong row pairing or argmax shows."""
    clf = Classifier(tiny_neox, ["a", "b", "c", "d"], layer=1)
    tail = SingleTokenTail(clf)
    texts = MORE + [t.lower() for t in MORE]
    h = clf.predict(texts, batch_size=4).hidden
    g = torch.Generator().manual_seed(7)
    mixed = h.clone()
    mixed[1::2] = torch.randn(mixed[1::2].shape, generator=g) * h.norm(dim=1).mean() / h.shape[1] ** 0.5
    # The tiny random model predicts nearly one class everywhere: spread o's argmax over the classes with
    # seeded noise (tail_ceiling compares argmaxes of whatever logits it is given), so that a wrong row
    # pairing shows too.
    o = _full_model_logits(clf, texts)
    o = o + torch.randn(o.shape, generator=g, dtype=o.dtype) * 4 * o.std()
    assert len(set(o.argmax(-1).tolist())) >= 3, o.argmax(-1)
    agree = _one_token_reference(clf, mixed).argmax(-1) == o.argmax(-1)  # [N] per-row oracle
    assert 0 < int(agree.sum()) < len(texts), f"degenerate setting (agreement {agree.tolist()})"
    # Every prefix and the even/odd rows: a share right by coincidence on one subset fails on another.
    subsets = [slice(0, n) for n in range(1, len(texts) + 1)] + [slice(0, None, 2), slice(1, None, 2)]
    for sub in subsets:
        want = float(agree[sub].double().mean())
        assert tail_ceiling(tail, mixed[sub], o[sub]) == pytest.approx(want, abs=1e-6), sub  # a float32 mean


@pytest.mark.parametrize("side", ["left", "right"])
def test_context_reproduces_full_logits(tiny_neox, side):
    clf = Classifier(tiny_neox, ["a", "b", "c", "d"], layer=0, prompt=PromptConfig(padding_side=side))
    ctx = ContextTail(clf, TEXTS)
    single = clf.predict(TEXTS, batch_size=1)
    torch.testing.assert_close(ctx(single.hidden), single.logits, rtol=1e-4, atol=1e-5)  # ctx(h) = o
    # arbitrary u into chosen sentences == a full forward with u spliced in at block L
    u = torch.randn(5, 32)
    rows = torch.tensor([3, 0, 3, 1, 2])
    got = ctx(u, rows, chunk=2)
    for j in range(5):
        b = clf.batch(clf.encode([TEXTS[rows[j]]]).ids)
        with torch.no_grad(), replace_resid_pre(clf.resolved.layers[0], b["positions"], u[j:j + 1]):
            ref = clf.forward_batch(b, hidden=False).logits[0]
        torch.testing.assert_close(got[j], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        ctx(u)


MORE = TEXTS + ["Great film.", "The central bank left rates unchanged and signalled patience for the rest of the year.",
                "Team wins."]


def _spliced(clf: Classifier, text: str, u: torch.Tensor) -> torch.Tensor:
    """Independent oracle: one full forward of ``text`` with u replacing the input of block L."""
    b = clf.batch(clf.encode([text]).ids)
    with torch.no_grad(), replace_resid_pre(clf.resolved.layers[clf.layer], b["positions"], u[None]):
        return clf.forward_batch(b, hidden=False).logits[0]


@pytest.mark.parametrize("family", ["neox", "llama", "bert"])
def test_context_block_size_invariant_and_bounded(family, tiny_neox, pythia_tokenizer, tiny_bert):
    """Blocks of 1, 3 or all sentences give the same logits; no forward ever carries more than one block."""
    if family == "llama":
        from transformers import LlamaConfig

        bb = load_backbone(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=50304),
                           tokenizer=pythia_tokenizer)
    else:
        bb = tiny_neox if family == "neox" else tiny_bert
    prompt = PromptConfig(padding_side="right") if family == "neox" else None
    clf = Classifier(bb, ["a", "b", "c", "d"], layer=1 if family == "neox" else 0, prompt=prompt)
    torch.manual_seed(0)
    rows = torch.tensor([6, 0, 3, 3, 5, 1, 2, 4, 0, 6, 2])
    u = torch.randn(rows.numel(), 32)
    seen: list[tuple[int, int]] = []  # (batch, length) of every multi-token embedding call

    def spy(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        if ids.dim() == 2 and ids.shape[1] > 1:
            seen.append((ids.shape[0], ids.shape[1]))

    handle = clf.model.get_input_embeddings().register_forward_pre_hook(spy, with_kwargs=True)
    try:
        results = {}
        for bs, keep in ((1, 1), (3, 2), (len(MORE), 2)):
            seen.clear()
            ctx = ContextTail(clf, MORE, block_size=bs, cache_blocks=keep)
            if bs == 3:
                ctx.max_cache_copy = 1  # forces one vector per decoder forward (the memory cap path)
            results[bs] = ctx(u, rows, chunk=2)
            torch.testing.assert_close(ctx(ctx.h_clean), ctx.clean_logits, rtol=1e-4, atol=1e-5)
            assert seen and max(b for b, _ in seen) <= bs, (bs, seen)
            assert len(ctx._lru) <= keep
            assert sorted(i for blk in ctx.blocks for i in blk) == list(range(len(MORE)))
    finally:
        handle.remove()
    for bs in (1, 3):
        torch.testing.assert_close(results[bs], results[len(MORE)], rtol=1e-4, atol=1e-5)
    for j in (0, 4, 9):
        torch.testing.assert_close(results[1][j], _spliced(clf, MORE[int(rows[j])], u[j]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        ContextTail(clf, MORE, block_size=0)


@pytest.mark.parametrize("family", ["neox", "bert"])
def test_context_state_budget(family, tiny_neox, tiny_bert):
    """Block states are kept while they fit ``cache_bytes``: a repeated sweep builds nothing new; with a
    zero budget only the newest block is kept, so every revisit rebuilds it, and results are equal."""
    bb = tiny_neox if family == "neox" else tiny_bert
    clf = Classifier(bb, ["a", "b", "c", "d"], layer=1 if family == "neox" else 0)
    torch.manual_seed(1)
    rows = torch.tensor([6, 0, 3, 3, 5, 1, 2, 4, 0, 6, 2])
    u = torch.randn(rows.numel(), 32)
    roomy = ContextTail(clf, MORE, block_size=2)
    first = roomy(u, rows)
    n_blocks = len(roomy.blocks)
    assert roomy.builds == n_blocks and len(roomy._lru) == n_blocks
    assert roomy._lru_bytes == sum(st["_bytes"] for st in roomy._lru.values()) > 0
    torch.testing.assert_close(roomy(u, rows), first)
    assert roomy.builds == n_blocks, "states that fit the budget must be reused"
    tight = ContextTail(clf, MORE, block_size=2, cache_bytes=0)
    torch.testing.assert_close(tight(u, rows), first, rtol=1e-5, atol=1e-6)
    tight(u, rows)
    assert len(tight._lru) == 1 and tight.builds == 2 * n_blocks
    with pytest.raises(ValueError, match="cache_bytes"):
        ContextTail(clf, MORE, cache_bytes=-1)


def test_context_is_differentiable(tiny_neox):
    clf = Classifier(tiny_neox, ["a", "b"], layer=1)
    ctx = ContextTail(clf, TEXTS, block_size=2)
    u = ctx.h_clean.clone().requires_grad_(True)
    out = ctx(u, torch.tensor([3, 2, 1, 0]), chunk=3)
    out.sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
