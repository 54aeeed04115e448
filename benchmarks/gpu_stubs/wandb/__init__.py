"""Import-time stand-in for ``wandb`` on the device machine, where benchmarks/gpu_session.sh puts this
folder on PYTHONPATH after the carried wheels.

sae-lens imports wandb when it is imported (its config and trainer modules), but the benchmark only builds
a TopK SAE and runs its training forward pass: nothing is logged. The real wandb wheel and what it pulls
in (OpenTelemetry, pydantic) are ~25 MB of the 64 MiB a device call may carry, so this module stands in.
Any attribute resolves to a placeholder, and calling one raises, so a code path that really logs fails
loudly instead of silently doing nothing. Never on the path of the package or its tests.
"""
from __future__ import annotations

__version__ = "0.0.0+concept_ext-stub"


class _Unavailable:
    """Placeholder for any wandb attribute; using it raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Unavailable":
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"wandb.{self._name} called: this is the benchmark's import stub, not wandb")

    def __mro_entries__(self, bases):  # lets `class X(wandb.Something)` define, as an empty base
        return (object,)


def __getattr__(name: str) -> _Unavailable:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable(name)
