"""One-process benchmark of concept_ext against plain eager PyTorch, torch.compile, eai-sparsify and SAELens
(issue 8 item 2; performance.md sections 3.3-3.7).

In a single process it measures the device ceilings (copy bandwidth, matmul rate), then for every size
times encode, decode fwd+bwd, the activation-rate loss fwd+bwd, a TopK-SAE training step (fwd+bwd, no
optimiser) and ablate_decode, for each available implementation on identical inputs. Next to every timing
it checks the result against the pure-PyTorch reference (max relative error, and pass/fail), and it
reports min/median/max, peak memory (CUDA only; "n/a" on CPU) and the ratio to the best peer. A short
table is printed last; the full record goes to ``benchmarks/results/<device>-<date>.json`` (``--out``).

    python benchmarks/run_gpu.py --sizes paper core          # on a GPU (sizes of performance.md 3.3)
    python benchmarks/run_gpu.py --sizes stress              # H200 preferred
    python benchmarks/run_gpu.py --cpu-smoke                 # tiny CPU sizes (CI smoke test)

Build the extension first (nothing is compiled inside the timed script except torch.compile's graphs,
whose compile time is excluded by warm-up). Peers are optional: an implementation whose package is missing
is listed as skipped with the reason. No GPU number is claimed anywhere from this file: it only measures.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import classifsae_step  # noqa: E402
import concept_ext  # noqa: E402
import peers  # noqa: E402
from concept_ext.ops import reference  # noqa: E402
from concept_ext.config.sae import SAEConfig, TrainConfig  # noqa: E402
from concept_ext.sae.losses import sae_losses  # noqa: E402
from concept_ext.sae.model import TopKSAE  # noqa: E402

#: name -> list of (n, d, m, k); performance.md 3.3.
SIZES = {
    "paper": [(2000, 2048, 4096, 10), (500, 1024, 2048, 10)],
    "core": [(16384, d, m, k) for d in (512, 1024, 2048) for m in (4096, 16384, 65536) for k in (32, 128)],
    "stress": [(65536, 512, 65536, 32)],
    "cpu": [(2000, 2048, 4096, 10), (4096, 1024, 16384, 32)],
    "smoke": [(64, 32, 256, 8)],
}
#: Op variants timed besides the fp32 Gaussian ones: name -> (builder, dtype, input distribution).
#: performance.md 3.6 asks for bf16 as well as fp32, and for a heavy-tailed SAE-like input besides the
#: Gaussian one, since a selection's speed depends on the value distribution.
VARIANTS = {
    "encode_bf16": ("encode", torch.bfloat16, "gaussian"),
    "encode_sae_like": ("encode", torch.float32, "sae_like"),
    "decode_fwd_bwd_bf16": ("decode_fwd_bwd", torch.bfloat16, "gaussian"),
}
MSE_ONLY = TrainConfig(lambda_mse=1.0, lambda_ar=0.0, lambda_cls=0.0, mse_normalization="fvu",
                       dead_latents="none", device="cpu")
RATE = 0.1


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int) -> dict:
    """min/median/max seconds of ``reps`` calls after ``warmup`` calls, and peak extra memory (CUDA)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else None
    return {"min_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts), "max_ms": 1e3 * max(ts),
            "reps": reps, "peak_extra_mib": peak}


