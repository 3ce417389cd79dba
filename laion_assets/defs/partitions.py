"""Shard partitions, and the policies of the assets over them: how they backfill and when they follow."""

import os
import urllib.parse
import warnings
from collections.abc import Callable, Iterator

import dagster as dg

from laion_assets import names
from laion_assets.defs.metadata import writes_layer
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.storage import DatasetStore, Layer

# One partition per source file in `{root}/incoming/`.
shards = dg.DynamicPartitionsDefinition(name=names.SHARDS_PARTITIONS)

SHARDS_PER_RUN_ENV = "LAION_ASSETS_SHARDS_PER_RUN"


def shards_per_run() -> int:
    """$LAION_ASSETS_SHARDS_PER_RUN, 1 by default: how many shards one run of the sensor or of a
    backfill materialises.

    One shard per run keeps each shard's own materialisation metadata, and a bad shard fails alone (the
    catch-up schedule retries it). More shards per run pay the run's fixed cost once for all of them
    (the run worker and its imports, the CLIP model load, a pod on Kubernetes) and divide the runs the
    daemon must submit; each shard's metadata is then a row of a table, and a failed check holds back
    every shard of its run."""
    value = os.environ.get(SHARDS_PER_RUN_ENV) or "1"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{SHARDS_PER_RUN_ENV}={value!r} is not a whole number of shards, 1 or more")
    return int(value)


# The UI's asset group of the per-shard chain, beside "dataset" and "takedowns": the lineage opens on
# three groups that say what they are, not one group per asset.
SHARD_GROUP = "per_shard"
DATASET_GROUP = "dataset"
TAKEDOWNS_GROUP = "takedowns"


def lineage_path() -> str:
    """The UI's global lineage with every group open; it opens them collapsed, no asset name shown. (A
    group's id in the UI is `global@global:<group>`, unless its flag to group per code location is on.)"""
    groups = ",".join(f"global@global:{group}" for group in (SHARD_GROUP, TAKEDOWNS_GROUP, DATASET_GROUP))
    return "/asset-groups?" + urllib.parse.urlencode({"expanded": groups})


# A backfill, of the job or of the assets, launches runs of this many consecutive shards.
SHARD_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=shards_per_run())


def range_tags(first: str, last: str) -> dict[str, str]:
    """The run tags of a run over the shards from `first` to `last`, in the partitions' order."""
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


# `backfill_policy` on an asset is "beta" in Dagster 1.13; the policy above is its plainest form.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset`")

# A per-shard asset has no automation condition: the runs that make a shard (the sensor's, their
# retries, the catch-up schedule's, a backfill's) plan every per-shard asset, and a second run would race
# them for the shard's lease. Dagster 1.13's conditions could not tell those runs apart on a real
# deployment (docs/automation.md): `eager()` re-ran assets that a shard's own run had just made.

# A dataset-level asset runs once any shard of its upstream has been updated and no shard of it is
# being materialised: during a backfill of many shards it waits for the end. Unlike `eager()`, it
# does not wait for every shard to exist, which a failed shard would prevent forever.
FOLLOWS_ANY_SHARD = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after any shard is updated")


def leased_shards(context: dg.AssetExecutionContext, store: DatasetStore) -> Iterator[str]:
    """The run's shards, each held under its lease while the caller writes it (pipeline/leases.py): a
    shard another live run is writing fails this step with a message naming that run."""
    for shard in context.partition_keys:
        with shard_lease(store, shard, context.run.run_id):
            yield shard


def per_shard_asset(
    name: str,
    layer: Layer,
    kinds: set[str],
    upstream: dg.AssetsDefinition | None = None,
    **options: object,
) -> Callable[[Callable[..., dg.MaterializeResult]], dg.AssetsDefinition]:
    """The decorator of a per-shard asset: a partition per shard, the shards' backfill policy and group,
    `layer` as the store layer it writes (`writes_layer`), and `upstream` (the asset it is made from) as
    its dependency. `options`: more of `dg.asset`'s (pool, op_tags)."""
    return dg.asset(
        name=name,
        partitions_def=shards,
        backfill_policy=SHARD_BACKFILL,
        deps=[upstream] if upstream else None,
        group_name=SHARD_GROUP,
        kinds=kinds,
        metadata=writes_layer(layer),
        **options,
    )
