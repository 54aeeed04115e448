"""TrainConfig.cuda_graph: the fixed-shape, synchronisation-free training step (train_graph.GraphStep).

On CPU the step runs eagerly with the code a CUDA graph would hold; these tests check that it trains
exactly like the eager step (up to rounding), that it contains no operation that synchronises the host
with a CUDA device, that a non-finite loss still stops training before a checkpoint, and that
checkpoints resume across the two modes. The capture itself is tested in test_ops_cuda.py (CUDA only).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from concept_ext.config_sae import SAEConfig, TrainConfig
from concept_ext.losses import sae_losses
from concept_ext.sae import build_sae
from concept_ext.train import Trainer

#: aten operations that make the host wait for a CUDA device (a CUDA graph cannot hold them): reading a
#: value (item / bool), data-dependent output shapes, and bincount (which reads its input's maximum).
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
           "unique_consecutive", "unique_dim", "bincount", "is_nonzero", "item", "repeat_interleave",
           "masked_scatter", "nonzero_static"}


class SyncOps(TorchDispatchMode):
    """Records the syncing aten ops dispatched inside it; ``x[bool_mask]`` counts as nonzero."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.seen.append(name)
        if name in ("index", "index_put", "index_put_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.seen.append(f"{name}(bool mask)")
        return func(*args, **(kwargs or {}))


def _data(n=40, d=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) + 0.5, torch.randint(0, 2, (n,), generator=gen)


def _trainer(h, y, *, graph, out_dir=None, arch="classif_topk", **kw):
    scfg = SAEConfig(d=h.shape[1], m=64, k=2, n_concepts=3, n_classes=2, architecture=arch)
    # dead_window 2, N_train = 40, B = 16: dead latents (most of the 64) and the stop-gradient switch
    # both happen within the 12 steps.
    vals = dict(total_samples=16 * 12, batch_size=16, lr=1e-2, dead_window=2, progress=False, device="cpu",
                log_every=3)
    vals.update(kw)
    tcfg = TrainConfig(cuda_graph=graph, **vals)
    return Trainer(build_sae(scfg), tcfg, h, y, out_dir=out_dir, metadata={"model_id": "tiny"})


CASES = {
    "ghost": {},
    "auxk": {"dead_latents": "auxk"},
    "none": {"dead_latents": "none"},
    "fvu_ghost": {"mse_normalization": "fvu"},
    "v1_noise_auxk": {"loss_version": "v1", "input_noise": 0.2, "dead_latents": "auxk"},
    "v1_ghost": {"loss_version": "v1", "input_noise": 0.2},
    "half_batches": {"alternate_half_batches": True, "stopgrad_plain_sae": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_graph_step_trains_like_the_eager_step(case):
    h, y = _data()
    eager = _trainer(h, y, graph=False, **CASES[case])
    static = _trainer(h, y, graph=True, **CASES[case])
    for step in range(12):
        a, b = eager.train_step(), static.train_step()
        for name, u, v in zip(a.terms._fields, a.terms, b.terms):
            assert torch.allclose(u, v, rtol=1e-4, atol=1e-6), (case, step, name, float(u), float(v))
        assert torch.equal(a.indices, b.indices), (case, step)
    for (n, p), (_, q) in zip(eager.sae.named_parameters(), static.sae.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), (case, n, float((p - q).abs().max()))
    assert torch.equal(eager.firing.counts, static.firing.counts)
    assert torch.equal(eager.firing.steps_since, static.firing.steps_since)
    assert eager.firing.samples_seen == static.firing.samples_seen
    static.check_finite()  # nothing was non-finite


def test_the_cases_exercise_dead_latents_and_both_phases():
    """The equality above means something only if dead-latent terms and the phase switch occurred."""
    h, y = _data()
    for kw, term in (({}, "ghost"), ({"dead_latents": "auxk"}, "auxk")):
        hist = _trainer(h, y, graph=True, **kw).train().history
        assert any(m[f"loss/{term}"] > 0 for m in hist), term
        assert any(m["stopgrad"] for m in hist) and not all(m["stopgrad"] for m in hist)


def test_static_losses_are_zero_without_dead_latents_and_match_eager_with_them():
    h, y = _data(n=32)
    sae = build_sae(SAEConfig(d=8, m=64, k=2, n_concepts=3, n_classes=2))
    for kind in ("ghost", "auxk"):
        cfg = TrainConfig(device="cpu", dead_latents=kind)
        none = torch.zeros(64, dtype=torch.bool)
        out = sae_losses(sae, h, y, cfg, dead_mask=none, static=True)
        assert float(out.terms.ghost) == 0 and float(out.terms.auxk) == 0
        some = torch.zeros(64, dtype=torch.bool)
        some[torch.tensor([3, 17, 40, 41, 63])] = True
        a = sae_losses(sae, h, y, cfg, dead_mask=some)
        b = sae_losses(sae, h, y, cfg, dead_mask=some, static=True)
        term = "ghost" if kind == "ghost" else "auxk"
        assert float(getattr(a.terms, term)) > 0
        assert torch.allclose(getattr(a.terms, term), getattr(b.terms, term), rtol=1e-5)
        ga = torch.autograd.grad(a.terms.total, [sae.W_enc, sae.W_dec])
        gb = torch.autograd.grad(b.terms.total, [sae.W_enc, sae.W_dec])
        for u, v in zip(ga, gb):
            assert torch.allclose(u, v, rtol=1e-4, atol=1e-7), kind


@pytest.mark.parametrize("case", ["ghost", "auxk", "v1_noise_auxk", "half_batches"])
def test_graph_step_has_no_host_synchronisation(case):
    """Everything a CUDA graph would hold runs without a syncing op. Adam is left out here: on CPU it is
    the plain (non-capturable) one, which reads its step count; on CUDA the capturable one is used."""
    h, y = _data()
    tr = _trainer(h, y, graph=True, **CASES[case])
    tr.train_step()  # Adam creates its state lazily
    real_step = tr.opt.step

    def opt_step_outside(*a, **kw):
        with _disable_current_modes():
            return real_step(*a, **kw)

    tr.opt.step = opt_step_outside
    with SyncOps() as mode:
        for _ in range(4):
            tr.train_step()
    assert mode.seen == [], mode.seen


def test_sync_detector_sees_the_eager_step():
    """Control: the eager step does synchronise (the dead set's size, nonzero, the loss check)."""
    h, y = _data()
    tr = _trainer(h, y, graph=False)
    for _ in range(4):
        tr.train_step()  # latents go dead
    with SyncOps() as mode:
        tr.train_step()
    assert "nonzero" in mode.seen and "_local_scalar_dense" in mode.seen


def test_non_finite_loss_stops_before_a_checkpoint(tmp_path):
    h, y = _data()
    tr = _trainer(h, y, graph=True, out_dir=tmp_path, checkpoint_every=16 * 4, log_every=100)
    tr.train(steps=2)
    with torch.no_grad():
        tr.sae.b_dec[0] = float("nan")
    # On CPU the encoder's own NaN check stops step 3, and the error names step 2 as the cause; on CUDA
    # the kernels go on and the checkpoint due after step 4's samples (64) is where the check runs.
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 \(0-based\).*found at step [34]"):
        tr.train()
    assert not any(tmp_path.iterdir())


def test_checkpoints_resume_across_modes(tmp_path):
    h, y = _data()
    full = _trainer(h, y, graph=False).train()
    for first, second in ((True, False), (False, True), (True, True)):
        part = _trainer(h, y, graph=first, out_dir=tmp_path / f"{first}{second}")
        part.train(steps=5)
        path = part.save(tmp_path / f"{first}{second}" / "mid")
        cfg = part.cfg
        cfg.cuda_graph = second
        resumed = Trainer.resume(path, h, y, cfg=cfg)
        assert resumed.step == 5 and (resumed._graph is not None) == second
        res = resumed.train()
        assert res.steps == 12
        for (n, p), (_, q) in zip(full.sae.named_parameters(), res.sae.named_parameters()):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), (first, second, n)
        assert torch.equal(full.firing.counts, res.firing.counts)


def test_cuda_graph_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setattr("concept_ext.distributed.enabled", lambda: True)
    h, y = _data()
    with pytest.raises(ValueError, match="cuda_graph is single-process only"):
        _trainer(h, y, graph=True)


def test_deferred_check_catches_a_non_finite_loss_at_the_next_checkpoint(tmp_path, monkeypatch):
    """A NaN total whose gradients stay finite (a NaN constant added to the loss) leaves the kernels
    running; the check at the checkpoint due after step 4 (64 samples) finds it and nothing is written."""
    from concept_ext import train_graph

    real = train_graph.sae_losses
    calls = []

    def nan_on_third_call(*a, **kw):
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) == 3:  # step 2 (0-based)
            out = out._replace(terms=out.terms._replace(total=out.terms.total + float("nan")))
        return out

    monkeypatch.setattr(train_graph, "sae_losses", nan_on_third_call)
    h, y = _data()
    tr = _trainer(h, y, graph=True, out_dir=tmp_path, checkpoint_every=16 * 4, log_every=100)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 \(0-based\).*found at step 4"):
        tr.train()
    assert tr.step == 4 and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- CUDA (capture itself)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_trainer(graph, **kw):
    gen = torch.Generator().manual_seed(5)
    h = (torch.randn(4096, 64, generator=gen) + 0.3).cuda()
    y = torch.randint(0, 3, (4096,), generator=gen).cuda()
    scfg = SAEConfig(d=64, m=512, k=8, n_concepts=10, n_classes=3)
    vals = dict(total_samples=64 * 10**4, batch_size=64, lr=1e-3, dead_window=1, progress=False,
                device="cuda", log_every=10**9)
    vals.update(kw)
    return Trainer(build_sae(scfg), TrainConfig(cuda_graph=graph, **vals), h, y)


@cuda
@pytest.mark.parametrize("kind", ["ghost", "auxk"])
def test_cuda_graph_step_is_captured_and_trains_like_eager(kind):
    from concept_ext.train_graph import WARMUP_STEPS

    eager, graph = _cuda_trainer(False, dead_latents=kind), _cuda_trainer(True, dead_latents=kind)
    for step in range(12):
        a, b = eager.train_step(), graph.train_step()
        assert torch.allclose(a.terms.total, b.terms.total, rtol=2e-3, atol=1e-5), (kind, step)
    assert all(s.graph is not None for s in graph._graph.slots.values())
    assert graph.step == 12 and graph._graph.slots[(64, False)].warm == WARMUP_STEPS
    for (n, p), (_, q) in zip(eager.sae.named_parameters(), graph.sae.named_parameters()):
        assert torch.allclose(p, q, rtol=2e-3, atol=1e-5), (kind, n, float((p - q).abs().max()))
    assert torch.equal(eager.firing.counts, graph.firing.counts)
    graph.check_finite()


@cuda
def test_cuda_graph_replays_do_not_synchronise():
    tr = _cuda_trainer(True)
    for _ in range(4):  # warm-up and capture
        tr.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):  # within one pass over the 4096 rows: no new permutation is uploaded
            tr.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tr.check_finite()
