"""Compile-check every CUDA source (``csrc/cuda/*.cu``) with ``nvcc -c``, no CUDA build of torch needed.

The kernels include only stable-ABI headers (design.md section 4), which the CPU wheel ships, so CPU CI
can prove that the CUDA sources compile for Hopper even though it can neither link nor run them. Each
file is compiled for ``sm_90a`` and for plain ``compute_90 -> sm_90`` in one nvcc call (one front-end
pass for both targets), at most two nvcc processes at a time (CI has two cores). Host code is compiled
at -O0: this is a compile check, and the device code still goes through ptxas at its default -O3, so
register/shared-memory limits are still checked. Prints one line per file with the time taken; exits
non-zero on any failure and 0 with a message when nvcc is absent.

Usage: ``python tools/nvcc_check.py [--jobs N] [files...]``
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020a000000000000"  # stable ABI of torch 2.10, as in setup.py
ARCHS = {
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
    "sm_90": "-gencode=arch=compute_90,code=sm_90",
}


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, then $PATH, then /usr/local/cuda/bin."""
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        cands.append(Path(which))
    cands.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def torch_includes() -> list[str]:
    """Header folders of the installed torch (the CPU wheel ships the stable-ABI headers)."""
    from torch.utils import cpp_extension

    return list(cpp_extension.include_paths())


def compile_one(nvcc: str, src: Path, archs: list[str], includes: list[str], outdir: str) -> tuple[bool, float, str]:
    """Compile one file for the given archs; returns (ok, seconds, compiler output)."""
    obj = os.path.join(outdir, f"{src.stem}.o")
    cmd = [
        nvcc, "-c", str(src), "-o", obj,
        "-std=c++20", "-DUSE_CUDA", TORCH_TARGET, "--expt-relaxed-constexpr",
        *[ARCHS[a] for a in archs], "-Xcompiler", "-fPIC", "-Xcompiler", "-O0",
        "-I", str(ROOT / "csrc" / "include"),
    ]
    for inc in includes:
        cmd += ["-I", inc]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, time.perf_counter() - t0, (proc.stdout + proc.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="sources to check (default: csrc/cuda/*.cu)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="arch(s) to check (default both)")
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc-check: nvcc not found (set CUDA_HOME or put nvcc on PATH); skipping the CUDA compile check")
        return 0
    try:
        includes = torch_includes()
    except ImportError as e:  # pragma: no cover - make test installs torch first
        print(f"nvcc-check: cannot import torch ({e}); skipping")
        return 0
    files = [Path(f).resolve() for f in args.files] or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not files:
        print("nvcc-check: no .cu files found")
        return 0
    archs = args.arch or ["sm_90a", "sm_90"]
    label = ",".join(archs)
    print(f"nvcc-check: {nvcc}, {len(files)} file(s) for {label}, {max(1, args.jobs)} job(s)")
    failures = 0
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="concept_ext_nvcc_") as outdir, ThreadPoolExecutor(
        max_workers=max(1, args.jobs)
    ) as pool:
        futures = [(f, pool.submit(compile_one, nvcc, f, archs, includes, outdir)) for f in files]
        for f, fut in futures:
            ok, secs, out = fut.result()
            rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
            print(f"  {'OK  ' if ok else 'FAIL'} {rel} [{label}] {secs:.1f} s", flush=True)
            if not ok:
                failures += 1
                print(out)
    print(f"nvcc-check: {len(files) - failures}/{len(files)} passed in {time.perf_counter() - t_all:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
