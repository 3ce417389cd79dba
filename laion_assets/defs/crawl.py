"""The `crawl_metadata` asset: a source file from `incoming/` becomes a keyed parquet table."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.config import dataset_config
from laion_assets.defs.metadata import preview, shards_materialized, shards_written
from laion_assets.defs.partitions import leased_shards, per_shard_asset
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.crawl.metadata import CrawlSettings, write_crawl_metadata
from laion_assets.pipeline.crawl.sources import ColumnNames
from laion_assets.pipeline.storage import CRAWL_METADATA


class CrawlMetadataConfig(dg.Config):
    """Column names of URL lists (blank: found among the common names) and the WAT alt-text rule."""

    url_column: str | None = None
    caption_column: str | None = None
    license_column: str | None = None
    min_alt_length: int = CrawlSettings.min_alt_length

    def settings(self) -> CrawlSettings:
        columns = ColumnNames(url=self.url_column, caption=self.caption_column, license=self.license_column)
        return CrawlSettings(columns=columns, min_alt_length=self.min_alt_length)


@per_shard_asset(names.CRAWL_METADATA_ASSET, CRAWL_METADATA, kinds={"parquet"})
def crawl_metadata(
    context: dg.AssetExecutionContext, config: CrawlMetadataConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """Image URLs and captions from one source file (URL list or WAT), cleaned, deduplicated and keyed."""
    dataset = store.get_store()
    settings = dataset_config(context, config, dataset).settings()
    with shards_written(context) as metadata:
        for shard in leased_shards(context, dataset):
            result = write_crawl_metadata(dataset, shard, settings)
            metadata[shard] = {
                "dagster/row_count": result.table.num_rows,
                "rows_read": result.rows_read,
                **{f"dropped/{reason}": n for reason, n in result.dropped.items()},
                "source_file": result.source.name,
                "format": result.source.format,
                "path": dg.MetadataValue.path(dataset.url(result.path)),
                "preview": preview(result.table, ["key", "url", "caption", "license"]),
            }
    return shards_materialized(metadata)
