"""The card's charts, drawn with matplotlib's object API (Agg, no pyplot, no display)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from laion_assets.pipeline.card.stats import (
    AESTHETIC_BIN,
    LENGTH_BINS,
    PROBABILITY_BIN,
    SIMILARITY_BIN,
    SIZE_BIN,
    SIZE_BINS,
    Bins,
    CardStats,
    Counts,
    ScoreStats,
)
from laion_assets.pipeline.markdown import shorten

if TYPE_CHECKING:  # matplotlib is imported when a card is drawn: half a second off every run's start
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# figures


def render_figures(stats: CardStats) -> dict[str, bytes]:
    """The charts as PNG bytes, by file name."""
    figures = {
        "similarity.png": _similarity_histogram(stats),
        "image_sizes.png": _size_histogram(stats),
        "nsfw.png": _bar_chart(stats.nsfw, "NSFW tags of the pairs", "pairs"),
        "licenses.png": _bar_chart(stats.licenses, "Licences of the pairs", "pairs"),
    }
    if stats.recaptions:
        recaptions = stats.recaptions
        figures["recaption_scores.png"] = _two_histograms(
            recaptions.score_bins,
            SIMILARITY_BIN,
            "CLIP score of each recaptioned pair's web caption and new caption",
            "cosine similarity with the image",
        )
        figures["caption_lengths.png"] = _two_histograms(
            recaptions.length_bins, 1, "Caption lengths", f"words ({LENGTH_BINS - 1} and up in one bin)"
        )
    if stats.scores:
        figures["scores.png"] = _score_histograms(stats.scores)
        figures["languages.png"] = _bar_chart(stats.scores.languages, "Languages of the captions", "images")
    return figures


def _axes() -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    # a bare Figure draws with Agg and never touches pyplot or a display
    figure = Figure(figsize=(7, 4), layout="constrained")
    return figure, figure.subplots()


def _png(figure: Figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100, metadata={"Software": None})
    return out.getvalue()


def _similarity_histogram(stats: CardStats) -> bytes:
    figure, ax = _axes()
    starts = np.array([b for b, _ in stats.similarity_bins], float) * SIMILARITY_BIN
    ax.bar(starts, [n for _, n in stats.similarity_bins], SIMILARITY_BIN, align="edge")
    thresholds = stats.thresholds()
    for threshold in thresholds:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"min_similarity = {threshold:g}")
    if thresholds:
        ax.legend()
    ax.set(
        title="CLIP similarity of every embedded image and its caption",
        xlabel="cosine similarity",
        ylabel="images",
    )
    return _png(figure)


def _size_histogram(stats: CardStats) -> bytes:
    figure, ax = _axes()
    shown = 1 + max((b for bins in stats.size_bins.values() for b, _ in bins), default=0)
    for column, bins in stats.size_bins.items():
        counts = np.zeros(shown, int)
        for b, n in bins:
            counts[b] = n
        ax.stairs(counts, np.arange(shown + 1) * SIZE_BIN, label=column.removeprefix("original_"))
    ax.legend()
    ax.set(
        title="Original sizes of the downloaded images",
        xlabel=f"pixels, in bins of {SIZE_BIN} ({SIZE_BIN * (SIZE_BINS - 1)} and up in one)",
        ylabel="images",
    )
    return _png(figure)


def _score_histograms(scores: ScoreStats) -> bytes:
    """A histogram per quality score, side by side; an empty axis says where a score was not computed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.5, 3.5), layout="constrained")
    labels = {
        "punsafe": ("punsafe", PROBABILITY_BIN),
        "pwatermark": ("pwatermark", PROBABILITY_BIN),
        "aesthetic": ("aesthetic (1-10)", AESTHETIC_BIN),
    }
    for ax, (column, (label, width)) in zip(figure.subplots(1, 3), labels.items(), strict=True):
        bins = scores.bins[column]
        starts = np.array([b for b, _ in bins], float) * width
        ax.bar(starts, [n for _, n in bins], width, align="edge")
        ax.set(title=label if bins else f"{label}: not computed", xlabel=label, ylabel="images")
    figure.suptitle("Quality scores of the scored images")
    return _png(figure)


def _bar_chart(counts: Counts, title: str, xlabel: str) -> bytes:
    figure, ax = _axes()
    ax.barh([shorten(name, 48) for name, _ in reversed(counts)], [n for _, n in reversed(counts)])
    ax.set(title=title, xlabel=xlabel)
    return _png(figure)


def _two_histograms(bins: dict[str, Bins], width: float, title: str, xlabel: str) -> bytes:
    """The web caption's and the new caption's histograms (`org_*` and `re_*`), as outlines on one axis."""
    figure, ax = _axes()
    labels = {"org": "web caption (org_caption)", "re": "new caption (re_caption)"}
    first = min((b for counts in bins.values() for b, _ in counts), default=0)
    last = max((b for counts in bins.values() for b, _ in counts), default=0)
    for column, counts in bins.items():
        heights = np.zeros(last - first + 1, int)
        for b, n in counts:
            heights[b - first] = n
        edges = (np.arange(last - first + 2) + first) * width
        ax.stairs(heights, edges, label=labels[column.split("_", 1)[0]])
    ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel="pairs")
    return _png(figure)
