"""torch.library.opcheck on every op and sample; dispatch-table facts; the ops work without _C."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import concept_ext
from concept_ext.ops import OP_NAMES
from samples import decode_cases, encode_cases, rate_cases

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _samples():
    gen = torch.Generator().manual_seed(1234)
    for label, kw in encode_cases(torch.float32, gen):
        if kw["x"].shape[0] == 0:
            continue
        kw = {**kw, "x": kw["x"].clone().requires_grad_(), "W_enc": kw["W_enc"].clone().requires_grad_()}
        yield "topk_encode", label, (kw["x"], kw["W_enc"], kw["b_enc"], kw["k"])
    for label, kw in decode_cases(torch.float32, gen):
        v = kw["values"].clone().requires_grad_()
        yield "sparse_decode", label, (v, kw["indices"], kw["W_dec"].clone().requires_grad_(), kw["b_dec"])
        keep = torch.arange(0, kw["W_dec"].shape[0], 2)
        yield "ablate_decode", label, (kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep, None)
    for label, kw in rate_cases(torch.float32, gen):
        yield "activation_rate_loss", label, (kw["values"].clone().requires_grad_(), kw["indices"],
                                              kw["n_latents"], kw["rate"])


SAMPLES = list(_samples())


@pytest.mark.parametrize("op,label,args", SAMPLES, ids=[f"{o}-{lbl}" for o, lbl, _ in SAMPLES])
def test_opcheck(op, label, args):
    tests = OPCHECK_TESTS
    if op == "ablate_decode":  # data-dependent output size: dynamic AOT dispatch is not meaningful
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(getattr(torch.ops.concept_ext, op).default, args, test_utils=tests)


def test_every_op_has_a_cpu_implementation_when_extension_is_built():
    for op in OP_NAMES:
        kind = concept_ext.info.kernel_for(op, "cpu")
        built = concept_ext.HAS_C_EXTENSION or concept_ext.KERNELS_REQUIRED
        assert kind == ("cpu_kernel" if built else "reference"), op


# Run before `import concept_ext` in a subprocess: makes `concept_ext._C` unimportable (a missing build).
_BLOCK_C = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'concept_ext._C': raise ImportError('blocked for the test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def _env(require: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != concept_ext.REQUIRE_KERNELS_ENV}
    if require:
        env[concept_ext.REQUIRE_KERNELS_ENV] = "1"
    return env


def test_missing_extension_is_an_import_error_when_kernels_required():
    """CONCEPT_EXT_REQUIRE_KERNELS=1: no silent fallback; the ImportError names the cause and the switch."""
    code = _BLOCK_C + "import concept_ext\nprint('imported')\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(True), timeout=120)
    assert res.returncode != 0 and "imported" not in res.stdout, res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: concept_ext._C unavailable: blocked for the test"), res.stderr
    assert "CONCEPT_EXT_REQUIRE_KERNELS=1" in last, res.stderr


def test_partial_build_is_an_import_error_when_kernels_required():
    """A `_C` that imports but registers no CPU kernel (a partial build) must not pass on the references."""
    code = (
        "import sys, importlib.abc, importlib.util\n"
        "class Empty(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        return importlib.util.spec_from_loader(name, self) if name == 'concept_ext._C' else None\n"
        "    def create_module(self, spec): return None\n"
        "    def exec_module(self, module): pass\n"
        "sys.meta_path.insert(0, Empty())\n"
        "import concept_ext\nprint('imported')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(True), timeout=120)
    assert res.returncode != 0 and "imported" not in res.stdout, res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: concept_ext._C has no CPU kernel for ['topk_encode',"), res.stderr
    assert "CONCEPT_EXT_REQUIRE_KERNELS=1" in last, res.stderr


def test_ops_work_without_compiled_extension(tmp_path):
    """Block ``concept_ext._C`` from importing (switch unset, as for a user): the references must serve every
    op, and the fallback is announced by a warning."""
    code = _BLOCK_C + (
        "import torch, concept_ext\n"
        "assert not concept_ext.HAS_C_EXTENSION\n"
        "x = torch.randn(5, 4); w = torch.randn(4, 9); b = torch.zeros(9)\n"
        "v, i = concept_ext.topk_encode(x, w, b, 3)\n"
        "out = concept_ext.sparse_decode(v, i, w.t().contiguous(), torch.zeros(4))\n"
        "loss = concept_ext.activation_rate_loss(v, i, 9, 0.5)\n"
        "assert out.shape == (5, 4) and loss.shape == ()\n"
        "from concept_ext.info import kernel_for\n"
        "assert kernel_for('topk_encode', 'cpu') == 'reference'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(False), timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    assert "concept_ext._C unavailable: blocked for the test; the pure-PyTorch reference ops serve." in res.stderr
