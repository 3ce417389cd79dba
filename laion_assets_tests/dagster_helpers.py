"""Running the real assets on an ephemeral Dagster instance."""

import dagster as dg

from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import build_resources


def materialize_shard(
    instance: dg.DagsterInstance, root: str, shard: str, run_config: dict | None = None
) -> dg.ExecuteInProcessResult:
    if shard not in instance.get_dynamic_partitions(shards.name):
        instance.add_dynamic_partitions(shards.name, [shard])
    return dg.materialize(
        PER_SHARD_ASSETS,
        partition_key=shard,
        instance=instance,
        resources=build_resources(root),
        run_config=run_config,
        raise_on_error=False,
    )
