"""The `downloaded_images` asset: a shard's URLs become a webdataset tar and a status parquet."""

import threading
from typing import Any

import dagster as dg
import pydantic

from laion_assets import names
from laion_assets.defs.checks import shard_check
from laion_assets.defs.config import config_values, dataset_config, settings_from
from laion_assets.defs.crawl import crawl_metadata
from laion_assets.defs.execution import DOWNLOAD_POD
from laion_assets.defs.metadata import counts_table, preview, shards_materialized, shards_written
from laion_assets.defs.partitions import per_shard_asset
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.downloader import (
    DownloadResult,
    DownloadSettings,
    DownloadWorkers,
    write_images,
)
from laion_assets.pipeline.download.imaging import RESIZE_MODES
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.parallel import pipelined
from laion_assets.pipeline.storage import CRAWL_METADATA, IMAGES, DatasetStore

D = DownloadSettings  # every default below is the pipeline's own


class DownloadImagesConfig(dg.Config):
    """How images are resized and encoded, and how they are fetched (img2dataset's names where it has one)."""

    image_size: int = D.image_size
    # Any, not str: YAML 1.1 reads a bare `no` as false, and false means the mode "no"
    resize_mode: Any = pydantic.Field(default=D.resize_mode, description=f"one of {', '.join(RESIZE_MODES)}")
    border_color: str = pydantic.Field(default=D.border_color, description="the padding of `border`")
    resize_only_if_bigger: bool = D.resize_only_if_bigger
    downscale_interpolation: str = D.downscale_interpolation  # nearest, bilinear, bicubic, area, lanczos
    upscale_interpolation: str = D.upscale_interpolation
    encode_format: str = D.encode_format  # jpg, webp or png
    encode_quality: int = D.encode_quality  # 0-100, over 100 lossless webp; png: compression level 0-9
    skip_reencode: bool = D.skip_reencode  # keep the original bytes when nothing is resized
    min_image_size: int = D.min_image_size  # shorter side, pixels; smaller images are filtered_size
    max_image_area: int = D.max_image_area  # width x height; larger images are filtered_size (0: none)
    max_aspect_ratio: float = D.max_aspect_ratio  # 0: no limit
    max_pixels: int = D.max_pixels  # larger images are decompression bombs (failed_to_decode)
    connect_timeout: float = D.connect_timeout
    read_timeout: float = D.read_timeout
    request_timeout: float = D.request_timeout  # the whole request, redirects and body included
    max_bytes: int = D.max_bytes
    max_redirects: int = D.max_redirects
    retries: int = D.retries  # extra attempts after timeouts, resets, 429 and 5xx
    retry_backoff: float = D.retry_backoff
    max_retry_after: float = D.max_retry_after
    per_host_connections: int = D.per_host_connections
    user_agent_token: str = D.user_agent_token
    respect_robots_txt: bool = D.respect_robots_txt
    # X-Robots-Tag values that opt out
    opt_out_directives: list[str] = pydantic.Field(default_factory=lambda: list(D.opt_out_directives))
    respect_tdm_reservation: bool = D.respect_tdm_reservation  # W3C TDMRep's response header
    tdmrep_wait: float = D.tdmrep_wait  # seconds an image waits for its site's tdmrep.json
    allow_private_networks: bool = D.allow_private_networks
    dns_timeout: float = D.dns_timeout  # a host that does not resolve in time fails its rows at once
    dns_cache_seconds: float = D.dns_cache_seconds
    dns_lookups: int = D.dns_lookups  # resolutions in flight at once
    # "address" or "address:port" of the DNS servers to ask (a local caching resolver); empty: the system's
    dns_servers: list[str] = pydantic.Field(default_factory=lambda: list(D.dns_servers))
    max_in_flight: int = D.max_in_flight  # requests at once, in all, shared by the worker processes
    processes: int = D.processes  # worker processes for a shard of over 256 rows; 0: one per core
    shard_timeout: float = D.shard_timeout
    retry_failed: bool = D.retry_failed  # fetch again only the rows that failed to download last time

    def settings(self) -> DownloadSettings:
        return settings_from(self, DownloadSettings)


@per_shard_asset(
    names.DOWNLOADED_IMAGES_ASSET,
    IMAGES,
    kinds={"webdataset", "parquet"},
    upstream=crawl_metadata,
    pool=names.DOWNLOAD_POOL,
    op_tags=DOWNLOAD_POD,
)
def downloaded_images(
    context: dg.AssetExecutionContext, config: DownloadImagesConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """Each crawl row fetched, resized into `images/<shard>.tar`, its outcome in `images/<shard>.parquet`."""
    dataset = store.get_store()
    config = dataset_config(context, config, dataset)
    settings = config.settings()
    workers = DownloadWorkers(settings)  # shared by the shards: as many processes as cores in all

    def download(shard: str, draining: threading.Event) -> DownloadResult:
        with shard_lease(dataset, shard, context.run.run_id):
            return write_images(dataset, shard, settings, context.log.info, draining, workers)

    # the next shard starts fetching while the last one waits on its slowest hosts
    with workers, shards_written(context) as metadata:
        for shard, result in pipelined(context.partition_keys, download, workers.stop):
            counts = result.status_counts()
            rows = result.table.num_rows
            metadata[shard] = {
                "dagster/row_count": rows,
                **{f"status/{status}": n for status, n in counts.items()},
                "success_rate": round(counts[schemas.SUCCESS] / rows, 4) if rows else 0.0,
                "top_errors": counts_table(result.top_errors(), "error"),
                "top_failing_hosts": counts_table(result.top_failing_hosts(), "host"),
                "fetched": result.fetched,
                "reused_from_previous": result.reused,
                "seconds": round(result.seconds, 2),
                "images_per_second": round(result.fetched / result.seconds, 1) if result.seconds else 0.0,
                "settings": dg.MetadataValue.json(config_values(config)),  # as this run used them
                "path": dg.MetadataValue.path(dataset.url(IMAGES.tar(shard))),
                "preview": preview(result.table, ["key", "status", "error_message", "width", "height"]),
            }
    return shards_materialized(metadata)


def one_row_per_crawl_row(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """`images/<shard>.parquet` has exactly as many rows as `crawl_metadata/<shard>.parquet`."""
    crawl_rows = dataset.parquet_num_rows(CRAWL_METADATA.parquet(shard))
    image_rows = dataset.parquet_num_rows(IMAGES.parquet(shard))
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


one_row_per_crawl_row_check = shard_check(
    downloaded_images, names.ONE_ROW_PER_CRAWL_ROW_CHECK, one_row_per_crawl_row
)
