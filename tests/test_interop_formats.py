"""load_sae / export_sae against the real SAELens and sparsify (issue 25): parity of codes and
reconstructions with the library, each convention difference, round trips both ways, the ClassifSAE head
sidecar, and one test per refused checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from interop_peers import TOL, need, same_code, same_selection
from concept_ext import export_sae, load_sae
from concept_ext.config.sae import SAEConfig
from concept_ext.interop.formats import HEAD_FILE
from concept_ext.sae.model import ClassifSAE, TopKSAE, dense_code

D, M, K, N = 16, 64, 4, 40
SEED = 0


def _x(dtype=torch.float32, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _sparsify_coder(dtype=torch.float32, **cfg):
    sp = need("sparsify")
    torch.manual_seed(SEED)
    coder = sp.SparseCoder(D, sp.SparseCoderConfig(num_latents=M, k=K, **cfg), dtype=dtype)
    with torch.no_grad():  # non-trivial biases, so that the b_dec convention matters
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(0, 0.5)
    return coder


def _saelens_sae(dtype="float32", training=True, **cfg):
    need("sae_lens")
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(SEED)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, dtype=dtype, **cfg))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(M, 1, dtype=sae.W_dec.dtype) + 0.5)  # rows of unequal norm
    return sae


# ----------------------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsify_load_parity(tmp_path, dtype):
    coder = _sparsify_coder(dtype)
    coder.save_to_disk(tmp_path / "layers.3")
    sae = load_sae(tmp_path, hookpoint="layers.3")
    assert isinstance(sae, TopKSAE) and sae.cfg.normalize == "none" and sae.W_enc.dtype == dtype
    x = _x(dtype)
    with torch.no_grad():
        ref = coder(x)
        code = sae.encode(x)
        same_selection(code.values, code.indices, ref.latent_acts, ref.latent_indices, M, atol=TOL[dtype])
        torch.testing.assert_close(sae(x).h_hat, ref.sae_out, atol=TOL[dtype], rtol=TOL[dtype])


def test_sparsify_b_dec_is_subtracted_before_encoding(tmp_path):
    coder = _sparsify_coder()
    coder.save_to_disk(tmp_path)
    sae = load_sae(tmp_path)
    torch.testing.assert_close(sae.center, coder.b_dec.detach())
    sae.set_center(None)  # without the convention the codes differ from sparsify's
    x = _x()
    with torch.no_grad():
        assert not torch.allclose(sae.encode(x).values.sort(1).values, coder.encode(x).top_acts.sort(1).values)


@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_sparsify_decoder_used_as_stored(tmp_path, normalize_decoder):
    # normalize_decoder only steers sparsify's training; a non-unit W_dec is used as is by both.
    coder = _sparsify_coder(normalize_decoder=normalize_decoder)
    with torch.no_grad():
        coder.W_dec.mul_(torch.linspace(0.5, 2.0, M)[:, None])
    coder.save_to_disk(tmp_path)
    sae = load_sae(tmp_path)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(sae(x).h_hat, coder(x).sae_out, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ SAELens


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale"])
def test_saelens_load_parity(tmp_path, apply_b_dec, rescale, norm):
    sl = need("sae_lens")
    _saelens_sae(apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale,
                 normalize_activations=norm).save_model(tmp_path)
    lib = sl.SAE.load_from_disk(tmp_path)  # the library's own inference SAE from the same files
    sae = load_sae(tmp_path)
    assert sae.cfg.normalize == norm
    assert (sae.center is not None) == apply_b_dec
    if rescale:  # folded: unit decoder rows
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))
    x = _x()
    with torch.no_grad():
        code = sae.encode(x)
        same_code(code.values, code.indices, lib.encode(x), atol=1e-5)
        torch.testing.assert_close(sae(x).h_hat, lib(x), atol=1e-5, rtol=1e-5)


def test_saelens_float64(tmp_path):
    sl = need("sae_lens")
    _saelens_sae(dtype="float64").save_model(tmp_path)
    lib, sae, x = sl.SAE.load_from_disk(tmp_path), load_sae(tmp_path), _x(torch.float64)
    assert sae.W_enc.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(sae(x).h_hat, lib(x), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------- export


def _ours(arch="topk", normalize="none", center="b_dec", seed=3):
    cfg = SAEConfig(d=D, m=M, k=K, n_concepts=5 if arch == "classif_topk" else 0, n_classes=3,
                    architecture=arch, normalize=normalize, seed=seed)
    sae = ClassifSAE(cfg) if arch == "classif_topk" else TopKSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D, generator=g))
        sae.b_enc.copy_(torch.randn(M, generator=g) * 0.5)
    if center == "b_dec":
        sae.set_center(sae.b_dec.detach())
    elif center == "other":
        sae.set_center(torch.randn(D, generator=g))
    return sae


@pytest.mark.parametrize("center", ["b_dec", "none", "other"])
@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_library_reproduces_codes(tmp_path, fmt, center):
    ours = _ours(center=center)
    export_sae(ours, tmp_path, fmt)
    x = _x()
    with torch.no_grad():
        code, h_hat = ours.encode(x), ours(x).h_hat
        if fmt == "saelens":
            lib = need("sae_lens").SAE.load_from_disk(tmp_path)
            same_code(code.values, code.indices, lib.encode(x), atol=1e-5)
            out = lib(x)
        else:
            lib = need("sparsify").SparseCoder.load_from_disk(tmp_path)
            ref = lib(x)
            same_selection(code.values, code.indices, ref.latent_acts, ref.latent_indices, M, atol=1e-5)
            out = ref.sae_out
        torch.testing.assert_close(out, h_hat, atol=1e-5, rtol=1e-5)
        back = load_sae(tmp_path)  # and the round trip through our own loader
        torch.testing.assert_close(back(x).h_hat, h_hat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_classifsae_head_sidecar(tmp_path, fmt):
    ours = _ours("classif_topk")
    export_sae(ours, tmp_path, fmt)
    assert (tmp_path / HEAD_FILE).exists()
    back = load_sae(tmp_path)
    assert isinstance(back, ClassifSAE) and back.cfg.n_concepts == 5 and back.cfg.n_classes == 3
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits, atol=1e-5, rtol=1e-5)
    export_sae(_ours("topk"), tmp_path, fmt)  # a plain SAE written over it drops the stale head
    assert not (tmp_path / HEAD_FILE).exists() and type(load_sae(tmp_path)) is TopKSAE


def test_export_constant_norm_rescale(tmp_path):
    ours = _ours(normalize="constant_norm_rescale")
    export_sae(ours, tmp_path / "sl", "saelens")  # the same per-sample rescale in SAELens
    lib = need("sae_lens").SAE.load_from_disk(tmp_path / "sl")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(lib(x), ours(x).h_hat, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no per-sample input rescale"):
        export_sae(ours, tmp_path / "sp", "sparsify")


# ------------------------------------------------------------------------------------------ refusals


def _edit_cfg(folder, **changes):
    doc = json.loads((folder / "cfg.json").read_text())
    for key, val in changes.items():
        if val is ...:
            doc.pop(key)
        elif key == "metadata":
            doc["metadata"].update(val)
        else:
            doc[key] = val
    (folder / "cfg.json").write_text(json.dumps(doc))


def _edit_weights(path, drop=None, reshape=None, add=None):
    t = load_file(str(path))
    if drop:
        t.pop(drop)
    if reshape:
        t[reshape] = t[reshape][..., :-1].contiguous()
    if add:
        t[add] = torch.zeros(3)
    save_file(t, str(path))


def test_refuse_saelens_jumprelu(tmp_path):
    need("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=M)).save_model(tmp_path)
    with pytest.raises(ValueError, match="architecture 'jumprelu'"):
        load_sae(tmp_path)


def test_refuse_saelens_standard_relu_l1(tmp_path):
    need("sae_lens")
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=D, d_sae=M)).save_model(tmp_path)
    with pytest.raises(ValueError, match="architecture 'standard'"):
        load_sae(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"k": ...}, "has no 'k'"),
    ({"metadata": {"sae_lens_version": "5.9.1"}}, "supported: 6.x"),
    ({"normalize_activations": "expected_average_only_in"}, "expected_average_only_in"),
    ({"normalize_activations": "layer_norm"}, "layer_norm"),
    ({"reshape_activations": "hook_z"}, "hook_z"),
    ({"d_sae": M * 2}, "W_enc has shape"),
])
def test_refuse_saelens_config(tmp_path, change, match):
    _saelens_sae().save_model(tmp_path)
    _edit_cfg(tmp_path, **change)
    with pytest.raises(ValueError, match=match):
        load_sae(tmp_path)


@pytest.mark.parametrize("edit, match", [
    ({"drop": "b_enc"}, r"lacks the tensor\(s\) \['b_enc'\]"),
    ({"reshape": "W_dec"}, "W_dec has shape"),
    ({"add": "threshold"}, r"\['threshold'\] that a TopK SAE does not have"),
])
def test_refuse_saelens_weights(tmp_path, edit, match):
    _saelens_sae().save_model(tmp_path)
    _edit_weights(tmp_path / "sae_weights.safetensors", **edit)
    with pytest.raises(ValueError, match=match):
        load_sae(tmp_path)


@pytest.mark.parametrize("cfg, match", [
    ({"activation": "groupmax"}, "activation = 'groupmax'"),
    ({"transcode": True}, "transcoder"),
    ({"skip_connection": True}, "skip connection"),
])
def test_refuse_sparsify_variants(tmp_path, cfg, match):
    _sparsify_coder(**cfg).save_to_disk(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_sae(tmp_path)


@pytest.mark.parametrize("change, match", [({"k": ...}, "has no 'k'"), ({"future_field": 1}, "unknown to sparsify")])
def test_refuse_sparsify_config(tmp_path, change, match):
    _sparsify_coder().save_to_disk(tmp_path)
    _edit_cfg(tmp_path, **change)
    with pytest.raises(ValueError, match=match):
        load_sae(tmp_path)


@pytest.mark.parametrize("edit, match", [({"drop": "encoder.bias"}, "lacks"), ({"reshape": "encoder.weight"}, "shape")])
def test_refuse_sparsify_weights(tmp_path, edit, match):
    _sparsify_coder().save_to_disk(tmp_path)
    _edit_weights(tmp_path / "sae.safetensors", **edit)
    with pytest.raises(ValueError, match=match):
        load_sae(tmp_path)


def test_sparsify_run_folder_needs_a_hookpoint(tmp_path):
    _sparsify_coder().save_to_disk(tmp_path / "layers.1")
    _sparsify_coder().save_to_disk(tmp_path / "layers.2")
    with pytest.raises(ValueError, match=r"hookpoint \['layers.1', 'layers.2'\]"):
        load_sae(tmp_path)
    assert load_sae(tmp_path, hookpoint="layers.2").m == M


def test_refuse_missing_folder_and_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nope")
    with pytest.raises(ValueError, match="format must be"):
        export_sae(_ours(), tmp_path, "dictionary_learning")
