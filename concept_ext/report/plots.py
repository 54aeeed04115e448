"""Figures of the run report (matplotlib, Agg backend): SentenceSim curves, activation-rate histograms,
class x concept heat maps, decoder PCA and per-concept TF-IDF word clouds (method.md 6.6-6.8).

Every function takes plain Python lists (the JSON content of ``metrics.json``), writes one PNG at
``DPI`` and returns its path. Writes are atomic (temp name + ``os.replace``). Word clouds are drawn with
plain matplotlib text (no ``wordcloud`` dependency): font size grows with the TF-IDF weight and words are
placed on an Archimedean spiral, largest first, so the layout is deterministic.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: the report is built on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.patheffects  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "DPI",
    "method_color",
    "plot_sentence_sim",
    "plot_act_rate_hist",
    "plot_class_heatmap",
    "plot_decoder_pca",
    "plot_wordcloud",
]

DPI = 110
"""Resolution of every report figure."""

# One fixed colour per method so that a method looks the same in every figure.
_METHOD_COLORS = {
    "ICA": "#1f77b4",
    "ConceptSHAP": "#ff7f0e",
    "HI-Concept": "#2ca02c",
    "SAE": "#9467bd",
    "ClassifSAE": "#d62728",
}
_CLASS_CMAP = "tab10"


def method_color(name: str) -> str:
    """The colour of a method in every report figure (a stable fallback for unknown names)."""
    if name in _METHOD_COLORS:
        return _METHOD_COLORS[name]
    palette = plt.get_cmap("Dark2").colors
    return matplotlib.colors.to_hex(palette[sum(map(ord, name)) % len(palette)])


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def _finite(xs: Sequence[Optional[float]]) -> np.ndarray:
    arr = np.asarray([np.nan if x is None else float(x) for x in xs], dtype=np.float64)
    return arr[np.isfinite(arr)]


def plot_sentence_sim(
    path: Path,
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    *,
    baseline: Optional[float] = None,
    title: str = "SentenceSim(k)",
) -> Path:
    """SentenceSim(k) of every method in one plot (``curves``: name -> (ks, values)); the dataset-wide
    mean pairwise cosine as a dashed line. A ``None`` value (undefined: no pair shares exactly k concepts)
    is a gap in its curve, never a point at 0."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    all_k: set[int] = set()
    for name, (ks, vals) in curves.items():
        # NaN breaks the line, so the points on either side of an undefined k are not joined.
        pts = [(int(k), float("nan") if v is None else float(v)) for k, v in zip(ks, vals)]
        if all(v != v for _, v in pts):
            continue
        all_k.update(k for k, v in pts if v == v)
        ax.plot(*zip(*pts), marker="o", lw=2, color=method_color(name), label=name)
    if baseline is not None:
        ax.axhline(float(baseline), ls="--", color="0.35", lw=1.5, label=f"cosine baseline ({baseline:.3f})")
    if all_k:
        ax.set_xticks(sorted(all_k))
    ax.set_xlabel("k = number of shared top concepts")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_act_rate_hist(
    path: Path,
    rates: Mapping[str, Sequence[float]],
    *,
    values: Optional[Mapping[str, Sequence[Sequence[float]]]] = None,
    labels: Optional[Mapping[str, Sequence[str]]] = None,
) -> Path:
    """One row per method: the histogram of its per-concept activation rates (percent) and, when
    ``values`` has the method, a box plot of the sampled non-zero activation values of each concept
    (x labels from ``labels``, e.g. the concept ids)."""
    values = {k: v for k, v in (values or {}).items() if v}
    names = list(dict.fromkeys([*rates, *values]))
    n_cols = 2 if values else 1
    fig, axes = plt.subplots(len(names), n_cols, figsize=(5.2 * n_cols, 2.3 * len(names) + 0.6),
                             squeeze=False)
    for row, name in enumerate(names):
        color = method_color(name)
        ax = axes[row, 0]
        r = _finite(rates.get(name, []))
        if r.size:
            ax.hist(r, bins=np.linspace(0, 100, 21), color=color, alpha=0.8, edgecolor="white")
            ax.axvline(r.mean(), color="k", ls="--", lw=1)
            ax.set_title(f"mean {r.mean():.1f}% (dashed), |F| = {r.size}", fontsize=8, loc="right")
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        else:
            ax.text(0.5, 0.5, "no activation rates", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 100)
        ax.set_ylabel(f"{name}\n#concepts")
        if row == len(names) - 1:
            ax.set_xlabel("activation rate (% of test sentences)")
        if n_cols == 2:
            _value_panel(axes[row, 1], values.get(name), (labels or {}).get(name), color=color,
                         last=row == len(names) - 1)
    fig.suptitle("Per-concept activation rates" + (" and activation values" if values else ""))
    fig.tight_layout()
    return _save(fig, path)


