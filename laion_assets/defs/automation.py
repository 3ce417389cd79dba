"""What runs without a person: the sensor that turns new files in `incoming/` into shard runs, the
automation-condition sensor that makes assets follow their upstream, and the schedule that catches up."""

import json

import dagster as dg

from laion_assets.defs.jobs import PER_SHARD_ASSETS, shard_job
from laion_assets.defs.metadata import shard_output
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.sources import parse_source_name
from laion_assets.pipeline.storage import INCOMING, DatasetStore, StoredFile

SOURCE_FILE_TAG = "laion_assets/source_file"


@dg.sensor(job=shard_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def incoming_files_sensor(
    context: dg.SensorEvaluationContext, store: DatasetStoreResource
) -> dg.SensorResult:
    """Adds a shard for each new file in `{root}/incoming/` and runs its assets.

    The cursor maps each file name to its content fingerprint (S3 ETag, or size and mtime), so a
    file counts once; a file replaced with new content gets its shard run again. A file the sensor
    has not seen whose shard the store already holds, read from that same content (by `laion-assets
    run` or the demo), gets its partition but no run.
    """
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    dataset = store.get_store()
    files = dataset.list(INCOMING)
    known = set(context.instance.get_dynamic_partitions(shards.name))
    new_shards: list[str] = []
    run_requests = []
    for file in files:
        if seen.get(file.name) == file.fingerprint:
            continue
        shard = parse_source_name(file.name).shard
        if shard not in known and shard not in new_shards:
            new_shards.append(shard)
        if file.name not in seen and _already_stored(dataset, shard, file):
            continue
        run_requests.append(
            dg.RunRequest(
                run_key=f"{file.name}:{file.fingerprint}",
                partition_key=shard,
                tags={
                    SOURCE_FILE_TAG: file.name,
                    "laion_assets/trigger": "changed" if file.name in seen else "new",
                },
            )
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[shards.build_add_request(new_shards)] if new_shards else [],
        cursor=json.dumps({f.name: f.fingerprint for f in files}, sort_keys=True),
        skip_reason=None if run_requests else f"no new or changed files among {len(files)} in incoming/",
    )


automation_sensor = dg.AutomationConditionSensorDefinition(
    "follow_upstream_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Requests the assets whose automation condition holds: a per-shard asset after its upstream "
    "shard changed alone, the dataset-level assets (catalog, card) after any shard changed.",
)


def _already_stored(dataset: DatasetStore, shard: str, file: StoredFile) -> bool:
    """Whether `crawl_metadata/<shard>.parquet` was read from this very file content."""
    path = dataset.shard_file("crawl_metadata", shard, "parquet")
    if not dataset.exists(path):
        return False
    source = json.loads(dataset.parquet_metadata(path).get(schemas.SOURCE, "{}"))
    return source == {"file": file.name, "fingerprint": file.fingerprint}


def _stored_whole(dataset: DatasetStore, shard: str, file: StoredFile) -> bool:
    """Every per-shard output of `shard` is in the store, made from this very source content."""
    return _already_stored(dataset, shard, file) and all(
        dataset.exists(shard_output(asset, shard)) for asset in PER_SHARD_ASSETS
    )


def shards_to_catch_up(
    instance: dg.DagsterInstance, dataset: DatasetStore, sources: dict[str, StoredFile]
) -> list[str]:
    """Shards (of `sources`, shard -> its file) where the last attempt at some per-shard asset failed, or
    where some per-shard asset was never materialised in this instance and the store does not hold the
    shard's outputs either (it does after `laion-assets run` on another instance)."""
    keys = list(sources)
    failed: set[str] = set()
    never: set[str] = set()
    for asset in PER_SHARD_ASSETS:
        statuses = instance.get_status_by_partition(asset.key, keys, shards) or {}
        failed.update(key for key in keys if statuses.get(key) == dg.AssetPartitionStatus.FAILED)
        never.update(key for key in keys if statuses.get(key) is None)
    return [
        key
        for key in keys
        if key in failed or (key in never and not _stored_whole(dataset, key, sources[key]))
    ]


@dg.schedule(job=shard_job, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING)
def catch_up_schedule(context: dg.ScheduleEvaluationContext, store: DatasetStoreResource):
    """Nightly: reruns each shard still in `incoming/` whose assets are missing or whose last run failed."""
    dataset = store.get_store()
    files = {parse_source_name(f.name).shard: f for f in dataset.list(INCOMING)}
    registered = set(context.instance.get_dynamic_partitions(shards.name))
    sources = {shard: file for shard, file in files.items() if shard in registered}
    stale = shards_to_catch_up(context.instance, dataset, sources)
    if not stale:
        return dg.SkipReason(f"all {len(sources)} shards are materialised")
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [
        dg.RunRequest(
            run_key=f"catch-up:{day}:{shard}", partition_key=shard, tags={"laion_assets/trigger": "catch-up"}
        )
        for shard in stale
    ]
