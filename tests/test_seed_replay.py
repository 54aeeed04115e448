"""Random tests are replayable: a test that draws from ``rand_gen`` prints its seed when it fails, and
``CONCEPT_EXT_TEST_SEED`` replays exactly the same draw (tests/conftest.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# A throwaway test folder that uses this suite's conftest (its fixtures and report hook) by path.
_CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("suite_conftest", {str(TESTS / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
rand_seed, rand_gen, pytest_runtest_makereport = suite.rand_seed, suite.rand_gen, suite.pytest_runtest_makereport
"""
_TEST = """
import torch

def test_draw(rand_gen):
    value = torch.rand(3, generator=rand_gen).tolist()
    assert False, f"drew {value}"
"""


def _run(tmp_path: Path, seed: str | None) -> str:
    (tmp_path / "conftest.py").write_text(_CONFTEST)
    (tmp_path / "test_draw.py").write_text(_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CONCEPT_EXT_TEST_SEED"}
    if seed is not None:
        env["CONCEPT_EXT_TEST_SEED"] = seed
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_draw.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr  # the test fails on purpose
    return res.stdout


def test_failure_prints_seed_and_the_seed_replays_the_draw(tmp_path):
    first = _run(tmp_path, None)
    found = re.search(r"seed (\d+): replay with CONCEPT_EXT_TEST_SEED=(\d+) "
                      r"python -m pytest 'test_draw.py::test_draw'", first)
    assert found and found.group(1) == found.group(2), first
    drew = re.search(r"drew \[[^\]]*\]", first).group(0)
    again = _run(tmp_path, found.group(1))
    assert drew in again, (drew, again)
    # A fresh run without the variable draws another seed (2^31 of them: equal only by a 5e-10 chance).
    other = re.search(r"replay with CONCEPT_EXT_TEST_SEED=(\d+)", _run(tmp_path, None)).group(1)
    assert other != found.group(1)
