"""benchmarks/gpu_session.sh, the one-call script of a GPU session, run here without a GPU: its phase
bookkeeping, logs, time budget and refusal of unknown phases. A broken script would waste the few minutes
of device time a task gets, so the shell logic is checked where it costs nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _run(tmp_path: Path, *phases: str, total: int = 300) -> subprocess.CompletedProcess:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    smi = fake_bin / "nvidia-smi"  # the card's name is all the script asks of it
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\n")
    smi.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TOTAL_LIMIT=str(total),
               PATH=f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", str(SCRIPT), *phases], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


def test_phases_log_and_summarise(tmp_path):
    r = _run(tmp_path, "facts", "test")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.split("== summary")[-1]
    assert "facts: rc 0" in summary and "test: rc 0" in summary
    out = tmp_path / "out"
    assert "NVIDIA H100" in (out / "facts.log").read_text()
    assert "passed" in (out / "test.log").read_text()  # the sanitizer driver's CPU tests ran
    assert (out / "_build_info.json").exists()


def test_total_limit_skips_what_cannot_fit(tmp_path):
    r = _run(tmp_path, "facts", "bench", total=10)
    assert r.returncode == 1
    assert "facts: skipped" in r.stdout and "bench: skipped" in r.stdout


def test_unknown_phase_is_refused(tmp_path):
    r = _run(tmp_path, "benchh")
    assert r.returncode == 2 and "unknown phase benchh" in r.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="the script targets the Linux device machine")
def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
