"""Multi-process runs on PyTorch's own distributed stack (``torchrun`` + ``torch.distributed``).

Nothing here re-implements distribution: processes are started by ``torchrun`` (one per GPU, or per
CPU worker with the ``gloo`` backend), gradients are all-reduced by ``DistributedDataParallel`` and
every exchange is a ``torch.distributed`` collective. This module only holds the plumbing:

* :func:`init_from_env` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun), picks
  ``nccl`` on CUDA and ``gloo`` on CPU, and sets a **bounded timeout** (``CONCEPT_EXT_DIST_TIMEOUT``
  seconds, default 1800) so that a dead rank makes the others fail with an error instead of hanging.
  Without those variables (or with ``WORLD_SIZE=1``) everything runs single-process, unchanged.
* rank-0-only writes (:func:`is_main`), barriers (:func:`barrier`), object broadcast, shard helpers
  (:func:`shard_range`, :func:`owned_shards`).
* :class:`BatchGroup`: the global batch of one SAE step split across ranks, with the few reductions the
  losses need to equal the single-process losses on the concatenated batch (see losses.py).
* :class:`LossModule`: wraps a loss function of a module so that ``DistributedDataParallel`` sees the
  call that builds the graph.
* Task parallelism (``fit_parallel="tasks"``): :func:`owned_tasks` deals whole (method, seed) fits out
  round robin, :func:`local` runs one of them as a single-process job while the group stays up, and
  :func:`task_group` gives the barrier that waits for the slowest rank's tasks (its own, longer timeout:
  ``CONCEPT_EXT_DIST_TASK_TIMEOUT`` seconds, default 24 h).

The run directory must be on a filesystem that every node sees (caches, checkpoints, stage records).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger("concept_ext")

__all__ = ["DistContext", "init_from_env", "context", "enabled", "is_main", "rank", "world_size", "barrier",
           "broadcast_object", "shutdown", "shard_range", "owned_shards", "BatchGroup", "LossModule",
           "default_timeout", "DEFAULT_TIMEOUT_S", "wrap_ddp", "run_ranked", "RankFailure", "owned_tasks", "local",
           "task_group", "task_timeout", "DEFAULT_TASK_TIMEOUT_S"]

#: Default collective timeout in seconds (``CONCEPT_EXT_DIST_TIMEOUT`` overrides it).
DEFAULT_TIMEOUT_S = 1800.0
#: Default timeout of the task barrier in seconds (``CONCEPT_EXT_DIST_TASK_TIMEOUT`` overrides it): a rank
#: that finished its fits waits there for the slowest rank's, which can take hours at the paper's scale.
DEFAULT_TASK_TIMEOUT_S = 86400.0


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int
    """Global rank (0 .. world_size-1)."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    backend: Optional[str]
    """``"nccl"`` / ``"gloo"`` when a process group is up, else None."""
    device: str
    """The device this rank computes on (``cuda:<local_rank>`` or ``cpu``)."""

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


_SINGLE = DistContext(0, 1, 0, None, "cpu")
_ctx: DistContext = _SINGLE


def _seconds_from_env(name: str, default: float) -> datetime.timedelta:
    raw = os.environ.get(name)
    try:
        secs = float(raw) if raw else default
    except ValueError as exc:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from exc
    if secs <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return datetime.timedelta(seconds=secs)


