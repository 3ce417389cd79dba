"""What runs without a person: the sensor that turns new files in `incoming/` into shard runs, the
automation-condition sensor that makes assets follow their upstream, and the schedule that catches up."""

import json

import dagster as dg

from laion_assets import names
from laion_assets.defs.jobs import PER_SHARD_ASSETS, shard_job
from laion_assets.defs.metadata import layer_of
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.lineage import incoming_by_shard, stale_layers
from laion_assets.pipeline.storage import DatasetStore, StoredFile

PER_SHARD_LAYERS = [layer_of(asset) for asset in PER_SHARD_ASSETS]


@dg.sensor(
    name=names.INCOMING_FILES_SENSOR,
    job=shard_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def incoming_files_sensor(
    context: dg.SensorEvaluationContext, store: DatasetStoreResource
) -> dg.SensorResult:
    """Adds a shard for each new file in `{root}/incoming/` and runs its assets.

    The cursor maps each file name to its content fingerprint (S3 ETag, or size and mtime), so a
    file counts once; a file replaced with new content gets its shard run again. A file the sensor
    has not seen whose shard is done in the store, made from that same content (by `laion-assets run`
    or the demo), gets its partition but no run.
    """
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    dataset = store.get_store()
    sources = incoming_by_shard(dataset)
    known = set(context.instance.get_dynamic_partitions(shards.name))
    unseen = {shard: file for shard, file in sources.items() if file.name not in seen}
    done = done_shards(dataset, unseen)
    new_shards: list[str] = []
    run_requests = []
    for shard, file in sources.items():
        if seen.get(file.name) == file.fingerprint:
            continue
        if shard not in known:
            new_shards.append(shard)
        if shard in done:
            continue
        run_requests.append(
            dg.RunRequest(
                run_key=f"{file.name}:{file.fingerprint}",
                partition_key=shard,
                tags={
                    names.SOURCE_FILE_TAG: file.name,
                    names.TRIGGER_TAG: "changed" if file.name in seen else "new",
                },
            )
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[shards.build_add_request(new_shards)] if new_shards else [],
        cursor=json.dumps({f.name: f.fingerprint for f in sources.values()}, sort_keys=True),
        skip_reason=None if run_requests else f"no new or changed files among {len(sources)} in incoming/",
    )


automation_sensor = dg.AutomationConditionSensorDefinition(
    names.FOLLOW_UPSTREAM_SENSOR,
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Requests the assets whose automation condition holds: a per-shard asset after its upstream "
    "shard changed alone, the dataset-level assets (catalog, card) after any shard changed.",
)


def done_shards(dataset: DatasetStore, sources: dict[str, StoredFile]) -> set[str]:
    """The shards of `sources` whose every per-shard layer is in the store, made from this very content."""
    return {shard for shard, stale in stale_layers(dataset, sources, PER_SHARD_LAYERS).items() if not stale}


def shards_to_catch_up(
    instance: dg.DagsterInstance, dataset: DatasetStore, sources: dict[str, StoredFile]
) -> list[str]:
    """Shards (of `sources`, shard -> its file) where the last attempt at some per-shard asset failed, or
    where some per-shard asset was never materialised in this instance and the shard is not done in the
    store either (it is after `laion-assets run` on another instance)."""
    keys = list(sources)
    failed: set[str] = set()
    never: set[str] = set()
    for asset in PER_SHARD_ASSETS:
        statuses = instance.get_status_by_partition(asset.key, keys, shards) or {}
        failed.update(key for key in keys if statuses.get(key) == dg.AssetPartitionStatus.FAILED)
        never.update(key for key in keys if statuses.get(key) is None)
    done = done_shards(dataset, {key: sources[key] for key in never - failed})
    return [key for key in keys if key in failed or (key in never and key not in done)]


@dg.schedule(
    name=names.CATCH_UP_SCHEDULE,
    job=shard_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def catch_up_schedule(context: dg.ScheduleEvaluationContext, store: DatasetStoreResource):
    """Nightly: reruns each shard still in `incoming/` whose assets are missing or whose last run failed."""
    dataset = store.get_store()
    registered = set(context.instance.get_dynamic_partitions(shards.name))
    sources = {shard: file for shard, file in incoming_by_shard(dataset).items() if shard in registered}
    stale = shards_to_catch_up(context.instance, dataset, sources)
    if not stale:
        return dg.SkipReason(f"all {len(sources)} shards are materialised")
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [
        dg.RunRequest(
            run_key=f"catch-up:{day}:{shard}", partition_key=shard, tags={names.TRIGGER_TAG: "catch-up"}
        )
        for shard in stale
    ]
