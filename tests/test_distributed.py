"""torchrun / DDP on CPU (gloo, 2 processes): each test launches ``tests/dist_worker.py`` under torchrun and
compares what rank 0 wrote with a single-process computation in this process.

* SAE: 5 DDP steps == 5 single-process steps on the concatenated batches (weights, every loss term incl.
  L_ar, ghost grads, AuxK, v1 noise; firing counters), and the ranks hold bit-identical weights.
* cache: a 2-rank cache == the 1-rank cache (same manifest rows and order, same values).
* fine-tuning: 2-rank DDP == single process with the same effective batch; resume.
* fine-tuning with FSDP (``parallel="fsdp"``): the same, and its checkpoints are single-process checkpoints.
* failure: a rank that raises stops the job with a non-zero exit naming it, within a bounded time.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_worker as W
from conftest import needs_shared

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(timeout_s: float) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", CONCEPT_EXT_DIST_TIMEOUT=str(timeout_s), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(task: str, out: Path, *, nproc: int = 2, timeout_s: float = 60, wait_s: float = 240):
    """Run the worker under torchrun; returns the CompletedProcess (stdout+stderr in .stdout)."""
    # --standalone: the rendezvous store binds port 0 itself (no window between picking a free port and
    # binding it, in which a parallel job could take it).
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(WORKER), task, str(out)]
    return subprocess.run(cmd, env=_env(timeout_s), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=wait_s)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:]


# ----------------------------------------------------------------------------------------------------
# SAE training
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_sae")
    _ok(torchrun("sae", out))
    return out


@pytest.mark.parametrize("case", [c[0] for c in W.SAE_CASES])
def test_ddp_sae_steps_equal_single_process_on_concatenated_batch(sae_run, case):
    got = torch.load(sae_run / f"sae_{case}.pt", weights_only=False)
    assert got["ranks_identical"], "ranks diverged: weights differ between ranks"
    torch.manual_seed(0)
    tr = W.sae_trainer(case)
    res = tr.train()
    want_hist = res.history
    assert len(got["history"]) == len(want_hist) == W.SAE_STEPS
    for g, w in zip(got["history"], want_hist):
        for key in w:
            if key == "head_acc":
                # argmax over logits = b_c on rows where no z_class latent fires: after one Adam step the
                # entries of b_c are +-lr exactly, so ties flip on rounding differences. Weights are compared.
                continue
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (case, key, g["step"])
    # The paths the test is about were exercised.
    assert max(h["loss/ar"] for h in want_hist) > 0
    dead_term = "loss/auxk" if "auxk" in case else "loss/ghost"
    assert max(h[dead_term] for h in want_hist) > 0
    for name, p in tr.sae.state_dict().items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-4, atol=1e-5, msg=f"{case}: {name}")
    assert torch.equal(got["counts"], tr.firing.counts)
    assert torch.equal(got["steps_since"], tr.firing.steps_since)
    # Unit decoder rows on every rank after the renormalisation of the next step.
    w = got["state"]["W_dec"]
    torch.testing.assert_close((w / w.norm(dim=1, keepdim=True)).norm(dim=1), torch.ones(w.shape[0]))


def test_batch_group_share_and_shard_range():
    from concept_ext.distributed import shard_range

    n, world = 31, 4
    parts = [shard_range(n, rank=r, world=world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, rank=2, world=2)


# ----------------------------------------------------------------------------------------------------
# Failure handling
# ----------------------------------------------------------------------------------------------------


def test_failing_rank_stops_torchrun_job_with_clear_error(tmp_path):
    t0 = time.monotonic()
    proc = torchrun("fail", tmp_path, timeout_s=20, wait_s=120)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert "rank 1 of 2 stopped" in proc.stdout and "planted failure on rank 1" in proc.stdout, proc.stdout[-3000:]
    assert took < 100


def test_dead_peer_without_agent_fails_within_timeout(tmp_path):
    """Multi-node case: no agent kills the survivors; rank 0's collective must fail on its own, bounded by
    the timeout, with an error that names it as waiting on another rank."""
    port = free_port()
    procs = []
    t0 = time.monotonic()
    for r in range(2):
        env = dict(_env(8), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "fail", str(tmp_path)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    took = time.monotonic() - t0
    assert procs[1].returncode != 0 and "planted failure on rank 1" in outs[1]
    assert procs[0].returncode != 0, outs[0][-3000:]
    assert "rank 0 of 2 stopped" in outs[0] and "another rank" in outs[0], outs[0][-3000:]
    assert took < 100


# ----------------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.slow
def test_two_rank_cache_equals_one_rank_cache(tmp_path):
    import json

    from concept_ext.cache.activations import build_cache, load_cache
    from concept_ext.config.clf import CacheConfig

    cfg = CacheConfig(layer=1, batch_size=4, shard_size=6)
    # A one-process build interrupted after 2 of 7 shards: the 2-rank build resumes it.
    partial = build_cache(W.tiny_classifier(), W.sentences(), "test", out_dir=tmp_path / "cache", config=cfg,
                          max_shards=2)
    assert len(json.loads((partial.dir / "cache.json").read_text())["shards"]) == 2
    first = (partial.dir / "shard_00000.safetensors").stat().st_mtime_ns
    _ok(torchrun("cache", tmp_path))
    assert (partial.dir / "shard_00000.safetensors").stat().st_mtime_ns == first, "finished shards are kept"
    ref_dir = tmp_path / "ref"
    build_cache(W.tiny_classifier(), W.sentences(), "test", out_dir=ref_dir, config=cfg)
    got_dir = tmp_path / "cache"
    assert not list(got_dir.glob("cache.part-*")), "part manifests must be merged and removed"
    got_man, ref_man = json.loads((got_dir / "cache.json").read_text()), json.loads((ref_dir / "cache.json").read_text())
    assert got_man["cache_id"] == ref_man["cache_id"] and got_man["complete"]
    assert list(got_man["shards"]) == list(ref_man["shards"]) == [str(i) for i in range(7)]  # 40 rows / 6
    assert [e["rows"] for e in got_man["shards"].values()] == [e["rows"] for e in ref_man["shards"].values()]
    got, ref = load_cache(got_dir), load_cache(ref_dir)
    assert got.texts == ref.texts
    for name in ("pred", "label"):
        assert torch.equal(getattr(got, name), getattr(ref, name))
    torch.testing.assert_close(got.h, ref.h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@needs_shared
@pytest.mark.slow
def test_ddp_finetune_equals_single_process_and_resumes(tmp_path, monkeypatch):
    import concept_ext.classifier.finetune as ft

    cfg = W.finetune_config(checkpoint_every=2)
    # A single-process run interrupted right after its step-2 checkpoint: the 2-rank job resumes it.
    real_save = ft._save_checkpoint

    def save_then_stop(out, step, *a, **k):
        real_save(out, step, *a, **k)
        raise _Stop

    monkeypatch.setattr(ft, "_save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        ft.finetune(W.tiny_classifier(), W.sentences(24), config=cfg, out_dir=tmp_path / "ft_resume")
    monkeypatch.setattr(ft, "_save_checkpoint", real_save)

    _ok(torchrun("finetune", tmp_path))
    clf = W.tiny_classifier()
    want = ft.finetune(clf, W.sentences(24), config=cfg, out_dir=tmp_path / "ref")
    want_state = clf.model.state_dict()
    for name in ("fresh", "resume"):
        got = torch.load(tmp_path / f"finetune_{name}.pt", weights_only=False)
        assert got["resumed_from"] == (2 if name == "resume" else None)
        assert got["losses"] == pytest.approx(want.losses, rel=1e-4), name
        for k, v in want_state.items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    # Rank 0 wrote one checkpoint (atomically, the older ones removed) and the final model.
    ft_dir = tmp_path / "ft_fresh"
    assert sorted(p.name for p in ft_dir.glob("ckpt-*")) == ["ckpt-00000004"]
    assert (ft_dir / "model" / "config.json").is_file() and not list(ft_dir.glob(".*tmp*"))


def _interrupted_single_process_finetune(monkeypatch, out: Path, cfg) -> None:
    """A single-process fine-tuning stopped right after its first checkpoint (the 2-rank job resumes it)."""
    import concept_ext.classifier.finetune as ft

    real_save = ft._save_checkpoint

    def save_then_stop(out, step, *a, **k):
        real_save(out, step, *a, **k)
        raise _Stop

    monkeypatch.setattr(ft, "_save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        ft.finetune(W.tiny_classifier(), W.sentences(24), config=cfg, out_dir=out)
    monkeypatch.setattr(ft, "_save_checkpoint", real_save)


@needs_shared
@pytest.mark.slow
def test_fsdp_finetune_equals_single_process_resumes_and_writes_its_checkpoints(tmp_path, monkeypatch):
    """``finetune.parallel="fsdp"`` on 2 ranks: the parameters are really sharded, the losses and weights
    are the single-process ones, a single-process checkpoint resumes, and the checkpoint rank 0 writes
    from the gathered shards is the single-process checkpoint (same files, keys, parameter ids, values)."""
    from safetensors.torch import load_file

    import concept_ext.classifier.finetune as ft

    cfg = W.finetune_config(checkpoint_every=2)
    _interrupted_single_process_finetune(monkeypatch, tmp_path / "fsdp_resume", cfg)
    _ok(torchrun("finetune_fsdp", tmp_path))
    clf = W.tiny_classifier()
    want = ft.finetune(clf, W.sentences(24), config=cfg, out_dir=tmp_path / "ref")
    want_state = clf.model.state_dict()
    for name in ("fresh", "resume"):
        got = torch.load(tmp_path / f"fsdp_{name}.pt", weights_only=False)
        # Rank 0 held about half of every parameter while training (2 ranks; per-tensor padding aside).
        n_runs = 1 if name == "fresh" else 2
        shares = got["shard_share"]
        assert len(shares) == n_runs and all(0.4 < s < 0.6 for s in shares), shares
        assert got["resumed_from"] == (2 if name == "resume" else None)
        assert got["losses"] == pytest.approx(want.losses, rel=1e-4), name
        assert set(got["state"]) == set(want_state)
        for k, v in want_state.items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    fsdp_dir, ref_dir = tmp_path / "fsdp_fresh", tmp_path / "ref"
    assert sorted(p.name for p in fsdp_dir.glob("ckpt-*")) == ["ckpt-00000004"]
    assert (fsdp_dir / "model" / "config.json").is_file() and not list(fsdp_dir.glob(".*tmp*"))
    ck, ref = fsdp_dir / "ckpt-00000004", ref_dir / "ckpt-00000004"
    assert sorted(p.name for p in ck.iterdir()) == sorted(p.name for p in ref.iterdir())
    a, b = load_file(ck / "model.safetensors"), load_file(ref / "model.safetensors")
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    sa = torch.load(ck / "trainer_state.pt", weights_only=False)
    sb = torch.load(ref / "trainer_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 4 and sa["scheduler"] == sb["scheduler"]
    assert sa["losses"] == pytest.approx(sb["losses"], rel=1e-4)
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]  # same hyper-parameters and integer parameter ids
    assert set(oa["state"]) == set(ob["state"]) == set(range(len(b)))
    for i, st in ob["state"].items():
        assert set(oa["state"][i]) == set(st)
        for key, v in st.items():
            torch.testing.assert_close(oa["state"][i][key], v, rtol=1e-4, atol=1e-7, msg=f"{i}.{key}")
    # Tied LM head / embedding (GPT-2, as SmolLM2): still one parameter, the single-process run's values,
    # and the checkpoint stores it once, as safetensors' save_model does for the single-process model.
    tied = torch.load(tmp_path / "fsdp_tied.pt", weights_only=False)
    clf = W.tied_classifier()
    want = ft.finetune(clf, W.sentences(24), config=cfg, out_dir=tmp_path / "ref_tied")
    assert tied["tied"] and tied["losses"] == pytest.approx(want.losses, rel=1e-4)
    for k, v in clf.model.state_dict().items():
        torch.testing.assert_close(tied["state"][k], v, rtol=1e-4, atol=1e-5, msg=f"tied: {k}")
    a = load_file(tmp_path / "fsdp_tied" / "ckpt-00000004" / "model.safetensors")
    b = load_file(tmp_path / "ref_tied" / "ckpt-00000004" / "model.safetensors")
    assert set(a) == set(b) and len(b) < len(clf.model.state_dict())


# ----------------------------------------------------------------------------------------------------
# The CLI under torchrun
# ----------------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.slow
def test_torchrun_cli_train_equals_single_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m concept_ext train`` (DDP fine-tuning, sharded cache, DDP ClassifSAE)
    gives the caches and SAE weights of ``python -m concept_ext train``."""
    import json

    from concept_ext.cache.activations import load_cache
    from concept_ext.sae.checkpoint import load_checkpoint

    cfg = {"backbone": f"config:{W.PYTHIA_14M}", "config_overrides": W.TINY_NEOX,
           "dataset": str(W.SHARED / "data" / "ag_news"), "train_rows": 48, "test_rows": 24,
           "methods": ["ClassifSAE"], "finetune": {"steps": 4, "batch_size": 8, "lr": 1e-3},
           "cache": {"shard_size": 16}, "sae": {"expansion": 4, "k": 4, "n_concepts": 6},
           "train_classifsae": {"total_samples": 480, "batch_size": 32, "progress": False}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    args = ["train", "--config", str(path), "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "concept_ext", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=_env(60), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    _ok(proc)
    proc = subprocess.run([sys.executable, "-m", "concept_ext", *args, "--out", str(tmp_path / "one")], env=_env(60),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    _ok(proc)
    for split in ("train", "test"):
        a, b = load_cache(tmp_path / "ddp" / "cache" / split), load_cache(tmp_path / "one" / "cache" / split)
        assert a.texts == b.texts and torch.equal(a.pred, b.pred)
        torch.testing.assert_close(a.h, b.h, rtol=1e-5, atol=1e-5)
    fit = "fit/ClassifSAE-s42/sae"
    a, b = load_checkpoint(tmp_path / "ddp" / fit).sae, load_checkpoint(tmp_path / "one" / fit).sae
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    assert not list((tmp_path / "ddp").glob(".tmp-rank*")), "scratch folders of the other ranks are removed"


@needs_shared
@pytest.mark.slow
def test_torchrun_task_parallel_run_equals_single_process(tmp_path):
    """``fit_parallel=tasks``: 2 ranks deal the (method, seed) pairs out round robin (each rank's log names
    its tasks), and every fit, every evaluation and the report's numbers equal a single-process run's."""
    import json

    from concept_ext.sae.checkpoint import load_checkpoint

    cfg = {"backbone": f"config:{W.PYTHIA_14M}", "config_overrides": W.TINY_NEOX,
           "dataset": str(W.SHARED / "data" / "ag_news"), "train_rows": 96, "test_rows": 32,
           "methods": ["ICA", "ClassifSAE"], "seeds": [42, 43], "protocols": ["tail"],
           "finetune": {"steps": 4, "batch_size": 8, "lr": 1e-3},
           "cache": {"shard_size": 16}, "sae": {"expansion": 4, "k": 4, "n_concepts": 6},
           "train_classifsae": {"total_samples": 3200, "batch_size": 32, "progress": False},
           "fit_parallel": "tasks"}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    args = ["run", "--config", str(path), "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "concept_ext", *args, "--out", str(tmp_path / "one")],
                          env=_env(120), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    _ok(proc)
    # The same classifier and cache for both (DDP fine-tuning equals one process only to float rounding,
    # which the tiny model's near-zero metrics would amplify): the torchrun job skips those two stages.
    import shutil

    for stage in ("finetune", "cache"):
        shutil.copytree(tmp_path / "one" / stage, tmp_path / "tasks" / stage)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "concept_ext", *args, "--out", str(tmp_path / "tasks")]
    proc = subprocess.run(cmd, env=_env(120), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    _ok(proc)
    assert "stage cache: up to date, skipped" in proc.stdout
    # method-major order ICA-s42, ICA-s43, ClassifSAE-s42, ClassifSAE-s43; round robin over 2 ranks
    for task, r in (("ICA-s42", 0), ("ICA-s43", 1), ("ClassifSAE-s42", 0), ("ClassifSAE-s43", 1)):
        assert f"concept_ext [rank {r}] task {task} on rank {r} of 2" in proc.stdout, proc.stdout[-4000:]
    for seed in (42, 43):
        fit = f"fit/ClassifSAE-s{seed}/sae"
        a, b = load_checkpoint(tmp_path / "tasks" / fit).sae, load_checkpoint(tmp_path / "one" / fit).sae
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    for m in ("ICA", "ClassifSAE"):
        for seed in (42, 43):
            name = f"evaluate/{m}-s{seed}/results.json"
            ra = json.loads((tmp_path / "tasks" / name).read_text())["protocols"]
            rb = json.loads((tmp_path / "one" / name).read_text())["protocols"]
            _assert_same_numbers(ra, rb, f"{m}-s{seed}")
    report = (tmp_path / "tasks" / "metrics.json").read_text()
    assert json.loads(report)["methods"].keys() == {"ICA", "ClassifSAE"}
    assert not list((tmp_path / "tasks").glob(".tmp-rank*"))


def _assert_same_numbers(a, b, where: str) -> None:
    """Every number of two JSON trees agrees (floats to 1e-4 relative), and so does every other leaf."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_numbers(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    else:
        assert a == b, where


def test_local_context_and_task_assignment(monkeypatch):
    """Inside ``local()`` a rank of a live job is a single-process job (rank 0 of 1, collectives off, its own
    device); outside it, the job's context is back. Tasks are dealt round robin."""
    import torch.distributed as dist

    from concept_ext import distributed as D

    assert D.owned_tasks(5, rank=0, world=2) == [0, 2, 4] and D.owned_tasks(5, rank=1, world=2) == [1, 3]
    assert D.owned_tasks(1, rank=1, world=3) == []
    monkeypatch.setattr(D, "_ctx", D.DistContext(1, 2, 1, "gloo", "cuda:1"))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert D.enabled() and not D.is_main() and D.rank() == 1
    with D.local():
        assert not D.enabled() and D.is_main() and D.world_size() == 1 and D.context().device == "cuda:1"
        D.barrier()  # a no-op: no collective is issued inside local()
        assert D.broadcast_object("x") == "x" and D.task_group() is None
    assert D.enabled() and D.rank() == 1
    monkeypatch.setenv("CONCEPT_EXT_DIST_TASK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CONCEPT_EXT_DIST_TASK_TIMEOUT"):
        D.task_timeout()
    monkeypatch.setenv("CONCEPT_EXT_DIST_TASK_TIMEOUT", "7200")
    assert D.task_timeout().total_seconds() == 7200


def test_global_activation_rate_loss_differs_from_per_rank_losses():
    """Why L_ar needs the all-gather: on the test batches, the mean of per-half L_ar (top sets of 15 rows,
    m_tau = 3) differs from the global one (top sets of 30 rows, m_tau = 6), so the DDP equality test
    above would catch a per-rank L_ar."""
    from concept_ext.ops import activation_rate_loss

    tr = W.sae_trainer("classif_ghost")
    idx = tr.order.next(tr.cfg.batch_size)
    with torch.no_grad():
        code = tr.sae.encode(tr.h[idx])
    m, rate = tr.sae.m, tr.cfg.target_rate
    full = float(activation_rate_loss(code.values, code.indices, m, rate))
    halves = [float(activation_rate_loss(code.values[s], code.indices[s], m, rate))
              for s in (slice(0, 15), slice(15, 30))]
    assert full > 0
    assert abs(full - sum(halves) / 2) > 1e-3 * full
