"""benchmarks/run_gpu.py in its CPU smoke mode: one process, every op, correctness next to every timing,
the JSON record written atomically. Peers that are not installed are listed as skipped (CI has none)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_gpu():
    """benchmarks/run_gpu.py as a fresh module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("run_gpu", ROOT / "benchmarks" / "run_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_gpu_cpu_smoke(tmp_path, capsys):
    mod = _run_gpu()
    out = tmp_path / "smoke.json"
    record = mod.main(["--cpu-smoke", "--no-compile", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == record["device"] and saved["ceilings"]["copy_GBps"] > 0
    ops = {r["op"] for r in saved["results"]}
    assert ops == {"encode", "decode_fwd_bwd", "activation_rate_fwd_bwd", "train_step", "ablate_decode",
                   "classifsae_step", "trainer_step", "encode_bf16", "encode_sae_like", "decode_fwd_bwd_bf16"}
    for r in saved["results"]:
        assert "error" not in r, r
        assert r["ok"], r  # every implementation agrees with the reference within tolerance
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    ours = [r for r in saved["results"] if r["impl"] == "ours"]
    assert len(ours) == 10 and all(r["ratio_to_best_other"] is not None for r in ours)
    # The padded ablation pass is timed and checked (after compaction) next to the compact one.
    assert any(r["op"] == "ablate_decode" and r["impl"] == "ours_padded" for r in saved["results"])
    # The whole-step rows count the dispatched ops of a step (CPU; launches on CUDA).
    steps = [r for r in saved["results"] if r["op"] == "classifsae_step"]
    assert {r["impl"] for r in steps} == {"ours", "eager"}  # ours_graph needs CUDA
    assert all(r["ops_per_step"] > 0 for r in steps) and saved["ceilings"]["launch_us"] > 0
    # The real Trainer.train_step, cuda_graph against eager (on CPU the graph step runs eagerly).
    trainer = [r for r in saved["results"] if r["op"] == "trainer_step"]
    assert {r["impl"] for r in trainer} == {"ours", "trainer_eager"}
    assert all(r["ops_per_step"] > 0 for r in trainer)
    assert "wrote" in capsys.readouterr().out.splitlines()[-1]
    # bf16 and SAE-like variants carry their dtype and input distribution; the record is complete.
    kinds = {(r["op"], r["dtype"], r["dist"]) for r in saved["results"] if r["impl"] == "ours"}
    assert {("encode_bf16", "bfloat16", "gaussian"), ("encode_sae_like", "float32", "sae_like"),
            ("decode_fwd_bwd_bf16", "bfloat16", "gaussian"), ("encode", "float32", "gaussian")} <= kinds
    assert saved["sizes_done"] == len(saved["sizes_planned"]) == 1


def test_run_gpu_writes_after_every_size(tmp_path, monkeypatch):
    """A run stopped part-way (a device time limit) keeps the sizes it finished."""
    mod = _run_gpu()
    out = tmp_path / "partial.json"
    real, calls = mod.run_size, []

    def second_size_dies(*a, **kw):
        calls.append(a[:4])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's signal looks like to the script
        return real(*a, **kw)

    monkeypatch.setattr(mod, "run_size", second_size_dies)
    try:
        mod.main(["--cpu-smoke", "--no-compile", "--threads", "1", "--ops", "encode", "--size", "32,16,64,4",
                  "--out", str(out)])
    except KeyboardInterrupt:
        pass
    saved = json.loads(out.read_text())
    assert saved["sizes_done"] == 1 and len(saved["sizes_planned"]) == 2
    assert {(r["n"], r["d"], r["m"], r["k"]) for r in saved["results"]} == {(32, 16, 64, 4)}


def test_targets_summary_counts_what_the_targets_need():
    mod = _run_gpu()

    def row(op, m, impl, ms, ok=True, mem=None):
        return {"set": "core", "op": op, "n": 16, "d": 8, "m": m, "k": 4, "impl": impl, "median_ms": ms, "ok": ok,
                "peak_extra_mib": mem}

    rows = [
        # ours 2x the best peer; a faster peer that fails its check still counts (conservative): 0.5x
        row("encode", 4096, "ours", 1.0, mem=10), row("encode", 4096, "sparsify", 2.0, mem=5),
        row("encode", 4096, "sae_lens", 0.5, ok=False, mem=50), row("encode", 4096, "eager", 3.0),
        # ours wrong at this point: not a ratio, a failure
        row("encode", 16384, "ours", 1.0, ok=False), row("encode", 16384, "sparsify", 9.0),
        # ours erred (no timing at all)
        {"set": "core", "op": "encode", "n": 16, "d": 8, "m": 65536, "k": 4, "impl": "ours", "error": "OOM"},
        # train_step: dense is the faster of eager and compile
        row("train_step", 16384, "ours", 1.0), row("train_step", 16384, "eager", 4.0),
        row("train_step", 16384, "compile", 1.5), row("train_step", 16384, "sae_lens", 5.0),
        row("train_step", 16384, "sparsify", 1.2),
    ]
    for op, m in {(r["op"], r["m"]) for r in rows}:  # as run_size leaves them, per op and size
        mod.add_ratios([r for r in rows if (r["op"], r["m"]) == (op, m)])
    s = mod.targets(rows)["core"]
    enc = s["encode"]
    assert enc["points"] == 3 and enc["points_vs_peer"] == 1
    assert abs(enc["min_vs_best_peer"] - 0.5) < 1e-12 and enc["below_1"] == [[16, 8, 4096, 4]]
    assert enc["ours_failed"] == [[16, 8, 16384, 4], [16, 8, 65536, 4]]
    assert enc["peers_failing_check"] == [["sae_lens", 16, 8, 4096, 4]]
    assert enc["memory_over_best_peer"] == [[16, 8, 4096, 4]]  # 10 MiB > sparsify's 5
    ts = s["train_step"]
    assert abs(ts["min_vs_dense_m16384"] - 1.5) < 1e-12 and abs(ts["min_vs_saelens_m16384"] - 5.0) < 1e-12
    assert abs(ts["min_vs_sparsify"] - 1.2) < 1e-12 and ts["memory_over_best_peer"] is None  # none measured
    table = mod.targets_table(mod.targets(rows))
    assert "core | train_step |" in table and "1.50x, 5.00x, 1.20x" in table and "| n/a |" in table
