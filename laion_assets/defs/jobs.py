"""The per-shard assets, in order, their checks, and the job that materialises them for one shard."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.config import deployment_run_config
from laion_assets.defs.crawl import crawl_metadata
from laion_assets.defs.download import downloaded_images, one_row_per_crawl_row_check
from laion_assets.defs.embeddings import clip_embeddings, keys_are_success_images_check
from laion_assets.defs.pairs import filtered_pairs, follows_the_contract_check
from laion_assets.defs.recaptions import one_row_per_kept_pair_check, recaptions
from laion_assets.defs.scores import one_row_per_embedding_check, quality_scores

PER_SHARD_ASSETS = [
    crawl_metadata,
    downloaded_images,
    clip_embeddings,
    quality_scores,
    filtered_pairs,
    recaptions,
]
PER_SHARD_CHECKS = [
    one_row_per_crawl_row_check,
    keys_are_success_images_check,
    one_row_per_embedding_check,
    follows_the_contract_check,
    one_row_per_kept_pair_check,
]

shard_job = dg.define_asset_job(
    names.SHARD_JOB,
    selection=dg.AssetSelection.assets(*PER_SHARD_ASSETS),
    description="Every per-shard asset for one shard, in dependency order, with its checks.",
    config=deployment_run_config(),
)