def ceilings(dev: torch.device, smoke: bool) -> dict:
    """Copy bandwidth (read + write counted) and the matmul rate, measured in this process."""
    nbytes = (16 if smoke else 1024) << 20
    a = torch.empty(nbytes // 4, device=dev).normal_()
    t = timeit(lambda: a.clone(), dev, 5, 1)
    out = {"copy_GBps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}
    s = 256 if smoke else 8192
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(s, s, device=dev).to(dtype)
        t = timeit(lambda: x @ x, dev, 3, 1)
        out[f"matmul_{str(dtype)[6:]}_TFLOPs_{s}"] = 2 * s**3 / (t["median_ms"] * 1e-3) / 1e12
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ problems


def problem(n, d, m, k, dev):
    w = peers.make_weights(d, m)
    w = peers.Weights(*(t.to(dev) for t in w))
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(n, d, generator=g) * 2 + 0.3).to(dev)
    vals = (torch.rand(n, k, generator=g) + 0.1).to(dev)
    # k distinct latents per row without a per-row randperm (n reaches 65536): slot j of row i lies in
    # its own window [r_i + j*step, r_i + (j+1)*step) mod m.
    step = m // k
    r = torch.randint(0, m, (n, 1), generator=g)
    idx = ((r + torch.arange(k) * step + torch.randint(0, step, (n, k), generator=g)) % m).to(dev)
    gout = torch.randn(n, d, generator=g).to(dev)
    return w, x, vals, idx, gout


def sae_like_inputs(w: "peers.Weights", n: int, k: int) -> torch.Tensor:
    """``x [n, d]`` as a trained SAE sees it: per row max(1, k/2) decoder rows with log-normal magnitudes
    (mean about 3.3) plus N(0, 0.1^2) noise per dimension. With W_enc = W_dec^T the pre-activations are a
    few large values over a Gaussian bulk, so the k-th largest sits in the bulk's tail."""
    m, d = w.W_dec.shape
    g = torch.Generator().manual_seed(4)
    active = max(1, k // 2)
    ids = torch.randint(0, m, (n, active), generator=g).to(w.W_dec.device)
    mags = (2 * torch.exp(torch.randn(n, active, generator=g))).to(w.W_dec.device)
    x = F.embedding_bag(ids, w.W_dec.float(), per_sample_weights=mags, mode="sum")  # no [n, active, d]
    return x + 0.1 * torch.randn(n, d, generator=g).to(x.device)


def with_env(fn, **env):
    """``fn`` run with the environment variables ``env`` set (and restored afterwards)."""
    def run():
        old = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return run


def encode_impls(w, x, k, compiled):
    w_lin = w.W_enc.t().contiguous()
    eager = lambda x: torch.topk(F.relu(F.linear(x, w_lin, w.b_enc)), k, dim=1, sorted=False)  # noqa: E731
    impls = {"ours": lambda: concept_ext.topk_encode(x, w_lin.t(), w.b_enc, k), "eager": lambda: eager(x)}
    # The same call with the wrapper's data checks on (NaN/inf: a host synchronisation on CUDA): the
    # other ours rows run without them, as the trainer does (see run_size).
    impls["ours_checked"] = impls["ours"]
    # The CUDA selection's general radix path for every row (A/B of the shared-memory fast path).
    impls["ours_radix"] = with_env(impls["ours"], CONCEPT_EXT_TOPK_SELECT="radix")
    if compiled:
        ce = torch.compile(eager)
        impls["compile"] = lambda: ce(x)
    if not peers.missing_reason("sparsify"):
        coder = peers.sparsify_coder(peers.Weights(*(t.cpu() for t in w)), k).to(x.device)
        impls["sparsify"] = lambda: peers.sparsify_encode(coder, x)
    if not peers.missing_reason("sae_lens"):
        sae = peers.saelens_sae(peers.Weights(*(t.cpu() for t in w)), k).to(x.device)
        impls["sae_lens"] = lambda: peers.saelens_encode(sae, x).topk(k, dim=1)
    want = torch.addmm(w.b_enc.double(), x.double(), w.W_enc.double()).topk(k, dim=1).values.clamp_min(0)

    def check(out):  # tie-aware: the sorted selected values
        return rel_err(out[0].sort(1, descending=True).values, want)

    return impls, check


def unchecked(fn):
    """``fn`` run inside ``concept_ext.unchecked()``: the public wrappers skip their data-dependent checks
    (each a host synchronisation on CUDA), as the SAE trainer runs the ops; peers validate nothing either."""
    def run():
        with concept_ext.unchecked():
            return fn()
    return run


def deterministic(fn):
    """``fn`` run under ``torch.use_deterministic_algorithms(True)``: the custom ops' weight gradients then
    come from the sorted bucket reduction instead of atomics (bitwise reproducible; this row prices that)."""
    def run():
        prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return fn()
        finally:
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    return run


def decode_impls(w, vals, idx, gout, m, compiled):
    W = w.W_dec.clone().requires_grad_(True)
    v = vals.clone().requires_grad_(True)

    def fwd_bwd(f):
        def run():
            v.grad = W.grad = None
            f().backward(gout)
            return v.grad, W.grad
        return run

    bag = lambda: F.embedding_bag(idx, W, per_sample_weights=v, mode="sum") + w.b_dec  # noqa: E731
    dense = lambda: (torch.zeros(idx.shape[0], m, device=v.device, dtype=v.dtype)  # noqa: E731
                     .scatter(1, idx, v) @ W + w.b_dec)
    impls = {"ours": fwd_bwd(lambda: concept_ext.sparse_decode(v, idx, W, w.b_dec)), "eager": fwd_bwd(bag),
             "eager_dense": fwd_bwd(dense)}
    impls["ours_deterministic"] = deterministic(impls["ours"])
    if compiled:
        impls["compile"] = fwd_bwd(torch.compile(bag))
    if not peers.missing_reason("sparsify"):
        dec = peers.sparsify_decode()
        impls["sparsify"] = fwd_bwd(lambda: dec(idx, v, W.mT) + w.b_dec)
    if not peers.missing_reason("sae_lens"):
        impls["sae_lens"] = fwd_bwd(dense)  # SAELens' default TopK decode is this dense form
    gv, gw = reference.sparse_decode_backward(gout.double(), vals.double(), idx, w.W_dec.double())
    return impls, lambda out: max(rel_err(out[0], gv), rel_err(out[1], gw))


def ar_impls(vals, idx, m, compiled):
    v = vals.clone().requires_grad_(True)
    n = vals.shape[0]
    m_tau = int(math.floor(RATE * n + 1e-9))

    def dense_loss():
        z = torch.zeros(n, m, device=v.device).scatter(1, idx, v)
        return (z.sum() - z.topk(m_tau, dim=0).values.sum()) / n

    def fwd_bwd(f):
        def run():
            v.grad = None
            loss = f()
            loss.backward()
            return loss.detach(), v.grad
        return run

    impls = {"ours": fwd_bwd(lambda: concept_ext.activation_rate_loss(v, idx, m, RATE)),
             "eager": fwd_bwd(dense_loss)}
    if compiled:
        impls["compile"] = fwd_bwd(torch.compile(dense_loss))
    want = reference.activation_rate_loss(vals, idx, m, RATE)
    return impls, lambda out: rel_err(out[0], want)


def train_impls(w, x, k, compiled):
    d, m = w.W_enc.shape
    sae = TopKSAE(SAEConfig(d=d, m=m, k=k, architecture="topk", normalize="none", n_concepts=0)).to(x.device)
    with torch.no_grad():
        for p, t in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), w):
            p.copy_(t)
    params = [p for p in sae.parameters()]

    def ours():
        sae.zero_grad(set_to_none=True)
        out = sae_losses(sae, x, None, MSE_ONLY)
        out.terms.total.backward()
        return sae.W_dec.grad

    def eager_loss():  # plain dense PyTorch: linear, topk, scatter to [N, m], dense decode, FVU
        pre = F.relu(x @ sae.W_enc + sae.b_enc)
        top = pre.topk(k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        x_hat = z @ sae.W_dec + sae.b_dec
        return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()

    def step(loss_fn):
        def run():
            sae.zero_grad(set_to_none=True)
            loss_fn().backward()
            return sae.W_dec.grad
        return run

    impls = {"ours": ours, "ours_deterministic": deterministic(ours), "eager": step(eager_loss)}
    if compiled:
        impls["compile"] = step(torch.compile(eager_loss))
    ref_grad = None
    if not peers.missing_reason("sparsify"):
        coder = peers.sparsify_coder(peers.Weights(*(t.cpu() for t in w)), k).to(x.device)

        def sp():
            coder.zero_grad(set_to_none=True)
            peers.sparsify_step(coder, x)
            return coder.W_dec.grad

        impls["sparsify"] = sp
    if not peers.missing_reason("sae_lens"):
        sl = peers.saelens_sae(peers.Weights(*(t.cpu() for t in w)), k).to(x.device)
        scale = float(((x - x.mean(0)) ** 2).sum() / x.shape[0])

        def slr():
            sl.zero_grad(set_to_none=True)
            peers.saelens_step(sl, x)
            return sl.W_dec.grad / scale

        impls["sae_lens"] = slr
    ref_grad = step(eager_loss)().clone()
    del params
    return impls, lambda out: rel_err(out, ref_grad)


def step_impls(x, k, m):
    """The whole ClassifSAE step (classifsae_step.py): ours eager, ours in a CUDA graph, dense eager."""
    labels = torch.randint(0, classifsae_step.N_CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    return classifsae_step.make_impls(x.shape[1], m, k, x, labels.to(x.device))


def trainer_impls(x, k, m):
    """Trainer.train_step itself (classifsae_step.trainer_impls): cuda_graph=True against the eager step."""
    labels = torch.randint(0, classifsae_step.N_CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    return classifsae_step.trainer_impls(x.shape[1], m, k, x, labels.to(x.device))


def ablate_impls(w, vals, idx, n_keep=20):
    keep = torch.arange(n_keep, device=vals.device)
    v = vals.clone()
    v[:, 0] = v[:, 0] + 0  # keep the code as drawn; ~n*k*n_keep/m pairs are active
    # ours_padded: one slot per code entry, no host synchronisation (what a CUDA-graph captured sweep runs).
    # Every output is checked after keeping its valid slots ordered by (row, concept): for the compact
    # form that is the identity, for the padded form it gives the compact output.
    impls = {"ours": lambda: concept_ext.ablate_decode(v, idx, w.W_dec, w.b_dec, keep),
             "ours_padded": lambda: concept_ext.ablate_decode(v, idx, w.W_dec, w.b_dec, keep, padded=True),
             "eager": lambda: reference.ablate_decode(v, idx, w.W_dec, w.b_dec, keep, None)}
    want = reference.ablate_decode(v, idx, w.W_dec, w.b_dec, keep, None)

    def check(out):
        base, abl, rows, cons = out
        valid = rows >= 0
        order = torch.argsort(rows[valid] * (n_keep + 1) + cons[valid])
        abl, rows, cons = abl[valid][order], rows[valid][order], cons[valid][order]
        if not (torch.equal(rows, want[2]) and torch.equal(cons, want[3])):
            return float("inf")  # a different pair list is wrong, whatever the values
        return max(rel_err(base, want[0]), rel_err(abl, want[1]) if want[1].numel() else 0.0)

    return impls, check


# ------------------------------------------------------------------------------------------ driver

PEER_NAMES = ("sparsify", "sae_lens")


def run_size(n, d, m, k, dev, args, done: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Every op of ``args.ops`` at one size; ``done(op_rows)`` after each op (for incremental saving)."""
    w, x, vals, idx, gout = problem(n, d, m, k, dev)

    def cast(dtype, *ts):
        return [t.to(dtype) if t.is_floating_point() else t for t in ts]

    def variant(name):  # the builder of a VARIANTS entry, on inputs of its dtype and distribution
        base, dtype, dist = VARIANTS[name]
        wv = peers.Weights(*cast(dtype, *w))
        xv = sae_like_inputs(w, n, k) if dist == "sae_like" else x
        if base == "encode":
            return encode_impls(wv, *cast(dtype, xv), k, args.compile)
        return decode_impls(wv, *cast(dtype, vals, idx, gout), m, args.compile)

    builders = {
        "encode": lambda: encode_impls(w, x, k, args.compile),
        **{name: (lambda name=name: variant(name)) for name in VARIANTS},
        "decode_fwd_bwd": lambda: decode_impls(w, vals, idx, gout, m, args.compile),
        "activation_rate_fwd_bwd": lambda: ar_impls(vals, idx, m, args.compile),
        "train_step": lambda: train_impls(w, x, k, args.compile),
        "ablate_decode": lambda: ablate_impls(w, vals, idx),
        "classifsae_step": lambda: step_impls(x, k, m),
        "trainer_step": lambda: trainer_impls(x, k, m),
    }
    rows = []
    for op in args.ops:
        try:
            impls, check = builders[op]()
        except Exception as exc:  # e.g. out of memory building the inputs at a stress size: recorded
            rows.append({"op": op, "n": n, "d": d, "m": m, "k": k, "impl": "(setup)",
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        op_rows = []
        dtype, dist = VARIANTS[op][1:] if op in VARIANTS else (torch.float32, "gaussian")
        tol = args.tol_bf16 if dtype == torch.bfloat16 else args.tol
        for name, fn in impls.items():
            if args.impls and name not in args.impls:
                continue
            row = {"op": op, "n": n, "d": d, "m": m, "k": k, "impl": name, "dtype": str(dtype)[6:], "dist": dist}
            if name.startswith("ours") and name != "ours_checked":
                fn = unchecked(fn)
            try:
                err = check(fn())  # correctness on this implementation's own output, before timing
                row.update(timeit(fn, dev, args.reps, args.warmup), rel_err=err, ok=bool(err <= tol))
                if op in ("classifsae_step", "trainer_step"):  # launches per step (issue 8 item 4)
                    row.update(classifsae_step.launches_per_step(fn, dev))
                    if "launches_per_step" in row and row["launches_per_step"]:
                        row["step_over_launch_floor"] = row["median_ms"] * 1e3 / (
                            row["launches_per_step"] * args.launch_us)
            except Exception as exc:  # a peer failing at a size is recorded, not fatal
                row.update(error=f"{type(exc).__name__}: {exc}"[:300])
            op_rows.append(row)
        add_ratios(op_rows)
        rows += op_rows
        if done is not None:
            done(op_rows)
    return rows


def add_ratios(op_rows: list[dict]) -> None:
    """Set ``ratio_to_best_peer`` and ``ratio_to_best_other`` on the rows of one op at one size: the
    fastest sparsify/SAELens row that ran (checked ok or not), and the fastest non-ours one, over ours."""
    ours = next((r for r in op_rows if r["impl"] == "ours" and "median_ms" in r), None)
    if not ours:
        return
    timed_peers = [r["median_ms"] for r in op_rows if r["impl"] in PEER_NAMES and "median_ms" in r]
    # Our own variants (ours_padded) are not "others": the ratio is against what a user would otherwise run.
    others = [r["median_ms"] for r in op_rows if not r["impl"].startswith("ours") and "median_ms" in r]
    for r in op_rows:
        r["ratio_to_best_peer"] = min(timed_peers) / ours["median_ms"] if timed_peers else None
        r["ratio_to_best_other"] = min(others) / ours["median_ms"] if others else None


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(dev)).strip("-").lower()
    return f"cpu-{os.cpu_count()}core"


def table(rows: list[dict]) -> str:
    out = ["op | n d m k | impl | median ms | min | max | peak MiB | rel err | ok | best peer / ours"]
    for r in rows:
        size = f"{r['n']} {r['d']} {r['m']} {r['k']}"
        if "median_ms" not in r:
            out.append(f"{r['op']} | {size} | {r['impl']} | {r.get('error', 'skipped')}")
            continue
        peak = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        ratio = r.get("ratio_to_best_peer")
        out.append(f"{r['op']} | {size} | {r['impl']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                   f"{r['max_ms']:.2f} | {peak} | {r['rel_err']:.1e} | {r['ok']} | "
                   f"{'-' if ratio is None else f'{ratio:.2f}x'}")
    return "\n".join(out)


def launch_table(rows: list[dict]) -> str:
    """Launches (CUDA) or dispatched ops (CPU) per ClassifSAE step (the benchmark's step and the real
    Trainer.train_step), and the step time in launch floors."""
    out = ["step | n d m k | impl | median ms | launches/step | syncs/step | ops/step | x launch floor"]
    for r in rows:
        if r["op"] not in ("classifsae_step", "trainer_step") or "median_ms" not in r:
            continue
        f = lambda key, fmt="{:.0f}": "-" if r.get(key) is None else fmt.format(r[key])  # noqa: E731
        out.append(f"{r['op']} | {r['n']} {r['d']} {r['m']} {r['k']} | {r['impl']} | {r['median_ms']:.2f} | "
                   f"{f('launches_per_step')} | {f('syncs_per_step')} | {f('ops_per_step')} | "
                   f"{f('step_over_launch_floor', '{:.1f}')}")
    return "\n".join(out)


def _geomean(xs: list[float]) -> Optional[float]:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def targets(rows: list[dict]) -> dict:
    """Issue 8 item 4 / performance.md section 4, from the rows measured so far, per size set and op.

    Per point (a size) where ours ran and passed its check: ours' speed-up over the best peer, i.e. the
    fastest sparsify/SAELens row that ran (as ``ratio_to_best_peer``; a peer failing its own check still
    counts, which can only lower the ratio, and is listed), and over the best non-ours implementation.
    Reported: their geometric means and minima, the points below 1.0x and below 0.95x (outside +-5%
    noise), and the points where ours' peak extra memory exceeds the smallest peer's (CUDA; ``None`` when
    no memory was measured). Points where ours failed or erred are listed as ``ours_failed`` (a target
    is not met there). For ``train_step`` also the minimum speed-up over dense code (the faster of eager
    and torch.compile) and over SAELens at m >= 16384, and over sparsify at every point."""
    out: dict = {}
    keyed: dict = {}
    for r in rows:
        keyed.setdefault((r.get("set", "custom"), r["op"], r["n"], r["d"], r["m"], r["k"]), []).append(r)
    for (set_name, op, *size), op_rows in keyed.items():
        s = out.setdefault(set_name, {}).setdefault(op, {
            "points": 0, "peer": [], "other": [], "below_1": [], "below_0_95": [], "ours_failed": [],
            "peers_failing_check": [], "memory_over_best_peer": None})
        s["points"] += 1
        impls = {r["impl"]: r for r in op_rows}
        ours = impls.get("ours")
        if not ours or "median_ms" not in ours or not ours.get("ok"):
            s["ours_failed"].append(size)
            continue
        ran = {name: r for name, r in impls.items() if "median_ms" in r}
        peers_ = {name: r for name, r in ran.items() if name in PEER_NAMES}
        s["peers_failing_check"] += [[name, *size] for name, r in peers_.items() if not r.get("ok")]
        ratio = ours.get("ratio_to_best_peer")  # run_size's: the fastest peer that ran
        if ratio is not None:
            s["peer"].append(ratio)
            if ratio < 1.0:
                s["below_1"].append(size)
            if ratio < 0.95:
                s["below_0_95"].append(size)
            mems = [r["peak_extra_mib"] for r in peers_.values() if r.get("peak_extra_mib") is not None]
            if mems and ours.get("peak_extra_mib") is not None:
                over = s["memory_over_best_peer"] = s["memory_over_best_peer"] or []
                if ours["peak_extra_mib"] > min(mems):
                    over.append(size)
        if ours.get("ratio_to_best_other") is not None:
            s["other"].append(ours["ratio_to_best_other"])
        if op == "train_step":
            dense = [ran[name]["median_ms"] for name in ("eager", "compile") if name in ran]
            for key, times, wanted in (("min_vs_dense_m16384", dense, size[2] >= 16384),
                                       ("min_vs_saelens_m16384", [ran[n]["median_ms"] for n in ("sae_lens",)
                                                                  if n in ran], size[2] >= 16384),
                                       ("min_vs_sparsify", [ran[n]["median_ms"] for n in ("sparsify",)
                                                            if n in ran], True)):
                if wanted and times:
                    ratio = min(times) / ours["median_ms"]
                    s[key] = min(s.get(key, ratio), ratio)
    for per_op in out.values():
        for s in per_op.values():
            peer, other = s.pop("peer"), s.pop("other")
            s.update(geomean_vs_best_peer=_geomean(peer), min_vs_best_peer=min(peer) if peer else None,
                     points_vs_peer=len(peer), geomean_vs_best_other=_geomean(other),
                     min_vs_best_other=min(other) if other else None)
    return out


def targets_table(summary: dict) -> str:
    """The target figures per size set and op (ratios > 1: ours is faster)."""
    out = ["set | op | points (vs peer) | ours failed | geomean / min vs best peer | < 1.0x | < 0.95x | "
           "mem > best peer | geomean / min vs best other | train_step: min vs dense, SAELens (m>=16384), "
           "sparsify"]
    f = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    for set_name, per_op in summary.items():
        for op, s in per_op.items():
            mem = s["memory_over_best_peer"]
            extra = (f"{f(s.get('min_vs_dense_m16384'))}, {f(s.get('min_vs_saelens_m16384'))}, "
                     f"{f(s.get('min_vs_sparsify'))}") if op == "train_step" else ""
            out.append(f"{set_name} | {op} | {s['points']} ({s['points_vs_peer']}) | {len(s['ours_failed'])} | "
                       f"{f(s['geomean_vs_best_peer'])} / {f(s['min_vs_best_peer'])} | {len(s['below_1'])} | "
                       f"{len(s['below_0_95'])} | {'n/a' if mem is None else len(mem)} | "
                       f"{f(s['geomean_vs_best_other'])} / {f(s['min_vs_best_other'])} | {extra}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU sizes, 1 rep (CI smoke test)")
    ap.add_argument("--sizes", nargs="+", default=None, choices=sorted(SIZES), help="size sets")
    ap.add_argument("--size", action="append", default=[], help="extra size n,d,m,k")
    ap.add_argument("--ops", nargs="+", default=["encode", "decode_fwd_bwd", "activation_rate_fwd_bwd",
                                                "train_step", "ablate_decode", "classifsae_step",
                                                "trainer_step", *VARIANTS])
    ap.add_argument("--impls", nargs="+", default=None, help="only these implementations")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--tol", type=float, default=1e-3, help="max relative error counted as ok (fp32)")
    ap.add_argument("--tol-bf16", type=float, default=1e-2,
                    help="max relative error counted as ok (bf16; performance.md 3.6's band is 1e-3..1e-2)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/<device>-<date>.json)")
    ap.add_argument("--require-peers", action="store_true",
                    help="exit with an error, before timing anything, if a peer cannot be imported")
    args = ap.parse_args(argv)
    missing = {p: peers.missing_reason(p) for p in PEER_NAMES if peers.missing_reason(p)}
    if args.require_peers and missing:
        raise SystemExit("run_gpu: peers missing (install them from wheels first, tools/gpu_wheels.py): "
                         + "; ".join(missing.values()))
    dev = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [("custom", tuple(int(v) for v in s.split(","))) for s in args.size]
    for name in args.sizes or (["smoke"] if args.cpu_smoke else (["cpu"] if dev.type == "cpu" else ["paper"])):
        sizes += [(name, size) for size in SIZES[name]]
    args.reps = args.reps or (1 if args.cpu_smoke else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    record = {
        "device": device_name(dev), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "threads": torch.get_num_threads(), "versions": peers.peer_versions(),
        "cuda": torch.version.cuda, "extension_kernel_cpu": torch._C._dispatch_has_kernel_for_dispatch_key(
            "concept_ext::topk_encode", "CPU"),
        "skipped_peers": {p: peers.missing_reason(p) for p in PEER_NAMES if peers.missing_reason(p)},
        "ceilings": ceilings(dev, args.cpu_smoke), "results": [], "summary": {},
    }
    # One tiny launch (CUDA) or dispatch (CPU): the floor that a step's launch count multiplies.
    args.launch_us = record["ceilings"]["launch_us"] = classifsae_step.launch_overhead_us(dev)
    out = args.out or HERE / "results" / f"{record['device']}-{record['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record["sizes_planned"] = [[name, *size] for name, size in sizes]
    record["sizes_done"] = 0

    def save() -> None:  # atomically: a run stopped by a time limit keeps what it measured
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out)

    save()  # at once, so that an older file of the same name is not mistaken for this run's
    for i, (name, (n, d, m, k)) in enumerate(sizes):
        def op_done(op_rows: list[dict], name: str = name) -> None:
            record["results"] += [dict(r, set=name) for r in op_rows]
            record["summary"] = targets(record["results"])
            save()

        run_size(n, d, m, k, dev, args, done=op_done)
        record["sizes_done"] = i + 1
        save()
    print(json.dumps({"device": record["device"], "ceilings": record["ceilings"],
                      "skipped_peers": record["skipped_peers"]}, indent=1))
    print(launch_table(record["results"]))
    print(targets_table(record["summary"]))
    print(table(record["results"]))  # the short table, last
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
