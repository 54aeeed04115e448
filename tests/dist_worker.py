"""Worker of tests/test_distributed.py, started by ``torchrun --nproc_per_node=N tests/dist_worker.py TASK OUT``.

Tasks: ``sae`` (a few DDP SAE steps per configuration of :data:`SAE_CASES`), ``cache`` (a sharded cache of
real sentences), ``finetune`` (DDP fine-tuning, then a resumed run), ``finetune_fsdp`` (the same with
FSDP), ``fail`` (rank 1 raises while rank 0
waits in a collective). Each writes what the test compares under OUT (rank 0), and the shared pieces
(data, models, configs) are functions the test calls for its single-process reference.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout (not pip-installed)
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__import__("concept_ext.text.data", fromlist=["shared_dir"]).shared_dir()).resolve()
PYTHIA_14M = SHARED / "models" / "pythia-configs" / "pythia-14m"
PYTHIA_TOKENIZER = SHARED / "models" / "pythia-tokenizer"
TINY_NEOX = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1)
D, N = 16, 120

#: (name, SAE config overrides, train config overrides): ghost grads + L_ar on an even split; AuxK with
#: FVU normalisation, odd batches and alternating half batches (uneven splits); v1 with input noise.
SAE_CASES = [
    ("classif_ghost", dict(architecture="classif_topk"), dict(batch_size=30, dead_latents="ghost")),
    ("sae_auxk_uneven", dict(architecture="topk"),
     dict(batch_size=31, dead_latents="auxk", mse_normalization="fvu", alternate_half_batches=True)),
    ("classif_v1_noise", dict(architecture="classif_topk"),
     dict(batch_size=30, loss_version="v1", input_noise=0.1, dead_latents="ghost")),
]
SAE_STEPS = 5


def sae_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g) * 2 + 1
    labels = torch.randint(0, 3, (N,), generator=g)
    return h, labels


def sae_trainer(case: str):
    """A fresh trainer of one case (the same weights on every process)."""
    from concept_ext.config.sae import SAEConfig, TrainConfig
    from concept_ext.sae.model import build_sae
    from concept_ext.sae.trainer import Trainer

    name, scfg, tcfg = next(c for c in SAE_CASES if c[0] == case)
    sae_cfg = SAEConfig(d=D, m=24, k=4, n_concepts=4, n_classes=3, **scfg)
    # dead_window 0: every latent that did not fire in the last step is dead, so ghost grads / AuxK run;
    # target_rate 0.2 with ~5 activations per latent per batch: several latents exceed m_tau, so L_ar > 0.
    cfg = TrainConfig(total_samples=tcfg["batch_size"] * SAE_STEPS, lr=1e-2, lr_end=1e-3, target_rate=0.2,
                      dead_window=0, log_every=1, device="cpu", progress=False, lambda_ar=0.5, seed=3,
                      **{k: v for k, v in tcfg.items()})
    h, labels = sae_data()
    return Trainer(build_sae(sae_cfg), cfg, h, labels if scfg["architecture"] == "classif_topk" else None)


def task_sae(out: Path) -> None:
    import torch.distributed as dist

    from concept_ext import distributed

    for name, _, _ in SAE_CASES:
        tr = sae_trainer(name)
        res = tr.train()
        # Every rank must hold bit-identical weights (same all-reduced gradients, same renormalisation).
        flat = torch.cat([p.detach().reshape(-1) for p in tr.sae.parameters()])
        allp = [torch.empty_like(flat) for _ in range(distributed.world_size())]
        dist.all_gather(allp, flat)
        same = all(torch.equal(allp[0], x) for x in allp)
        if distributed.is_main():
            torch.save({"state": tr.sae.state_dict(), "history": res.history, "counts": tr.firing.counts,
                        "steps_since": tr.firing.steps_since, "ranks_identical": same}, out / f"sae_{name}.pt")


def tiny_classifier():
    from transformers import AutoTokenizer

    from concept_ext.classifier.backbones import load_backbone
    from concept_ext.classifier.model import Classifier

    tok = AutoTokenizer.from_pretrained(str(PYTHIA_TOKENIZER))
    bb = load_backbone(f"config:{PYTHIA_14M}", config_overrides=TINY_NEOX, tokenizer=tok, seed=0, num_labels=4)
    return Classifier(bb, ["World", "Sports", "Business", "SciTech"], layer=1)


def tied_classifier():
    """A tiny GPT-2 whose LM head is tied to the token embedding (as SmolLM2's), without dropout."""
    from transformers import AutoTokenizer, GPT2Config

    from concept_ext.classifier.backbones import load_backbone
    from concept_ext.classifier.model import Classifier

    tok = AutoTokenizer.from_pretrained(str(PYTHIA_TOKENIZER))
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50304, n_positions=512, tie_word_embeddings=True,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    bb = load_backbone(cfg, tokenizer=tok, seed=0)
    return Classifier(bb, ["World", "Sports", "Business", "SciTech"], layer=1)


def sentences(n: int = 40):
    from concept_ext.text.data import load_dataset

    return load_dataset(str(SHARED / "data" / "ag_news"), "test", max_rows=n)


def task_cache(out: Path) -> None:
    from concept_ext.cache.activations import build_cache
    from concept_ext.config.clf import CacheConfig

    build_cache(tiny_classifier(), sentences(), "test", out_dir=out / "cache",
                config=CacheConfig(layer=1, batch_size=4, shard_size=6))


def finetune_config(steps: int = 4, checkpoint_every: int = 0):
    from concept_ext.config.clf import FineTuneConfig

    return FineTuneConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=1, bucket_factor=2, seed=1,
                          checkpoint_every=checkpoint_every, max_eval_rows=8, eval_batch_size=8)


