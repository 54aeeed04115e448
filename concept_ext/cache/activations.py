"""Activation cache: one batched, length-bucketed pass per split (method.md 1.6, design.md 9).

Layout of a cache directory::

    cache.json                 manifest: key, cache_id, sizes, class names, shard list with SHA-256
    shard_00000.safetensors    h [n, D] f32, logits [n, C] f32, pred [n], label [n], truncated [n];
                               metadata["texts"] = JSON list of the texts the model saw

Shard i holds rows [i*S, (i+1)*S) of the split in file order (bucketing happens inside a shard), so
an interrupted build resumes at the first shard missing from the manifest. Every file is written under
a temporary name and moved into place (``os.replace``); the manifest is the commit point and records
each shard's SHA-256, so a half-written shard never loads. A directory whose key differs from the
request is refused (:class:`CacheKeyMismatch`).

Under torchrun each rank builds the shards ``i % world == rank`` (``distributed.owned_shards``; the shard
boundaries do not depend on the number of ranks) and records them in its own ``cache.part-<rank>.json``
(atomic, after every shard); after a barrier rank 0 merges every part into ``cache.json`` with the shards
in index order, so the directory equals a single-process build. A resumed build (any number of ranks)
counts the shards listed in the manifest and in any part file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from concept_ext import distributed
from concept_ext.classifier.backbones import load_backbone, weights_hash
from concept_ext.runstate import atomic_write_text
from concept_ext.classifier.model import Classifier
from concept_ext.config.clf import CacheConfig
from concept_ext.text.data import TextDataset, load_dataset, sha256_file

logger = logging.getLogger("concept_ext")

__all__ = ["build_cache", "load_cache", "check_finite",
           "CacheHandle", "ActivationCache", "CacheKeyMismatch", "CacheError",
           "cache_key", "spot_check"]

FORMAT_VERSION = 1
MANIFEST = "cache.json"
PART_GLOB = "cache.part-*.json"  # per-rank manifests of a distributed build (merged into cache.json)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(RuntimeError):
    """A cache is incomplete, corrupted or fails its spot check."""


def _read_manifest(path: Path) -> dict:
    """The parsed manifest; a :class:`CacheError` naming the file when it is not a JSON object."""
    try:
        man = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path}: the cache manifest is unreadable ({exc}): corrupted") from exc
    if not isinstance(man, dict) or "shards" not in man:
        raise CacheError(f"{path}: the cache manifest is not a manifest (no shard list): corrupted")
    return man


class CacheKeyMismatch(CacheError):
    """The cache on disk was built for another model / dataset / split / layer / template / dtype."""


class ActivationCache(NamedTuple):
    """A loaded split."""

    h: Tensor
    """Residual stream entering block L at the decision token [N, D] float32."""
    logits: Tensor
    """Full-model label logits o [N, C] float32."""
    pred: Tensor
    """LLM-predicted labels argmax o [N] int64."""
    label: Tensor
    """Ground-truth labels [N] int64."""
    texts: list[str]
    """The texts the model saw (template removed; method.md 9 oddity 13)."""
    class_names: list[str]
    """Prompt class names in label order."""
    meta: dict
    """The manifest (key, cache_id, sizes, shards), ``truncated`` (bool [N]: text cut by truncation) and
    ``spot_check_max_abs_err`` when a spot check ran."""


@dataclass
class CacheHandle:
    """A finished cache directory."""

    dir: Path
    """Cache directory."""
    cache_id: str
    """SHA-256 of the key."""
    key: dict
    """What the cache was built from."""
    n_rows: int
    """Rows cached."""

    def load(self, **kwargs: Any) -> ActivationCache:
        """:func:`load_cache` on this directory."""
        return load_cache(self.dir, **kwargs)


def _tokenizer_hash(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(clf: Classifier, ds: TextDataset, split: str) -> dict:
    """Everything a cached row depends on (design.md 9)."""
    p = next(clf.model.parameters())
    return {
        "format_version": FORMAT_VERSION,
        "model_id": clf.backbone.model_id,
        "family": clf.resolved.family,
        "weights_sha256": weights_hash(clf.model),
        "dtype": str(p.dtype).replace("torch.", ""),
        "layer": clf.layer,
        "position_rule": "last_prompt_token" if clf.kind == "decoder" else "cls_position_0",
        "prompt": {**dataclasses.asdict(clf.prompt), "padding_side": clf.padding_side,
                   "max_length": clf.max_length},
        "tokenizer_sha256": _tokenizer_hash(clf.tokenizer),
        "label_ids": list(clf.label_ids),
        "class_names": list(clf.class_names),
        "dataset": ds.key,
        "dataset_fingerprint": ds.fingerprint,
        "split": split,
        "n_rows": len(ds),
    }


def _diff(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _as_classifier(model_spec: Any, ds: TextDataset, layer: int | None, cfg: CacheConfig, device: str) -> Classifier:
    if isinstance(model_spec, Classifier):
        if layer is not None and layer != model_spec.layer:
            raise ValueError(f"layer={layer} but the classifier hooks layer {model_spec.layer}")
        return model_spec
    bb = load_backbone(model_spec, num_labels=len(ds.class_names), dtype=_DTYPES[cfg.dtype], device=device)
    return Classifier(bb, ds.class_names, layer=layer, prompt=cfg.prompt)


def build_cache(model_spec: Any, dataset_spec: Any, split: str, *, out_dir: str | os.PathLike,
                layer: int | None = None, batch_size: int | None = None, config: CacheConfig | None = None,
                max_rows: int | None = None, device: str = "cpu", progress: bool = False,
                max_shards: int | None = None) -> CacheHandle:
    """One pass over a split -> cache directory (resumes a partial one with the same key).

    Args:
        model_spec: a :class:`Classifier` (its layer/prompt are used) or a source for ``load_backbone``.
        dataset_spec: a :class:`TextDataset` or a spec for ``data.load_dataset``.
        split: split name (recorded in the key).
        out_dir: cache directory (created).
        layer, batch_size: override ``config.layer`` / ``config.batch_size``.
        max_rows: first rows only (part of the dataset fingerprint).
        max_shards: stop after writing this many new shards (tests of resumption; the cache stays partial).
    """
    cfg = config if config is not None else CacheConfig()
    layer = layer if layer is not None else cfg.layer
    bs = batch_size if batch_size is not None else cfg.batch_size
    ds = dataset_spec if isinstance(dataset_spec, TextDataset) else load_dataset(dataset_spec, split)
    ds = ds.subset(max_rows)
    if len(ds) == 0:
        raise ValueError(f"build_cache: dataset {ds.key}/{split} is empty")
    clf = _as_classifier(model_spec, ds, layer, cfg, device)
    key = cache_key(clf, ds, split)
    cache_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    man_path = out / MANIFEST
    S = cfg.shard_size
    n_shards = (len(ds) + S - 1) // S
    if man_path.is_file():
        man = _read_manifest(man_path)
        if man.get("cache_id") != cache_id:
            raise CacheKeyMismatch(f"{out}: holds a cache for a different request (differs in "
                                   f"{_diff(man.get('key', {}), key)}); use another out_dir or delete it")
        if man["shard_size"] != S:
            raise CacheKeyMismatch(f"{out}: shard_size {man['shard_size']} != {S}")
    else:
        man = {"format_version": FORMAT_VERSION, "cache_id": cache_id, "key": key, "n_rows": len(ds),
               "d_model": clf.d_model, "n_classes": clf.n_classes, "class_names": list(ds.class_names),
               "shard_size": S, "n_shards": n_shards, "shards": {}, "complete": False}
    ctx = distributed.context()
    if ctx.enabled:  # distributed: shards committed by any rank of an earlier run count as done
        _merge_parts(out, man)
        mine_path, mine = out / f"cache.part-{ctx.rank}.json", {}
        owned = set(distributed.owned_shards(n_shards))
    written = 0
    bar_off = not progress or not distributed.is_main()
    for i in tqdm(range(n_shards), disable=bar_off, desc=f"cache {ds.key}/{split}"):
        name = f"shard_{i:05d}.safetensors"
        entry = man["shards"].get(str(i))
        if entry is not None and (out / name).is_file():
            continue  # committed by an earlier run (its SHA-256 is checked on load)
        if ctx.enabled and i not in owned:
            continue  # another rank's shard
        if max_shards is not None and written >= max_shards:
            break
        lo, hi = i * S, min((i + 1) * S, len(ds))
        pr = clf.predict(ds.texts[lo:hi], batch_size=bs, hidden=True)
        tensors = {"h": pr.hidden.contiguous(), "logits": pr.logits.contiguous(), "pred": pr.pred.contiguous(),
                   "label": torch.as_tensor(ds.labels[lo:hi], dtype=torch.long).contiguous(),
                   "truncated": torch.as_tensor(pr.encoded.truncated, dtype=torch.uint8)}
        tmp = out / f".{name}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"texts": json.dumps(pr.encoded.seen_texts),
                                               "cache_id": cache_id, "rows": f"{lo}:{hi}"})
        os.replace(tmp, out / name)
        man["shards"][str(i)] = {"file": name, "rows": [lo, hi], "sha256": sha256_file(out / name)}
        if ctx.enabled:  # this rank's part manifest is its commit point
            mine[str(i)] = man["shards"][str(i)]
            atomic_write_text(mine_path, json.dumps({"cache_id": cache_id, "shards": mine}, indent=1))
        else:
            atomic_write_text(man_path, json.dumps(man, indent=1))
        written += 1
    if ctx.enabled:  # rank 0 merges the parts (shards in index order) once every rank is done
        distributed.barrier()
        if distributed.is_main():
            _merge_parts(out, man)
            man["shards"] = {str(i): man["shards"][str(i)] for i in sorted(map(int, man["shards"]))}
        man = distributed.broadcast_object(man)
    man["complete"] = len(man["shards"]) == n_shards
    if distributed.is_main():
        atomic_write_text(man_path, json.dumps(man, indent=1))
        for part in out.glob(PART_GLOB) if ctx.enabled else ():
            part.unlink()
    distributed.barrier()
    if man["complete"]:
        logger.info("cache %s complete: %d rows in %d shards", out, len(ds), n_shards)
    return CacheHandle(out, cache_id, key, len(ds))


def _merge_parts(out: Path, man: dict) -> None:
    """Add to ``man["shards"]`` the shards recorded in the part manifests of a distributed build whose
    files exist (parts of another cache_id are ignored)."""
    for part in sorted(out.glob(PART_GLOB)):
        try:
            data = json.loads(part.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a part is written atomically; an unreadable one is treated as absent
        if data.get("cache_id") == man["cache_id"]:
            for i, entry in data["shards"].items():
                if (out / entry["file"]).is_file():
                    man["shards"].setdefault(i, entry)


def spot_check(cache: ActivationCache, clf: Classifier, *, rows: int = 4, atol: float | None = None) -> float:
    """Re-run ``rows`` sentences with the cached h spliced in at layer L (``tail.ContextTail``) and compare
    with the stored logits. Returns the max abs error; raises :class:`CacheError` beyond tolerance."""
    from concept_ext.classifier.tail import ContextTail

    trunc = cache.meta.get("truncated")
    cand = [i for i in range(len(cache.texts)) if trunc is None or not bool(trunc[i])]
    if not cand:
        return 0.0
    step = max(1, len(cand) // rows)
    idx = cand[::step][:rows]
    ctx = ContextTail(clf, [cache.texts[i] for i in idx])
    with torch.no_grad():
        got = ctx(cache.h[idx])
    want = cache.logits[idx]
    err = float((got.cpu() - want).abs().max())
    dtype = cache.meta["key"]["dtype"]
    # fp32 recomputation differs only by summation order (~1e-7); half precision by ~1e-2 relative.
    scale = float(want.abs().max())
    tol = atol if atol is not None else (1e-5 + 1e-4 * scale if dtype == "float32" else 1e-3 + 3e-2 * scale)
    if not err <= tol:
        raise CacheError(f"spot check failed: cached h spliced at layer {clf.layer} gives logits off by {err:.3g} "
                         f"(tolerance {tol:.3g}) on rows {idx}: the cache does not belong to this model")
    return err


def check_finite(cache: ActivationCache, where: str | os.PathLike, *, split: str) -> None:
    """Raise :class:`CacheError` when the cached h [N, d] or logits [N, C] hold a NaN or inf, naming the split
    and its rows (cache rows = the split's order): every stage that loads the cache (the pipeline's fit,
    embed and evaluate) stops there, before anything is fitted or written from it."""
    for name, t in (("h", cache.h), ("logits", cache.logits)):
        bad = (~torch.isfinite(t)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (f", ... ({len(bad)} rows)" if len(bad) > 10 else "")
            text = cache.texts[bad[0]] if bad[0] < len(cache.texts) else ""
            raise CacheError(
                f"{where}: the cached {name} of the {split} split is not finite (NaN or inf) in row(s) {shown} "
                f"(row {bad[0]}: {text[:80]!r}). Check the classifier (e.g. an fp16 overflow) and the input, "
                "then rebuild the cache (--force cache).")


def load_cache(cache_dir: str | os.PathLike, *, expect_key: dict | None = None, classifier: Classifier | None = None,
               spot_check_rows: int = 4, verify: bool = True) -> ActivationCache:
    """Load a complete cache.

    Args:
        expect_key: entries the key must have (e.g. ``{"split": "test", "layer": 5}``); a mismatch raises
            :class:`CacheKeyMismatch`.
        classifier: when given, its weights hash must match the key and ``spot_check_rows`` rows are
            re-run with their cached h (:func:`spot_check`).
        verify: check each shard's SHA-256 against the manifest.
    """
    d = Path(cache_dir)
    man_path = d / MANIFEST
    if not man_path.is_file():
        raise CacheError(f"{d}: no {MANIFEST}; not a cache directory")
    man = _read_manifest(man_path)
    if not man.get("complete"):
        raise CacheError(f"{d}: incomplete cache ({len(man['shards'])}/{man['n_shards']} shards); "
                         "run build_cache again with the same arguments to resume")
    key = man["key"]
    bad = [k for k, v in (expect_key or {}).items() if key.get(k) != v]
    if bad:
        raise CacheKeyMismatch(f"{d}: key differs from the expected one in {bad}: "
                               + ", ".join(f"{k}={key.get(k)!r} (expected {expect_key[k]!r})" for k in bad))
    parts: dict[str, list] = {k: [] for k in ("h", "logits", "pred", "label", "truncated")}
    texts: list[str] = []
    for i in range(man["n_shards"]):
        entry = man["shards"][str(i)]
        path = d / entry["file"]
        if verify and sha256_file(path) != entry["sha256"]:
            raise CacheError(f"{path}: SHA-256 does not match the manifest (corrupted or half-written shard)")
        with safe_open(str(path), framework="pt") as f:
            texts += json.loads(f.metadata()["texts"])
            for k in parts:
                parts[k].append(f.get_tensor(k))
    meta = dict(man)
    meta["truncated"] = torch.cat(parts["truncated"]).bool()
    cache = ActivationCache(torch.cat(parts["h"]).float(), torch.cat(parts["logits"]).float(), torch.cat(parts["pred"]),
                            torch.cat(parts["label"]), texts, list(man["class_names"]), meta)
    check_finite(cache, d, split=key.get("split", "?"))  # before the spot check re-runs any row
    if classifier is not None:
        if weights_hash(classifier.model) != key["weights_sha256"] or classifier.layer != key["layer"]:
            raise CacheKeyMismatch(f"{d}: built for other weights or layer than the given classifier")
        if spot_check_rows > 0:
            meta["spot_check_max_abs_err"] = spot_check(cache, classifier, rows=spot_check_rows)
    return cache
