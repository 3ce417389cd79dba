"""Takedowns: the `blocklist` and `takedowns` assets, the sensor that runs them when a list in
`{root}/blocklist/` is new or changed, and their job, which the dataset-level assets follow.

`downloaded_images` reads the entries `blocklist` records, but does not declare it upstream: a changed
list would then make every shard's download stale. What is already downloaded is the `takedowns`
asset's to remove, from the shards that hold a match and only from those (pipeline/removal.py).
"""

import hashlib
import json
from collections.abc import Iterator

import dagster as dg

from laion_assets import names
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.metadata import reads, rewritten_exports, rewritten_partitions
from laion_assets.defs.partitions import TAKEDOWNS_GROUP
from laion_assets.defs.recaptions import recaptions
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import markdown
from laion_assets.pipeline.leases import REMOVALS, shard_lease
from laion_assets.pipeline.removal import (
    TAKEN_DOWN,
    built_before_last_removal,
    finish_interrupted,
    remove_keys,
)
from laion_assets.pipeline.storage import BLOCKLIST, BLOCKLIST_ENTRIES, SHARD_LAYERS, TAKEDOWNS, DatasetStore
from laion_assets.pipeline.takedowns.blocklist import find_matches, load_active, read_lists, write_active

# How long a removal (takedowns, duplicates) waits for another run's to end; then it fails, naming it.
REMOVALS_WAIT = 3600.0


@dg.asset(name=names.BLOCKLIST_ASSET, group_name=TAKEDOWNS_GROUP, kinds={"parquet"})
def blocklist(context: dg.AssetExecutionContext, store: DatasetStoreResource) -> dg.MaterializeResult:
    """The active entries of every list in `{root}/blocklist/`, as hashes, with their counts per list and
    kind; the entries that could not be read are listed (and logged), not skipped silently."""
    dataset = store.get_store()
    lists = read_lists(dataset)
    write_active(dataset, lists)
    for problem in lists.problems:
        context.log.warning(f"block list {problem.list}, {problem.where}: {problem.problem}")
    problems = [(p.list, p.where, p.problem) for p in lists.problems]
    unread = [(name, "none: every entry is a problem", 0) for name in lists.without_entries()]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(lists),
            "lists": len(lists.lists),
            "lists_without_entries": len(unread),
            "entries_by_list": dg.MetadataValue.md(
                markdown.table(["list", "kind", "entries"], lists.counts() + unread)
            ),
            "problems": len(problems),
            "problem_entries": dg.MetadataValue.md(
                markdown.table(["list", "where", "problem"], problems[:50])
            ),
            "path": dg.MetadataValue.path(dataset.url(BLOCKLIST_ENTRIES)),
        }
    )


NOTHING_MATCHED = "nothing matched: no stored sample is on an active block list, so nothing was removed"


@dg.asset(
    name=names.TAKEDOWNS_ASSET,
    deps=[blocklist, recaptions],  # after the last per-shard asset
    group_name=TAKEDOWNS_GROUP,
    metadata=reads(BLOCKLIST_ENTRIES, *SHARD_LAYERS),
    kinds={"parquet"},
    output_required=False,
)
def takedowns(
    context: dg.AssetExecutionContext, store: DatasetStoreResource
) -> Iterator[dg.MaterializeResult]:
    """Every stored sample on an active list taken out of every layer, only in the shards that hold one,
    and a ledger row for each in `takedowns/<timestamp>.parquet`. When nothing matches, nothing is
    written and nothing is materialised, so the dataset-level assets after it are not rebuilt: an
    observation says "nothing matched" instead (the asset's Events in the UI)."""
    dataset = store.get_store()
    with shard_lease(dataset, REMOVALS, context.run.run_id, wait=REMOVALS_WAIT):
        yield from _take_down(context, dataset)


def _take_down(context: dg.AssetExecutionContext, dataset: DatasetStore) -> Iterator[dg.MaterializeResult]:
    finished = finish_interrupted(dataset)  # what a run cut short left pending, completed first
    for done in finished:
        context.log.warning(f"completed the removal an interrupted run left pending: {done.ledger}")
    result = remove_keys(dataset, find_matches(dataset, load_active(dataset)), TAKEN_DOWN)
    why = f"takedowns run {context.run.run_id[:8]}"
    for removal in [*finished, result]:
        for observation in rewritten_partitions(dataset, removal, PER_SHARD_ASSETS, why):
            context.log_event(observation)
        for observation in rewritten_exports(dataset, removal, why):
            context.log_event(observation)
    behind: list[str] = []
    if not result.removed:
        context.log.info("no stored sample is on an active block list: nothing to remove")
        behind = [] if finished else built_before_last_removal(dataset)
        if behind:  # a run cut short after its removal: materialised all the same, so the job rebuilds them
            context.log.warning(f"built before the last removal, rebuilt now: {', '.join(behind)}")
        elif not finished:
            # the UI's word for an asset that never materialised is "Never materialized": say why here
            context.log_event(
                dg.AssetObservation(
                    asset_key=dg.AssetKey(names.TAKEDOWNS_ASSET),
                    metadata={"outcome": NOTHING_MATCHED, "active_entries": len(load_active(dataset))},
                )
            )
            return
        else:
            result = finished[-1]
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.removed,
            "completed_interrupted_removals": len(finished),
            "shards_rewritten": len(result.shards),
            "files_rewritten": len(result.files),
            "removed_by_list": dg.MetadataValue.md(
                markdown.table(["list", "kind", "removed"], result.by_list)
            ),
            "shards": ", ".join(result.shards[:20]) + (" ..." if len(result.shards) > 20 else ""),
            "built_before_last_removal": ", ".join(behind),
            "path": dg.MetadataValue.path(dataset.url(result.ledger or TAKEDOWNS)),  # the ledger
        }
    )


# The takedown flow in one run, the sensor's and `laion-assets takedown`'s: the lists recorded, the matches
# removed, then what is built from every shard (skipped when nothing was removed).
takedown_job = dg.define_asset_job(
    names.TAKEDOWN_JOB,
    selection=dg.AssetSelection.assets(
        names.BLOCKLIST_ASSET,
        names.TAKEDOWNS_ASSET,
        names.DUPLICATES_ASSET,
        names.TRAINING_SHARDS_ASSET,
        names.SEARCH_INDEX_ASSET,
        names.CATALOG_ASSET,
        names.DATASET_CARD_ASSET,
    ),
    description="Record the block lists, remove what they match from the built shards and the exports, "
    "then dedup again, grow the exports, and rebuild the search index, the catalog and the card.",
)


@dg.sensor(
    name=names.BLOCKLIST_SENSOR,
    job=takedown_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def blocklist_sensor(context: dg.SensorEvaluationContext, store: DatasetStoreResource) -> dg.SensorResult:
    """Runs the takedown flow when a list in `{root}/blocklist/` is added, changed or removed; its cursor
    maps each list to its content fingerprint, so the same lists run once."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    now = {f.name: f.fingerprint for f in store.get_store().list(BLOCKLIST)}
    cursor = json.dumps(now, sort_keys=True)
    if now == seen:
        return dg.SensorResult(
            skip_reason=f"no new, changed or removed list among {len(now)} in {BLOCKLIST}/"
        )
    changed = sorted(name for name in now.keys() | seen.keys() if now.get(name) != seen.get(name))
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"blocklist:{hashlib.sha256(cursor.encode()).hexdigest()[:16]}",
                tags={names.TRIGGER_TAG: "blocklist", names.SOURCE_FILE_TAG: ",".join(changed)[:200]},
            )
        ],
        cursor=cursor,
    )
