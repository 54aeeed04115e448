"""Bad input gets a clear Python exception naming the argument: never a crash or silent garbage."""
from __future__ import annotations

import pytest
import torch

import concept_ext

_g = torch.Generator().manual_seed(0)  # module-level inputs: the same on every run
x = torch.randn(4, 3, generator=_g)
W = torch.randn(3, 6, generator=_g)
b = torch.zeros(6)
v = torch.rand(4, 2, generator=_g)
i = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
Wd = torch.randn(6, 3, generator=_g)
bd = torch.zeros(3)

nan_x = x.clone()
nan_x[1, 2] = float("nan")
inf_w = W.clone()
inf_w[0, 0] = float("inf")

RANGE = (ValueError, RuntimeError)


def _has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", "CPU")

CASES = [
    # (callable, exception type, fragment of the message)
    (lambda: concept_ext.topk_encode(x.long(), W, b, 2), TypeError, "x must be float"),
    (lambda: concept_ext.topk_encode(x[0], W, b, 2), ValueError, "x must have 2 dimension"),
    (lambda: concept_ext.topk_encode(x, W[:2], b, 2), ValueError, "W_enc expects d = 2"),
    (lambda: concept_ext.topk_encode(x, W, b[:5], 2), ValueError, "b_enc must have m = 6"),
    (lambda: concept_ext.topk_encode(x, W, b, 7), ValueError, "k must satisfy 1 <= k <= m = 6"),
    (lambda: concept_ext.topk_encode(x, W, b, 0), ValueError, "k must satisfy"),
    (lambda: concept_ext.topk_encode(x, W, b, 2.0), TypeError, "k must be an int"),
    (lambda: concept_ext.topk_encode(x.double(), W, b, 2), TypeError, "share a dtype"),
    (lambda: concept_ext.topk_encode(nan_x, W, b, 2), ValueError, "x contains NaN"),
    (lambda: concept_ext.topk_encode(x, inf_w, b, 2), ValueError, "W_enc contains NaN or infinite"),
    (lambda: concept_ext.topk_encode(x, W.to("meta"), b, 2), ValueError, "same device"),
    (lambda: concept_ext.topk_encode([[1.0]], W, b, 2), TypeError, "x must be a torch.Tensor"),
    (lambda: concept_ext.sparse_decode(v, i[:, :1], Wd, bd), ValueError, "same shape"),
    (lambda: concept_ext.sparse_decode(v, i.float(), Wd, bd), TypeError, "indices must be int64 or int32"),
    # Index ranges are checked by the compiled kernel (RuntimeError) or the wrapper without it (ValueError).
    (lambda: concept_ext.sparse_decode(v, i + 6, Wd, bd), RANGE, "indices must lie in [0, 6)"),
    (lambda: concept_ext.sparse_decode(v, -i - 1, Wd, bd), RANGE, "indices must lie in [0, 6)"),
    (lambda: concept_ext.sparse_decode(v, i, Wd, bd[:2]), ValueError, "b_dec must have d = 3"),
    (lambda: concept_ext.sparse_decode(v.double(), i, Wd, bd), TypeError, "share a dtype"),
    (lambda: concept_ext.activation_rate_loss(v, i, 5, 0.1), RANGE, "indices must lie in [0, "),
    (lambda: concept_ext.activation_rate_loss(v, i, 6, 1.5), ValueError, "rate must be a float in [0, 1]"),
    (lambda: concept_ext.activation_rate_loss(v, i, 0, 0.1), ValueError, "n_latents must be a positive int"),
    (lambda: concept_ext.activation_rate_loss(v * float("nan"), i, 6, 0.1), ValueError, "values contains NaN"),
    (lambda: concept_ext.ablate_decode(v, i, Wd, bd, torch.tensor([0, 0])), ValueError, "distinct"),
    (lambda: concept_ext.ablate_decode(v, i, Wd, bd, torch.tensor([9])), RANGE, "keep must lie in [0, 6)"),
    (lambda: concept_ext.ablate_decode(v, i, Wd, bd, torch.tensor([1]), target_norm=torch.ones(3)), ValueError,
     "one entry per row"),
]


@pytest.mark.parametrize("call,exc,fragment", CASES, ids=[c[2] for c in CASES])
def test_bad_input_raises_clearly(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize("fn,args,message", [pytest.param(*case, marks=pytest.mark.cpu_kernel(case[0])) for case in [
    ("sparse_decode", (v, i + 100, Wd, bd), r"indices must lie in \[0, 6\) \(W_dec has m = 6 rows\)"),
    ("topk_encode", (x, W, b, 9), r"topk_encode: k must satisfy 1 <= k <= m = 6, got 9"),
    ("activation_rate_loss", (v, i + 100, 6, 0.1), r"indices must lie in \[0, n_latents = 6\)"),
]])
def test_kernel_level_checks_raise_not_crash(fn, args, message):
    """Direct torch.ops calls bypass the wrapper checks: the compiled CPU kernel itself must refuse bad input
    with a message naming the argument and its bound."""
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.concept_ext, fn)(*args)


def test_unchecked_skips_data_checks_in_its_block_only():
    """``unchecked()`` turns the NaN/inf checks off inside the block (the kernels then run on the bad
    input), restores them after it, even when the block raises, and leaves other threads alone."""
    import threading

    with concept_ext.unchecked():
        # The wrapper's ValueError is off: the compiled CPU kernel's own NaN check answers instead (the
        # reference has none and runs on the bad input).
        if _has_cpu_kernel("topk_encode") or concept_ext.KERNELS_REQUIRED:
            nan_message = r"topk_encode: the pre-activations x @ W_enc \+ b_enc contain NaN"
            with pytest.raises(RuntimeError, match=nan_message):
                concept_ext.topk_encode(nan_x, W, b, 2)
        else:
            concept_ext.topk_encode(nan_x, W, b, 2)
        seen = []
        t = threading.Thread(target=lambda: seen.append(concept_ext.ops._check_data()))
        t.start()
        t.join()
        assert seen == [True]  # another thread still checks
        with concept_ext.unchecked():
            pass
        assert not concept_ext.ops._check_data()  # nested blocks restore the outer state
    with pytest.raises(ValueError, match="x contains NaN"):
        concept_ext.topk_encode(nan_x, W, b, 2)
    with pytest.raises(KeyError):
        with concept_ext.unchecked():
            raise KeyError("inside")
    assert concept_ext.ops._check_data()
    # Shape checks are not data checks: they still run inside the block.
    with concept_ext.unchecked(), pytest.raises(ValueError, match="W_enc expects d = 2"):
        concept_ext.topk_encode(x, W[:2], b, 2)
