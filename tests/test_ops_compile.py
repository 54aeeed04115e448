"""torch.compile(fullgraph=True) over a small SAE forward/backward built from the ops: no graph breaks."""
from __future__ import annotations

import pytest
import torch

import concept_ext


def _sae_step(x, W_enc, b_enc, W_dec, b_dec):
    values, indices = concept_ext.topk_encode(x, W_enc, b_enc, 4)
    x_hat = concept_ext.sparse_decode(values, indices, W_dec, b_dec)
    loss = ((x_hat - x) ** 2).sum(1).mean() + concept_ext.activation_rate_loss(values, indices, W_enc.shape[1], 0.1)
    return loss


@pytest.mark.slow
def test_compile_fullgraph_matches_eager(monkeypatch):
    monkeypatch.setenv("CONCEPT_EXT_CHECK_DATA", "0")  # data checks are skipped under compile anyway
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    params = [torch.randn(8, 24, generator=g), torch.zeros(24), torch.randn(24, 8, generator=g), torch.zeros(8)]
    eager_p = [p.clone().requires_grad_() for p in params]
    comp_p = [p.clone().requires_grad_() for p in params]
    eager = _sae_step(x, *eager_p)
    eager.backward()
    compiled = torch.compile(_sae_step, fullgraph=True, backend="aot_eager")
    out = compiled(x, *comp_p)
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(comp_p, eager_p):
        torch.testing.assert_close(a.grad, b.grad)