def _value_panel(ax, per_concept: Optional[Sequence[Sequence[float]]], labels: Optional[Sequence[str]], *,
                 color: str, last: bool) -> None:
    if not per_concept:
        ax.text(0.5, 0.5, "no activation sample", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    cols = [_finite(v) for v in per_concept]
    active = [c[np.abs(c) > 1e-6] for c in cols]  # method.md 6.2: |z| > 1e-6 is "active"
    n_total = sum(c.size for c in cols)
    n_zero = n_total - sum(a.size for a in active)
    pos = [j for j, a in enumerate(active) if a.size]
    if pos:
        box = ax.boxplot([active[j] for j in pos], positions=pos, widths=0.6, showfliers=False,
                         patch_artist=True, medianprops={"color": "k"})
        for patch in box["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.6)
    ticks = list(labels or [])[: len(cols)] + [f"#{j}" for j in range(len(labels or []), len(cols))]
    ax.set_xticks(range(len(cols)), ticks, rotation=60 if len(cols) > 10 else 0, fontsize=7)
    ax.set_xlim(-0.7, len(cols) - 0.3)
    ax.set_title(f"{100.0 * n_zero / max(n_total, 1):.0f}% of the sampled values are 0 (not shown)",
                 fontsize=8, loc="right")
    ax.set_ylabel("activation (non-zero)")
    ax.grid(axis="y", alpha=0.3)
    if last:
        ax.set_xlabel("selected concept")


def plot_class_heatmap(
    path: Path,
    means: Sequence[Sequence[float]],  # [C][|F|]
    *,
    class_names: Sequence[str],
    concept_labels: Sequence[str],
    segmentation: Optional[Sequence[Optional[int]]] = None,
    title: str = "",
) -> Path:
    """Class x concept mean-activation heat map; the cell of each concept's class segment is boxed."""
    m = np.asarray([[np.nan if v is None else float(v) for v in row] for row in means], dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"means must be a non-empty [C][|F|] table, got shape {m.shape}")
    n_cls, n_f = m.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.55 * n_f, 16), 1.6 + 0.55 * n_cls))
    # Concepts live on different scales: colour each column relative to its largest |mean| so that the
    # class a concept prefers stands out; the printed numbers stay raw.
    scale = np.nanmax(np.abs(m), axis=0, initial=0.0)  # [|F|]
    colour = m / np.where(scale > 0, scale, 1.0)
    signed = bool(np.nanmin(m) < 0)
    if signed:  # ICA sources are signed: a diverging map centred on 0
        im = ax.imshow(colour, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    else:
        im = ax.imshow(colour, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    if n_f * n_cls <= 200:  # numbers only where they stay legible
        for c in range(n_cls):
            for f in range(n_f):
                if np.isfinite(m[c, f]):
                    r, g, b, _ = im.cmap(im.norm(colour[c, f]))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # perceived luminance of the cell
                    ax.text(f, c, f"{m[c, f]:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    for f, c in enumerate(segmentation or []):
        if c is not None and 0 <= int(c) < n_cls:
            ax.add_patch(plt.Rectangle((f - 0.5, int(c) - 0.5), 1, 1, fill=False, ec="k", lw=2))
    names = [str(c) for c in class_names][:n_cls]
    ax.set_yticks(range(n_cls), names + [f"class {i}" for i in range(len(names), n_cls)])
    ticks = [str(t) for t in concept_labels][:n_f] + [f"#{j}" for j in range(len(concept_labels), n_f)]
    ax.set_xticks(range(n_f), ticks, rotation=60 if max(map(len, ticks)) * n_f > 60 else 0, fontsize=8)
    ax.set_xlabel("selected concept (boxed: its class segment)")
    ax.set_title(title or "Mean activation per class")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="mean activation\n/ max |mean| of the concept")
    fig.tight_layout()
    return _save(fig, path)


def plot_decoder_pca(
    path: Path,
    coords: Sequence[Sequence[float]],  # [m][2]
    *,
    selected: Sequence[int],
    segmentation: Optional[Sequence[Optional[int]]] = None,
    class_names: Sequence[str] = (),
    title: str = "",
) -> Path:
    """2-D PCA of all decoder directions (grey); selected concepts coloured by class segment and labelled."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(7.6, 5.2))
    ax.scatter(xy[:, 0], xy[:, 1], s=6, color="0.75", label=f"all {len(xy)} directions", zorder=1)
    cmap = plt.get_cmap(_CLASS_CMAP)
    seg = list(segmentation or [])
    shown: set = set()
    for pos, j in enumerate(selected):
        if not 0 <= int(j) < len(xy):
            continue
        c = seg[pos] if pos < len(seg) else None
        name = (class_names[c] if c is not None and c < len(class_names) else f"class {c}") if c is not None \
            else "selected"
        color = cmap(int(c) % 10) if c is not None else "k"
        ax.scatter(*xy[int(j)], s=46, color=color, edgecolor="k", zorder=3,
                   label=None if name in shown else name)
        shown.add(name)
        ax.annotate(str(int(j)), xy[int(j)], xytext=(4, 4), textcoords="offset points", fontsize=8, zorder=4,
                    path_effects=[matplotlib.patheffects.withStroke(linewidth=2.5, foreground="white")])
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "Decoder directions (PCA)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _spiral_layout(sizes: Sequence[tuple[float, float]], width: float, height: float) -> list:
    """Centres (pixels) for boxes ``sizes`` placed largest-first on an Archimedean spiral without overlap;
    None for a box that does not fit."""
    placed: list[tuple[float, float, float, float]] = []
    out: list = []
    pad = 2.0
    for w, h in sizes:
        spot = None
        for step in range(4000):
            t = 0.35 * step
            x = width / 2 + 2.2 * t * math.cos(t)
            y = height / 2 + 1.4 * t * math.sin(t)  # flatter spiral: the canvas is wider than tall
            box = (x - w / 2 - pad, y - h / 2 - pad, x + w / 2 + pad, y + h / 2 + pad)
            if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
                if 2.2 * t > width:
                    break
                continue
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in placed):
                spot = (x, y)
                placed.append(box)
                break
        out.append(spot)
    return out


def plot_wordcloud(
    path: Path,
    terms: Sequence[str],
    weights: Sequence[float],
    *,
    title: str = "",
    max_terms: int = 20,
    min_size: float = 9.0,
    max_size: float = 30.0,
) -> Path:
    """A word cloud of a concept's top TF-IDF terms: font size linear in weight / max weight."""
    # Phrase tokens come joined by "_" (method.md 6.7): show them as words.
    pairs = [(str(t).replace("_", " "), float(w)) for t, w in zip(terms, weights)
             if w is not None and math.isfinite(float(w))]
    pairs = sorted(pairs, key=lambda p: (-p[1], p[0]))[:max_terms]
    fig = plt.figure(figsize=(4.8, 2.9))
    ax = fig.add_axes((0, 0, 1, 0.88))
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.suptitle(title, fontsize=10, y=0.97)
    if not pairs:
        ax.text(0.5, 0.5, "no TF-IDF terms", ha="center", va="center", color="0.4", fontsize=12)
        return _save(fig, path)
    top = max(w for _, w in pairs) or 1.0
    lo = min(w for _, w in pairs)
    cmap = plt.get_cmap("viridis")
    renderer = fig.canvas.get_renderer()
    bbox = ax.get_window_extent(renderer)
    texts, sizes = [], []
    for term, w in pairs:
        frac = max(w, 0.0) / top
        txt = ax.text(0.5, 0.5, term, fontsize=min_size + (max_size - min_size) * frac, ha="center",
                      va="center", color=cmap(0.85 * (1 - (w - lo) / ((top - lo) or 1))),
                      fontweight="bold" if frac > 0.6 else "normal", parse_math=False)
        ext = txt.get_window_extent(renderer)
        texts.append(txt)
        sizes.append((ext.width, ext.height))
    for txt, spot in zip(texts, _spiral_layout(sizes, bbox.width, bbox.height)):
        if spot is None:
            txt.remove()  # no room left: drop the lightest terms rather than overlap
        else:
            txt.set_position((spot[0] / bbox.width, spot[1] / bbox.height))
    return _save(fig, path)
