"""The dataset card: a Hugging Face README.md with figures, describing every materialised shard.

`stats` gathers the numbers, `figures` draws the charts, `grid` the sample images, `readme` writes the
markdown. The card is the same for the same stored data (provenance timestamps are part of that data).
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from laion_assets.pipeline.card.figures import render_figures
from laion_assets.pipeline.card.grid import sample_grid
from laion_assets.pipeline.card.readme import render_markdown
from laion_assets.pipeline.card.settings import CardSettings
from laion_assets.pipeline.card.stats import gather_stats
from laion_assets.pipeline.storage import CARD, CARD_FIGURES, DatasetStore

__all__ = ["CardResult", "CardSettings", "write_card"]


UI_FIGURE_WIDTH = 720  # px: a figure's width in the UI's markdown dialog


@dataclass
class CardResult:
    markdown: str
    ui_markdown: str  # the card as the UI shows it (`card_for_ui`)
    readme: str  # path under the root
    figures: list[str]  # paths under the root
    shards: int
    pairs: int
    crawl_rows: int
    downloaded: int


def write_card(store: DatasetStore, settings: CardSettings | None = None) -> CardResult:
    """Write `card/figures/<figure>-<hash>.png`, then `card/README.md`, under the store's root; then
    remove the figures it does not link.

    A figure's name is its content's: the README's write switches the card to its figures at once, the
    old README's staying in place until then, so a run killed before it leaves the old card whole (and
    figures no card links, which the next run removes)."""
    settings = settings or CardSettings()
    stats = gather_stats(store, settings)
    figures = {**render_figures(stats), "samples.png": sample_grid(store, stats.samples)}
    files = {name: _content_name(name, png) for name, png in figures.items()}
    for name, png in figures.items():
        store.write_bytes(f"{CARD_FIGURES}/{files[name]}", png)
    markdown = render_markdown(stats, settings, files)
    store.write_bytes(CARD, markdown.encode())
    for stored in store.list(CARD_FIGURES):  # an earlier card's, or a killed run's
        if stored.name not in files.values():
            store.remove(f"{CARD_FIGURES}/{stored.name}")
    return CardResult(
        markdown=markdown,
        ui_markdown=card_for_ui(markdown, {files[name]: png for name, png in figures.items()}),
        readme=CARD,
        figures=[f"{CARD_FIGURES}/{file}" for file in files.values()],
        shards=len(stats.shards),
        pairs=stats.pairs,
        crawl_rows=stats.crawl_rows,
        downloaded=stats.downloaded,
    )


def _content_name(name: str, png: bytes) -> str:
    """`similarity.png` as `similarity-<12 hex digits of its SHA-256>.png`."""
    stem, _, suffix = name.rpartition(".")
    return f"{stem}-{hashlib.sha256(png).hexdigest()[:12]}.{suffix}"


def card_for_ui(markdown: str, figures: dict[str, bytes]) -> str:
    """The card for Dagster's metadata dialog: without the YAML front matter, which it shows as a garbled
    paragraph, and with each figure inside it as a data URL at most `UI_FIGURE_WIDTH` px wide, since
    the dialog has no folder to resolve `figures/` against. The card on disk stays the Hub's."""
    body = markdown.split("\n---\n", 1)[1].lstrip("\n") if markdown.startswith("---\n") else markdown
    for name, png in figures.items():
        body = body.replace(f"](figures/{name})", f"]({_ui_image(png)})")
    return body


def _ui_image(png: bytes) -> str:
    """A figure as a data URL no wider than `UI_FIGURE_WIDTH`: PNG, or JPEG where that is smaller (the
    sample grid's photos, a tenth of their PNG)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > UI_FIGURE_WIDTH:
        height = round(image.height * UI_FIGURE_WIDTH / image.width)
        image = image.resize((UI_FIGURE_WIDTH, height), Image.Resampling.LANCZOS)
    encoded = {}
    for fmt, options in (("png", {"optimize": True}), ("jpeg", {"quality": 85})):
        out = io.BytesIO()
        image.save(out, fmt.upper(), **options)
        encoded[fmt] = out.getvalue()
    fmt = min(encoded, key=lambda f: len(encoded[f]))
    return f"data:image/{fmt};base64,{base64.b64encode(encoded[fmt]).decode()}"
