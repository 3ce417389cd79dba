"""The per-shard assets, in order, and the job that materialises them for one shard."""

import dagster as dg

from laion_assets.defs.crawl import crawl_metadata
from laion_assets.defs.download import downloaded_images
from laion_assets.defs.embed import clip_embeddings
from laion_assets.defs.pairs import filtered_pairs

PER_SHARD_ASSETS = [crawl_metadata, downloaded_images, clip_embeddings, filtered_pairs]

shard_job = dg.define_asset_job(
    "shard_pipeline",
    selection=dg.AssetSelection.assets(*PER_SHARD_ASSETS),
    description="Every per-shard asset for one shard, in dependency order.",
)
