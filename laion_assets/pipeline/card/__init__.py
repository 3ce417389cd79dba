"""The dataset card: a Hugging Face README.md with figures, describing every materialised shard.

`stats` gathers the numbers, `figures` draws the charts, `grid` the sample images, `readme` writes the
markdown. The card is the same for the same stored data (provenance timestamps are part of that data).
"""

from __future__ import annotations

import base64
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
    """Write `card/README.md` and `card/figures/*.png` under the store's root (figures first)."""
    settings = settings or CardSettings()
    stats = gather_stats(store, settings)
    figures = {**render_figures(stats), "samples.png": sample_grid(store, stats.samples)}
    paths = []
    for name, png in figures.items():
        paths.append(f"{CARD_FIGURES}/{name}")
        store.write_bytes(paths[-1], png)
    markdown = render_markdown(stats, settings, list(figures))
    store.write_bytes(CARD, markdown.encode())
    return CardResult(
        markdown=markdown,
        ui_markdown=card_for_ui(markdown, figures),
        readme=CARD,
        figures=paths,
        shards=len(stats.shards),
        pairs=stats.pairs,
        crawl_rows=stats.crawl_rows,
        downloaded=stats.downloaded,
    )


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
