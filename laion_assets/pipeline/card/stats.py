"""The numbers on the card: counts from DuckDB over the catalog views, the funnel, settings and provenance
from each pairs parquet's footer, the CLIP model from each embeddings parquet's footer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.card.settings import CardSettings
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.dedup.deduplicate import KINDS, NEAR_KINDS
from laion_assets.pipeline.embeddings.clip import ModelIdentity
from laion_assets.pipeline.exports.export import stored_exports
from laion_assets.pipeline.pairs.filter import FUNNEL, PairsSettings, stored_pair_shards
from laion_assets.pipeline.parallel import store_map
from laion_assets.pipeline.storage import (
    DUPLICATES,
    EMBEDDINGS,
    PAIRS,
    RECAPTIONS,
    SCORES,
    SHARD_LAYERS,
    DatasetStore,
)

if TYPE_CHECKING:
    import duckdb

SIMILARITY_BIN = 0.01
PROBABILITY_BIN = 0.02  # punsafe, pwatermark
AESTHETIC_BIN = 0.25  # on LAION's 1-10 scale
SIZE_BIN, SIZE_BINS = 64, 64  # pixels per bin, bins; the last bin holds all larger sizes too
LENGTH_BINS = 80  # caption words, one bin per length; the last holds all longer captions too
RECAP_EXAMPLES = 5
DUPLICATE_EXAMPLES = 4


@dataclass(frozen=True)
class ShardRecord:
    """What one shard's parquet file metadata says (None where it was not recorded)."""

    shard: str
    settings: dict | None  # the rules' settings as they applied: a preset's values in place, its name kept
    funnel: dict | None  # {"rows_in": n, "removed": {rule: n}}
    provenance: dict | None
    model: ModelIdentity | None  # of its embeddings
    captioner: dict | None  # of its recaptions, if it has them
    scores: dict | None  # the models of its quality scores (settings, weights), if it has them


Counts = list[tuple[str, int]]
Bins = list[tuple[int, int]]  # (bin, rows)


@dataclass
class RecapStats:
    """The recaptions against the web's captions: both scored by the pipeline's CLIP."""

    recaptioned: int  # with a new caption (the rest have re_caption_error)
    above: int  # of those, pairs whose new caption scores higher than the web's
    means: dict[str, float | None]  # {org,re}_clip_score, {org,re}_length over the recaptioned; None if none
    score_bins: dict[str, Bins]  # org_clip_score / re_clip_score, in SIMILARITY_BIN bins
    length_bins: dict[str, Bins]  # org_length / re_length, in words
    examples: list[tuple[str, str, str, float, float]]  # key, org_caption, re_caption, both scores


@dataclass
class ScoreStats:
    """The quality scores of the images scored, from the `scores` view."""

    scored: int  # rows
    bins: dict[str, Bins]  # punsafe, pwatermark (PROBABILITY_BIN), aesthetic (AESTHETIC_BIN): (bin, rows)
    means: dict[str, float | None]  # None where the score was not computed
    languages: Counts  # the top ones, then the rest together


@dataclass
class DuplicateStats:
    """Dataset-level dedup's finds, from duplicates/duplicates.parquet."""

    by_kind: Counts  # every dedup kind
    settings: dict | None  # the dataset's (its footer)
    examples: list[tuple]  # semantic: key, url, caption, duplicate_of, its url, its caption, cosine
    settings_changes: list[dict] = field(default_factory=list)  # accepted changes: {"at", "changes"}


@dataclass
class CardStats:
    """Every count and figure is over the shards that have pairs (`shards`); the shards still being built,
    with some layer but no pairs yet, are only named (`in_progress`)."""

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
    recaptions: RecapStats | None  # None until some shard has recaptions
    removals: list[tuple[str, str, str, int]]  # (reason, list, kind, keys) from the removal ledgers
    duplicates: DuplicateStats | None = None  # None until dedup has run
    scores: ScoreStats | None = None  # None until some shard has quality scores
    exports: list[dict] = field(default_factory=list)  # the manifest of each training-shards export
    in_progress: list[str] = field(default_factory=list)  # shards with some layer stored but no pairs yet

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


# gathering


