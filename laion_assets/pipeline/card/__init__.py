"""The dataset card: a Hugging Face README.md with figures, describing every materialised shard.

`stats` gathers the numbers, `figures` draws the charts, `grid` the sample images, `readme` writes the
markdown. The card is the same for the same stored data (provenance timestamps are part of that data).
"""

from __future__ import annotations

from dataclasses import dataclass

from laion_assets.pipeline.card.figures import render_figures
from laion_assets.pipeline.card.grid import sample_grid
from laion_assets.pipeline.card.readme import render_markdown
from laion_assets.pipeline.card.settings import CardSettings
from laion_assets.pipeline.card.stats import gather_stats
from laion_assets.pipeline.storage import CARD, CARD_FIGURES, DatasetStore

__all__ = ["CardResult", "CardSettings", "write_card"]


@dataclass
class CardResult:
    markdown: str
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
        readme=CARD,
        figures=paths,
        shards=len(stats.shards),
        pairs=stats.pairs,
        crawl_rows=stats.crawl_rows,
        downloaded=stats.downloaded,
    )
