"""TrainConfig.cuda_graph: the fixed-shape, synchronisation-free training step (train_graph.GraphStep).

On CPU the step runs eagerly with the code a CUDA graph would hold; these tests check that it trains
exactly like the eager step (up to rounding), that it contains no operation that synchronises the host
with a CUDA device, that a non-finite loss still stops training before a checkpoint, and that
checkpoints resume across the two modes. The capture itself is tested at the end of this file (CUDA only).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.losses import sae_losses
from concept_ext.sae.model import build_sae
from concept_ext.sae.trainer import Trainer
from tiny_trainer import tiny_data, tiny_trainer

#: aten operations that make the host wait for a CUDA device (a CUDA graph cannot hold them): reading a
#: value (item / bool), data-dependent output shapes, and bincount (which reads its input's maximum).
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
           "unique_consecutive", "unique_dim", "bincount", "is_nonzero", "item", "repeat_interleave",
           "masked_scatter", "nonzero_static",
           # a Python constant turned into a tensor (torch.tensor(...)): a host-to-device copy on CUDA
           "lift_fresh", "lift_fresh_copy"}


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


CASES = {
    "ghost": {},
    "auxk": {"dead_latents": "auxk"},
    "none": {"dead_latents": "none"},
    "fvu_ghost": {"mse_normalization": "fvu"},
    "v1_noise_auxk": {"loss_version": "v1", "input_noise": 0.2, "dead_latents": "auxk"},
    "v1_ghost": {"loss_version": "v1", "input_noise": 0.2},
    "half_batches": {"alternate_half_batches": True, "stopgrad_plain_sae": True},
    "centred_ghost": {"center": "mean"},
    "centred_median_auxk": {"center": "geometric_median", "dead_latents": "auxk"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_graph_step_trains_like_the_eager_step(case):
    h, y = tiny_data()
    eager = tiny_trainer(h, y, cuda_graph=False, **CASES[case])
    static = tiny_trainer(h, y, cuda_graph=True, **CASES[case])
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
    h, y = tiny_data()
    for kw, term in (({}, "ghost"), ({"dead_latents": "auxk"}, "auxk")):
        hist = tiny_trainer(h, y, cuda_graph=True, **kw).train().history
        assert any(m[f"loss/{term}"] > 0 for m in hist), term
        assert any(m["stopgrad"] for m in hist) and not all(m["stopgrad"] for m in hist)


def test_static_losses_are_zero_without_dead_latents_and_match_eager_with_them():
    h, y = tiny_data(n=32)
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
    h, y = tiny_data()
    tr = tiny_trainer(h, y, cuda_graph=True, **CASES[case])
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
    h, y = tiny_data()
    tr = tiny_trainer(h, y, cuda_graph=False)
    for _ in range(4):
        tr.train_step()  # latents go dead
    with SyncOps() as mode:
        tr.train_step()
    assert "nonzero" in mode.seen and "_local_scalar_dense" in mode.seen


def test_non_finite_loss_stops_before_a_checkpoint(tmp_path):
    h, y = tiny_data()
    tr = tiny_trainer(h, y, cuda_graph=True, out_dir=tmp_path, checkpoint_every=16 * 4, log_every=100)
    tr.train(steps=2)
    with torch.no_grad():
        tr.sae.b_dec[0] = float("nan")
    # On CPU the encoder's own NaN check stops step 3, and the error names step 2 as the cause; on CUDA
    # the kernels go on and the checkpoint due after step 4's samples (64) is where the check runs.
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 \(0-based\).*found after [34] steps"):
        tr.train()
    assert not any(tmp_path.iterdir())


def test_checkpoints_resume_across_modes(tmp_path):
    h, y = tiny_data()
    full = tiny_trainer(h, y, cuda_graph=False).train()
    for first, second in ((True, False), (False, True), (True, True)):
        part = tiny_trainer(h, y, cuda_graph=first, out_dir=tmp_path / f"{first}{second}")
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


def test_graph_step_keeps_its_buffers_in_place():
    """What a CUDA graph holds by address: the batch buffers, the parameters, Adam's state and the firing
    counters must not move between steps (on CPU, the stand-in for "the graph still points at them").
    Slots are per (rows, phase); the first phase's are dropped at the switch."""
    h, y = tiny_data()
    tr = tiny_trainer(h, y, cuda_graph=True, alternate_half_batches=True, stopgrad_plain_sae=True)
    for _ in range(2):  # steps 0 and 1: one of each batch size (the phase switches at step 4)
        tr.train_step()
    assert set(tr._graph.slots) == {(16, False), (8, False)}

    def addresses():
        ptrs = {f"slot{key}": (sl.h.data_ptr(), sl.labels.data_ptr()) for key, sl in tr._graph.slots.items()}
        ptrs.update({n: p.data_ptr() for n, p in tr.sae.named_parameters()})
        ptrs.update({f"adam{i}.{k}": v.data_ptr() for i, st in enumerate(tr.opt.state.values())
                     for k, v in st.items()})
        ptrs.update(counts=tr.firing.counts.data_ptr(), since=tr.firing.steps_since.data_ptr(),
                    lr=tr._graph.lr.data_ptr(), weight=tr._graph.weight.data_ptr())
        return ptrs

    before = addresses()
    for _ in range(2):
        tr.train_step()
    after = addresses()
    assert after == before
    while not tr.stopgrad_active:
        tr.train_step()
    tr.train_step()
    tr.train_step()
    assert set(tr._graph.slots) == {(16, True), (8, True)}