def gather_stats(store: DatasetStore, settings: CardSettings) -> CardStats:
    """Everything the card shows, from the stored shards. Raises ValueError if there are none."""
    shards = stored_pair_shards(store, "the dataset card")
    connection = catalog.connect(store, shards=shards)
    try:
        records = list(store_map(lambda shard: _shard_record(store, shard), shards))
        stats = _stats(store, connection, records, settings)
    finally:
        connection.close()
    stored = {shard for layer in SHARD_LAYERS for shard in store.shards(layer)}
    stats.in_progress = sorted(stored - set(shards))
    return stats


def _stats(
    store: DatasetStore,
    connection: duckdb.DuckDBPyConnection,
    shards: list[ShardRecord],
    settings: CardSettings,
) -> CardStats:
    """One pass over each layer's files (two over pairs, for the samples): each pass groups what the card
    counts into a small table, and the card's queries read those, not the store again."""

    def rows(sql: str, *params: object) -> list[tuple]:
        return connection.execute(sql, list(params)).fetchall()

    # error_class is the downloader's own function (schemas.py), registered by connect
    connection.execute(
        "CREATE TEMP TABLE card_images AS SELECT status, "
        "CASE WHEN error_message <> '' THEN error_class(error_message) END AS error, "
        "CASE WHEN list_contains($failures, status) THEN host END AS host, "
        "CASE WHEN status = $success THEN least(original_width // $bin, $last) END AS width_bin, "
        "CASE WHEN status = $success THEN least(original_height // $bin, $last) END AS height_bin, "
        "count(*) AS n FROM images GROUP BY ALL",
        {
            "failures": list(schemas.FAILURES),
            "success": schemas.SUCCESS,
            "bin": SIZE_BIN,
            "last": SIZE_BINS - 1,
        },
    )
    statuses = dict(rows("SELECT status, sum(n)::BIGINT FROM card_images GROUP BY 1"))
    connection.execute(
        "CREATE TEMP TABLE card_pairs AS SELECT nsfw, coalesce(license, '(none)') AS license, count(*) AS n "
        "FROM pairs GROUP BY ALL"
    )
    licenses = rows("SELECT license, sum(n)::BIGINT AS n FROM card_pairs GROUP BY 1 ORDER BY n DESC, license")
    similarity_bins = rows(
        "SELECT floor(similarity / ?)::BIGINT AS bin, count(*) FROM embeddings GROUP BY 1 ORDER BY 1",
        SIMILARITY_BIN,
    )
    # a source without rows (a header-only CSV) is in no group: its shard's provenance names it
    recorded = {r.provenance.get("source_file") for r in shards if r.provenance} - {None}
    counted = dict(rows("SELECT source_file, count(*) FROM crawl_metadata GROUP BY 1"))
    sources = sorted({**dict.fromkeys(recorded, 0), **counted}.items())
    return CardStats(
        shards=shards,
        crawl_rows=sum(n for _, n in sources),
        downloaded=statuses.get(schemas.SUCCESS, 0),
        embedded=sum(n for _, n in similarity_bins),
        pairs=sum(n for _, n in licenses),
        sources=sources,
        statuses=_in_order(statuses, schemas.STATUSES),
        top_errors=rows(
            "SELECT error, sum(n)::BIGINT AS n FROM card_images WHERE error IS NOT NULL "
            "GROUP BY 1 ORDER BY n DESC, error LIMIT ?",
            settings.top_n,
        ),
        top_hosts=rows(
            "SELECT host, sum(n)::BIGINT AS n FROM card_images WHERE host IS NOT NULL "
            "GROUP BY 1 ORDER BY n DESC, host LIMIT ?",
            settings.top_n,
        ),
        nsfw=_in_order(
            dict(rows("SELECT nsfw, sum(n)::BIGINT FROM card_pairs GROUP BY 1")), schemas.NSFW_TAGS
        ),
        licenses=_top(licenses, settings.top_n, "(other licences)"),
        similarity_bins=similarity_bins,
        size_bins={
            f"original_{column}": rows(
                f"SELECT {column}_bin, sum(n)::BIGINT FROM card_images WHERE {column}_bin IS NOT NULL "
                "GROUP BY 1 ORDER BY 1"
            )
            for column in ("width", "height")
        },
        samples=rows("SELECT key, caption FROM pairs ORDER BY md5(key), key LIMIT ?", settings.grid_samples),
        recaptions=_recap_stats(connection) if RECAPTIONS.name in catalog.view_names(connection) else None,
        removals=rows(
            "SELECT reason, list, kind, count(DISTINCT key) FROM takedowns WHERE list_contains(?, shard) "
            "GROUP BY ALL ORDER BY ALL",
            [record.shard for record in shards],
        )
        if "takedowns" in catalog.view_names(connection)
        else [],
        duplicates=_duplicate_stats(store, connection)
        if catalog.DUPLICATES_VIEW in catalog.view_names(connection)
        else None,
        scores=_score_stats(connection, settings.top_n)
        if SCORES.name in catalog.view_names(connection)
        else None,
        exports=stored_exports(store),
    )


