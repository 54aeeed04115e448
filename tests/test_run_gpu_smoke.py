"""benchmarks/run_gpu.py in its CPU smoke mode: one process, every op, correctness next to every timing,
the JSON record written atomically. Peers that are not installed are listed as skipped (CI has none)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_gpu_cpu_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_gpu", ROOT / "benchmarks" / "run_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
    spec = importlib.util.spec_from_file_location("run_gpu", ROOT / "benchmarks" / "run_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
