"""Asset checks on the per-shard assets; a failing check names the shard and the offending count."""

import warnings

import dagster as dg

from laion_assets.defs.download import downloaded_images
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.storage import DatasetStore

# Partitioned checks are "preview" in Dagster 1.13: they run in each shard's run (a check-only run of
# one partition is not supported yet), so the check's logic is a plain function tests can call too.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")


def one_row_per_crawl_row(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """`images/<shard>.parquet` has exactly as many rows as `crawl_metadata/<shard>.parquet`."""
    crawl_rows = dataset.parquet_num_rows(dataset.shard_file("crawl_metadata", shard, "parquet"))
    image_rows = dataset.parquet_num_rows(dataset.shard_file("images", shard, "parquet"))
    difference = crawl_rows - image_rows
    return dg.AssetCheckResult(
        passed=difference == 0,
        metadata={"shard": shard, "crawl_metadata_rows": crawl_rows, "images_rows": image_rows},
        description=None
        if difference == 0
        else (
            f"shard {shard}: images has {image_rows} rows, crawl_metadata {crawl_rows} "
            f"({abs(difference)} {'missing' if difference > 0 else 'extra'})"
        ),
    )


@dg.asset_check(asset=downloaded_images, partitions_def=shards, name="one_row_per_crawl_row")
def images_have_one_row_per_crawl_row(
    context: dg.AssetCheckExecutionContext, store: DatasetStoreResource
) -> dg.AssetCheckResult:
    """Every crawl row has its images row, whatever happened to the download."""
    return one_row_per_crawl_row(store.get_store(), context.partition_key)


PER_SHARD_CHECKS = [images_have_one_row_per_crawl_row]
