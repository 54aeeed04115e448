"""tools/publish_results.py: publishing a finished run and rebuilding the README's Results block."""
from __future__ import annotations

import importlib.util
import json
import shutil
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("publish_results", ROOT / "tools" / "publish_results.py")
publish_results = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(publish_results)


def _fake_run(tmp_path: Path) -> Path:
    """A finished run folder made from a committed result (metrics.json has the pipeline's schema)."""
    src = ROOT / "results" / "minilm-sst2"
    if not (src / "metrics.json").is_file():
        pytest.skip("no committed results/minilm-sst2")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(src / "metrics.json", run / "metrics.json")
    (run / "metrics.json").chmod(0o600)  # as the run's atomic writer used to leave it
    (run / "report.md").write_text("# report\n")
    (run / "figures").mkdir()
    (run / "figures" / "a.png").write_bytes(b"png")
    return run


def test_publish_and_readme_block(tmp_path):
    run = _fake_run(tmp_path)
    dest = publish_results.publish(run, tmp_path / "results", suffix="variant")
    assert dest.name == "minilm-sst2-variant"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "figures", "machine.json", "metrics.json",
                                                      "report.md"]
    assert stat.S_IMODE(dest.joinpath("metrics.json").stat().st_mode) == 0o644
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["dataset"].endswith("sst2")
    # Publishing again replaces the folder (no .old or temporary folders left).
    publish_results.publish(run, tmp_path / "results", suffix="variant")
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["minilm-sst2-variant"]

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{publish_results.BEGIN}\nstale\n{publish_results.END}\nreading stays\n")
    publish_results.rebuild_readme(readme, tmp_path / "results")
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("reading stays\n")
    block = text.split(publish_results.BEGIN)[1].split(publish_results.END)[0]
    assert "#### minilm-sst2-variant" in block
    for row in ("| RAcc |", "| Δf_cond (a) paper |", "| ConceptSim (weighted) |", "| SentenceSim(4) |", "Wall-clock per stage"):
        assert row in block
    assert "| SAE | ClassifSAE |" in block  # every method of the run is a column


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no block\n")
    with pytest.raises(ValueError, match="block"):
        publish_results.rebuild_readme(readme, tmp_path)


def test_unfinished_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        publish_results.publish(tmp_path, tmp_path / "results")