def test_reset_after_a_bad_step_clears_the_record():
    """Rolling the same trainer back (weights in place, then load_state_dict) after a FloatingPointError
    trains on: the record of the bad step belongs to the discarded steps."""
    import copy

    h, y = tiny_data()
    tr = tiny_trainer(h, y, cuda_graph=True)
    tr.train(steps=2)
    state, weights = copy.deepcopy(tr.state_dict()), copy.deepcopy(tr.sae.state_dict())
    with torch.no_grad():
        tr.sae.b_dec[0] = float("nan")
    with pytest.raises(FloatingPointError):
        tr.train()
    with torch.no_grad():
        for name, t in tr.sae.state_dict().items():
            t.copy_(weights[name])
    tr.load_state_dict(state)
    assert tr.step == 2
    tr.train()
    assert tr.step == 12


def test_pipeline_fingerprint_ignores_cuda_graph(tmp_path):
    """cuda_graph changes how, not what, is trained: turning it on must not redo the fit stages."""
    from concept_ext.config.run import load_run_config
    from concept_ext.pipeline.stages import Pipeline
    from concept_ext.runstate import fingerprint

    cfg = load_run_config(None, ["device=cpu"])
    on = load_run_config(None, ["device=cpu", "train_classifsae.cuda_graph=true", "train_sae.cuda_graph=true"])
    off_fp = {m: fingerprint(Pipeline(cfg, tmp_path / "a")._method_config(m)) for m in ("ClassifSAE", "SAE")}
    on_fp = {m: fingerprint(Pipeline(on, tmp_path / "b")._method_config(m)) for m in ("ClassifSAE", "SAE")}
    assert off_fp == on_fp
    other = load_run_config(None, ["device=cpu", "train_classifsae.lr=0.0123"])
    assert fingerprint(Pipeline(other, tmp_path / "c")._method_config("ClassifSAE")) != off_fp["ClassifSAE"]


def test_cuda_graph_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setattr("concept_ext.distributed.enabled", lambda: True)
    h, y = tiny_data()
    with pytest.raises(ValueError, match="cuda_graph is single-process only"):
        tiny_trainer(h, y, cuda_graph=True)


