"""Build the CUDA sources (``csrc/cuda``) as a CPU library that runs them under an emulator.

CI has no GPU, yet the CUDA kernels hold most of the package's index arithmetic, barriers and radix
selects. This tool compiles the *same* ``.cu`` files with the host C++ compiler against
``csrc/emu/cuda_runtime.h`` (fiber-emulated threads, barriers and warp collectives; its header comment
gives the model and its limits) and registers every CUDA kernel of ``csrc/cuda/register.cu`` under the
``concept_ext_emu`` op namespace for CPU tensors. ``tests/test_cuda_emulated.py`` checks them against
the plain-PyTorch references on fresh random inputs.

The translation is textual and small, and each rewrite must match (a source change that breaks one
fails the build loudly instead of emulating something else):

* ``kernel<tmpl>\\s*<<<cfg>>>(args)`` -> ``::emu::launch("kernel", kernel<tmpl>, {cfg}, args)``;
* each ``__shared__`` declaration gets ``::emu::shared_region(&name, sizeof(name))`` after it (poisoned once
  per block);
* the CUDA-only host calls (current stream, device guard, the is-a-CUDA-tensor check) -> host stand-ins;
* ``register.cu``'s ``(concept_ext, CUDA, m)`` -> ``(concept_ext_emu, CPU, m)``.

Usage: ``python tools/cuda_emulate.py [--jobs N]`` builds (cached by source hash) and prints the library
path; ``load()`` builds, loads and defines the ``concept_ext_emu`` schemas for tests.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = ROOT / "csrc" / "emu"
BUILD_DIR = ROOT / "build" / "emu"
NAMESPACE = "concept_ext_emu"
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020a000000000000"  # as in setup.py

# (pattern, replacement, files it must match in): the host-side rewrites.
HOST_REWRITES = [
    (r"\baoti_torch_get_current_cuda_stream\(", "::emu::current_stream_shim(", {"common.cuh"}),
    (r"torch::stable::accelerator::DeviceGuard\b", "::emu::DeviceGuard", None),
    (r"\bcheck_cuda\(", "::concept_ext::check_cpu(", None),
    (r"STABLE_TORCH_LIBRARY_IMPL\(concept_ext, CUDA, m\)", f"STABLE_TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)",
     {"register.cu"}),
]


class TranslateError(RuntimeError):
    """A CUDA source uses a construct the emulator's translation does not handle."""


def _matching(text: str, i: int, open_c: str, close_c: str, step: int) -> int:
    """Index of the bracket matching text[i] (scanning forward for step=1, backward for step=-1)."""
    depth = 0
    while 0 <= i < len(text):
        c = text[i]
        if c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
        if depth == 0:
            return i
        i += step
    raise TranslateError(f"unbalanced {open_c}{close_c}")


def translate_launches(text: str, name: str) -> tuple[str, int]:
    """Rewrite every ``kernel<<<cfg>>>(args)`` of ``text``; returns (new text, number rewritten)."""
    out, pos, count = [], 0, 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out), count
        # The kernel expression ends just before <<< (maybe after whitespace) and may carry <template args>.
        j = start - 1
        while text[j].isspace():
            j -= 1
        end_expr = j + 1
        if text[j] == ">":
            j = _matching(text, j, ">", "<", -1) - 1
        while j >= 0 and (text[j].isalnum() or text[j] in "_:"):
            j -= 1
        k_begin = j + 1
        kernel = text[k_begin:end_expr]
        kname = re.match(r"[\w:]+", kernel)
        if not kname:
            raise TranslateError(f"{name}: cannot find the kernel before <<< at offset {start}")
        cfg_end = text.find(">>>", start)
        cfg = text[start + 3 : cfg_end]
        a0 = cfg_end + 3
        while text[a0].isspace():
            a0 += 1
        if text[a0] != "(":
            raise TranslateError(f"{name}: expected ( after >>> for {kernel}")
        a1 = _matching(text, a0, "(", ")", 1)
        args = text[a0 + 1 : a1].strip()
        out.append(text[pos:k_begin])
        call = f'::emu::launch("{kname.group(0)}", {kernel}, ::emu::Config{{{cfg}}}' + (f", {args})" if args else ")")
        # Keep the line count, so that #line (below) makes diagnostics point into the original file.
        out.append(call + "\n" * (text.count("\n", k_begin, a1 + 1) - call.count("\n")))
        pos = a1 + 1
        count += 1


