"""Fetch the wheels that the GPU benchmark's peers need on the device machine into ``.whl/`` (git-ignored).

The device machine reaches no package index, so the peers of ``benchmarks/run_gpu.py`` (eai-sparsify,
sae-lens) travel as wheels named in the call's ``carry``; ``benchmarks/gpu_session.sh`` installs them
into /tmp/site. Its image already holds PyTorch, transformers and most of the scientific stack
(``IMAGE`` below, from the device library's KINDS.md package list, 2026-11-17), so only the rest of each
peer's dependency closure is fetched: starting from the pinned peers, every ``Requires-Dist`` (extras
and markers evaluated for CPython 3.12 on Linux) that is neither in the image nor fetched already is
downloaded with ``pip download --no-deps`` for that platform (a source-only one is built here into a
pure-Python wheel), then its own requirements are read.

    python tools/gpu_wheels.py                 # -> .whl/*.whl, and the list of what was fetched and why
    python tools/gpu_wheels.py --check         # only report the closure of what .whl/ already holds

Exits non-zero if a requirement cannot be fetched, or if the wheels exceed the carry budget (64 MiB for
the whole working tree, of which the wheels may take ``--budget-mib``).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The peers of the GPU benchmark, pinned as in pyproject's ``peers`` extra.
PEERS = ["eai-sparsify==1.3.3", "sae-lens==6.54.12"]

#: Python distributions in the device image (normalised names), KINDS.md 2026-11-17.
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

#: Requirements not fetched (with their own requirements): what the benchmark's imports never load.
#: Measured 2026-12-04 by importing ``sparsify.fused_encoder`` and ``sae_lens.saes.topk_sae`` (and running
#: both peers' adapters in benchmarks/peers.py) in a venv holding only these wheels on top of torch and
#: transformers: none of the packages below was in ``sys.modules``, except wandb, which sae-lens imports
#: at import time but the benchmark never calls; benchmarks/gpu_stubs/wandb stands in for it (the real
#: one and its OpenTelemetry/pydantic closure are ~25 MB of the 64 MiB a device call may carry).
EXCLUDE = {"wandb": "stubbed: benchmarks/gpu_stubs/wandb", "plotly": "not imported", "plotly-express": "not imported",
           "nltk": "not imported", "babe": "not imported", "python-dotenv": "not imported",
           "tenacity": "not imported", "typeguard": "not imported", "beartype": "not imported",
           "fancy-einsum": "not imported", "transformers-stream-generator": "not imported"}

PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 *[a for n in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                               "manylinux2014_x86_64", "manylinux1_x86_64", "any")
                   for a in ("--platform", n)]]
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional requirements for the device's Python (``Requires-Dist`` lines)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(MARKER_ENV):
            out.append(str(req))
    return out


def wheel_name(wheel: Path) -> str:
    return norm(wheel.name.split("-")[0])


def fetch(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` one requirement for the device platform; returns the wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            # a source-only distribution: build its wheel here; kept only if pure Python (py3-none-any),
            # since a compiled one built on this machine would not match the device's Python
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, spec]
            built = subprocess.run(cmd, capture_output=True, text=True)
            pure = list(Path(tmp).glob("*-py3-none-any.whl")) + list(Path(tmp).glob("*-py2.py3-none-any.whl"))
            if built.returncode != 0 or not pure:
                raise RuntimeError(f"pip download {spec!r} failed and no pure-Python wheel could be built: "
                                   f"{proc.stderr.strip()[-400:]} {built.stderr.strip()[-300:]}")
        (whl,) = Path(tmp).glob("*.whl")
        target = dest / whl.name
        whl.replace(target)
        return target


def main(argv: list[str] | None = None) -> int:
    from packaging.requirements import Requirement

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--check", action="store_true", help="fetch nothing; report missing requirements")
    ap.add_argument("--budget-mib", type=float, default=24.0,
                    help="most MiB the wheels may take (the rest of the 64 MiB carries the working tree)")
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for w in args.dest.glob("*.whl"):  # one version of each, and nothing excluded: pip refuses duplicates
        if wheel_name(w) in EXCLUDE:
            w.unlink()
    have = {wheel_name(w): w for w in args.dest.glob("*.whl")}
    queue = list(PEERS)
    why: dict[str, str] = {norm(Requirement(p).name): "peer" for p in PEERS}
    missing = []
    while queue:
        spec = queue.pop(0)
        name = norm(Requirement(spec).name)
        if (name in IMAGE or name in EXCLUDE) and why.get(name) != "peer":
            continue
        if name not in have:
            if args.check:
                missing.append(f"{spec} (needed by {why.get(name)})")
                continue
            try:
                have[name] = fetch(spec, args.dest)
            except RuntimeError as exc:
                missing.append(str(exc))
                continue
            print(f"fetched {have[name].name:<60} for {why.get(name)}")
        for req in requirements(have[name]):
            rname = norm(Requirement(req).name)
            if rname not in why:
                why[rname] = name
                queue.append(req)
    size = sum(w.stat().st_size for w in have.values()) / 2**20
    print(f"{len(have)} wheels, {size:.1f} MiB in {args.dest}")
    for m in missing:
        print("MISSING", m)
    if size > args.budget_mib:
        print(f"over the budget of {args.budget_mib} MiB: the call's carry would not fit")
        return 1
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