def default_timeout() -> datetime.timedelta:
    """The collective timeout: ``CONCEPT_EXT_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    return _seconds_from_env("CONCEPT_EXT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)


def task_timeout() -> datetime.timedelta:
    """The task barrier's timeout: ``CONCEPT_EXT_DIST_TASK_TIMEOUT`` seconds, else
    :data:`DEFAULT_TASK_TIMEOUT_S`."""
    return _seconds_from_env("CONCEPT_EXT_DIST_TASK_TIMEOUT", DEFAULT_TASK_TIMEOUT_S)


def init_from_env(*, backend: Optional[str] = None, timeout: Optional[datetime.timedelta] = None,
                  device: str = "auto") -> DistContext:
    """Join the job torchrun started (no-op without ``WORLD_SIZE`` or with ``WORLD_SIZE=1``).

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when the device is CUDA, else gloo.
        timeout: bound on every collective (a dead peer raises after it); default :func:`default_timeout`.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    global _ctx
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _ctx = _SINGLE
        return _ctx
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout or default_timeout(),
                                device_id=torch.device(dev) if use_cuda else None)
    _ctx = DistContext(rank, world, local, backend, dev)
    logger.info("distributed: rank %d/%d (local %d) on %s, backend %s", rank, world, local, dev, backend)
    return _ctx


_local_depth = 0  # > 0 inside `local()`


def context() -> DistContext:
    """The current context (single-process when no group was initialised, or inside :func:`local`)."""
    if _ctx.enabled and not dist.is_initialized():
        return _SINGLE
    if _local_depth and _ctx.enabled:
        return DistContext(0, 1, _ctx.local_rank, None, _ctx.device)
    return _ctx


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Run the body as a single-process job of its own while the process group stays up: inside it,
    :func:`enabled` is False, :func:`is_main` True and collectives are no-ops, so a pipeline stage
    writes its own folder and trains without DDP. Used for task-parallel fits, where each rank owns
    whole (method, seed) stages. The device stays this rank's (``cuda:<local_rank>``)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def enabled() -> bool:
    """True inside a multi-process job."""
    return context().enabled


def rank() -> int:
    return context().rank


def world_size() -> int:
    return context().world_size


def is_main() -> bool:
    """True on the rank that writes shared files (rank 0, or the only process)."""
    return context().rank == 0


def barrier(group: Any = None) -> None:
    """Wait for every rank (no-op single-process). Bounded by the group's timeout; ``group`` (a gloo group
    from :func:`task_group`) waits under that group's timeout instead of the default one."""
    if enabled():
        if group is not None:
            dist.barrier(group=group)
        elif context().backend == "nccl":
            dist.barrier(device_ids=[context().local_rank])
        else:
            dist.barrier()


def task_group(timeout: Optional[datetime.timedelta] = None) -> Any:
    """A gloo group of every rank with the task timeout (:func:`task_timeout`), for :func:`barrier` calls
    that wait on other ranks' whole fits; None single-process. Collective: every rank calls it at the same
    point, before the tasks start (creating it while another rank is busy would itself wait)."""
    if not enabled():
        return None
    return dist.new_group(backend="gloo", timeout=timeout or task_timeout())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for small decisions and records)."""
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    global _ctx
    if dist.is_initialized():
        dist.destroy_process_group()
    _ctx = _SINGLE


def shard_range(n: int, *, rank: Optional[int] = None, world: Optional[int] = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` owned by ``rank``: contiguous, in rank order, sizes differ by <= 1, so
    the concatenation of every rank's rows in rank order is ``0..n-1``."""
    r = context().rank if rank is None else rank
    w = context().world_size if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank must lie in [0, {w}), got {r}")
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def owned_shards(n_shards: int, *, rank: Optional[int] = None, world: Optional[int] = None) -> list[int]:
    """Cache shard ids of ``rank``: round robin (``i % world == rank``), so every rank gets work even when
    the split has few shards, and the set is fixed by (n_shards, world) alone."""
    r = context().rank if rank is None else rank
    w = context().world_size if world is None else world
    return list(range(r, n_shards, w))


def owned_tasks(n_tasks: int, *, rank: Optional[int] = None, world: Optional[int] = None) -> list[int]:
    """Task ids of ``rank`` among ``n_tasks`` independent tasks: round robin (``i % world == rank``), fixed by
    (n_tasks, world) alone, so every rank computes the same assignment without talking."""
    return owned_shards(n_tasks, rank=rank, world=world)