def translate(src: Path) -> str:
    """The emulator form of one CUDA source file."""
    text = src.read_text()
    text, _ = translate_launches(text, src.name)
    # Every __shared__ declaration is followed (on its line) by a call that poisons it once per block.
    decls = len(re.findall(r"^\s*__shared__\b", text, flags=re.M))
    text, n = re.subn(r"^(\s*__shared__\s+[^;/]*?\b(\w+)\s*((?:\[[^\]]*\])*)\s*;)",
                      r"\1 ::emu::shared_region(&\2, sizeof(\2));", text, flags=re.M)
    if n != decls:
        raise TranslateError(f"{src.name}: {decls} __shared__ declarations, {n} understood (one per line, please)")
    text = f'#line 1 "{src}"\n' + text
    for pattern, repl, must in HOST_REWRITES:
        text, n = re.subn(pattern, repl, text)
        if must and src.name in must and n == 0:
            raise TranslateError(f"{src.name}: expected to rewrite {pattern!r}, found nothing to rewrite")
    if "<<<" in text or re.search(r"\bextern\s+__shared__", text):
        raise TranslateError(f"{src.name}: a launch or dynamic shared memory was left untranslated")
    return text


def _sources() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh"))


def _fingerprint(flags: list[str], sources: list[Path]) -> str:
    h = hashlib.sha256()
    files = sources + sorted(EMU_DIR.glob("*")) + sorted((ROOT / "csrc" / "include").rglob("*.h"))
    for p in files + [Path(__file__)]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    import torch

    h.update(torch.__version__.encode())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]


def _flags() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension

    inc = [f"-I{BUILD_DIR / 'src'}", f"-I{EMU_DIR}", f"-I{ROOT / 'csrc' / 'include'}"]
    inc += [f"-I{p}" for p in cpp_extension.include_paths()]
    cxx = ["-std=c++20", "-O1", "-g0", "-fPIC", "-fvisibility=hidden", TORCH_TARGET, "-DCONCEPT_EXT_EMULATE",
           # 64 KiB of encode scratch: test inputs with m ~ 1000 run through several row chunks.
           "-DCONCEPT_EXT_TOPK_SCRATCH_BYTES=65536",
           "-Wno-unknown-pragmas"] + inc
    libdirs = cpp_extension.library_paths()
    link = ["-shared"] + [f"-L{p}" for p in libdirs] + [f"-Wl,-rpath,{p}" for p in libdirs]
    link += ["-ltorch_cpu", "-lc10"]
    return cxx, link


def asan_requested() -> bool:
    """True when ``CONCEPT_EXT_EMU_ASAN=1``: build and load the AddressSanitizer variant."""
    return os.environ.get("CONCEPT_EXT_EMU_ASAN", "0") == "1"


