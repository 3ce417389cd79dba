"""The dataset card: a Hugging Face README.md with figures, describing every materialised shard.

Counts come from DuckDB over the catalog views; the funnel, the rules' settings and the provenance from
each pairs parquet's file metadata; the CLIP model from each embeddings parquet's file metadata.
The card is the same for the same stored data (provenance timestamps are part of that data).
"""

from __future__ import annotations

import io
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import duckdb
import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from laion_assets.pipeline import catalog, schemas
from laion_assets.pipeline.pairs import FUNNEL, stored_pair_shards
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import DatasetStore

README = "card/README.md"
FIGURES = "card/figures"
DATA_FILES = "pairs/*.parquet"  # relative to the dataset root, which is what gets uploaded
TASK_CATEGORIES = ("image-to-text", "text-to-image", "zero-shot-image-classification")

SIMILARITY_BIN = 0.01
SIZE_BIN, SIZE_BINS = 64, 64  # pixels per bin, bins; the last bin holds all larger sizes too
GRID_CELL, GRID_COLUMNS, CAPTION_LINES, CAPTION_CHARS = 192, 4, 3, 30

DEFAULT_DESCRIPTION = (
    "Image-text pairs in the style of LAION-400M: images and the alt text found with them in web crawls, "
    "downloaded, embedded with CLIP, and kept where the image and its caption agree (CLIP cosine "
    "similarity at or above a threshold), deduplicated and tagged for NSFW content."
)

# LAION-400M's features (TFDS `laion400m`), with this project's key, stored size and hash.
FEATURE_DESCRIPTIONS = {
    "key": "`<shard>-<row:08d>`: the join key across all layers and the sample name in `pairs/<shard>.tar`",
    "caption": "the alt text (or the source list's caption) found with the image",
    "url": "where the image was downloaded from",
    "license": "the licence the crawl found for the image (e.g. a Creative Commons URL); null if none",
    "nsfw": "UNLIKELY, UNSURE or NSFW from CLIP zero-shot against NSFW categories (LAION's rule); UNTAGGED",
    "original_height": "height of the image as downloaded, in pixels",
    "original_width": "width of the image as downloaded, in pixels",
    "similarity": "cosine similarity of the CLIP image and text embeddings",
    "width": "width of the stored (resized) image in `pairs/<shard>.tar`",
    "height": "height of the stored (resized) image in `pairs/<shard>.tar`",
    "sha256": "SHA-256 of the downloaded bytes",
}

LAION_400M_BIBTEX = """@article{schuhmann2021laion400m,
  title = {LAION-400M: Open Dataset of CLIP-Filtered 400 Million Image-Text Pairs},
  author = {Schuhmann, Christoph and Vencu, Richard and Beaumont, Romain and Kaczmarczyk, Robert and
            Mullis, Clayton and Katta, Aarush and Coombes, Theo and Jitsev, Jenia and Komatsuzaki, Aran},
  journal = {arXiv preprint arXiv:2111.02114},
  year = {2021}
}"""

