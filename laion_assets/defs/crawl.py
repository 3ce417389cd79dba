"""The `crawl_metadata` asset: a source file from `incoming/` becomes a keyed parquet table."""

import json

import dagster as dg

from laion_assets.defs.metadata import LAYER, preview
from laion_assets.defs.partitions import SHARD_BACKFILL, shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.crawl import CrawlConfig, build_crawl_metadata
from laion_assets.pipeline.sources import ColumnNames, find_source
from laion_assets.pipeline.storage import INCOMING


class CrawlMetadataConfig(dg.Config):
    """Column names of URL lists (blank: found among the common names) and the WAT alt-text rule."""

    url_column: str | None = None
    caption_column: str | None = None
    license_column: str | None = None
    min_alt_length: int = 5


@dg.asset(
    partitions_def=shards,
    backfill_policy=SHARD_BACKFILL,
    group_name="crawl",
    kinds={"parquet"},
    metadata={LAYER: "crawl_metadata"},
)
def crawl_metadata(
    context: dg.AssetExecutionContext, config: CrawlMetadataConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """Image URLs and captions from one source file (URL list or WAT), cleaned, deduplicated and keyed."""
    dataset = store.get_store()
    files = {f.name: f for f in dataset.list(INCOMING)}
    source = find_source(list(files), context.partition_key)
    columns = ColumnNames(url=config.url_column, caption=config.caption_column, license=config.license_column)
    result = build_crawl_metadata(
        dataset, source, CrawlConfig(columns=columns, min_alt_length=config.min_alt_length)
    )
    path = dataset.shard_file("crawl_metadata", source.shard, "parquet")
    fingerprint = files[source.name].fingerprint
    dataset.write_parquet(
        path,
        result.table,
        metadata={schemas.SOURCE: json.dumps({"file": source.name, "fingerprint": fingerprint})},
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.table.num_rows,
            "rows_read": result.rows_read,
            **{f"dropped/{reason}": n for reason, n in result.dropped.items()},
            "source_file": source.name,
            "format": source.format,
            "path": dg.MetadataValue.path(dataset.url(path)),
            "preview": preview(result.table, ["key", "url", "caption", "license"]),
        }
    )
