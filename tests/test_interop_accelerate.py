"""accelerate / undo on live sparsify and SAELens objects (issue 25): the object keeps its type, parameters
and outputs, its forward and backward run on concept_ext ops, undo restores the library's methods, and
the libraries' own trainers give the same weights after N steps with and without acceleration."""
from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

from interop_peers import need, same_selection
from concept_ext import accelerate
from concept_ext.interop import is_accelerated, undo

from concept_ext.interop import live as acc_mod  # noqa: E402  (the module behind accelerate/undo)

D, M, K, N = 16, 64, 4, 48
SEED = 0


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the concept_ext op calls made through the accelerated methods."""
    calls = {"topk_encode": 0, "sparse_decode": 0}
    for name in calls:
        real = getattr(acc_mod, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(acc_mod, name, counted)
    return calls


def _x(seed=SEED, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _coder(**cfg):
    sp = need("sparsify")
    torch.manual_seed(SEED)
    coder = sp.SparseCoder(D, sp.SparseCoderConfig(num_latents=M, k=K, **cfg))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(0, 0.5)
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.1)
        if cfg.get("transcode"):
            coder.W_dec.normal_(0, 0.3)
    return coder


def _grads(mod):
    return {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", [{}, {"multi_topk": True}, {"transcode": True, "skip_connection": True}])
@pytest.mark.parametrize("dead", [False, True])
def test_sparsify_forward_backward_parity(op_calls, cfg, dead):
    coder = _coder(**cfg)
    ref = copy.deepcopy(coder)
    params = list(coder.parameters())
    handle = accelerate(coder)
    assert type(coder) is type(ref) and list(coder.parameters()) == params and is_accelerated(coder)
    x, y = _x(), _x(seed=1)
    dead_mask = (torch.arange(M) % 3 == 0) if dead else None
    out = coder(x, y, dead_mask=dead_mask)
    exp = ref(x, y, dead_mask=dead_mask)
    assert op_calls["topk_encode"] == 1 and op_calls["sparse_decode"] >= 1
    assert type(out) is type(exp)
    same_selection(out.latent_acts.detach(), out.latent_indices, exp.latent_acts.detach(), exp.latent_indices, M,
                   atol=1e-5)
    for name in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(out, name), getattr(exp, name), atol=1e-5, rtol=1e-5)
    if dead:
        assert exp.auxk_loss > 0
    (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()
    (exp.fvu + exp.auxk_loss + exp.multi_topk_fvu).backward()
    got, want = _grads(coder), _grads(ref)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=f"grad {name}")
    handle.undo()
    assert not is_accelerated(coder) and "forward" not in coder.__dict__
    coder(x)
    assert op_calls["topk_encode"] == 1  # the library's own forward again


def test_sparsify_encode_decode(op_calls):
    coder = _coder()
    ref = copy.deepcopy(coder)
    x = _x()
    with accelerate(coder):
        enc, exp = coder.encode(x), ref.encode(x)
        same_selection(enc.top_acts.detach(), enc.top_indices, exp.top_acts.detach(), exp.top_indices, M, atol=1e-5)
        torch.testing.assert_close(enc.pre_acts, exp.pre_acts.detach())
        torch.testing.assert_close(coder.decode(enc.top_acts, enc.top_indices),
                                   ref.decode(exp.top_acts, exp.top_indices), atol=1e-5, rtol=1e-5)
    coder.encode(x)  # after the with-block: the library's own encode again
    assert not is_accelerated(coder) and "encode" not in coder.__dict__
    assert op_calls["topk_encode"] == 1 and op_calls["sparse_decode"] == 1


def test_refuse_other_objects():
    with pytest.raises(TypeError, match="SparseCoder or a SAELens"):
        accelerate(torch.nn.Linear(2, 2))
    coder = _coder(activation="groupmax")
    with pytest.raises(ValueError, match="groupmax"):
        accelerate(coder)


def _saelens(training=True, **cfg):
    need("sae_lens")
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(SEED)
    sae = (TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, **cfg)) if training
           else TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K, **cfg)))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(M, 1) + 0.5)
    return sae


@pytest.mark.parametrize("cfg", [{}, {"rescale_acts_by_decoder_norm": False, "apply_b_dec_to_input": False},
                                 {"normalize_activations": "constant_norm_rescale"}])
@pytest.mark.parametrize("training", [True, False])
def test_saelens_encode_forward_parity(op_calls, cfg, training):
    sae = _saelens(training, **cfg)
    ref = copy.deepcopy(sae)
    accelerate(sae)
    x = _x()
    torch.testing.assert_close(sae.encode(x), ref.encode(x), atol=1e-5, rtol=1e-5)
    out, exp = sae(x), ref(x)
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)
    assert op_calls["topk_encode"] == 2 and op_calls["sparse_decode"] == 1
    out.pow(2).sum().backward()
    exp.pow(2).sum().backward()
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(sae)[name], g, atol=1e-4, rtol=1e-4, msg=f"grad {name}")


@pytest.mark.parametrize("dead", [False, True])
def test_saelens_training_forward_pass_parity(op_calls, dead):
    need("sae_lens")
    from sae_lens.saes.sae import TrainStepInput

    sae = _saelens()
    ref = copy.deepcopy(sae)
    accelerate(sae)
    mask = (torch.arange(M) % 3 == 0) if dead else None
    step = TrainStepInput(sae_in=_x(), coefficients={}, dead_neuron_mask=mask, n_training_steps=0,
                          is_logging_step=False)
    out, exp = sae.training_forward_pass(step), ref.training_forward_pass(step)
    assert op_calls["topk_encode"] == 1
    assert type(out) is type(exp) and out.losses.keys() == exp.losses.keys()
    for name in ("loss", "sae_out", "feature_acts"):
        torch.testing.assert_close(getattr(out, name), getattr(exp, name), atol=1e-5, rtol=1e-5)
    assert (out.hidden_pre is not None) == dead  # the dense pre-activations only where AuxK needs them
    if dead:
        assert exp.losses["auxiliary_reconstruction_loss"] > 0
    out.loss.backward()
    exp.loss.backward()
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(sae)[name], g, atol=1e-4, rtol=1e-4, msg=f"grad {name}")


def test_saelens_hooks_fall_back_to_the_library(op_calls):
    sae = _saelens(training=False)
    ref = copy.deepcopy(sae)
    accelerate(sae)
    zero_first = lambda acts, hook: acts.index_fill(-1, torch.tensor([0, 1, 2]), 0.0)  # noqa: E731
    ref.hook_sae_acts_post.add_hook(zero_first)
    sae.hook_sae_acts_post.add_hook(zero_first)
    x = _x()
    torch.testing.assert_close(sae(x), ref(x))
    assert op_calls["topk_encode"] == 0
    undo(sae)
    assert "forward" not in sae.__dict__


# ------------------------------------------------------------------------------- the libraries' trainers


def _sparsify_trainer_weights(accelerated: bool, tmp_path, steps: int):
    """sparsify's own Trainer.fit on a tiny random GPT-NeoX (offline), AuxK on; the SAE weights after."""
    need("sparsify")
    datasets = pytest.importorskip("datasets")
    from sparsify import Trainer
    from sparsify.config import SparseCoderConfig, TrainConfig
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(SEED)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=64)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8 * steps, 16), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids}).with_format("torch")
    cfg = TrainConfig(SparseCoderConfig(num_latents=128, k=4), batch_size=8, layers=[1], log_to_wandb=False,
                      save_dir=str(tmp_path), save_every=10**9, optimizer="adam", lr=1e-3, lr_warmup_steps=0,
                      auxk_alpha=1 / 32, dead_feature_threshold=100)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(cfg, ds, model)
        if accelerated:
            for coder in trainer.saes.values():
                accelerate(coder)
        trainer.fit()
    return {n: p.detach().clone() for s in trainer.saes.values() for n, p in s.named_parameters()}