def asan_runtime() -> str | None:
    """The LD_PRELOAD value that runs the ASan variant in an uninstrumented Python; None if unavailable.

    libstdc++ is preloaded too: ASan resolves its ``__cxa_throw`` interceptor at start-up, and an
    exception thrown from the library (every clear error) aborts the process when libstdc++ was not
    loaded by then."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return None
    libs = []
    for name in ("libasan.so", "libstdc++.so.6"):
        r = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True)
        path = r.stdout.strip()
        if r.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
            return None
        libs.append(os.path.realpath(path))
    return " ".join(libs)


def build(jobs: int = 2, verbose: bool = False, asan: bool | None = None) -> Path:
    """Translate and compile csrc/cuda; returns the shared library (rebuilt only when a source changed).

    ``asan`` (default: ``asan_requested()``) compiles with AddressSanitizer, the stand-in for
    compute-sanitizer's memcheck: every kernel load and store outside a tensor's allocation is reported.
    The library must then be loaded into a process started with the ASan runtime preloaded."""
    asan = asan_requested() if asan is None else asan
    return _build(_sources(), NAMESPACE + ("_asan" if asan else ""), jobs, verbose, asan)


def build_extra(src: Path, name: str, jobs: int = 2, asan: bool | None = None) -> Path:
    """Emulator build of one stand-alone ``.cu`` file (it registers its own ops); used by the tests of
    the emulator itself."""
    asan = asan_requested() if asan is None else asan
    return _build([Path(src)], name + ("_asan" if asan else ""), jobs, False, asan)


def _build(sources: list[Path], name: str, jobs: int, verbose: bool, asan: bool = False) -> Path:
    cxx, link = _flags()
    if asan:
        cxx = cxx + ["-fsanitize=address", "-fno-omit-frame-pointer"]
        link = link + ["-fsanitize=address"]
    lib = BUILD_DIR / f"{name}-{_fingerprint(cxx + link + [str(s) for s in sources], sources)}.so"
    if lib.exists():
        return lib
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("cuda_emulate: no C++ compiler (c++ or g++, or $CXX) found")
    src_dir = BUILD_DIR / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for src in sources:
        dst = src_dir / src.name
        text = translate(src)
        # Concurrent builds (pytest-xdist, two checkouts' CI) never see a half-written source.
        tmp_src = dst.with_name(dst.name + f".{os.getpid()}.tmp")
        tmp_src.write_text(text)
        os.replace(tmp_src, dst)
        if src.suffix == ".cu":
            units.append(dst)
    units.append(EMU_DIR / "runtime.cpp")
    objdir = Path(tempfile.mkdtemp(dir=BUILD_DIR))

    def compile_one(unit: Path) -> Path:
        obj = objdir / (unit.stem + ".o")
        cmd = [compiler, "-x", "c++", "-c", str(unit), "-o", str(obj)] + cxx
        if verbose:
            print(" ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_emulate: compiling {unit.name} failed:\n{r.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objs = list(pool.map(compile_one, units))
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run([compiler, *map(str, objs), "-o", str(tmp), *link], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuda_emulate: linking failed:\n{r.stderr[-6000:]}")
    os.replace(tmp, lib)  # atomic: a concurrent or interrupted build never leaves a half-written library
    for old in BUILD_DIR.glob(f"{name}-*.so"):
        if old != lib:
            old.unlink(missing_ok=True)
    shutil.rmtree(objdir, ignore_errors=True)
    return lib


_loaded: Path | None = None
_schemas = None  # the concept_ext_emu schema registration, kept alive while the library is loaded


def load(jobs: int = 2):
    """Build if needed, load the library, define the ``concept_ext_emu`` schemas; returns its op namespace.

    The schemas are ``concept_ext.ops``'s own, so the emulated kernels take exactly the arguments of the
    real ones. Only CPU kernels are registered (there are no fake or autograd kernels).
    """
    global _loaded, _schemas
    import torch

    from concept_ext import ops

    if _loaded is None:
        lib = build(jobs=jobs)
        frag = torch.library.Library(NAMESPACE, "DEF")
        for schema in ops._SCHEMAS.values():
            frag.define(schema)
        _schemas = frag
        torch.ops.load_library(str(lib))
        _loaded = lib
    return getattr(torch.ops, NAMESPACE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--asan", action="store_true", help="the AddressSanitizer variant")
    a = p.parse_args(argv)
    print(build(jobs=a.jobs, verbose=a.verbose, asan=a.asan or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
