"""Distributed scaling on CPU: 1 vs N gloo processes (torchrun), one torch thread per process.

    PYTHONPATH=. python benchmarks/scaling_distributed.py            # small sizes (a smoke run, ~1 min)
    PYTHONPATH=. CONCEPT_EXT_BENCH_FULL=1 python benchmarks/scaling_distributed.py --nproc 1 2

For each process count it launches ``torchrun --nproc_per_node=P`` on this file in worker mode and
measures, between barriers, (a) ``build_cache`` of ag_news test sentences on a random-weight Pythia-14M
(the real config; shards of 32 rows, batch 16), (b) ClassifSAE training steps (global batch B, d,
m = 8d, k = 10) after 3 warm-up steps, DDP over the batch, and (c) the same training as independent
tasks (``fit_parallel="tasks"``): 4 ClassifSAEs of that size (seeds 0..3), dealt round robin, each rank
training its own single-process. One process runs the plain single-process code (WORLD_SIZE=1).
Prints one JSON line per measurement and writes them to ``benchmarks/results/scaling_distributed.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
FULL = os.environ.get("CONCEPT_EXT_BENCH_FULL") == "1"
SIZES = dict(cache_rows=512, sae_d=512, sae_batch=1024, sae_steps=30) if FULL else dict(
    cache_rows=128, sae_d=128, sae_batch=256, sae_steps=10)


def _worker(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from concept_ext import distributed
    from concept_ext.classifier.backbones import load_backbone
    from concept_ext.cache.activations import build_cache
    from concept_ext.classifier.model import Classifier
    from concept_ext.config.clf import CacheConfig
    from concept_ext.config.sae import SAEConfig, TrainConfig
    from concept_ext.text.data import load_dataset
    from concept_ext.sae.model import build_sae
    from concept_ext.sae.trainer import Trainer
    from transformers import AutoTokenizer

    distributed.init_from_env(device="cpu")
    res = {"world": distributed.world_size(), **SIZES}
    tok = AutoTokenizer.from_pretrained(str(SHARED / "models" / "pythia-tokenizer"))
    bb = load_backbone(f"config:{SHARED / 'models' / 'pythia-configs' / 'pythia-14m'}", tokenizer=tok, seed=0,
                       num_labels=4)
    ds = load_dataset(str(SHARED / "data" / "ag_news"), "test", max_rows=SIZES["cache_rows"])
    clf = Classifier(bb, ds.class_names, layer=5)
    distributed.barrier()
    t0 = time.perf_counter()
    build_cache(clf, ds, "test", out_dir=out / f"cache-w{res['world']}", config=CacheConfig(batch_size=16, shard_size=32))
    distributed.barrier()
    res["cache_s"] = time.perf_counter() - t0
    res["cache_rows_per_s"] = SIZES["cache_rows"] / res["cache_s"]

    d, B = SIZES["sae_d"], SIZES["sae_batch"]
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(8 * B, d, generator=g), torch.randint(0, 4, (8 * B,), generator=g)
    cfg = TrainConfig(total_samples=B * (SIZES["sae_steps"] + 3), batch_size=B, device="cpu", progress=False,
                      log_every=10**9, dead_window=5)
    tr = Trainer(build_sae(SAEConfig(d=d, m=8 * d, k=10, n_concepts=20, n_classes=4)), cfg, h, y)
    for _ in range(3):
        tr.train_step()
    distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(SIZES["sae_steps"]):
        tr.train_step()
    distributed.barrier()
    res["sae_s"] = time.perf_counter() - t0
    res["sae_rows_per_s"] = SIZES["sae_steps"] * B / res["sae_s"]

    n_tasks = res["tasks"] = 4
    mine = distributed.owned_tasks(n_tasks)  # outside local(): this rank's share of the job
    wait = distributed.task_group()
    distributed.barrier(group=wait)
    t0 = time.perf_counter()
    with distributed.local():  # each task: one whole single-process training, no collective
        for i in mine:
            tr = Trainer(build_sae(SAEConfig(d=d, m=8 * d, k=10, n_concepts=20, n_classes=4, seed=i)), cfg, h, y)
            for _ in range(SIZES["sae_steps"]):
                tr.train_step()
    distributed.barrier(group=wait)
    res["tasks_s"] = time.perf_counter() - t0
    res["task_rows_per_s"] = n_tasks * SIZES["sae_steps"] * B / res["tasks_s"]
    if distributed.is_main():
        (out / f"w{res['world']}.json").write_text(json.dumps(res))
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(Path(args.worker))
        return 0
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.nproc:
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       PYTHONPATH=str(ROOT))
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={p}", "--master_addr=127.0.0.1",
                   f"--master_port={_free_port()}", __file__, "--worker", tmp]
            subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            rows.append(json.loads((Path(tmp) / f"w{p}.json").read_text()))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["cache_speedup"] = r["cache_rows_per_s"] / base["cache_rows_per_s"]
        r["sae_speedup"] = r["sae_rows_per_s"] / base["sae_rows_per_s"]
        r["tasks_speedup"] = r["task_rows_per_s"] / base["task_rows_per_s"]
    out = ROOT / "benchmarks" / "results" / "scaling_distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"full": FULL, "cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(f"world {r['world']}: cache {r['cache_rows_per_s']:.1f} rows/s (x{r['cache_speedup']:.2f}), "
              f"SAE (DDP) {r['sae_rows_per_s']:.0f} rows/s (x{r['sae_speedup']:.2f}), "
              f"SAE tasks {r['task_rows_per_s']:.0f} rows/s (x{r['tasks_speedup']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
