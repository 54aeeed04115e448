"""The whole ClassifSAE training step, as ``run_gpu.py`` times it (issue 8 item 4).

One step is method.md 2.4 (v2 losses) without the data pipeline: (1) renormalise the rows of W_dec,
(2) encode, decode, L_mse + L_ar + L_CE, (3) backward, (4) project grad W_dec off the rows, (5) clip the
gradient norm, (6) Adam. Dead-latent handling (ghost grads / AuxK) is off: it selects the dead columns
with ``nonzero``, a data-dependent shape that no CUDA graph can hold. Three implementations, each on its
own copy of the same initial weights and batch:

* ``ours``: :func:`concept_ext.sae.losses.sae_losses` on the custom ops, eager;
* ``ours_graph``: the same step captured once in a CUDA graph and replayed (CUDA only);
* ``eager``: the same mathematics in plain dense PyTorch (``[B, m]`` codes, ``topk`` over the batch for
  L_ar), what one would write without the custom ops.

Each returns ``(loss, grad W_dec)`` of its step; the check compares the first step from the initial state
with the dense float64 step. :func:`launches_per_step` counts host-side launches (CUDA) or dispatched ops
(CPU) with torch.profiler, so that a step time can be read as a multiple of the launch overhead.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.losses import EPS, sae_losses
from concept_ext.sae.model import ClassifSAE, build_sae

#: Paper v2 coefficients (method.md 2.3), dead-latent handling off (see the module docstring).
STEP_CFG = TrainConfig(lambda_mse=0.02, lambda_ar=0.02, lambda_cls=1.0, target_rate=0.1,
                       mse_normalization="dense_batch", dead_latents="none", grad_clip=1.0,
                       project_decoder_grad=True, device="cpu")
N_CONCEPTS, N_CLASSES = 20, 4

#: Host-side CUDA API calls that start work on the device (what a CUDA graph replaces by one launch).
LAUNCH_APIS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
               "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync"}

Step = Callable[[], tuple[Tensor, Tensor]]


class StepState:
    """A ClassifSAE, its Adam optimiser and one static batch ``h [B, d]``, ``labels [B]``."""

    def __init__(self, d: int, m: int, k: int, h: Tensor, labels: Tensor, *, seed: int = 0) -> None:
        cfg = SAEConfig(d=d, m=m, k=k, n_concepts=min(N_CONCEPTS, m), n_classes=N_CLASSES,
                        architecture="classif_topk", normalize="constant_norm_rescale", seed=seed)
        self.sae: ClassifSAE = build_sae(cfg).to(h.device)
        self.h, self.labels = h, labels
        self.initial = copy.deepcopy(self.sae.state_dict())
        # capturable: Adam keeps its step count on the device, so a graph replay advances it.
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=5e-5, betas=STEP_CFG.betas, eps=STEP_CFG.eps,
                                    capturable=h.is_cuda, foreach=True)

    def restore(self) -> None:
        """Back to the initial weights and a fresh optimiser state, in place (graph addresses stay)."""
        with torch.no_grad():
            for name, t in self.sae.state_dict().items():
                t.copy_(self.initial[name])
            for st in self.opt.state.values():
                for t in st.values():
                    if isinstance(t, Tensor):
                        t.zero_()

    def step(self) -> tuple[Tensor, Tensor]:
        """One full training step; returns ``(total loss, grad W_dec)`` of it."""
        sae = self.sae
        sae.normalize_decoder()  # (1)
        out = sae_losses(sae, self.h, self.labels, STEP_CFG)  # (2)
        self.opt.zero_grad(set_to_none=True)
        out.terms.total.backward()  # (3)
        sae.project_decoder_grad()  # (4)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), STEP_CFG.grad_clip, foreach=True)  # (5)
        self.opt.step()  # (6)
        return out.terms.total.detach(), sae.W_dec.grad


def dense_step(params: dict[str, Tensor], h: Tensor, labels: Tensor, k: int, opt: torch.optim.Optimizer
               ) -> tuple[Tensor, Tensor]:
    """The step in plain dense PyTorch on ``params`` (W_enc [d, m], b_enc, W_dec [m, d], b_dec, W_c, b_c)."""
    W_enc, b_enc, W_dec, b_dec, W_c, b_c = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_c", "b_c"))
    d, n_concepts, b = W_enc.shape[0], W_c.shape[1], h.shape[0]
    with torch.no_grad():
        W_dec.div_(W_dec.norm(dim=1, keepdim=True))
    s = math.sqrt(d) / h.norm(dim=1).clamp_min(1e-12)  # [B]
    pre = F.relu(torch.addmm(b_enc, h * s[:, None], W_enc))  # [B, m]
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)  # [B, m]
    h_hat = (z @ W_dec + b_dec) / s[:, None]
    centred = (h - h.mean(0)).detach()
    l_mse = ((h_hat - h).pow(2).sum(1) / (centred.norm(dim=1) + EPS)).mean()
    m_tau = int(math.floor(STEP_CFG.target_rate * b + 1e-9))
    l_ar = (z.sum() - z.topk(m_tau, dim=0).values.sum()) / b if m_tau > 0 else z.sum() / b
    l_ce = F.cross_entropy(F.linear(z[:, :n_concepts], W_c, b_c), labels.long())
    total = STEP_CFG.lambda_mse * l_mse + STEP_CFG.lambda_ar * l_ar + STEP_CFG.lambda_cls * l_ce
    opt.zero_grad(set_to_none=True)
    total.backward()
    with torch.no_grad():
        W_dec.grad.sub_((W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec)
    torch.nn.utils.clip_grad_norm_(list(params.values()), STEP_CFG.grad_clip, foreach=True)
    opt.step()
    return total.detach(), W_dec.grad


def make_impls(d: int, m: int, k: int, h: Tensor, labels: Tensor) -> tuple[dict[str, Step], Callable]:
    """``{name: step}`` ready to time (each at its initial state, so its first call is the checked one)
    and ``check(out) -> max relative error`` against the dense float64 step."""
    ours = StepState(d, m, k, h, labels)
    impls: dict[str, Step] = {"ours": ours.step}

    # The dense step on its own copy of the same initial weights.
    dense_params = {n: t.detach().clone().requires_grad_() for n, t in ours.initial.items()}
    dense_opt = torch.optim.Adam(list(dense_params.values()), lr=5e-5, betas=STEP_CFG.betas, eps=STEP_CFG.eps,
                                 capturable=h.is_cuda, foreach=True)
    impls["eager"] = lambda: dense_step(dense_params, h, labels, k, dense_opt)

    if h.is_cuda:
        graph_state = StepState(d, m, k, h, labels)
        impls["ours_graph"] = capture(graph_state)

    want: list[Tensor] = []  # the float64 reference, computed at the first check (inside run_gpu's try:
    # at the largest grid points its dense [B, m] float64 tensors may not fit, which is then recorded)

    def check(out: tuple[Tensor, Tensor]) -> float:
        if not want:
            ref_params = {n: t.detach().double().clone().requires_grad_() for n, t in ours.initial.items()}
            ref_opt = torch.optim.Adam(list(ref_params.values()), lr=5e-5)
            want.extend(t.detach().clone() for t in dense_step(ref_params, h.double(), labels, k, ref_opt))
            del ref_params, ref_opt
        want_loss, want_grad = want
        loss, grad = out
        err_loss = float((loss.double() - want_loss).abs() / want_loss.abs().clamp_min(1e-30))
        err_grad = float((grad.double() - want_grad).abs().max() / want_grad.abs().max().clamp_min(1e-30))
        return max(err_loss, err_grad)

    return impls, check


def capture(state: StepState) -> Step:
    """Capture ``state.step`` in a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs
    requires), restore the initial state, and return a step that replays the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # cuBLAS workspaces, allocator pools, Adam's lazily created state
            state.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    state.opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out = state.step()
    state.restore()  # the warm-up and the capture moved the weights: start from the initial ones

    def replay() -> tuple[Tensor, Tensor]:
        graph.replay()
        return static_out

    return replay


