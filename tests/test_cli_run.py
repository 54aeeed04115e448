"""A whole tiny run through the CLI as the README writes it (issue 22): ``python -m concept_ext run --config
FILE --out DIR`` is interrupted with Ctrl-C (SIGINT) while fitting, exits 130 with a short message, and the
same command then finishes the run without redoing the finished stages (item 6). The finished run's tables
print undefined numbers as "—" with a footnote (item 4). Copies of it with a corrupted checkpoint, manifest
or stage record are refused with the file named and the stage is redone (item 6)."""
from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from cli import SHARED, popen_cli, run_cli, tiny_config

from concept_ext.runstate import read_record

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared not present")]


def _interrupt_when(proc, marker: str, lines: list[str], *, deadline_s: float = 600) -> bool:
    """Read the process's stderr; send SIGINT once a line holds ``marker``. True when it was sent."""
    sent = threading.Event()

    def reader():
        for line in proc.stderr:
            lines.append(line)
            if marker in line and not sent.is_set():
                proc.send_signal(signal.SIGINT)
                sent.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    proc.wait(timeout=deadline_s)
    t.join(timeout=10)
    return sent.is_set()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """Run 1: Ctrl-C while the plain SAE fits. Run 2: the same command, to the end."""
    tmp = tmp_path_factory.mktemp("cli_run")
    cfg, out = tiny_config(tmp), tmp / "out"
    args = ["run", "--config", cfg, "--out", out, "--quiet"]
    lines: list[str] = []
    proc = popen_cli(args)
    sent = _interrupt_when(proc, "stage fit/SAE-s42: running", lines)
    first = {"returncode": proc.returncode, "stderr": "".join(lines), "sent": sent}
    before = {name: read_record(out / name) for name in ("finetune", "cache", "fit/ICA-s42")}
    first["sae_record"] = read_record(out / "fit/SAE-s42")
    t0 = time.perf_counter()
    second = run_cli(args)
    return {"out": out, "first": first, "before": before, "second": second, "seconds": time.perf_counter() - t0}


def test_ctrl_c_exits_130_and_the_rerun_resumes(cli_run):
    first, second, out = cli_run["first"], cli_run["second"], cli_run["out"]
    assert first["sent"], "the run never reached the SAE fit"
    assert first["returncode"] == 130, first["stderr"][-2000:]
    assert "Traceback" not in first["stderr"], first["stderr"][-2000:]
    assert "interrupted: finished stages are kept" in first["stderr"]
    assert first["sae_record"] is None, "the interrupted stage must not be recorded as finished"
    assert second.returncode == 0, second.stderr[-3000:]
    for name, rec in cli_run["before"].items():
        assert rec is not None, f"{name} finished before the interruption"
        assert read_record(out / name).finished_at == rec.finished_at, f"{name} was redone after Ctrl-C"
    assert (out / "report.md").is_file() and read_record(out / "fit/SAE-s42") is not None


def _table_rows(report: str, title: str) -> dict[str, list[str]]:
    """The rows (name -> cells) of the first table after the heading ``title``."""
    body = report.split(title, 1)[1]
    rows = {}
    for line in body.splitlines()[2:]:
        if line.startswith("| metric") or line.startswith("|---"):
            continue
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def test_undefined_sentence_sim_is_a_dash_with_a_footnote(cli_run):
    out = cli_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    rows = _table_rows(report, "## Interpretability")
    names = list(metrics["methods"])
    undefined = 0
    for col, name in enumerate(names):
        ss = metrics["methods"][name]["interpret"]["sentence_sim"]
        for i, k in enumerate(ss["k"]):
            cellv = rows[f"SentenceSim({k})"][col]
            if ss["n_pairs"][i] == 0:
                undefined += 1
                assert ss["sentence_sim"][i] == 0.0, "metrics.json keeps the reference's value"
                assert f"interpret.sentence_sim.sentence_sim.{i}" in metrics["methods"][name]["undefined"]
                note = re.fullmatch(r"—<sup>(\d+)</sup>", cellv)
                assert note, f"{name} SentenceSim({k}) has no pair but prints {cellv!r}"
                assert re.search(rf"<sup>{note.group(1)}</sup> n/a: SentenceSim\({k}\): no two test sentences",
                                 report)
            else:
                assert cellv == f"{ss['sentence_sim'][i]:.3f}", f"{name} SentenceSim({k})"
    assert undefined, "the tiny run has methods with fewer than 4 concepts: some SentenceSim(k) has no pair"


