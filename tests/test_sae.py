"""TopKSAE / ClassifSAE modules, configs and checkpoints (method.md 2.1-2.2, design.md 8-9)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from concept_ext.sae import checkpoint as ckpt_mod
from concept_ext.sae.checkpoint import FiringStats, load_checkpoint, save_checkpoint
from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.model import ClassifSAE, TopKSAE, build_sae, dense_code

CFG = dict(d=8, m=24, k=4, n_concepts=5, n_classes=3)


def test_init_follows_reference_draw_order():
    sae = ClassifSAE(SAEConfig(**CFG, seed=42))
    d, m, n, c = CFG["d"], CFG["m"], CFG["n_concepts"], CFG["n_classes"]
    torch.manual_seed(42)  # the reference: global seed, nn.init.kaiming_uniform_ draws in this order
    w_dec = torch.nn.init.kaiming_uniform_(torch.empty(m, d))
    torch.nn.init.kaiming_uniform_(torch.empty(d, m))  # W_enc draw, discarded
    w_c = torch.nn.init.kaiming_uniform_(torch.empty(c, n))
    assert torch.equal(sae.W_enc, w_dec.T)  # copied before normalisation
    assert torch.equal(sae.W_dec, w_dec / w_dec.norm(dim=1, keepdim=True))
    assert torch.equal(sae.W_c, w_c)
    assert w_dec.abs().max() <= math.sqrt(6 / d) and w_c.abs().max() <= math.sqrt(6 / n)
    for b in (sae.b_enc, sae.b_dec, sae.b_c):
        assert torch.equal(b, torch.zeros_like(b))
    plain = TopKSAE(SAEConfig(**CFG, architecture="topk"))
    assert torch.equal(plain.W_dec, sae.W_dec) and not hasattr(plain, "W_c")


def test_forward_matches_dense_computation_any_leading_shape():
    sae = build_sae(SAEConfig(**CFG))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_c.normal_(0, 0.2)
    h = torch.randn(2, 3, CFG["d"]) * 5
    out = sae(h)
    assert out.h_hat.shape == h.shape and out.values.shape == (2, 3, CFG["k"])
    assert out.logits.shape == (2, 3, CFG["n_classes"]) and out.scale.shape == (2, 3)
    flat = h.reshape(-1, CFG["d"])
    s = math.sqrt(CFG["d"]) / flat.norm(dim=1, keepdim=True)
    pre = flat * s @ sae.W_enc + sae.b_enc
    z = torch.zeros_like(pre)
    top = pre.topk(CFG["k"], dim=1)
    z.scatter_(1, top.indices, top.values.relu())
    torch.testing.assert_close(dense_code(out.values, out.indices, sae.m).reshape(-1, sae.m), z)
    torch.testing.assert_close(out.h_hat.reshape(-1, CFG["d"]), (z @ sae.W_dec + sae.b_dec) / s)
    logits = z[:, : CFG["n_concepts"]] @ sae.W_c.T + sae.b_c
    torch.testing.assert_close(out.logits.reshape(-1, CFG["n_classes"]), logits)


def test_head_gives_bias_when_no_class_latent_fires():
    sae = ClassifSAE(SAEConfig(**CFG))
    with torch.no_grad():
        sae.b_c.copy_(torch.tensor([0.1, -0.2, 0.3]))
    values = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    indices = torch.tensor([[7, 9, 11, 2]])  # latent 2 is in z_class but inactive (value 0)
    torch.testing.assert_close(sae.classify(values, indices), sae.b_c[None])


def test_bad_inputs_and_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="k must be <= m"):
        SAEConfig(d=8, m=16, k=17)
    with pytest.raises(ValueError, match="n_concepts"):
        SAEConfig(d=8, m=16, k=4, n_concepts=17)
    with pytest.raises(ValueError, match="architecture"):
        SAEConfig(architecture="relu")
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.preset("v3")
    with pytest.raises(ValueError, match="dead_latents"):
        TrainConfig(dead_latents="resample")
    sae = TopKSAE(SAEConfig(**CFG, architecture="topk"))
    with pytest.raises(ValueError, match="d = 8"):
        sae.encode(torch.randn(4, 9))
    assert SAEConfig(d=16).m == 32  # m = 2d by default


def test_presets_and_coefficient_table():
    for alias in ("paper-v2", "v2", "paper"):
        assert TrainConfig.preset(alias).preset_name == "paper-v2"
    c = TrainConfig.preset("paper-v2", model="pythia-1b", dataset="tweeteval_sentiment")
    assert (c.lambda_mse, c.lambda_ar, c.lambda_cls, c.batch_size, c.total_steps) == (
        0.01,
        0.01,
        1.0,
        2000,
        5000,
    )
    c = TrainConfig.preset("paper", model="pythia-410m", dataset="imdb")
    assert (c.lambda_mse, c.batch_size, c.total_steps, c.lr, c.dead_latents) == (
        0.02,
        500,
        20_000,
        5e-5,
        "ghost",
    )
    sae_base = TrainConfig.preset("v2", method="sae")
    assert (sae_base.lambda_mse, sae_base.lambda_ar, sae_base.lambda_cls) == (1.0, 0.0, 0.0)
    v1 = TrainConfig.preset("v1", model="pythia-1b", dataset="imdb")
    assert (v1.lambda_mse, v1.lambda_ar, v1.input_noise, v1.loss_version) == (0.2, 0.1, 0.2, "v1")
    q = TrainConfig.preset("quick")
    assert q.total_steps <= 2000 and q.batch_size <= 512
    quirks = TrainConfig.preset("v2", dataset="tweeteval_offensive", reference_quirks=True)
    assert quirks.stopgrad_plain_sae and quirks.alternate_half_batches
    assert SAEConfig.for_model("pythia-1b", n_classes=4).m == 4096
    assert TrainConfig().preset_name == "paper-v2" and TrainConfig().total_steps == 20_000


def _roundtrip_sae(tmp_path, arch="classif_topk"):
    sae = build_sae(SAEConfig(**CFG, architecture=arch))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    firing = FiringStats(torch.arange(CFG["m"]), torch.arange(CFG["m"]) * 2, 1234)
    path = save_checkpoint(
        tmp_path / "ck",
        sae,
        train_cfg=TrainConfig.preset("quick"),
        firing=firing,
        metadata={"model_id": "pythia-14m", "note": "x"},
        hook_layer=5,
        class_names=("a", "b", "c"),
    )
    return sae, path


@pytest.mark.parametrize("arch", ["classif_topk", "topk"])
def test_save_load_round_trip_is_exact(tmp_path, arch):
    sae, path = _roundtrip_sae(tmp_path, arch)
    ck = load_checkpoint(path)
    for (n, a), (_, b) in zip(sae.named_parameters(), ck.sae.named_parameters()):
        assert torch.equal(a, b), n
    h = torch.randn(5, CFG["d"])
    a, b = sae(h), ck.sae(h)
    assert torch.equal(a.h_hat, b.h_hat) and torch.equal(a.indices, b.indices)
    doc = json.loads((path / "cfg.json").read_text())
    assert doc["format_version"] == 1 and doc["architecture"] == arch and doc["d"] == CFG["d"]
    assert ck.metadata["hook_layer"] == 5 and ck.metadata["class_names"] == ["a", "b", "c"]
    assert ck.metadata["model_id"] == "pythia-14m" and ck.metadata["note"] == "x"
    assert doc["hook_layer"] == 5 and doc["model_id"] == "pythia-14m" and doc["k"] == CFG["k"]
    assert ck.train_cfg == TrainConfig.preset("quick") and ck.firing.samples_seen == 1234
    assert torch.equal(ck.firing.steps_since_fired, torch.arange(CFG["m"]) * 2)


def test_load_rejects_bad_checkpoints(tmp_path):
    _, path = _roundtrip_sae(tmp_path)
    with pytest.raises(ValueError, match="expected_d"):
        load_checkpoint(path, expected_d=16)
    doc = json.loads((path / "cfg.json").read_text())
    unknown = dict(doc, sae=dict(doc["sae"], future_field=1))  # unknown keys are an error naming the file
    (path / "cfg.json").write_text(json.dumps(unknown))
    with pytest.raises(ValueError, match=r"cfg.json: unknown config key 'sae.future_field'"):
        load_checkpoint(path)
    bad = dict(doc, format_version=99)
    (path / "cfg.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version"):
        load_checkpoint(path)
    wrong_d = dict(doc, d=16)
    wrong_d["sae"] = dict(doc["sae"], d=16, m=24)
    (path / "cfg.json").write_text(json.dumps(wrong_d))
    with pytest.raises(ValueError, match="W_enc has shape"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    sae, path = _roundtrip_sae(tmp_path)
    other = build_sae(SAEConfig(**CFG, seed=7))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, other)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "fresh", other)
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind
    assert torch.equal(load_checkpoint(path).sae.W_dec, sae.W_dec)


def test_retired_config_keys_still_load(tmp_path, monkeypatch, caplog):
    """A key listed in RETIRED_KEYS (a field that was removed) is dropped on load, with a log line."""
    from concept_ext.config import build

    _, path = _roundtrip_sae(tmp_path)
    doc = json.loads((path / "cfg.json").read_text())
    doc["train"]["old_knob"] = 3
    (path / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="old_knob"):
        load_checkpoint(path)
    monkeypatch.setitem(build.RETIRED_KEYS, "TrainConfig", {"old_knob": "removed in a test"})
    with caplog.at_level("INFO", logger="concept_ext"):
        ck = load_checkpoint(path)
    assert ck.train_cfg == TrainConfig.preset("quick") and "train.old_knob" in caplog.text