def test_sparsify_trainer_same_weights(tmp_path, op_calls):
    steps = 8
    plain = _sparsify_trainer_weights(False, tmp_path / "a", steps)
    assert op_calls["topk_encode"] == 0
    fast = _sparsify_trainer_weights(True, tmp_path / "b", steps)
    assert op_calls["topk_encode"] == steps
    for name, w in plain.items():
        torch.testing.assert_close(fast[name], w, atol=1e-6, rtol=1e-5, msg=f"{name} after {steps} steps")


def _saelens_trainer_weights(accelerated: bool, steps: int):
    """SAELens's own SAETrainer.fit over an iterator of activation batches; the weights after."""
    need("sae_lens")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = _saelens()
    if accelerated:
        accelerate(sae)
    batch = 32
    g = torch.Generator().manual_seed(2)
    data = iter([torch.randn(batch, D, generator=g) * 2 + 0.5 for _ in range(steps)])
    cfg = SAETrainerConfig(total_training_samples=batch * steps, train_batch_size_samples=batch, lr=1e-3,
                           lr_end=1e-3, dead_feature_window=2, logger=LoggingConfig(log_to_wandb=False))
    with contextlib.redirect_stderr(io.StringIO()):
        SAETrainer(cfg, sae, data).fit()
    return {n: p.detach().clone() for n, p in sae.named_parameters()}


def test_saelens_trainer_same_weights(op_calls):
    steps = 10  # dead_feature_window=2: the AuxK term is on from step 3
    plain = _saelens_trainer_weights(False, steps)
    fast = _saelens_trainer_weights(True, steps)
    assert op_calls["topk_encode"] == steps
    for name, w in plain.items():
        torch.testing.assert_close(fast[name], w, atol=1e-5, rtol=1e-4, msg=f"{name} after {steps} steps")