def test_undefined_sentence_sim_is_a_gap_in_the_plot(cli_run, tmp_path, monkeypatch):
    from concept_ext.report import markdown, plots

    metrics = json.loads((cli_run["out"] / "metrics.json").read_text())
    seen = {}
    monkeypatch.setattr(plots, "plot_sentence_sim", lambda path, curves, **kw: seen.update(curves))
    markdown.global_figures(metrics, tmp_path)
    for name, (ks, vals) in seen.items():
        pairs = metrics["methods"][name]["interpret"]["sentence_sim"]["n_pairs"]
        assert [v is None for v in vals] == [c == 0 for c in pairs], name


def _no_traceback(res) -> None:
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.mark.parametrize("target,command,stage", [
    ("fit/ClassifSAE-s42/sae/sae.safetensors", "train", "fit/ClassifSAE-s42"),
    ("fit/ICA-s42/concepts/concepts.safetensors", "train", "fit/ICA-s42"),
    ("cache/test/cache.json", "cache", "cache"),
    ("finetune/stage.json", "finetune", "finetune"),
])
def test_corrupted_file_is_named_and_its_stage_redone(cli_run, tmp_path, target, command, stage):
    run = tmp_path / "run"
    shutil.copytree(cli_run["out"], run)
    before = read_record(run / stage)
    garbage = b"\x00garbage, not what the stage wrote\x00" * 8
    (run / target).write_bytes(garbage)
    if target.endswith("sae.safetensors"):  # explain reads it: refused with the file named, no traceback
        if not (run / "config.json").is_file():  # the CLI's run wrote none before issue 22 item 1
            (run / "config.json").write_text(json.dumps(json.loads((run / "metrics.json").read_text())["run"]["config"]))
        res = run_cli(["explain", "--run", run, "Stocks fell on Wall Street."])
        assert res.returncode == 1 and "sae.safetensors" in res.stderr, res.stderr[-3000:]
        _no_traceback(res)
    res = run_cli([command, "--config", tiny_config(tmp_path), "--out", run, "--quiet"])
    assert res.returncode == 0, res.stderr[-3000:]
    _no_traceback(res)
    assert str(run / target) in res.stderr, f"the warning must name {target}: {res.stderr[-3000:]}"
    after = read_record(run / stage)
    assert after is not None and after.finished_at != before.finished_at, f"{stage} was not redone"
    assert (run / target).read_bytes() != garbage, "the corrupted file must be rewritten"


def test_unwritable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = run_cli(["run", "--config", tiny_config(tmp_path), "--out", blocker / "run", "--quiet"])
    assert res.returncode == 1
    _no_traceback(res)
    assert "error (NotADirectoryError)" in res.stderr and "writable folder" in res.stderr


def test_disk_full_leaves_nothing_a_rerun_trusts(tmp_path):
    out, cfg = tmp_path / "out", tiny_config(tmp_path)
    res = run_cli(["finetune", "--config", cfg, "--out", out, "--quiet"], max_file_bytes=1 << 20)
    assert res.returncode == 1, res.stderr[-3000:]
    _no_traceback(res)
    assert "writable folder with free space" in res.stderr, res.stderr[-3000:]
    assert read_record(out / "finetune") is None and not (out / "finetune" / "model").exists()
    res = run_cli(["finetune", "--config", cfg, "--out", out, "--quiet"])  # space freed: the stage is redone
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_record(out / "finetune") is not None


def test_term_overlap_is_reported_per_method(cli_run):
    """Item 5: each method's concept terms are the contrast ranking, and metrics.json and report.md give the
    mean pairwise overlap of the concepts' top-10 terms, beside the plain TF-IDF ranking's."""
    from concept_ext.metrics.text import term_overlap

    out = cli_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = _table_rows((out / "report.md").read_text(), "## Interpretability")
    checked = 0
    for col, (name, m) in enumerate(metrics["methods"].items()):
        tf, ov = m["interpret"].get("tfidf"), m["interpret"].get("term_overlap")
        if tf is None:
            continue
        assert tf["ranking"] == "contrast", name
        assert ov["jaccard"] == term_overlap(tf["terms"]).jaccard and ov["top"] == 10, name
        for row, key in (("term overlap (top-10 Jaccard)", "jaccard"),
                         ("term overlap, plain TF-IDF ranking", "jaccard_tfidf")):
            cellv = rows[row][col]
            if ov[key] is None:
                assert cellv.startswith("—<sup>"), (name, row, cellv)
            else:
                assert cellv == f"{ov[key]:.3f}", (name, row, cellv)
                checked += 1
    assert checked, "no method with two concepts with terms in the tiny run"
    both = [m["interpret"]["term_overlap"] for m in metrics["methods"].values()
            if (m["interpret"].get("term_overlap") or {}).get("jaccard") is not None]
    mean = lambda key: sum(o[key] for o in both) / len(both)  # noqa: E731
    assert mean("jaccard") <= mean("jaccard_tfidf"), both  # the contrast ranking tells concepts apart better
