"""What runs without a person: the sensor that turns new files in `incoming/` into shard runs, the
automation-condition sensor that makes assets follow their upstream, and the schedule that catches up."""

import hashlib
import json

import dagster as dg

from laion_assets import names
from laion_assets.defs.jobs import PER_SHARD_ASSETS, shard_job
from laion_assets.defs.metadata import layer_of
from laion_assets.defs.partitions import range_tags, shards, shards_per_run
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.leases import holders
from laion_assets.pipeline.lineage import incoming_by_shard, settings_changes, stale_layers
from laion_assets.pipeline.settings import DatasetSettings, load_settings
from laion_assets.pipeline.storage import SETTINGS_FILE, DatasetStore, StoredFile

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
    file counts once; a file replaced with new content gets its shard run again. A new or changed file
    whose shard is done in the store, made from that same content (by `laion-assets run` or the demo, or
    before a `touch` or a copy: lineage compares content), gets its partition but no run. New shards
    share runs of `LAION_ASSETS_SHARDS_PER_RUN`.
    The cursor also counts the ticks that requested runs, and a run's key names its tick: the daemon
    drops a request whose key an earlier run had, so a key of the content alone would never run a file
    restored to content it had before, or removed and added again.
    """
    seen, ticks = _read_cursor(context.cursor)
    dataset = store.get_store()
    sources = incoming_by_shard(dataset)
    known = set(context.instance.get_dynamic_partitions(shards.name))
    changed = {shard: file for shard, file in sources.items() if seen.get(file.name) != file.fingerprint}
    busy = being_made(context.instance, dataset, list(changed), known)
    changed = {shard: file for shard, file in changed.items() if shard not in busy}
    done = done_shards(dataset, changed)  # a file touched, copied or re-uploaded with the same content too
    new_shards = [shard for shard in changed if shard not in known]
    to_run = [shard for shard in changed if shard not in done]
    tick = ticks + 1 if to_run else ticks
    run_requests = [
        _run_request({shard: changed[shard] for shard in run}, seen, tick)
        for run in _runs(to_run, new_shards, shards_per_run())
    ]
    files = {f.name: f.fingerprint for f in sources.values()}
    for name in (sources[shard].name for shard in busy):  # seen as before: a tick after the run sees it
        if name in seen:
            files[name] = seen[name]
        else:
            del files[name]
    waiting = f"{len(busy)} changed files wait for the runs making their shards: {', '.join(busy)}"
    if busy and run_requests:
        context.log.info(waiting)
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[shards.build_add_request(new_shards)] if new_shards else [],
        cursor=json.dumps({"files": files, "ticks": tick}, sort_keys=True),
        skip_reason=None
        if run_requests
        else (waiting if busy else f"no new or changed files among {len(sources)} in incoming/"),
    )


def being_made(
    instance: dg.DagsterInstance, dataset: DatasetStore, shard_names: list[str], known: set[str]
) -> list[str]:
    """The shards of `shard_names` that a run of `instance` plans to materialise and has not ended (of
    the partitions `known`), or whose lease a live writer holds (a `laion-assets run`, another instance).
    A run requested for one of them now would fail on the lease, and the file's new content would wait
    for the catch-up."""
    busy = set(holders(dataset, shard_names))
    partitions = [shard for shard in shard_names if shard in known]
    for asset in PER_SHARD_ASSETS:
        statuses = instance.get_status_by_partition(asset.key, partitions, shards) or {}
        busy.update(key for key, status in statuses.items() if status == dg.AssetPartitionStatus.IN_PROGRESS)
    return sorted(busy)


def _runs(to_run: list[str], new_shards: list[str], per_run: int) -> list[list[str]]:
    """The shards of `to_run`, grouped into runs of up to `per_run`.

    The new shards join the partitions in the order of `new_shards`, so consecutive ones there can
    share a run (a range of partitions); a shard known before runs alone, since its neighbours in the
    partitions' order need not run."""
    pending = set(to_run)
    runs: list[list[str]] = []
    current: list[str] = []
    for shard in new_shards:
        if shard in pending:
            current.append(shard)
        if current and (shard not in pending or len(current) == per_run):
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    new = set(new_shards)
    return runs + [[shard] for shard in to_run if shard not in new]


def _read_cursor(cursor: str | None) -> tuple[dict[str, str], int]:
    """The files the sensor has seen (name -> fingerprint) and its ticks that requested runs. A cursor
    written before the count is the files alone."""
    loaded = json.loads(cursor) if cursor else {}
    if isinstance(loaded.get("files"), dict):  # "files" in incoming/ would map to a fingerprint
        return loaded["files"], loaded["ticks"]
    return loaded, 0