def test_deferred_check_catches_a_non_finite_loss_at_the_next_checkpoint(tmp_path, monkeypatch):
    """A NaN total whose gradients stay finite (a NaN constant added to the loss) leaves the kernels
    running; the check at the checkpoint due after step 4 (64 samples) finds it and nothing is written."""
    from concept_ext.sae import graph_step as train_graph

    real = train_graph.sae_losses
    calls = []

    def nan_on_third_call(*a, **kw):
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) == 3:  # step 2 (0-based)
            out = out._replace(terms=out.terms._replace(total=out.terms.total + float("nan")))
        return out

    monkeypatch.setattr(train_graph, "sae_losses", nan_on_third_call)
    h, y = tiny_data()
    tr = tiny_trainer(h, y, cuda_graph=True, out_dir=tmp_path, checkpoint_every=16 * 4, log_every=100)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 \(0-based\).*found after 4 steps"):
        tr.train()
    assert tr.step == 4 and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- CUDA (capture itself)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_trainer(graph, out_dir=None, **kw):
    gen = torch.Generator().manual_seed(5)
    h = (torch.randn(4096, 64, generator=gen) + 0.3).cuda()
    y = torch.randint(0, 3, (4096,), generator=gen).cuda()
    scfg = SAEConfig(d=64, m=512, k=8, n_concepts=10, n_classes=3)
    vals = dict(total_samples=64 * 10**4, batch_size=64, lr=1e-3, dead_window=1, progress=False,
                device="cuda", log_every=10**9)
    vals.update(kw)
    return Trainer(build_sae(scfg), TrainConfig(cuda_graph=graph, **vals), h, y, out_dir=out_dir)


CUDA_CASES = {
    "ghost": {},
    "auxk": {"dead_latents": "auxk"},
    # 64 * 30 samples: the lr schedule moves, the stop-gradient phase starts at step 15 and both batch
    # sizes get graphs in both phases (8 graphs captured in all, 4 freed at the switch).
    "v1_noise_half_batches_phases": {"loss_version": "v1", "input_noise": 0.2, "alternate_half_batches": True,
                                     "total_samples": 64 * 30, "stopgrad_plain_sae": True},
    "v2_phases_half_batches": {"alternate_half_batches": True, "total_samples": 64 * 30},
}


@cuda
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_cuda_graph_step_is_captured_and_trains_like_eager(case):
    from concept_ext.sae.graph_step import WARMUP_STEPS

    kw = dict(CUDA_CASES[case])
    eager, graph = _cuda_trainer(False, **kw), _cuda_trainer(True, **kw)
    steps = min(eager.cfg.total_steps, 30)
    for step in range(steps):
        a, b = eager.train_step(), graph.train_step()
        assert torch.allclose(a.terms.total, b.terms.total, rtol=5e-3, atol=1e-5), (case, step)
    assert all(s.graph is not None for s in graph._graph.slots.values())
    assert graph.step == steps and all(s.warm == WARMUP_STEPS for s in graph._graph.slots.values())
    for (n, p), (_, q) in zip(eager.sae.named_parameters(), graph.sae.named_parameters()):
        assert torch.allclose(p, q, rtol=5e-3, atol=1e-5), (case, n, float((p - q).abs().max()))
    # A near-tie in the top-k may fall the other way after different GEMM roundings: counts nearly equal.
    assert (eager.firing.counts - graph.firing.counts).abs().sum() <= 0.01 * eager.firing.counts.sum()
    graph.check_finite()


@cuda
def test_cuda_graph_resume_equals_uninterrupted(tmp_path):
    kw = {"alternate_half_batches": True, "total_samples": 64 * 24}
    full = _cuda_trainer(True, **kw)
    full.train()
    part = _cuda_trainer(True, out_dir=tmp_path, **kw)
    part.train(steps=9)
    path = part.save(tmp_path / "mid")
    resumed = Trainer.resume(path, part.h, part.labels)
    assert resumed._graph is not None and resumed.step == 9
    resumed.train()
    for (n, p), (_, q) in zip(full.sae.named_parameters(), resumed.sae.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n


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


def test_graph_step_only_captures_and_replays():
    """The graph step holds no reference to the trainer and leaves the step's bookkeeping (step count, last
    batch, samples seen) to the trainer's step-begin/step-end pair, which the eager step uses too."""
    import ast
    from pathlib import Path

    import concept_ext.sae.graph_step as graph_module

    h, y = tiny_data()
    tr = tiny_trainer(h, y, cuda_graph=True, alternate_half_batches=True)
    for _ in range(3):
        tr.train_step()
    assert all(v is not tr for v in vars(tr._graph).values()), "GraphStep keeps a back-pointer to the Trainer"
    assert tr.step == 3 and tr.firing.samples_seen == 16 + 8 + 16
    assert tr._last_batch[0].shape == (16, 8)
    tree = ast.parse(Path(graph_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "concept_ext.sae.trainer" not in imported
