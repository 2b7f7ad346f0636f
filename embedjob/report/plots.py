"""The report's figures, drawn with matplotlib as inline SVG: no JavaScript and nothing to fetch,
so the page works offline and stays small. Text stays text (``svg.fonttype: none``), every figure
gets its own id salt (several SVGs share one HTML document), and points can carry ``<title>``
tooltips (:func:`with_titles`)."""

from __future__ import annotations

import html
import io
import re
from typing import Any, Optional, Sequence

import numpy as np

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]
_counter = [0]


def _plt():
    import matplotlib

    matplotlib.use("svg", force=True)
    import matplotlib.pyplot as plt

    return plt


def colour(i: int) -> str:
    """A palette colour for class ``i`` (grey for -1: no class)."""
    if i < 0:
        return "#c8c8c8"
    if i < len(PALETTE):
        return PALETTE[i]
    import matplotlib

    return matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](i % 20))


def to_svg(fig) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), closed afterwards."""
    import matplotlib

    plt = _plt()
    _counter[0] += 1
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"embedjob-fig{_counter[0]}",
                                "svg.id": f"fig{_counter[0]}"}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.find("<svg"):], count=1, flags=re.S)


def with_titles(svg: str, gid: str, titles: Sequence[str]) -> str:
    """Give the i-th point of the collection drawn with ``gid`` the tooltip ``titles[i]``."""
    start = svg.find(f'<g id="{gid}">')
    if start < 0:
        return svg
    defs = svg.find("</defs>", start)  # a marker drawn many times is defined once, then <use>d
    if 0 <= defs < svg.find("</g>", start):
        start = defs
    end = svg.find("</g>", start)  # points are drawn with clip_on=False: no group inside
    body = svg[start:end]
    it = iter(titles)

    def add(m: re.Match) -> str:
        t = next(it, None)
        return m.group(0) if t is None else f"{m.group(0)[:-2]}><title>{html.escape(t)}</title></{m.group(1)}>"

    return svg[:start] + re.sub(r"<(use|path)\b[^>]*/>", add, body) + svg[end:]


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


def stage_bars(stages: list[tuple[str, float]]) -> str:
    """Horizontal bars: seconds per stage."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(stages) + 0.8))
    names = [s for s, _ in stages][::-1]
    secs = [v for _, v in stages][::-1]
    ax.barh(names, secs, color=PALETTE[0])
    for y, v in enumerate(secs):
        ax.text(v, y, f" {v:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_xlim(0, max(secs + [1e-9]) * 1.2)
    _style(ax)
    return to_svg(fig)


def rolling_rate(t: np.ndarray, count: np.ndarray, window: float) -> np.ndarray:
    """Rate of a growing ``count`` over the last ``window`` seconds at each sample (encode output
    arrives a block at a time: a rate between two samples alone is all spikes)."""
    j = np.searchsorted(t, t - window, side="left")
    j = np.minimum(j, np.arange(len(t)) - 1).clip(0)
    dt = t - t[j]
    return np.where(dt > 0, (count - count[j]) / np.where(dt > 0, dt, 1.0), 0.0)


def timeline(samples: list[dict[str, Any]], spans: list[list[Any]]) -> str:
    """Documents/s and tokens/s (over a rolling window) over the run, stage spans shaded; memory below."""
    plt = _plt()
    t = np.array([s["t"] for s in samples], float)
    window = max(10.0, 0.02 * float(t[-1] - t[0]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True)
    for i, (name, a, b) in enumerate(spans):
        b = t[-1] if b is None else b
        for ax in (ax1, ax2):
            ax.axvspan(a, b, color=colour(i), alpha=0.10, lw=0)
        if b - a >= 0.04 * max(t[-1], 1e-9):  # a label that fits its span
            ax1.text((a + b) / 2, 1.0, name, transform=ax1.get_xaxis_transform(), ha="center", va="bottom",
                     fontsize=7)
    docs = np.array([s.get("docs") or 0 for s in samples], float)
    toks = np.array([s.get("tokens") or 0 for s in samples], float)
    if len(t) > 1 and docs.max() > 0:
        ax1.plot(t, rolling_rate(t, docs, window), color=PALETTE[0], label="documents/s")
        ax1b = ax1.twinx()
        ax1b.plot(t, rolling_rate(t, toks, window), color=PALETTE[1], label="tokens/s", alpha=0.8)
        ax1b.set_ylabel("tokens/s", fontsize=8, color=PALETTE[1])
        ax1b.tick_params(labelsize=8)
        ax1b.spines["top"].set_visible(False)
    ax1.set_ylabel("documents/s", fontsize=8, color=PALETTE[0])
    for key, label, c in (("driver_rss_mb", "driver RSS", PALETTE[2]), ("encoder_rss_mb", "encoder actor peak RSS", PALETTE[4])):
        ys = [s.get(key) for s in samples]
        if any(y is not None for y in ys):
            ax2.plot(t, [np.nan if y is None else y for y in ys], color=c, label=label)
    node = [s.get("node_used_mb") for s in samples]
    if any(y is not None for y in node):  # the whole node, on its own scale
        ax2b = ax2.twinx()
        ax2b.plot(t, [np.nan if y is None else y for y in node], color=PALETTE[3], ls="--", label="driver's node in use")
        ax2b.set_ylabel("node MiB", fontsize=8, color=PALETTE[3])
        ax2b.tick_params(labelsize=8)
        ax2b.spines["top"].set_visible(False)
        ax2b.legend(fontsize=7, loc="upper right", frameon=False)
    ax2.set_ylabel("process MiB", fontsize=8)
    ax2.set_xlabel("seconds since the run started", fontsize=8)
    ax2.legend(fontsize=7, loc="upper left", frameon=False)
    _style(ax1)
    _style(ax2)
    return to_svg(fig)


def topic_map(xy: np.ndarray, sizes: np.ndarray, labels: list[str]) -> str:
    """LDAvis' intertopic distance map: topics at their PCoA coordinates, area ~ prevalence."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    area = 3000 * np.asarray(sizes, float) / max(float(np.sum(sizes)), 1e-9) + 30
    sc = ax.scatter(xy[:, 0], xy[:, 1], s=area, c=[colour(i) for i in range(len(xy))], alpha=0.55,
                    edgecolors="#333333", linewidths=0.6, clip_on=False)
    sc.set_gid("topic-points")
    for i, (x, y) in enumerate(xy):
        ax.text(x, y, str(i), ha="center", va="center", fontsize=8, weight="bold")
    ax.axhline(0, color="#bbbbbb", lw=0.5)
    ax.axvline(0, color="#bbbbbb", lw=0.5)
    ax.set_xlabel("PC1", fontsize=8)
    ax.set_ylabel("PC2", fontsize=8)
    pad = max(float(np.abs(xy).max()) if len(xy) else 1.0, 1e-6) * 1.35
    ax.set_xlim(-pad, pad)
    ax.set_ylim(-pad, pad)
    ax.set_aspect("equal")
    _style(ax)
    return with_titles(to_svg(fig), "topic-points", labels)


def doc_map(xy: np.ndarray, classes: np.ndarray, class_names: list[str], titles: list[str],
            share: Optional[list[float]] = None) -> str:
    """Sampled documents at their first two principal components, coloured by class."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    cols = [colour(int(c)) for c in classes]
    sc = ax.scatter(xy[:, 0], xy[:, 1], s=9, c=cols, linewidths=0, clip_on=False)  # no clip group per point
    sc.set_gid("doc-points")
    present = sorted(set(int(c) for c in classes))
    for c in present[:20]:
        ax.scatter([], [], s=20, c=colour(c), label=class_names[c] if 0 <= c < len(class_names) else "no topic")
    if present:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    share = share or [0.0, 0.0]
    ax.set_xlabel(f"PC1 ({100 * share[0]:.0f}% of variance)", fontsize=8)
    ax.set_ylabel(f"PC2 ({100 * share[1]:.0f}% of variance)", fontsize=8)
    _style(ax)
    return with_titles(to_svg(fig), "doc-points", titles)
