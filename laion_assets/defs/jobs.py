"""The per-shard assets, in order, and the job that materialises them for one shard."""

import dagster as dg

from laion_assets.defs.crawl import crawl_metadata

PER_SHARD_ASSETS = [crawl_metadata]

shard_job = dg.define_asset_job(
    "shard_pipeline",
    selection=dg.AssetSelection.assets(*PER_SHARD_ASSETS),
    description="Every per-shard asset for one shard, in dependency order.",
)