def launches_per_step(fn: Step, dev: torch.device, steps: int = 3) -> dict:
    """Host-side launches per step on CUDA (``LAUNCH_APIS`` events), or dispatched aten/concept_ext ops per
    step on CPU (nested ones included), counted with torch.profiler over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    if dev.type == "cuda":
        return {"launches_per_step": sum(n in LAUNCH_APIS for n in names) / steps,
                "syncs_per_step": sum(n in ("cudaStreamSynchronize", "cudaDeviceSynchronize") for n in names)
                / steps}
    return {"ops_per_step": sum(n.startswith(("aten::", "concept_ext::")) for n in names) / steps}


def launch_overhead_us(dev: torch.device, reps: int = 2000) -> float:
    """Median host time of one tiny in-place op (one launch on CUDA, one dispatch on CPU), microseconds."""
    import time

    x = torch.zeros(1, device=dev)
    for _ in range(100):
        x.add_(1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        x.add_(1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


# ------------------------------------------------------------------------ the real Trainer.train_step

#: The trainer's recipe for ``trainer_impls``: STEP_CFG's losses with ghost grads on, a dead window of
#: one step (so the dead-latent terms run from the third step on) and a flat learning rate.
TRAINER_CFG = dict(lambda_mse=0.02, lambda_ar=0.02, lambda_cls=1.0, target_rate=0.1, dead_latents="ghost",
                   dead_window=1, schedule="constant", lr=5e-5, progress=False, log_every=10**9)


def trainer_impls(d: int, m: int, k: int, x: Tensor, labels: Tensor) -> tuple[dict[str, Step], Callable]:
    """:meth:`concept_ext.sae.trainer.Trainer.train_step` itself (data order, ghost grads, firing counters and
    all), on batches of ``B = x.shape[0]`` rows drawn from a pool of 4B rows built from ``x``:

    * ``ours``: ``TrainConfig(cuda_graph=True)``; its first call runs the warm-up steps, the capture and
      the first replay (on CUDA), so that the timed calls are replays;
    * ``trainer_eager``: the default eager step.

    Both start from the same weights and their first call runs the same ``WARMUP_STEPS + 1`` steps. Each
    returns ``(loss, grad W_dec)`` of its last step; the check compares the first call's (on CUDA a
    replayed step, with dead latents in play) with the eager trainer's in float64 after as many steps."""
    from concept_ext.sae.trainer import Trainer
    from concept_ext.sae.graph_step import WARMUP_STEPS

    b, dev = x.shape[0], x.device
    gen = torch.Generator(device="cpu").manual_seed(3)
    pool = torch.cat([x] + [x + 0.1 * torch.randn(x.shape, generator=gen).to(dev) for _ in range(3)])
    pool_labels = labels.repeat(4)
    scfg = SAEConfig(d=d, m=m, k=k, n_concepts=min(N_CONCEPTS, m), n_classes=N_CLASSES,
                     architecture="classif_topk", normalize="constant_norm_rescale", seed=0)

    def trainer(graph: bool, dtype: str = "float32") -> Trainer:
        tcfg = TrainConfig(batch_size=b, total_samples=b * 10**6, device=str(dev), cuda_graph=graph,
                           **TRAINER_CFG)
        return Trainer(build_sae(SAEConfig(**{**scfg.__dict__, "dtype": dtype})), tcfg,
                       pool.to(getattr(torch, dtype)), pool_labels)

    first = WARMUP_STEPS + 1  # steps of the first call: on CUDA, warm-up, capture, and one replay

    def impl(tr: Trainer) -> Step:
        calls = [0]

        def step() -> tuple[Tensor, Tensor]:
            calls[0] += 1
            for _ in range(first - 1 if calls[0] == 1 else 0):  # untimed: the first call is the check
                tr.train_step()
            out = tr.train_step()
            return out.terms.total, tr.sae.W_dec.grad

        return step

    impls = {"ours": impl(trainer(True)), "trainer_eager": impl(trainer(False))}
    want: list[Tensor] = []

    def check(out: tuple[Tensor, Tensor]) -> float:
        if not want:  # the eager trainer in float64, after the same number of steps
            ref = trainer(False, "float64")
            for _ in range(first):
                o = ref.train_step()
            want.extend([o.terms.total.detach().clone(), ref.sae.W_dec.grad.clone()])
            del ref
        loss, grad = out
        err_loss = float((loss.double() - want[0]).abs() / want[0].abs().clamp_min(1e-30))
        err_grad = float((grad.double() - want[1]).abs().max() / want[1].abs().max().clamp_min(1e-30))
        return max(err_loss, err_grad)

    return impls, check
