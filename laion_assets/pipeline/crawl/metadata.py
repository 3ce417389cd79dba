"""The crawl_metadata stage: one source file in, one keyed, cleaned, deduplicated table out."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.crawl.sources import (
    INVALID_URL,
    ColumnNames,
    SourceError,
    SourceName,
    find_source,
    read_source,
)
from laion_assets.pipeline.lineage import source_digest, source_footer
from laion_assets.pipeline.storage import CRAWL_METADATA, INCOMING, DatasetStore
from laion_assets.pipeline.tables import keep_first

# Dropped-row reasons, as they appear in the materialisation metadata.
EMPTY_CAPTION = "empty_caption"
DUPLICATE = "duplicate"  # same (url, caption) earlier in the shard
_HTTP_URL = r"^https?://[^/?#\s]+"


@dataclass(frozen=True)
class CrawlSettings:
    columns: ColumnNames = field(default_factory=ColumnNames)
    min_alt_length: int = 5  # WAT alt text shorter than this is dropped, as LAION did

    def recorded(self, source_format: str) -> dict[str, str | int | None]:
        """As the footer of a shard of `source_format` records them, named as the crawl_metadata run config
        names them: those that shape it alone (a URL list's column names, a WAT file's alt-text rule), so
        that a change to the others does not report it built with other settings."""
        if source_format == "wat":
            return {"min_alt_length": self.min_alt_length}
        columns = self.columns
        return {
            "url_column": columns.url,
            "caption_column": columns.caption,
            "license_column": columns.license,
        }


@dataclass(frozen=True)
class CrawlResult:
    table: pa.Table
    rows_read: int  # candidate rows before the shared rules (WAT: images with usable alt text)
    dropped: dict[str, int]  # by reason, every reason a reader or the rules applied
    source: SourceName | None = None  # set by write_crawl_metadata
    path: str = ""  # under the root, set by write_crawl_metadata


def write_crawl_metadata(store: DatasetStore, shard: str, settings: CrawlSettings) -> CrawlResult:
    """`crawl_metadata/<shard>.parquet` from the shard's file in `incoming/`, which its footer records: its
    name, fingerprint, size and sha256 (`lineage.source_footer`; the digest costs one more read of it)."""
    files = {f.name: f for f in store.list(INCOMING)}
    source = find_source(list(files), shard)
    result = build_crawl_metadata(store, source, settings)
    path = CRAWL_METADATA.parquet(shard)
    recorded = json.dumps(settings.recorded(source.format))
    listed = files[source.name]
    fingerprint, sha256 = source_digest(store, source.name)
    read = sha256 if fingerprint == listed.fingerprint else None  # else replaced since: recorded as before
    footer = {**source_footer(listed, read), names.SETTINGS_FOOTER: recorded}
    try:
        store.write_parquet(path, result.table, metadata=footer)
    except pa.ArrowException as exc:  # a passed-through column parquet cannot hold (a JSON `{}` in each row)
        raise SourceError(
            f"{store.url(f'{INCOMING}/{source.name}')}: its columns cannot be stored: {exc}"
        ) from exc
    return dataclasses.replace(result, source=source, path=path)


def build_crawl_metadata(store: DatasetStore, source: SourceName, settings: CrawlSettings) -> CrawlResult:
    with store.open(f"{INCOMING}/{source.name}") as stream:
        candidates, dropped = read_source(stream, source, settings.columns, settings.min_alt_length)
    table, rule_drops = apply_rules(candidates)
    dropped.update(rule_drops)
    keys = pa.array([schemas.make_key(source.shard, i) for i in range(table.num_rows)], pa.string())
    table = table.add_column(0, "key", keys)
    table = table.append_column("source_file", pa.array([source.name] * table.num_rows, pa.string()))
    return CrawlResult(
        table=schemas.conform(table, schemas.CRAWL_METADATA),
        rows_read=candidates.num_rows,
        dropped={reason: dropped[reason] for reason in sorted(dropped)},
    )


def apply_rules(table: pa.Table) -> tuple[pa.Table, Counter]:
    """Drop rows without an http(s) URL or caption and repeated (url, caption) pairs; keep row order."""
    dropped: Counter = Counter()
    url = pc.utf8_trim_whitespace(table.column("url"))
    caption = pc.utf8_trim_whitespace(table.column("caption"))
    table = table.set_column(table.column_names.index("url"), "url", url)
    table = table.set_column(table.column_names.index("caption"), "caption", caption)

    valid_url = pc.fill_null(pc.match_substring_regex(url, _HTTP_URL, ignore_case=True), False)
    has_caption = pc.fill_null(pc.greater(pc.utf8_length(caption), 0), False)
    dropped[INVALID_URL] = table.num_rows - pc.sum(valid_url).as_py() if table.num_rows else 0
    dropped[EMPTY_CAPTION] = pc.sum(pc.and_(valid_url, pc.invert(has_caption))).as_py() or 0
    table = table.filter(pc.and_(valid_url, has_caption))

    unique = keep_first(table, ["url", "caption"])
    dropped[DUPLICATE] = table.num_rows - unique.num_rows
    return unique, dropped
