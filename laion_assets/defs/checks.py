"""Per-shard asset checks: each is a plain `check(store, shard)` function beside its asset, made a
blocking partitioned check here, so a broken shard stops its downstream steps in the same run.

A run over several shards (`LAION_ASSETS_SHARDS_PER_RUN`) evaluates a check once for all of them, as
Dagster 1.13 does for a partition range: it passes when every shard passes, and names those that fail.
"""

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
        dataset = store.get_store()
        return over_shards({shard: check(dataset, shard) for shard in context.partition_keys})

    return _check


def over_shards(results: dict[str, dg.AssetCheckResult]) -> dg.AssetCheckResult:
    """The result of one check over the shards of a run: a single shard's own, or all of them together."""
    if len(results) == 1:
        return next(iter(results.values()))
    failed = {shard: result for shard, result in results.items() if not result.passed}
    return dg.AssetCheckResult(
        passed=not failed,
        metadata={"shards": len(results), "failed_shards": sorted(failed)},
        description="; ".join(result.description or shard for shard, result in failed.items()) or None,
    )


def problems_found(shard: str, problems: dict[str, object]) -> dg.AssetCheckResult:
    """Passed when every one of `problems` (name -> a count or a message) is zero or empty; else the
    others in the metadata and the description."""
    found = {name: str(value) for name, value in problems.items() if value}
    return dg.AssetCheckResult(
        passed=not found,
        metadata={"shard": shard, **found},
        description=f"shard {shard}: " + ", ".join(f"{k}: {v}" for k, v in found.items()) if found else None,
    )