def task_finetune(out: Path, *, parallel: str = "ddp") -> None:
    """A fresh 2-rank fine-tuning in ft_fresh, and one resuming the checkpoint the test left in ft_resume
    (``parallel="fsdp"``: the same with fully sharded fine-tuning, in fsdp_fresh / fsdp_resume)."""
    import dataclasses

    from concept_ext.classifier.finetune import finetune

    from concept_ext.classifier import finetune_fsdp

    tag = "ft" if parallel == "ddp" else parallel
    cfg = dataclasses.replace(finetune_config(checkpoint_every=2), parallel=parallel)
    shard_share: list[float] = []  # FSDP: share of the parameters this rank holds while training
    real_shard = finetune_fsdp.shard_classifier

    def shard_and_measure(*args, **kwargs):
        sharded = real_shard(*args, **kwargs)
        params = list(sharded.model.parameters())
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        shard_share.append(local / sum(p.numel() for p in params))
        return sharded

    finetune_fsdp.shard_classifier = shard_and_measure
    for name in ("fresh", "resume"):
        clf = tiny_classifier()
        res = finetune(clf, sentences(24), config=cfg, out_dir=out / f"{tag}_{name}")
        if os.environ.get("RANK") == "0":
            state = {k: v.clone() for k, v in clf.model.state_dict().items()}
            torch.save({"state": state, "losses": res.losses, "resumed_from": res.resumed_from,
                        "shard_share": list(shard_share)},
                       out / f"{'finetune' if parallel == 'ddp' else parallel}_{name}.pt")
    if parallel == "fsdp":  # tied weights: one parameter under two names, in the root unit
        clf = tied_classifier()
        res = finetune(clf, sentences(24), config=cfg, out_dir=out / "fsdp_tied")
        if os.environ.get("RANK") == "0":
            tied = clf.model.lm_head.weight is clf.model.transformer.wte.weight
            state = {k: v.clone() for k, v in clf.model.state_dict().items()}
            torch.save({"state": state, "losses": res.losses, "tied": tied}, out / "fsdp_tied.pt")


def task_fail(out: Path) -> None:
    from concept_ext import distributed

    if distributed.rank() == 1:
        raise RuntimeError("planted failure on rank 1")
    distributed.barrier()  # rank 0 waits for a peer that never comes


def main() -> int:
    from concept_ext import distributed

    task, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    fn = {"sae": task_sae, "cache": task_cache, "finetune": task_finetune, "fail": task_fail,
          "finetune_fsdp": lambda o: task_finetune(o, parallel="fsdp")}[task]

    def body() -> int:
        fn(out)
        distributed.barrier()
        return 0

    return distributed.run_ranked(body)


if __name__ == "__main__":
    sys.exit(main())
