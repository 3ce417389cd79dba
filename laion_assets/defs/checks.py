"""Asset checks on the per-shard assets; a failing check names the shard and the offending count."""

import json
import warnings

import dagster as dg

from laion_assets.defs.download import downloaded_images
from laion_assets.defs.embed import clip_embeddings
from laion_assets.defs.pairs import filtered_pairs
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.pairs import PairsSettings, rule_violations
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


def embeddings_of_success_images(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """Every `embeddings` key is a `success` row of `images`, once."""
    images = dataset.read_parquet(dataset.shard_file("images", shard, "parquet")).select(["key", "status"])
    keys = dataset.read_parquet(dataset.shard_file("embeddings", shard, "parquet")).column("key").to_pylist()
    successes = {
        k
        for k, s in zip(images.column("key").to_pylist(), images.column("status").to_pylist(), strict=True)
        if s == schemas.SUCCESS
    }
    not_success = sum(key not in successes for key in keys)
    repeated = len(keys) - len(set(keys))
    passed = not_success == 0 and repeated == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"shard": shard, "not_a_success": not_success, "repeated_keys": repeated},
        description=None
        if passed
        else f"shard {shard}: {not_success} keys not a success image, {repeated} repeated",
    )


def pairs_follow_the_contract(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """`pairs` has exactly the contract's schema, unique keys, and no row that breaks an active rule."""
    table = dataset.read_parquet(dataset.shard_file("pairs", shard, "parquet"))
    problems = {}
    if table.schema.remove_metadata() != schemas.PAIRS:
        problems["schema"] = f"columns {table.schema.names} differ from the contract {schemas.PAIRS.names}"
    else:
        stored = (table.schema.metadata or {}).get(schemas.PAIRS_SETTINGS.encode())
        settings = PairsSettings(**json.loads(stored)) if stored else PairsSettings()
        keys = table.column("key").to_pylist()
        counts = {"repeated_keys": len(keys) - len(set(keys)), **rule_violations(table, settings)}
        problems = {name: n for name, n in counts.items() if n}
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"shard": shard, **{name: str(value) for name, value in problems.items()}},
        description=None
        if not problems
        else f"shard {shard}: " + ", ".join(f"{k}: {v}" for k, v in problems.items()),
    )


@dg.asset_check(asset=clip_embeddings, partitions_def=shards, name="keys_are_success_images")
def embeddings_keys_are_success_images(
    context: dg.AssetCheckExecutionContext, store: DatasetStoreResource
) -> dg.AssetCheckResult:
    return embeddings_of_success_images(store.get_store(), context.partition_key)


@dg.asset_check(asset=filtered_pairs, partitions_def=shards, name="follows_the_contract")
def pairs_follows_the_contract(
    context: dg.AssetCheckExecutionContext, store: DatasetStoreResource
) -> dg.AssetCheckResult:
    """Exact schema, unique keys, every row within the active rules."""
    return pairs_follow_the_contract(store.get_store(), context.partition_key)


PER_SHARD_CHECKS = [
    images_have_one_row_per_crawl_row,
    embeddings_keys_are_success_images,
    pairs_follows_the_contract,
]
