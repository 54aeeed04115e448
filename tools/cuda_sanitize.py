"""Run every concept_ext CUDA kernel once, forward and backward, on small odd-sized random inputs, and
compare with the pure-PyTorch reference: the program to run under ``compute-sanitizer`` (issue 8 item 5).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python tools/cuda_sanitize.py
    compute-sanitizer --tool racecheck python tools/cuda_sanitize.py --small

The sizes are small so that the sanitizer's slowdown (10-100x, more for racecheck) fits a short device
call, yet odd (not multiples of any tile or warp) so that every kernel's tail paths run. Without the
caching allocator (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) each tensor is its own allocation and memcheck
sees an out-of-bounds access as one. Exits 1 when a result disagrees with the reference, 2 when no CUDA
kernel is registered; the sanitizer's own exit code says whether it found an error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import concept_ext  # noqa: E402
from concept_ext.ops import reference as ref  # noqa: E402

OPS = ["topk_encode", "topk_encode_backward", "sparse_decode", "sparse_decode_backward", "activation_rate_loss",
       "activation_rate_loss_backward", "ablate_decode", "ablate_decode_padded"]


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    ok = bool(torch.isfinite(got).all()) and err <= tol
    print(f"  {'ok ' if ok else 'BAD'} {name:<34} rel err {err:.2e}")
    return ok


def run(n: int, d: int, m: int, k: int, dtype: torch.dtype, seed: int, dev: str = "cuda") -> bool:
    """One pass over every op at (n, d, m, k); True when every result matches the reference."""
    g = torch.Generator(device=dev).manual_seed(seed)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3}.get(dtype, 2e-2)
    print(f"N {n}, d {d}, m {m}, k {k}, {dtype}")
    x = torch.randn(n, d, device=dev, generator=g, dtype=dtype)
    W_enc = (torch.randn(d, m, device=dev, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    b_enc = (0.1 * torch.randn(m, device=dev, generator=g)).to(dtype).requires_grad_()
    W_dec = torch.randn(m, d, device=dev, generator=g, dtype=dtype).requires_grad_()
    b_dec = torch.randn(d, device=dev, generator=g, dtype=dtype).requires_grad_()
    ok = True

    vals, idx = concept_ext.topk_encode(x, W_enc, b_enc, k)  # [N, k] each
    rv, _ = ref.topk_encode(x, W_enc.detach(), b_enc.detach(), k)
    # the selected values, sorted per row, are tie-independent
    ok &= _close("topk_encode values", vals.detach().sort(-1).values, rv.sort(-1).values, tol)
    gv = torch.randn_like(vals)
    g_We, g_be = torch.autograd.grad(vals, (W_enc, b_enc), gv)
    # only the selected entries carry gradient: the dense form of the grad of the [N, m] pre-activation
    dense = torch.zeros(n, m, device=dev, dtype=torch.float64).scatter_(1, idx, gv.double() * (vals > 0))
    ok &= _close("topk_encode_backward grad_W_enc", g_We, x.double().T @ dense, tol)
    ok &= _close("topk_encode_backward grad_b_enc", g_be, dense.sum(0), tol)

    v = vals.detach().abs().requires_grad_()
    out = concept_ext.sparse_decode(v, idx, W_dec, b_dec)  # [N, d]
    ok &= _close("sparse_decode", out, ref.sparse_decode(v.detach(), idx, W_dec.detach(), b_dec.detach()), tol)
    go = torch.randn_like(out)
    g_v, g_W, g_b = torch.autograd.grad(out, (v, W_dec, b_dec), go)
    ok &= _close("sparse_decode_backward grad_values", g_v,
                 (go.double().unsqueeze(1) * W_dec.detach().double()[idx]).sum(-1), tol)
    dense_v = torch.zeros(n, m, device=dev, dtype=torch.float64).scatter_add_(1, idx, v.detach().double())
    ok &= _close("sparse_decode_backward grad_W_dec", g_W, dense_v.T @ go.double(), tol)
    ok &= _close("sparse_decode_backward grad_b_dec", g_b, go.double().sum(0), tol)

    v = vals.detach().abs().requires_grad_()
    loss = concept_ext.activation_rate_loss(v, idx, m, 0.1)
    ok &= _close("activation_rate_loss", loss.reshape(1), ref.activation_rate_loss(v.detach(), idx, m, 0.1).reshape(1),
                 tol)
    (gl,) = torch.autograd.grad(loss, v)
    v2 = v.detach().double().requires_grad_()
    (rg,) = torch.autograd.grad(ref.activation_rate_loss(v2, idx, m, 0.1), v2)
    ok &= _close("activation_rate_loss_backward", gl, rg, tol)

    keep = torch.randperm(m, device=dev, generator=g)[: min(m, 20)]
    norm = x.norm(dim=1)
    got = concept_ext.ablate_decode(vals.detach().abs(), idx, W_dec.detach(), b_dec.detach(), keep, target_norm=norm)
    want = ref.ablate_decode(vals.detach().abs(), idx, W_dec.detach(), b_dec.detach(), keep, norm)
    ok &= _close("ablate_decode base", got[0], want[0], tol)
    same_pairs = torch.equal(got[2].cpu(), want[2].cpu()) and torch.equal(got[3].cpu(), want[3].cpu())
    print(f"  {'ok ' if same_pairs else 'BAD'} ablate_decode pairs ({got[2].numel()})")
    ok &= same_pairs
    if same_pairs and got[1].numel():
        ok &= _close("ablate_decode ablated", got[1], want[1], tol)
    pad = concept_ext.ablate_decode(vals.detach().abs(), idx, W_dec.detach(), b_dec.detach(), keep, target_norm=norm,
                                    padded=True)
    pwant = ref.ablate_decode_padded(vals.detach().abs(), idx, W_dec.detach(), b_dec.detach(), keep, norm)
    same_slots = torch.equal(pad[2].cpu(), pwant[2].cpu()) and torch.equal(pad[3].cpu(), pwant[3].cpu())
    print(f"  {'ok ' if same_slots else 'BAD'} ablate_decode_padded slots ({pad[2].numel()})")
    ok &= same_slots
    ok &= _close("ablate_decode_padded base", pad[0], pwant[0], tol)
    if same_slots and pad[1].numel():
        ok &= _close("ablate_decode_padded ablated", pad[1], pwant[1], tol)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()  # a kernel fault surfaces here, inside this case
    return bool(ok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="one fp32 size only (racecheck is slow)")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu checks this script on the CPU kernels")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() or not all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", args.device.upper()) for op in OPS):
        print("cuda_sanitize: no GPU, or the extension has no CUDA kernels (build with CUDA first)")
        return 2
    cases = [(67, 45, 301, 7, torch.float32)] if args.small else [
        (67, 45, 301, 7, torch.float32), (130, 96, 1031, 1, torch.float32), (33, 64, 260, 32, torch.bfloat16),
        (1, 17, 19, 19, torch.float32), (41, 36, 200, 9, torch.float16), (29, 20, 150, 5, torch.float64)]
    ok = all([run(n, d, m, k, dt, seed, args.device) for seed, (n, d, m, k, dt) in enumerate(cases)])
    print("cuda_sanitize:", "all results match the reference" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
