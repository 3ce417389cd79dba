"""The `catalog` asset: a DuckDB database file with a view per layer, for `duckdb data/catalog.duckdb`,
and hosts/hosts.parquet, the images grouped by host, behind its `hosts` view."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.exports import training_shards
from laion_assets.defs.metadata import reads
from laion_assets.defs.partitions import DATASET_GROUP, FOLLOWS_ANY_SHARD
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.catalog import views as duckdb_catalog
from laion_assets.pipeline.storage import BLOCKLIST_ENTRIES, DUPLICATES, EXPORTS, SHARD_LAYERS, TAKEDOWNS


class CatalogConfig(dg.Config):
    """`database`: the file to write; blank: {root}/catalog.duckdb locally, ./catalog.duckdb for S3."""

    database: str = ""


@dg.asset(
    name=names.CATALOG_ASSET,
    deps=[training_shards],  # after every removal and export
    group_name=DATASET_GROUP,
    metadata=reads(*SHARD_LAYERS, TAKEDOWNS, BLOCKLIST_ENTRIES, DUPLICATES, EXPORTS),
    kinds={"duckdb"},
    automation_condition=FOLLOWS_ANY_SHARD,
)
def catalog(config: CatalogConfig, store: DatasetStoreResource) -> dg.MaterializeResult:
    """A view per layer (crawl_metadata, images, embeddings, pairs, ...) over every materialised shard, and
    `hosts` over hosts/hosts.parquet, written first: the images grouped by host."""
    dataset = store.get_store()
    database = config.database or duckdb_catalog.default_catalog_path(dataset)
    views = duckdb_catalog.write_catalog(dataset, database)
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(database), "views": ", ".join(views), "root": dataset.root}
    )
