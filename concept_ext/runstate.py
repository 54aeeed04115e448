"""Atomic outputs and stage bookkeeping for long runs.

A stage writes everything into a temporary sibling folder, then renames it into place and writes its
``stage.json`` record last. A stage whose record exists and whose input fingerprint matches is skipped;
an interrupted stage leaves only a ``.tmp-*`` folder, which the next run removes and redoes. Nothing a
finished stage produced is ever touched by a later failure.

The record also holds the size and SHA-256 of every file the stage wrote (:func:`output_digests`); a
stage whose files no longer match (a corrupted checkpoint or manifest, a deleted file) is not trusted
(:func:`verify_outputs` names the file) and is redone, as is a stage whose record is unreadable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_json", "dumps_json", "float32_list", "atomic_write_text", "atomic_dir", "fingerprint", "StageRecord", "read_record"]

RECORD = "stage.json"
PENDING = "stage.pending"

logger = logging.getLogger("concept_ext")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}  # order kept (fingerprints sort keys)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fingerprint(*parts: Any) -> str:
    """A stable SHA-256 (hex, 16 chars) of JSON-able parts (dataclasses, dicts, lists, scalars)."""
    blob = json.dumps(_jsonable(list(parts)), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_file_mode() -> int:
    """The permission bits ``open()`` would give a new file under the current umask (``mkstemp`` makes
    its temporary files 0600, which would leave atomically written outputs unreadable to the group)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# A JSON scalar as json.dumps writes it: number (NaN, Infinity included), null, true, false.
_SCALAR = r"(?:-?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|Infinity)|NaN|null|true|false)"
# An array of scalars, spread one item per line by indent=2.
_SCALAR_ARRAY = re.compile(r"\[\s*(" + _SCALAR + r"(?:,\s*" + _SCALAR + r")*)\s*\]")


def dumps_json(obj: Any) -> str:
    """``obj`` as indented JSON with every array of numbers (or null/booleans) on one line: the readable
    layout of indent=2 without one line per number (long per-sentence arrays made that 2-3x larger)."""
    text = json.dumps(_jsonable(obj), indent=2, default=str)
    return _SCALAR_ARRAY.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def float32_list(t: Any) -> list:
    """A float32 tensor or array as nested lists of the shortest decimals that read back as the same
    float32 values (``tolist()`` writes them as float64, with 17 digits)."""
    import numpy as np

    arr = t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)
    # numpy prints a float32 as its shortest round-trip decimal; float() of that decimal is the nearest
    # float64, whose own shortest repr is the same decimal.
    text = arr.astype(np.float32).astype(str)  # same shape, one decimal string per value
    return np.vectorize(float, otypes=[object])(text).tolist() if text.ndim else float(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (:func:`dumps_json`)."""
    atomic_write_text(path, dumps_json(obj) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``final`` in one rename.

    On an exception the temporary folder is deleted and ``final`` (if it existed) is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_tmp(folder: str | os.PathLike) -> None:
    """Remove ``.tmp-*``/``.old-*`` leftovers of interrupted writes in ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@dataclasses.dataclass
class StageRecord:
    """What a finished stage wrote about itself (``<stage dir>/stage.json``)."""

    stage: str
    """Stage name."""
    fingerprint: str
    """Fingerprint of the stage's inputs (config subset and upstream fingerprints)."""
    seconds: float
    """Wall-clock time the stage took."""
    finished_at: float = dataclasses.field(default_factory=time.time)
    """UNIX time the stage finished."""
    extra: dict = dataclasses.field(default_factory=dict)
    """Stage-specific summary (e.g. accuracy, number of rows)."""
    outputs: dict = dataclasses.field(default_factory=dict)
    """Relative path -> [size in bytes, SHA-256 hex] of every file the stage wrote (empty in records
    written before outputs were recorded: those are trusted as they are)."""


def output_digests(stage_dir: str | os.PathLike) -> dict[str, list]:
    """Size and SHA-256 of every file under ``stage_dir`` except the stage's own bookkeeping (the record,
    the pending marker, hidden temporary files), keyed by the path relative to ``stage_dir``."""
    root = Path(stage_dir)
    out: dict[str, list] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.as_posix() in (RECORD, PENDING) or any(
                part.startswith(".") for part in rel.parts):
            continue
        out[rel.as_posix()] = [path.stat().st_size, _sha256(path)]
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_outputs(stage_dir: str | os.PathLike, record: StageRecord) -> str | None:
    """None when every file the record lists is there with its size and SHA-256; else what is wrong,
    naming the file."""
    root = Path(stage_dir)
    for rel, (size, sha) in record.outputs.items():
        path = root / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when the stage finished (corrupted or truncated)"
    for rel, (size, sha) in record.outputs.items():
        if _sha256(root / rel) != sha:
            return f"{root / rel} changed since the stage finished (SHA-256 differs: corrupted)"
    return None


def read_record(stage_dir: str | os.PathLike) -> StageRecord | None:
    """The record of a finished stage, or ``None`` if it never finished or the record is unreadable (then
    a warning names the file: the stage will be redone)."""
    path = Path(stage_dir) / RECORD
    try:
        data = json.loads(path.read_text())
        return StageRecord(**{f.name: data[f.name] for f in dataclasses.fields(StageRecord) if f.name in data})
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as exc:
        logger.warning("%s is unreadable (%s: %s): the stage is not trusted and will be redone", path,
                       type(exc).__name__, exc)
        return None


def write_record(stage_dir: str | os.PathLike, record: StageRecord) -> None:
    """Write the record last: its presence means the stage's outputs are complete."""
    atomic_write_json(Path(stage_dir) / RECORD, record)
