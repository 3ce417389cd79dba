"""The numbers on the card: counts from DuckDB over the catalog views, the funnel, settings and provenance
from each pairs parquet's footer, the CLIP model from each embeddings parquet's footer."""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb

from laion_assets import names
from laion_assets.pipeline import catalog, schemas
from laion_assets.pipeline.card.settings import CardSettings
from laion_assets.pipeline.clip import ModelIdentity
from laion_assets.pipeline.pairs import FUNNEL, stored_pair_shards
from laion_assets.pipeline.parallel import store_map
from laion_assets.pipeline.storage import EMBEDDINGS, PAIRS, DatasetStore

SIMILARITY_BIN = 0.01
SIZE_BIN, SIZE_BINS = 64, 64  # pixels per bin, bins; the last bin holds all larger sizes too


@dataclass(frozen=True)
class ShardRecord:
    """What one shard's parquet file metadata says (None where it was not recorded)."""

    shard: str
    settings: dict | None
    funnel: dict | None  # {"rows_in": n, "removed": {rule: n}}
    provenance: dict | None
    model: ModelIdentity | None  # of its embeddings


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


# gathering


def gather_stats(store: DatasetStore, settings: CardSettings) -> CardStats:
    """Everything the card shows, from the stored shards. Raises ValueError if there are none."""
    shards = stored_pair_shards(store, "the dataset card")
    connection = catalog.connect(store)
    try:
        records = list(store_map(lambda shard: _shard_record(store, shard), shards))
        return _stats(connection, records, settings)
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
        # error_class and url_host are the downloader's own functions (schemas.py), registered by connect
        top_errors=rows(
            "SELECT error_class(error_message) AS error, count(*) AS n FROM images "
            "WHERE error_message <> '' GROUP BY 1 ORDER BY n DESC, error LIMIT ?",
            settings.top_n,
        ),
        top_hosts=rows(
            "SELECT url_host(url) AS host, count(*) AS n "
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

    def loaded(key: str) -> dict | None:
        return json.loads(pairs[key]) if key in pairs else None

    return ShardRecord(
        shard=shard,
        settings=loaded(names.PAIRS_SETTINGS_FOOTER),
        funnel=loaded(names.PAIRS_FUNNEL_FOOTER),
        provenance=loaded(names.PROVENANCE_FOOTER),
        model=ModelIdentity.from_footer(embeddings),
    )