def _run_request(files: dict[str, StoredFile], seen: dict[str, str], tick: int) -> dg.RunRequest:
    """A run of the shards of `files` (shard -> its file; consecutive partitions), keyed by their content
    and the sensor's `tick`."""
    file_names = [file.name for file in files.values()]
    trigger = "changed" if any(name in seen for name in file_names) else "new"
    if len(files) == 1:
        ((shard, file),) = files.items()
        return dg.RunRequest(
            run_key=f"{file.name}:{file.fingerprint}:{tick}",
            partition_key=shard,
            tags={names.SOURCE_FILE_TAG: file.name, names.TRIGGER_TAG: trigger},
        )
    content = "\n".join(f"{file.name}:{file.fingerprint}" for file in files.values())
    first, *_, last = files
    span = f"{file_names[0]}..{file_names[-1]}"
    return dg.RunRequest(
        run_key=f"{span}:{hashlib.sha256(content.encode()).hexdigest()[:16]}:{tick}",
        tags={**range_tags(first, last), names.SOURCE_FILE_TAG: span, names.TRIGGER_TAG: trigger},
    )


automation_sensor = dg.AutomationConditionSensorDefinition(
    names.FOLLOW_UPSTREAM_SENSOR,
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Requests the dataset-level assets (dedup, training shards, catalog, card, search index) "
    "after any shard changed and no shard is being made.",
)


def done_shards(dataset: DatasetStore, sources: dict[str, StoredFile]) -> set[str]:
    """The shards of `sources` whose every per-shard layer is in the store, made from this very content."""
    return {shard for shard, stale in stale_layers(dataset, sources, PER_SHARD_LAYERS).items() if not stale}


def shards_to_catch_up(
    instance: dg.DagsterInstance, dataset: DatasetStore, sources: dict[str, StoredFile]
) -> list[str]:
    """Shards (of `sources`, shard -> its file) where the last attempt at some per-shard asset failed, or
    some per-shard asset was never materialised in this instance, and that are not done in the store
    either (they are after `laion-assets run` on another instance, as `laion-assets status` says)."""
    keys = list(sources)
    failed: set[str] = set()
    never: set[str] = set()
    for asset in PER_SHARD_ASSETS:
        statuses = instance.get_status_by_partition(asset.key, keys, shards) or {}
        failed.update(key for key in keys if statuses.get(key) == dg.AssetPartitionStatus.FAILED)
        never.update(key for key in keys if statuses.get(key) is None)
    done = done_shards(dataset, {key: sources[key] for key in failed | never})
    return [key for key in keys if key in failed | never and key not in done]


def settings_report(dataset: DatasetStore, shard_names: list[str]) -> str:
    """A line on the shards with layers built with other settings than the dataset's, or "": they are
    reported here, never rebuilt by the schedule (a backfill or `laion-assets run --rebuild-stale` does)."""
    changed = settings_changes(dataset, shard_names, load_settings(dataset) or DatasetSettings())
    if not changed:
        return ""
    shard, layers = next(iter(changed.items()))
    example = "; ".join(f"{layer}: {', '.join(changes)}" for layer, changes in layers.items())
    return (
        f"{len(changed)} shards have layers built with other settings than {SETTINGS_FILE} (e.g. {shard}: "
        f"{example}); not rebuilt: backfill them, or run `laion-assets run --rebuild-stale`"
    )


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
    other_settings = settings_report(dataset, list(sources))
    if other_settings:
        context.log.warning(other_settings)
    if not stale:
        return dg.SkipReason(f"all {len(sources)} shards are materialised. {other_settings}".strip())
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return [
        dg.RunRequest(
            run_key=f"catch-up:{day}:{shard}", partition_key=shard, tags={names.TRIGGER_TAG: "catch-up"}
        )
        for shard in stale
    ]


def unpause_the_ui_automation_badge(instance: dg.DagsterInstance) -> None:
    """Turns off the pause switch of Dagster's pre-sensor automation daemon in `instance`.

    The UI's "Auto-materialize off" badge reads that switch, which is on in a new instance (anything but
    "false"); our automation is `automation_sensor`, which the switch does not stop, so the badge would
    say automation is paused while it runs. The demo calls this, as the UI's /health toggle would, and
    deploy/set-pools.sh makes the same call with Dagster alone. (Dagster has no public call for it.)"""
    from dagster._daemon.asset_daemon import set_auto_materialize_paused

    set_auto_materialize_paused(instance, False)
