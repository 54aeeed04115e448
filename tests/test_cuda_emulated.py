"""The CUDA kernels themselves, run on the CPU under the fiber emulator (tools/cuda_emulate.py): what
goes beyond test_ops_cuda.py's kernel-level tests.

CI has no GPU, so the CUDA backend of ``test_ops_cuda.py`` skips there; its ``emulated`` backend
(tests/kernel_backend.py) runs the same kernel-level tests on CPU tensors through the ``concept_ext_emu``
op namespace, built from ``csrc/cuda/*.cu`` unchanged (host and device code) against
``csrc/emu/cuda_runtime.h``. Uninitialised outputs are poisoned by PyTorch itself
(``fill_uninitialized_memory``: NaN in floats, the largest value in integers). The encode's row-chunk
scratch is shrunk to 64 KiB in this build so that its chunked path runs at test sizes. This module adds
what only the emulator can check: both selection paths on the same rows, results that must not depend
on the order in which threads run between barriers, and the emulator's own checks (divergent barriers,
collectives with exited lanes), which must fire on kernels that break those rules.

What this cannot show is in ``csrc/emu/cuda_runtime.h``: speed, inter-block memory ordering, hardware
limits; those need the GPU (``test_ops_cuda.py``, ``tools/cuda_sanitize.py``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_ops_cuda as _cuda  # its helpers (_randn, _code, _check_topk, _close, DTYPES): an ordinary import
from concept_ext.ops import reference as ref
from kernel_backend import EmulatedOps, has_host_compiler, poisoned_empty

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import cuda_emulate  # noqa: E402

pytestmark = pytest.mark.skipif(not has_host_compiler(), reason="no host C++ compiler")

E = EmulatedOps()


@pytest.fixture(autouse=True, scope="module")
def _poisoned_empty():
    """Every uninitialised tensor (the kernels' outputs included) starts as NaN / the integer maximum."""
    with poisoned_empty():
        yield


def test_poisoning_is_active():
    """The premise of the module: torch.empty really is poisoned here, so an unwritten output is caught."""
    assert torch.isnan(torch.empty(1000)).all()
    assert (torch.empty(10, dtype=torch.int64) == torch.iinfo(torch.int64).max).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d,m,k", [(37, 19, 53, 53), (65, 33, 300, 17), (30, 64, 3000, 64), (5, 8, 3000, 1100)])
def test_topk_select_paths_agree(n, d, m, k, dtype, monkeypatch):
    """The encode's two selection paths, the shared-memory fast path (a crowded top bucket or k > 1024
    sends a row to the general one) and the radix select forced by CONCEPT_EXT_TOPK_SELECT=radix, give the
    same bits, and both pass the tie-aware reference check."""
    g = torch.Generator().manual_seed(n + m + k)
    x, W, b = _cuda._randn(n, d, dtype=dtype, g=g), _cuda._randn(d, m, dtype=dtype, g=g), _cuda._randn(m, dtype=dtype, g=g)
    W[:, 7:30] = W[:, 3:4]  # with b below, near or exact ties (test_topk_select_exact_ties pins the
    b[7:30] = b[3]          # tie rule exactly, on inputs where every sum is exact)
    fast = E.topk_encode(x, W, b, k)
    monkeypatch.setenv("CONCEPT_EXT_TOPK_SELECT", "radix")
    radix = E.topk_encode(x, W, b, k)
    assert torch.equal(fast[1], radix[1]) and torch.equal(fast[0], radix[0])
    _cuda._check_topk(x, W, b, k, *fast, dtype)


@pytest.mark.parametrize("select", ["default", "radix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d,m,k", [(21, 6, 300, 17), (9, 5, 3000, 64), (4, 3, 2000, 1500)])
def test_topk_select_exact_ties(n, d, m, k, dtype, select, monkeypatch):
    """Small integers make every pre-activation exact in any summation order, with many exact ties; the
    ids must then be exactly the first k of a stable sort by value descending (ties: lowest id first), on
    both selection paths (m = 3000 with few distinct values crowds one bucket)."""
    if select == "radix":
        monkeypatch.setenv("CONCEPT_EXT_TOPK_SELECT", "radix")
    g = torch.Generator().manual_seed(n * m + k)
    x = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    W = torch.randint(-3, 4, (d, m), generator=g).to(dtype)
    b = (torch.randint(-4, 5, (m,), generator=g) / 4).to(dtype)
    values, indices = E.topk_encode(x, W, b, k)
    pre = x.double() @ W.double() + b.double()  # exact
    want = torch.sort(-pre, dim=1, stable=True).indices[:, :k]
    assert torch.equal(indices, want)
    assert torch.equal(values.double(), pre.gather(1, want).clamp_min(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_select_crowded_bucket(dtype):
    """Every pre-activation in one histogram bucket ([1, 1.1), far more than 1024 of them): the rows take
    the general path by themselves; with four levels, ties straddle the k-th place."""
    g = torch.Generator().manual_seed(3)
    n, d, m, k = 7, 5, 5000, 40
    x = torch.zeros(n, d, dtype=dtype)
    b = (1 + torch.randint(0, 4, (m,), generator=g) / 40).to(dtype)
    W = torch.randn(d, m, generator=g).to(dtype)  # x = 0: pre = b exactly
    values, indices = E.topk_encode(x, W, b, k)
    _cuda._check_topk(x, W, b, k, values, indices, dtype)
    # (value desc, index asc): the k largest are the first k ids at the top level
    top = (b == b.max()).nonzero().flatten()[:k]
    assert torch.equal(indices[0, : top.numel()], top)


def test_bfloat16_weights_form():
    """float32 x and b_enc with a bfloat16 W_enc, forward and backward, on the CUDA code path."""
    g = torch.Generator().manual_seed(29)
    n, d, m, k = 45, 24, 300, 12
    x, b = torch.randn(n, d, generator=g), torch.randn(m, generator=g)
    W = torch.randn(d, m, generator=g).to(torch.bfloat16)
    values, indices = E.topk_encode(x, W, b, k)
    _cuda._check_topk(x, W.float(), b, k, values, indices, torch.float32)
    gv = torch.randn(n, k, generator=g)
    for a, e in zip(E.topk_encode_backward(gv, values, indices, x, W), ref.topk_encode_backward(gv, values, indices, x, W)):
        assert a.shape == e.shape and a.dtype == e.dtype
        _cuda._close(a, e, e.dtype, scale=4.0)


@pytest.mark.parametrize("dtype", _cuda.DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("n,k,m,d", [(0, 3, 10, 8), (1, 1, 5, 7), (37, 6, 50, 33), (9, 300, 700, 37),
                                     (300, 3, 3, 20), (6, 3, 10, 0)])
def test_deterministic_backward(n, k, m, d, index_dtype, dtype):
    """The bucketed, sorted weight-gradient reduction (torch.use_deterministic_algorithms(True)) against the
    reference: odd sizes, k over one tile, latents hit by a hundred rows (m = 3), d = 0, an empty batch."""
    g = torch.Generator().manual_seed(n + k + m + d)
    values, indices = _cuda._code(n, k, m, dtype, g, index_dtype=index_dtype)
    if n > 2 and k > 1:
        values[1, 0] = -0.5  # the ReLU blocks this entry's encoder gradient; the decoder still uses it
    x, W_enc = _cuda._randn(n, d, dtype=dtype, g=g), _cuda._randn(d, m, dtype=dtype, g=g)
    gv = _cuda._randn(n, k, dtype=dtype, g=g)
    got = E.topk_encode_backward(gv, values, indices, x, W_enc, True)
    want = ref.topk_encode_backward(gv, values, indices.long(), x, W_enc)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        _cuda._close(a, e, dtype, scale=float(n) ** 0.5 + 4)
    W_dec, grad_out = _cuda._randn(m, d, dtype=dtype, g=g), _cuda._randn(n, d, dtype=dtype, g=g)
    got = E.sparse_decode_backward(grad_out, values, indices, W_dec, True)
    want = ref.sparse_decode_backward(grad_out, values, indices.long(), W_dec)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        _cuda._close(a, e, dtype, scale=float(max(n, d)) ** 0.5 + 4)


def _all_ops(g: torch.Generator) -> dict[str, tuple]:
    """One call of every op on shared random inputs; outputs keyed by op."""
    n, d, m, k = 70, 33, 600, 24
    x, W, b = torch.randn(n, d, generator=g), torch.randn(d, m, generator=g), torch.randn(m, generator=g)
    W[:, 100:140] = W[:, 90:91]  # tied latents
    out = {"encode": E.topk_encode(x, W, b, k)}
    # The general selection path too: forced, and by k > 1024 (on a wider code of its own).
    os.environ["CONCEPT_EXT_TOPK_SELECT"] = "radix"
    try:
        out["encode_radix"] = E.topk_encode(x, W, b, k)
    finally:
        os.environ.pop("CONCEPT_EXT_TOPK_SELECT", None)
    W2, b2 = torch.randn(d, 1200, generator=g), torch.randn(1200, generator=g)
    out["encode_k1100"] = E.topk_encode(x[:9], W2, b2, 1100)
    v, i = out["encode"]
    Wd, bd = torch.randn(m, d, generator=g), torch.randn(d, generator=g)
    gv = torch.randn(n, k, generator=g)
    out["encode_backward"] = E.topk_encode_backward(gv, v, i, x, W)
    out["decode"] = (E.sparse_decode(v, i, Wd, bd),)
    grad_out = torch.randn(n, d, generator=g)
    out["decode_backward"] = E.sparse_decode_backward(grad_out, v, i, Wd)
    out["encode_backward_deterministic"] = E.topk_encode_backward(gv, v, i, x, W, True)
    out["decode_backward_deterministic"] = E.sparse_decode_backward(grad_out, v, i, Wd, True)
    out["rate"] = (E.activation_rate_loss(v, i, m, 0.1),)
    out["rate_backward"] = (E.activation_rate_loss_backward(torch.tensor(1.0), v, i, m, 0.1),)
    keep = torch.randperm(m, generator=g)[:200]
    out["ablate"] = E.ablate_decode(v, i, Wd, bd, keep, None)
    out["ablate_padded"] = E.ablate_decode_padded(v, i, Wd, bd, keep, torch.rand(n, generator=g) + 0.5)
    return out


@pytest.mark.parametrize("bad_id", [12, -1])
def test_device_side_index_checks(bad_id):
    """The kernels' own range checks: on a GPU they guard the calls that skip the wrappers' host-side check
    (concept_ext.unchecked(), CUDA-graph capture, torch.compile). Every op that reads ids stops with a
    message naming the bad id instead of reading or writing out of bounds."""
    g = torch.Generator().manual_seed(3)
    values, indices = _cuda._code(8, 3, 12, torch.float32, g)  # values[:, :2] > 0, values[:, 2] = 0
    W, b = torch.randn(12, 5, generator=g), torch.randn(5, generator=g)
    bad = indices.clone()
    bad[3, 1] = bad_id
    x, W_enc = torch.randn(8, 5, generator=g), torch.randn(5, 12, generator=g)
    keep = torch.tensor([0, 1])
    calls = {
        "sparse_decode": lambda: E.sparse_decode(values, bad, W, b),
        "sparse_decode_backward": lambda: E.sparse_decode_backward(torch.randn(8, 5), values, bad, W),
        "topk_encode_backward": lambda: E.topk_encode_backward(torch.randn(8, 3), values, bad, x, W_enc),
        "activation_rate_loss": lambda: E.activation_rate_loss(values, bad, 12, 0.5),
        "activation_rate_loss_backward": lambda: E.activation_rate_loss_backward(torch.tensor(1.0), values, bad, 12, 0.5),
        "ablate_decode": lambda: E.ablate_decode(values, bad, W, b, keep, None),
        "ablate_decode_padded": lambda: E.ablate_decode_padded(values, bad, W, b, keep, None),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"indices out of range: {bad_id} not in \[0, 12\)"):
            call()
    bad_keep = torch.tensor([0, bad_id if bad_id < 0 else 12])
    for op in (E.ablate_decode, E.ablate_decode_padded):
        with pytest.raises(RuntimeError, match=r"keep out of range: -?\d+ not in \[0, 12\)"):
            op(values, indices, W, b, bad_keep, None)
    # and the emulated kernels still work afterwards
    torch.testing.assert_close(E.sparse_decode(values, indices, W, b), ref.sparse_decode(values, indices, W, b))


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_results_do_not_depend_on_thread_order(order, monkeypatch):
    """Between two barriers the emulator runs threads in one order; a kernel whose result depends on that
    order (an unsynchronised read of another thread's write) changes its output under another order.
    Everything but the atomically accumulated weight gradients must be bit-identical, the deterministic
    backward's included; the atomic ones may differ in the last bits (the summation order changes), as on
    a GPU."""
    want = _all_ops(torch.Generator().manual_seed(5))
    monkeypatch.setenv("CONCEPT_EXT_EMU_ORDER", order)
    monkeypatch.setenv("CONCEPT_EXT_EMU_SEED", "1234")
    got = _all_ops(torch.Generator().manual_seed(5))
    atomic = {("encode_backward", 1), ("encode_backward", 2), ("decode_backward", 1)}
    for op, outs in want.items():
        for j, (w, g_) in enumerate(zip(outs, got[op])):
            if (op, j) in atomic:
                torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(g_, w), f"{op} output {j} depends on the thread order ({order})"


# ---------------------------------------------------------------------------------------------------
# The emulator's own checks, on kernels written to break the rules (tests/cuda_emu_faults.cu).
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faults():
    lib = cuda_emulate.build_extra(ROOT / "tests" / "cuda_emu_faults.cu", "concept_ext_emu_faults")
    torch.ops.load_library(str(lib))
    return torch.ops.concept_ext_emu_faults


def test_emulator_reduces_correctly(faults):
    """The control: a correct block reduction (warp shuffles, __syncthreads) over 1000 values."""
    x = torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(faults.block_sum(x, 0), x.sum().reshape(1))


def test_emulator_reports_divergent_syncthreads(faults):
    with pytest.raises(RuntimeError, match=r"block_sum_kernel.*different __syncthreads.*cuda_emu_faults.cu:\d+\)"):
        faults.block_sum(torch.randn(300, dtype=torch.float64), 1)


def test_emulator_reports_collective_after_exit(faults):
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync with a full mask after .* exited"):
        faults.block_sum(torch.randn(300, dtype=torch.float64), 2)


def test_emulator_reports_exit_before_syncthreads(faults):
    with pytest.raises(RuntimeError, match=r"exited before a __syncthreads that others wait at"):
        faults.block_sum(torch.randn(300, dtype=torch.float64), 5)


def test_emulator_poisons_shared_memory(faults):
    """Shared memory read before anyone wrote it holds garbage (NaN here), as on a GPU, not zeros or what
    the previous block or launch left there."""
    x = torch.randn(300, dtype=torch.float64)
    faults.block_sum(x, 0)  # leaves the true partial sums in `red`
    assert torch.isnan(faults.block_sum(x, 6)).all()


def test_emulator_order_exposes_a_race(faults, monkeypatch):
    """A kernel that reads a neighbour's shared-memory slot without a barrier gives a different answer
    when the threads run in another order; the ordering test above relies on exactly this."""
    x = torch.arange(256, dtype=torch.float64)
    fwd = faults.block_sum(x, 3)
    monkeypatch.setenv("CONCEPT_EXT_EMU_ORDER", "reverse")
    assert not torch.equal(faults.block_sum(x, 3), fwd)


# ---------------------------------------------------------------------------------------------------
# Memory checking: the same kernels built with AddressSanitizer (the CPU stand-in for compute-sanitizer's
# memcheck), in a child process that preloads the ASan runtime.
# ---------------------------------------------------------------------------------------------------
def _asan_env() -> dict[str, str]:
    runtime = cuda_emulate.asan_runtime()
    if runtime is None:
        pytest.skip("the compiler ships no AddressSanitizer runtime")
    return dict(os.environ, CONCEPT_EXT_EMU_ASAN="1", LD_PRELOAD=runtime,
                ASAN_OPTIONS="detect_leaks=0:halt_on_error=1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
@pytest.mark.skipif(cuda_emulate.asan_requested(), reason="this process is the AddressSanitizer run")
def test_kernels_under_address_sanitizer():
    """Every kernel test of this module and the emulated backend of test_ops_cuda.py again, with each kernel
    access checked against its tensor's bounds."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        str(Path(__file__).with_name("test_ops_cuda.py")),
                        "-k", "not thread_order and not address_sanitizer"],
                       env=_asan_env(), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-3000:] + r.stderr[-6000:])
    assert "passed" in r.stdout and "failed" not in r.stdout


@pytest.mark.skipif(cuda_emulate.asan_requested(), reason="this process is the AddressSanitizer run")
def test_address_sanitizer_catches_an_out_of_bounds_read():
    """The control of the test above: one read one element past a tensor is reported."""
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT / 'tools')!r}); import cuda_emulate; "
            f"torch.ops.load_library(str(cuda_emulate.build_extra({str(ROOT / 'tests' / 'cuda_emu_faults.cu')!r}, "
            f"'concept_ext_emu_faults'))); "
            f"print(torch.ops.concept_ext_emu_faults.block_sum(torch.randn(300, dtype=torch.float64), 4))")
    r = subprocess.run([sys.executable, "-c", code], env=_asan_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, r.stderr[-4000:]
    assert "block_sum_kernel" in r.stderr  # the report names the kernel
