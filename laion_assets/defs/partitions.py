"""Shard partitions, and the policies of the assets over them: how they backfill and when they follow."""

import warnings

import dagster as dg

from laion_assets import names

# One partition per source file in `{root}/incoming/`.
shards = dg.DynamicPartitionsDefinition(name=names.SHARDS_PARTITIONS)

# A backfill launches one run per shard: each shard's materialisation keeps its own metadata, a bad
# shard fails alone (the catch-up schedule retries it), and the `gpu` pool serialises the embedding
# runs. What this repeats per shard, loading the CLIP model, costs seconds against minutes of work.
SHARD_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)
# `backfill_policy` on an asset is "beta" in Dagster 1.13; the policy above is its plainest form.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset`")

# A per-shard asset runs when its upstream shard is updated by a run that did not include it, e.g. a
# person re-materialising crawl_metadata alone. The sensor's runs include every per-shard asset.
FOLLOWS_ITS_SHARD = dg.AutomationCondition.eager()

# A dataset-level asset runs once any shard of its upstream has been updated and no shard of it is
# being materialised: during a backfill of many shards it waits for the end. Unlike `eager()`, it
# does not wait for every shard to exist, which a failed shard would prevent forever.
FOLLOWS_ANY_SHARD = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after any shard is updated")