def _score_stats(connection: duckdb.DuckDBPyConnection, top_n: int) -> ScoreStats:
    """One pass over the scores into a small table of bins, then the histograms and languages from it."""
    connection.execute(
        "CREATE TEMP TABLE card_scores AS SELECT floor(punsafe / $p)::BIGINT AS punsafe_bin, "
        "floor(pwatermark / $p)::BIGINT AS pwatermark_bin, floor(aesthetic / $a)::BIGINT AS aesthetic_bin, "
        "coalesce(language, '(none)') AS language, count(*) AS n, sum(punsafe) AS punsafe_sum, "
        "sum(pwatermark) AS pwatermark_sum, sum(aesthetic) AS aesthetic_sum, count(punsafe) AS punsafe_n, "
        "count(pwatermark) AS pwatermark_n, count(aesthetic) AS aesthetic_n FROM scores GROUP BY ALL",
        {"p": PROBABILITY_BIN, "a": AESTHETIC_BIN},
    )

    def rows(sql: str) -> list[tuple]:
        return connection.execute(sql).fetchall()

    columns = ("punsafe", "pwatermark", "aesthetic")
    totals = rows(f"SELECT {', '.join(f'sum({c}_sum), sum({c}_n)' for c in columns)} FROM card_scores")[0]
    means = {
        c: totals[2 * i] / totals[2 * i + 1] if totals[2 * i + 1] else None for i, c in enumerate(columns)
    }
    languages = rows(
        "SELECT language, sum(n)::BIGINT AS n FROM card_scores GROUP BY 1 ORDER BY n DESC, language"
    )
    return ScoreStats(
        scored=sum(n for _, n in languages),
        bins={
            column: rows(
                f"SELECT {column}_bin, sum(n)::BIGINT FROM card_scores WHERE {column}_bin IS NOT NULL "
                "GROUP BY 1 ORDER BY 1"
            )
            for column in columns
        },
        means=means,
        languages=_top(languages, top_n, "(other languages)"),
    )


def _duplicate_stats(store: DatasetStore, connection: duckdb.DuckDBPyConnection) -> DuplicateStats:
    counts = dict(connection.execute("SELECT kind, count(*) FROM duplicates GROUP BY 1").fetchall())
    stored_footer = store.parquet_metadata(DUPLICATES)
    footer = stored_footer.get(names.DEDUP_SETTINGS_FOOTER)
    # a copy or its original taken down since is not shown: its url and caption are gone from images
    examples = connection.execute(
        "SELECT d.key, a.url, a.caption, d.duplicate_of, b.url, b.caption, d.cosine FROM duplicates d "
        "JOIN images a ON a.key = d.key JOIN images b ON b.key = d.duplicate_of "
        "WHERE list_contains(?, d.kind) AND a.status <> ? AND b.status <> ? "
        "ORDER BY md5(d.key), d.key LIMIT ?",
        [list(NEAR_KINDS), schemas.TAKEN_DOWN, schemas.TAKEN_DOWN, DUPLICATE_EXAMPLES],
    ).fetchall()
    return DuplicateStats(
        by_kind=[(kind, counts.get(kind, 0)) for kind in KINDS],
        settings=json.loads(footer) if footer else None,
        examples=examples,
        settings_changes=json.loads(stored_footer.get(names.SETTINGS_CHANGE_FOOTER, "[]")),
    )