_SIZE_CATEGORIES = (
    (10**3, "n<1K"),
    (10**4, "1K<n<10K"),
    (10**5, "10K<n<100K"),
    (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"),
    (10**8, "10M<n<100M"),
    (10**9, "100M<n<1B"),
    (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"),
    (10**12, "100B<n<1T"),
)


@dataclass(frozen=True)
class CardSettings:
    pretty_name: str = "LAION-style image-text pairs"
    # The licence of the card's YAML header, for the metadata (urls, captions, scores): the images are
    # not covered by it, each keeps its own rights. "other" unless you know better.
    license: str = "other"
    description: str = DEFAULT_DESCRIPTION
    authors: str = ""  # the BibTeX author field; blank leaves it out
    grid_samples: int = 12
    top_n: int = 10  # rows in the error, host and licence lists


@dataclass(frozen=True)
class ShardRecord:
    """What one shard's parquet file metadata says (None where it was not recorded)."""

    shard: str
    settings: dict | None
    funnel: dict | None  # {"rows_in": n, "removed": {rule: n}}
    provenance: dict | None
    model: tuple[str, str] | None  # (model, pretrained) of its embeddings


Counts = list[tuple[str, int]]


@dataclass
class CardStats:
    shards: list[ShardRecord]  # sorted by shard
    crawl_rows: int
    downloaded: int
    embedded: int
    pairs: int
    sources: Counts  # crawl rows by source file
    statuses: Counts  # images rows by status, every status
    top_errors: Counts
    top_hosts: Counts
    nsfw: Counts  # pairs by tag, every tag
    licenses: Counts  # pairs by licence, the top ones and then the rest together
    similarity_bins: list[tuple[int, int]]  # (bin, embedded images): bin i holds [i, i + 1) * SIMILARITY_BIN
    size_bins: dict[str, list[tuple[int, int]]]  # original_width / original_height: (bin, success images)
    samples: list[tuple[str, str]]  # (key, caption) for the grid

    def funnel(self) -> tuple[int, dict[str, int]]:
        """Rows in and rows removed by each rule, summed over the shards that recorded a funnel."""
        rows_in, removed = 0, dict.fromkeys(FUNNEL, 0)
        for record in self.shards:
            if record.funnel:
                rows_in += record.funnel["rows_in"]
                for rule, n in record.funnel["removed"].items():
                    removed[rule] = removed.get(rule, 0) + n
        return rows_in, removed

    def thresholds(self) -> list[float]:
        """The distinct `min_similarity` of the shards that filtered by threshold (not by top fraction)."""
        return sorted(
            {
                s["min_similarity"]
                for s in (r.settings for r in self.shards)
                if s and s.get("top_fraction", 0) <= 0
            }
        )


@dataclass
class CardResult:
    markdown: str
    readme: str  # path under the root
    figures: list[str]  # paths under the root
    shards: int
    pairs: int
    crawl_rows: int
    downloaded: int


def size_category(rows: int) -> str:
    """The Hugging Face `size_categories` value for a dataset of `rows` rows."""
    return next((name for bound, name in _SIZE_CATEGORIES if rows < bound), "n>1T")


def write_card(store: DatasetStore, settings: CardSettings = CardSettings()) -> CardResult:
    """Write `card/README.md` and `card/figures/*.png` under the store's root (figures first)."""
    stats = gather_stats(store, settings)
    figures = {**render_figures(stats), "samples.png": sample_grid(store, stats.samples)}
    paths = []
    for name, png in figures.items():
        paths.append(f"{FIGURES}/{name}")
        store.write_bytes(paths[-1], png)
    markdown = render_markdown(stats, settings, list(figures))
    store.write_bytes(README, markdown.encode())
    return CardResult(
        markdown=markdown,
        readme=README,
        figures=paths,
        shards=len(stats.shards),
        pairs=stats.pairs,
        crawl_rows=stats.crawl_rows,
        downloaded=stats.downloaded,
    )


# gathering


def gather_stats(store: DatasetStore, settings: CardSettings) -> CardStats:
    """Everything the card shows, from the stored shards. Raises ValueError if there are none."""
    shards = stored_pair_shards(store, "the dataset card")
    connection = catalog.connect(store)
    try:
        return _stats(connection, [_shard_record(store, shard) for shard in shards], settings)
    finally:
        connection.close()


def _stats(
    connection: duckdb.DuckDBPyConnection, shards: list[ShardRecord], settings: CardSettings
) -> CardStats:
    def rows(sql: str, *params: object) -> list[tuple]:
        return connection.execute(sql, list(params)).fetchall()

    def count(sql: str) -> int:
        return rows(sql)[0][0]

    statuses = dict(rows("SELECT status, count(*) FROM images GROUP BY 1"))
    nsfw = dict(rows("SELECT nsfw, count(*) FROM pairs GROUP BY 1"))
    licenses = rows(
        "SELECT coalesce(license, '(none)') AS license, count(*) AS n FROM pairs "
        "GROUP BY 1 ORDER BY n DESC, license"
    )
    rest = sum(n for _, n in licenses[settings.top_n :])
    size_bins = {
        column: rows(
            f"SELECT least({column} // ?, ?) AS bin, count(*) FROM images "
            f"WHERE status = ? AND {column} IS NOT NULL GROUP BY 1 ORDER BY 1",
            SIZE_BIN,
            SIZE_BINS - 1,
            schemas.SUCCESS,
        )
        for column in ("original_width", "original_height")
    }
    return CardStats(
        shards=shards,
        crawl_rows=count("SELECT count(*) FROM crawl_metadata"),
        downloaded=statuses.get(schemas.SUCCESS, 0),
        embedded=count("SELECT count(*) FROM embeddings"),
        pairs=count("SELECT count(*) FROM pairs"),
        sources=rows("SELECT source_file, count(*) FROM crawl_metadata GROUP BY 1 ORDER BY 1"),
        statuses=_in_order(statuses, schemas.STATUSES),
        # the error class is the text before the first colon, as the downloaded_images metadata has it
        top_errors=rows(
            "SELECT split_part(error_message, ':', 1) AS error, count(*) AS n FROM images "
            "WHERE error_message <> '' GROUP BY 1 ORDER BY n DESC, error LIMIT ?",
            settings.top_n,
        ),
        top_hosts=rows(
            "SELECT lower(regexp_extract(url, '^[^:/?#]+://([^/?#]*)', 1)) AS host, count(*) AS n "
            "FROM images WHERE list_contains(?, status) GROUP BY 1 ORDER BY n DESC, host LIMIT ?",
            list(schemas.FAILURES),
            settings.top_n,
        ),
        nsfw=_in_order(nsfw, schemas.NSFW_TAGS),
        licenses=licenses[: settings.top_n] + ([("(other licences)", rest)] if rest else []),
        similarity_bins=rows(
            "SELECT floor(similarity / ?)::BIGINT AS bin, count(*) FROM embeddings GROUP BY 1 ORDER BY 1",
            SIMILARITY_BIN,
        ),
        size_bins=size_bins,
        samples=rows("SELECT key, caption FROM pairs ORDER BY md5(key), key LIMIT ?", settings.grid_samples),
    )


def _in_order(counts: dict[str, int], names: tuple[str, ...]) -> Counts:
    """Every one of `names` (zero where absent), then any other name found, sorted."""
    return [(name, counts.get(name, 0)) for name in names] + sorted(
        (name, n) for name, n in counts.items() if name not in names
    )


def _shard_record(store: DatasetStore, shard: str) -> ShardRecord:
    pairs = store.parquet_metadata(store.shard_file("pairs", shard, "parquet"))
    embeddings_path = store.shard_file("embeddings", shard, "parquet")
    embeddings = store.parquet_metadata(embeddings_path) if store.exists(embeddings_path) else {}
    model = embeddings.get(schemas.EMBEDDING_MODEL)

    def loaded(key: str) -> dict | None:
        return json.loads(pairs[key]) if key in pairs else None

    return ShardRecord(
        shard=shard,
        settings=loaded(schemas.PAIRS_SETTINGS),
        funnel=loaded(schemas.PAIRS_FUNNEL),
        provenance=loaded(schemas.PROVENANCE),
        model=(model, embeddings.get(schemas.EMBEDDING_PRETRAINED, "")) if model else None,
    )


# figures


def render_figures(stats: CardStats) -> dict[str, bytes]:
    """The charts as PNG bytes, by file name."""
    return {
        "similarity.png": _similarity_histogram(stats),
        "image_sizes.png": _size_histogram(stats),
        "nsfw.png": _bar_chart(stats.nsfw, "NSFW tags of the pairs", "pairs"),
        "licenses.png": _bar_chart(stats.licenses, "Licences of the pairs", "pairs"),
    }


def _axes() -> tuple[Figure, Axes]:
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


def _bar_chart(counts: Counts, title: str, xlabel: str) -> bytes:
    figure, ax = _axes()
    ax.barh([_shorten(name, 48) for name, _ in reversed(counts)], [n for _, n in reversed(counts)])
    ax.set(title=title, xlabel=xlabel)
    return _png(figure)


def sample_grid(store: DatasetStore, samples: list[tuple[str, str]]) -> bytes:
    """A PNG montage of the samples' images from `pairs/<shard>.tar`, each with its caption under it."""
    images = _sample_images(store, [key for key, _ in samples])
    shown = [(key, caption) for key, caption in samples if key in images]
    caption_height = CAPTION_LINES * 14 + 8
    rows = max(1, math.ceil(len(shown) / GRID_COLUMNS))
    grid = Image.new("RGB", (GRID_COLUMNS * GRID_CELL, rows * (GRID_CELL + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    if not shown:
        draw.text((8, 8), "no pairs yet", fill="black", font=font)
    for i, (key, caption) in enumerate(shown):
        left, top = (i % GRID_COLUMNS) * GRID_CELL, (i // GRID_COLUMNS) * (GRID_CELL + caption_height)
        with Image.open(io.BytesIO(images[key])) as opened:
            thumb = opened.convert("RGB")
        thumb.thumbnail((GRID_CELL - 8, GRID_CELL - 8))
        grid.paste(thumb, (left + (GRID_CELL - thumb.width) // 2, top + (GRID_CELL - thumb.height) // 2))
        lines = textwrap.wrap(caption, CAPTION_CHARS) or [""]
        if len(lines) > CAPTION_LINES:
            lines = [
                *lines[: CAPTION_LINES - 1],
                _shorten(" ".join(lines[CAPTION_LINES - 1 :]), CAPTION_CHARS),
            ]
        draw.multiline_text((left + 4, top + GRID_CELL), "\n".join(lines), fill="black", font=font, spacing=2)
    out = io.BytesIO()
    grid.save(out, "PNG")
    return out.getvalue()


def _sample_images(store: DatasetStore, keys: list[str]) -> dict[str, bytes]:
    """The image bytes of `keys`, read from their shards' pairs tars (a key is `<shard>-<row>`)."""
    wanted: dict[str, set[str]] = {}
    for key in keys:
        wanted.setdefault(key.rsplit("-", 1)[0], set()).add(key)
    found: dict[str, bytes] = {}
    for shard, shard_keys in sorted(wanted.items()):
        with store.open(store.shard_file("pairs", shard, "tar")) as f:
            for key, members in read_samples(f):
                if key in shard_keys:
                    found[key] = next(data for ext, data in members.items() if ext not in ("txt", "json"))
                    if shard_keys <= found.keys():
                        break
    return found


# markdown


def render_markdown(stats: CardStats, settings: CardSettings, figures: list[str]) -> str:
    """The card: YAML front matter for the Hub, then the sections; `figures` are file names in figures/."""
    header = {
        "pretty_name": settings.pretty_name,
        "license": settings.license,
        "task_categories": list(TASK_CATEGORIES),
        "size_categories": [size_category(stats.pairs)],
        "tags": ["laion", "clip", "image-text-pairs", "webdataset"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
    }
    year = _build_year(stats.shards)
    sections = [
        f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---",
        f"# {settings.pretty_name}",
        _description(stats, settings),
        _model_and_thresholds(stats),
        _features(),
        _funnel(stats),
        _downloads(stats, settings),
        _figures(figures),
        _provenance(stats),
        "## Licence\n\n"
        f"The `license: {settings.license}` above covers the metadata (urls, captions, scores). The images "
        "are not part of it: each keeps its own copyright and licence, given in the `license` column where "
        "the crawl found one. Respect it, and the opt-outs of the sites they come from.",
        "## Citation\n\n```bibtex\n"
        f"{_dataset_bibtex(settings, year, stats.shards)}\n\n{LAION_400M_BIBTEX}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def _description(stats: CardStats, settings: CardSettings) -> str:
    sources = _table(["source file", "crawl rows"], stats.sources)
    return (
        f"## Dataset description\n\n{settings.description}\n\n"
        f"{stats.pairs} pairs from {len(stats.shards)} shards: {stats.crawl_rows} crawl rows, "
        f"{stats.downloaded} images downloaded, {stats.embedded} embedded.\n\n"
        "To publish it, upload the dataset root with this file as its `README.md` and `card/figures/` as "
        f"`figures/`: the `configs` above point at `{DATA_FILES}`, relative to the root. The same pairs, "
        "with their images, are webdataset shards in `pairs/<shard>.tar`.\n\n"
        f"### Sources\n\nEach source file is one shard.\n\n{sources}"
    )


def _model_and_thresholds(stats: CardStats) -> str:
    models = _groups(stats.shards, lambda r: r.model)
    model_rows = [
        (*(model if model else ("not recorded", "")), _shard_names(shards)) for model, shards in models
    ]
    settings_groups = _groups(
        stats.shards, lambda r: json.dumps(r.settings, sort_keys=True) if r.settings else None
    )
    names = sorted({name for key, _ in settings_groups if key for name in json.loads(key)})
    setting_rows = [
        (name, *(json.loads(key).get(name, "") if key else "not recorded" for key, _ in settings_groups))
        for name in names
    ]
    settings_header = ["setting", *(f"shards {_shard_names(shards)}" for _, shards in settings_groups)]
    return (
        "## Model and thresholds\n\n"
        "Images and captions are embedded with CLIP; a pair is kept when their cosine similarity is at least "
        "`min_similarity` (LAION-400M: 0.3 with ViT-B/32), or, with `top_fraction` > 0, when it is in that "
        "top fraction of its shard.\n\n"
        f"{_table(['CLIP model', 'pretrained', 'shards'], model_rows)}\n\n"
        f"{_table(settings_header, setting_rows)}"
    )


def _features() -> str:
    rows = [(f"`{f.name}`", str(f.type), FEATURE_DESCRIPTIONS[f.name]) for f in schemas.PAIRS]
    return (
        "## Features\n\nOne row per pair in `pairs/<shard>.parquet`, LAION-400M's columns and more.\n\n"
        f"{_table(['column', 'type', 'description'], rows)}"
    )


def _funnel(stats: CardStats) -> str:
    rows_in, removed = stats.funnel()
    remaining, rows = rows_in, [("rows in", "", rows_in)]
    for rule, n in removed.items():
        remaining -= n
        rows.append((rule, n, remaining))
    missing = [r.shard for r in stats.shards if not r.funnel]
    note = f"\n\nShards without a recorded funnel, left out: {_shard_names(missing)}." if missing else ""
    return (
        "## Filtering funnel\n\n"
        "Rows removed by each rule, in the order they apply, summed over the shards. `rows in` are the "
        f"crawl rows with a download outcome.\n\n{_table(['rule', 'removed', 'remaining'], rows)}{note}"
    )


def _downloads(stats: CardStats, settings: CardSettings) -> str:
    return (
        "## Download outcomes\n\n"
        f"{_table(['status', 'rows'], stats.statuses)}\n\n"
        f"### Top {settings.top_n} error classes\n\n{_table(['error', 'rows'], stats.top_errors)}\n\n"
        f"### Top {settings.top_n} failing hosts\n\n"
        f"Rows that failed to download or decode, by host.\n\n{_table(['host', 'rows'], stats.top_hosts)}"
    )


def _figures(figures: list[str]) -> str:
    captions = {
        "similarity.png": "CLIP similarity of every embedded image, with the threshold",
        "image_sizes.png": "Original sizes of the downloaded images",
        "nsfw.png": "NSFW tags of the pairs",
        "licenses.png": "Licences of the pairs",
        "samples.png": "Sample pairs",
    }
    return "## Figures\n\n" + "\n\n".join(f"![{captions[name]}](figures/{name})" for name in figures)


def _provenance(stats: CardStats) -> str:
    columns = ("source_file", "run_id", "materialized_at", "code_version")
    rows = [
        (r.shard, *((r.provenance or {}).get(c) or "not recorded" for c in columns)) for r in stats.shards
    ]
    return (
        "## Provenance\n\nThe Dagster run that made each shard's pairs.\n\n"
        f"{_table(['shard', 'source file', 'run id', 'materialised at (UTC)', 'code version'], rows)}"
    )


def _build_year(shards: list[ShardRecord]) -> str | None:
    """The year of the newest materialisation: the build date, from the data rather than the clock."""
    times = [r.provenance["materialized_at"] for r in shards if r.provenance]
    return max(times)[:4] if times else None


def _dataset_bibtex(settings: CardSettings, year: str | None, shards: list[ShardRecord]) -> str:
    key = re.sub(r"[^a-z0-9]+", "_", settings.pretty_name.lower()).strip("_") + (year or "")
    versions = sorted({r.provenance["code_version"] for r in shards if r.provenance})
    fields = [("title", settings.pretty_name), ("author", settings.authors), ("year", year or "")]
    fields.append(("note", f"Built with laion_assets {', '.join(versions)}".rstrip()))
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields if value)
    return f"@misc{{{key},\n{body}\n}}"


def _groups(
    shards: list[ShardRecord], value: Callable[[ShardRecord], object]
) -> list[tuple[object, list[str]]]:
    """The distinct values over the shards, each with its shards, in order of first appearance."""
    groups: dict[object, list[str]] = {}
    for record in shards:
        groups.setdefault(value(record), []).append(record.shard)
    return list(groups.items())


def _shard_names(shards: list[str], shown: int = 5) -> str:
    more = f" and {len(shards) - shown} more" if len(shards) > shown else ""
    return ", ".join(shards[:shown]) + more


def _table(header: list[str], rows: Iterable[tuple]) -> str:
    rows = list(rows)
    if not rows:
        return "none"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
