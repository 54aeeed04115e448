"""A non-editable install works from another folder (issue 23, done-when): a wheel built from the source
tree, installed into an empty target folder, imports every public name of ``import concept_ext`` and every
module of the package, and runs ``python -m concept_ext info``. The test run from the checkout cannot see a
subpackage left out of the wheel; this one fails on it.

The wheel is built without the compiled extension (``CONCEPT_EXT_NO_EXTENSION=1``, setup.py) so that no
compile runs: packaging, not kernels, is checked here (the ops then serve from the reference)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in the installed environment: the package comes from the target folder, every public name resolves,
# and every module of the source tree (argv[2]: the expected list) imports.
CHECK = """
import importlib, json, sys
import concept_ext
target = sys.argv[1]
assert concept_ext.__file__.startswith(target), concept_ext.__file__
for name in concept_ext.__all__:
    getattr(concept_ext, name)
for mod in json.loads(sys.argv[2]):
    importlib.import_module(mod)
print("ok", len(concept_ext.__all__))
"""


def _source_modules() -> list[str]:
    """Every module of the source tree's package, dotted (``concept_ext.sae.trainer``)."""
    mods = []
    for path in sorted((ROOT / "concept_ext").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if rel.name != "__main__":
            mods.append(".".join(parts))
    return mods


@pytest.mark.slow  # about a minute on the 2-core machine under load (pip wheel + pip install + imports)
def test_wheel_install_imports_every_module_from_another_folder(tmp_path):
    import json

    src = tmp_path / "src"  # a clean copy: the build writes build/ and *.egg-info next to setup.py
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "concept_ext", src / "concept_ext",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", ".built", "_build_info.json"))
    env = dict(os.environ, CONCEPT_EXT_NO_EXTENSION="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    # The wheel is built without the extension (no compile here), so the fallback must be allowed in it.
    env.pop("CONCEPT_EXT_REQUIRE_KERNELS", None)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, env=env, cwd=tmp_path, timeout=600)
    (wheel,) = wheels.glob("concept_ext-*.whl")
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: only the target folder provides concept_ext
    elsewhere.mkdir()
    run_env = dict(env, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", CHECK, str(target), json.dumps(_source_modules())],
                         capture_output=True, text=True, env=run_env, cwd=elsewhere, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-4000:]
    info = subprocess.run([sys.executable, "-m", "concept_ext", "info"], capture_output=True, text=True,
                          env=run_env, cwd=elsewhere, timeout=600)
    assert info.returncode == 0 and "topk_encode" in info.stdout, info.stdout + info.stderr[-4000:]
