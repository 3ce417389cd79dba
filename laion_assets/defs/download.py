"""The `downloaded_images` asset: a shard's URLs become a webdataset tar and a status parquet."""

import contextlib

import dagster as dg

from laion_assets.defs.config import config_class, settings_from
from laion_assets.defs.crawl import crawl_metadata
from laion_assets.defs.metadata import LAYER, counts_table, preview
from laion_assets.defs.partitions import FOLLOWS_ITS_SHARD, SHARD_BACKFILL, shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.download import DownloadSettings, download_shard

DownloadImagesConfig = config_class(DownloadSettings, "DownloadImagesConfig")


@dg.asset(
    partitions_def=shards,
    backfill_policy=SHARD_BACKFILL,
    automation_condition=FOLLOWS_ITS_SHARD,
    deps=[crawl_metadata],
    group_name="images",
    kinds={"webdataset", "parquet"},
    metadata={LAYER: "images"},
)
def downloaded_images(
    context: dg.AssetExecutionContext, config: DownloadImagesConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """Each crawl row fetched, resized into `images/<shard>.tar`, its outcome in `images/<shard>.parquet`."""
    settings: DownloadSettings = settings_from(config, DownloadSettings)
    dataset = store.get_store()
    shard = context.partition_key
    crawl = dataset.read_parquet(dataset.shard_file("crawl_metadata", shard, "parquet"))
    tar_path = dataset.shard_file("images", shard, "tar")
    parquet_path = dataset.shard_file("images", shard, "parquet")
    with contextlib.ExitStack() as stack:
        previous = None
        if settings.retry_failed and dataset.exists(parquet_path) and dataset.exists(tar_path):
            previous = (dataset.read_parquet(parquet_path), stack.enter_context(dataset.open(tar_path)))
        tar_out = stack.enter_context(dataset.atomic_write(tar_path))
        result = download_shard(crawl, settings, tar_out, previous, progress=context.log.info)
    dataset.write_parquet(parquet_path, result.table)

    counts = result.status_counts()
    rows = result.table.num_rows
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            **{f"status/{status}": n for status, n in counts.items()},
            "success_rate": round(counts[schemas.SUCCESS] / rows, 4) if rows else 0.0,
            "top_errors": counts_table(result.top_errors(), "error"),
            "top_failing_hosts": counts_table(result.top_failing_hosts(), "host"),
            "fetched": result.fetched,
            "reused_from_previous": result.reused,
            "seconds": round(result.seconds, 2),
            "images_per_second": round(result.fetched / result.seconds, 1) if result.seconds else 0.0,
            "path": dg.MetadataValue.path(dataset.url(tar_path)),
            "preview": preview(result.table, ["key", "status", "error_message", "width", "height"]),
        }
    )
