"""Per-shard asset checks: each is a plain `check(store, shard)` function beside its asset, made a
blocking partitioned check here, so a broken shard stops its downstream steps in the same run."""

import inspect
import warnings
from collections.abc import Callable

import dagster as dg

from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.storage import DatasetStore

# Partitioned checks are "preview" in Dagster 1.13: they run in each shard's run (a check-only run of
# one partition is not supported yet), which is why the logic is a plain function tests can call too.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")

ShardCheck = Callable[[DatasetStore, str], dg.AssetCheckResult]


def shard_check(asset: dg.AssetsDefinition, name: str, check: ShardCheck) -> dg.AssetChecksDefinition:
    """`check` as the blocking check `name` on each shard of `asset`; its docstring is the description."""

    @dg.asset_check(
        asset=asset, name=name, partitions_def=shards, blocking=True, description=inspect.getdoc(check)
    )
    def _check(context: dg.AssetCheckExecutionContext, store: DatasetStoreResource) -> dg.AssetCheckResult:
        return check(store.get_store(), context.partition_key)

    return _check