def _recap_stats(connection: duckdb.DuckDBPyConnection) -> RecapStats:
    """One pass over the recaptions into a small table of scores and lengths, then the examples."""
    connection.execute(
        "CREATE TEMP TABLE card_recaptions AS SELECT re_caption IS NOT NULL AS recaptioned, "
        "coalesce(re_clip_score > org_clip_score, false) AS above, "
        "floor(org_clip_score / $bin)::BIGINT AS org_clip_score_bin, "
        "floor(re_clip_score / $bin)::BIGINT AS re_clip_score_bin, "
        "least(org_length, $last) AS org_length_bin, least(re_length, $last) AS re_length_bin, "
        "count(*) AS n, sum(org_clip_score) AS org_score_sum, sum(re_clip_score) AS re_score_sum, "
        "sum(org_length) AS org_length_sum, sum(re_length) AS re_length_sum FROM recaptions GROUP BY ALL",
        {"bin": SIMILARITY_BIN, "last": LENGTH_BINS - 1},
    )

    def rows(sql: str) -> list[tuple]:
        return connection.execute(sql).fetchall()

    recaptioned, above, *sums = rows(
        "SELECT coalesce(sum(n) FILTER (recaptioned), 0)::BIGINT, "
        "coalesce(sum(n) FILTER (above), 0)::BIGINT, "
        "sum(org_score_sum) FILTER (recaptioned), sum(re_score_sum), "
        "sum(org_length_sum) FILTER (recaptioned), sum(re_length_sum) FROM card_recaptions"
    )[0]
    names = ("org_clip_score", "re_clip_score", "org_length", "re_length")
    return RecapStats(
        recaptioned=recaptioned,
        above=above,
        means={
            name: float(sum_) / recaptioned if recaptioned else None
            for name, sum_ in zip(names, sums, strict=True)
        },
        score_bins={name: _bins(rows, name) for name in names[:2]},
        length_bins={name: _bins(rows, name) for name in names[2:]},
        examples=rows(
            "SELECT key, org_caption, re_caption, org_clip_score, re_clip_score FROM recaptions "
            f"WHERE re_caption IS NOT NULL ORDER BY md5(key), key LIMIT {RECAP_EXAMPLES}"
        ),
    )


def _bins(rows: Callable[[str], list[tuple]], column: str) -> Bins:
    return rows(
        f"SELECT {column}_bin, sum(n)::BIGINT FROM card_recaptions WHERE recaptioned GROUP BY 1 ORDER BY 1"
    )


def _top(counts: Counts, n: int, rest: str) -> Counts:
    """The first `n` of `counts` (largest first), then the others together as `rest`, where there are any."""
    others = sum(count for _, count in counts[n:])
    return counts[:n] + ([(rest, others)] if others else [])


def _in_order(counts: dict[str, int], order: tuple[str, ...]) -> Counts:
    """Every one of `order` (zero where absent), then any other name found, sorted."""
    return [(name, counts.get(name, 0)) for name in order] + sorted(
        (name, n) for name, n in counts.items() if name not in order
    )


def _shard_record(store: DatasetStore, shard: str) -> ShardRecord:
    pairs = store.parquet_metadata(PAIRS.parquet(shard))
    try:
        embeddings = store.parquet_metadata(EMBEDDINGS.parquet(shard))
    except FileNotFoundError:
        embeddings = {}

    try:
        recaptions = store.parquet_metadata(RECAPTIONS.parquet(shard))
    except FileNotFoundError:
        recaptions = {}
    try:
        scores = store.parquet_metadata(SCORES.parquet(shard))
    except FileNotFoundError:
        scores = {}

    def loaded(key: str, footer: dict[str, str] = pairs) -> dict | None:
        return json.loads(footer[key]) if key in footer else None

    return ShardRecord(
        shard=shard,
        settings=_applied(loaded(names.PAIRS_SETTINGS_FOOTER)),
        funnel=loaded(names.PAIRS_FUNNEL_FOOTER),
        provenance=loaded(names.PROVENANCE_FOOTER),
        model=ModelIdentity.from_footer(embeddings),
        captioner=loaded(names.CAPTIONER_FOOTER, recaptions),
        scores=loaded(names.SCORES_FOOTER, scores),
    )


def _applied(recorded: dict | None) -> dict | None:
    """A pairs footer's settings as the rules applied them: the footer records the preset's name and the
    fields as set, and a preset's values (`datacomp-clip-score`'s top_fraction) are in no field of it."""
    if recorded is None:
        return None
    rules = asdict(PairsSettings.from_footer(recorded).resolved())
    return json.loads(json.dumps({**rules, "preset": recorded.get("preset", "")}))