class BatchGroup:
    """The global batch of one step, split over the ranks: this rank holds rows ``[offset, offset+local)``
    of the ``rows`` rows. Every reduction is an all-reduce/all-gather over the default group.

    The losses use it so that (a) every statistic of the batch (means, normalisers, the L_ar top sets,
    v1's noise scale) is the global batch's and (b) each rank returns its *share* of every loss term: the
    shares sum over ranks to the single-process value and their gradients sum to its gradient.
    """

    def __init__(self, rows: int, *, rank: Optional[int] = None, world: Optional[int] = None) -> None:
        self.rank = context().rank if rank is None else rank
        self.world = context().world_size if world is None else world
        self.rows = rows
        self.bounds = [shard_range(rows, rank=r, world=self.world) for r in range(self.world)]
        self.offset, hi = self.bounds[self.rank]
        self.local = hi - self.offset

    def sum(self, x: Tensor) -> Tensor:
        """All-reduced sum of a tensor over ranks (no gradient)."""
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    def mean_rows(self, x: Tensor) -> Tensor:
        """Mean over the global batch's rows of a per-row tensor ``x [local, ...]`` -> ``[...]`` (no grad)."""
        return self.sum(x.detach().sum(0)) / self.rows

    def gather_rows(self, x: Tensor) -> Tensor:
        """``[rows, ...]``: every rank's ``x [local, ...]`` concatenated in rank order (no gradient)."""
        most = max(hi - lo for lo, hi in self.bounds)
        pad = x.detach().new_zeros((most, *x.shape[1:]))
        pad[: x.shape[0]] = x.detach()
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad.contiguous())
        return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, self.bounds)])

    def splice(self, full: Tensor, local: Tensor) -> Tensor:
        """``full [rows, ...]`` with this rank's rows replaced by ``local`` (which keeps its gradient)."""
        return torch.cat([full[: self.offset], local, full[self.offset + self.local:]])

    def share(self, replicated: Tensor) -> Tensor:
        """This rank's share of a term every rank computed in full on the global batch while only its own
        rows carry gradient: value ``replicated / world`` (the shares sum to it), gradient unchanged (the
        other ranks' rows get theirs on their own ranks)."""
        return replicated - replicated.detach() * (1.0 - 1.0 / self.world)


class LossModule(nn.Module):
    """``forward(*args, **kw) = fn(module, *args, **kw)``: lets ``DistributedDataParallel`` wrap a loss
    computed from a module's methods (the SAE losses call encode/decode/classify, not ``forward``)."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)


def wrap_ddp(module: nn.Module) -> nn.Module:
    """``DistributedDataParallel(module)`` on this rank's device (broadcasts rank 0's parameters)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ctx = context()
    ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return DDP(module, device_ids=ids)


class RankFailure(RuntimeError):
    """This rank failed, or a collective failed because another rank died or timed out."""


def run_ranked(fn: Callable[[], int], *, timeout: Optional[datetime.timedelta] = None) -> int:
    """Join the job (:func:`init_from_env`), run ``fn()``, leave the group; returns ``fn``'s exit code.

    On an exception, the error is re-raised as :class:`RankFailure` naming this rank, so the job log says
    which rank failed first (torchrun then stops the others; on other nodes, their next collective fails
    within the timeout and names its own rank as a follower).
    """
    ctx = init_from_env(timeout=timeout)
    try:
        rc = fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised with the rank in the message
        if not ctx.enabled or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        t = (timeout or default_timeout()).total_seconds()
        collective = isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in str(exc).lower() or (
            "nccl" in str(exc).lower())
        why = (f"a collective failed or timed out (timeout {t:.0f} s): another rank has probably failed, see "
               "the first failing rank in the log" if collective else "it raised")
        raise RankFailure(f"rank {ctx.rank} of {ctx.world_size} stopped: {why}: "
                          f"{type(exc).__name__}: {exc}") from exc
    shutdown()
    return rc
