"""Materialising the assets from Python: what `laion-assets run` and the demo do, shard by shard."""

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._utils.error import SerializableErrorInfo

from laion_assets import names
from laion_assets.definitions import DATASET_ASSETS, SETTINGS_SECTIONS, build_definitions
from laion_assets.definitions import defs as project_definitions
from laion_assets.defs.config import RUN_ONLY_FIELDS, config_values, explicit_config
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.metadata import layer_of
from laion_assets.defs.partitions import SHARDS_PER_RUN_ENV, range_tags, shards, shards_per_run
from laion_assets.defs.resources import (
    HF_FIELDS,
    CaptionerSettings,
    CocaCaptionerResource,
    HfCaptionerResource,
    coca_named,
    environment_captioner,
    recorded_captioner,
)
from laion_assets.pipeline.dedup.deduplicate import recorded_settings as recorded_dedup_settings
from laion_assets.pipeline.embeddings.clip import ClipSettings, values_from_env
from laion_assets.pipeline.leases import ShardBusy, describe, holder
from laion_assets.pipeline.lineage import incoming_by_shard, settings_changes, sourceless_shards, stale_layers
from laion_assets.pipeline.recaptions.caption import SETTINGS_ENV as CAPTION_ENV
from laion_assets.pipeline.recaptions.caption import CaptionSettings
from laion_assets.pipeline.recaptions.hf_caption import SETTINGS_ENV as HF_CAPTION_ENV
from laion_assets.pipeline.recaptions.hf_caption import HfCaptionSettings
from laion_assets.pipeline.scores.score import MODEL_FIELDS as SCORE_MODEL_FIELDS
from laion_assets.pipeline.scores.score import SETTINGS_ENV as SCORES_ENV
from laion_assets.pipeline.scores.score import ScoreSettings
from laion_assets.pipeline.settings import (
    CAPTIONER_FIELDS,
    CAPTIONER_SECTION,
    CLIP_SECTION,
    COCA_FIELDS,
    MODEL_FIELDS,
    SCORES_SECTION,
    DatasetSettings,
    add_missing_sections,
    did_you_mean,
    load_settings,
    unknown_settings,
)
from laion_assets.pipeline.storage import BLOCKLIST, INCOMING, SETTINGS_FILE, DatasetStore

ALL_ASSETS = [*PER_SHARD_ASSETS, *DATASET_ASSETS]  # per-shard assets, then the dataset-level ones
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the summary lines say enough


def run_job(
    defs: dg.Definitions, job_name: str, instance: dg.DagsterInstance, **options: object
) -> dg.ExecuteInProcessResult:
    """A run of the project's job `job_name`, in this process, recorded as a run of the code location
    that the UI, the daemon and `dg` load (names.CODE_LOCATION), as their own runs are: the UI finds the
    job through it, so "Re-execute" works on the run. `options`: `execute_in_process`'s, which records no
    location."""
    result = defs.resolve_job_def(job_name).execute_in_process(
        instance=instance, raise_on_error=False, **options
    )
    instance.run_storage.replace_job_origin(result.dagster_run, code_location_origin(job_name))
    return result


def code_location_origin(job_name: str) -> RemoteJobOrigin:
    """Where `job_name` comes from in a workspace: the repository of `laion_assets.definitions`, loaded
    as the code location names.CODE_LOCATION."""
    location = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=names.DEFINITIONS_MODULE),
        location_name=names.CODE_LOCATION,
    )
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME), job_name)


@dataclass
class ShardOutcome:
    shard: str
    ran: list[str] = field(default_factory=list)  # asset names materialised
    rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None  # why the shard was left alone

    def line(self) -> str:
        if self.skipped:
            return f"{self.shard}: skipped: {self.skipped}"
        if self.error:
            return f"{self.shard}: FAILED ({', '.join(self.ran)}): {self.error}"
        if not self.ran:
            return f"{self.shard}: up to date"
        return f"{self.shard}: " + ", ".join(f"{name} {self.rows.get(name, '?')} rows" for name in self.ran)


@contextmanager
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """The instance at $DAGSTER_HOME, or a temporary in-memory one."""
    if os.environ.get("DAGSTER_HOME"):
        with dg.DagsterInstance.get() as instance:
            yield instance
    else:
        yield dg.DagsterInstance.ephemeral()


def check_run_config(run_config: dict) -> None:
    """ValueError naming each op of `run_config` that is in none of the project's jobs, and each field of
    an op's config that its asset lacks or that has the wrong type, as the launchpad refuses them. The
    runner keeps only the selected assets' blocks, so a misspelt asset was dropped without a word (and
    the first run wrote the dataset's settings from the defaults it fell back on)."""
    jobs = [project_definitions.resolve_job_def(name) for name in (names.SHARD_JOB, names.DATASET_JOB)]
    ops = (run_config or {}).get("ops") or {}
    if not isinstance(ops, dict):
        raise ValueError(f"`ops:` maps asset names to their blocks, got {ops!r}")
    problems = []
    for op, block in ops.items():
        job = next((job for job in jobs if op in job.graph.node_dict), None)
        if job is None:
            assets = (asset.key.to_user_string() for asset in ALL_ASSETS)
            problems.append(f"{op} is not an asset{did_you_mean(op, assets)}")
            continue
        try:
            dg.validate_run_config(job, {"ops": {op: block}})
            if op in SETTINGS_SECTIONS:  # values of the right type that no run can use
                SETTINGS_SECTIONS[op](**explicit_config(run_config, op)).settings()
        except dg.DagsterInvalidConfigError as exc:  # each error's message ends with the whole schema
            problems.extend(error.message.split(". Expected:")[0] for error in exc.errors)
        except ValueError as exc:
            problems.append(f"{op}: {exc}")
    if problems:
        raise ValueError("; ".join(problems))


def settings_warnings(store: DatasetStore, settings: DatasetSettings | None) -> list[str]:
    """A line per section and field of the dataset's settings file (`settings`, as read from `store`) that
    no run reads (a misspelt key, a field an older version wrote): `settings.unknown_settings`."""
    if settings is None:
        return []
    known = {name: set(config.model_fields) - RUN_ONLY_FIELDS for name, config in SETTINGS_SECTIONS.items()}
    models = {CLIP_SECTION: MODEL_FIELDS, CAPTIONER_SECTION: CAPTIONER_FIELDS}
    return unknown_settings(
        settings, {**known, **models, SCORES_SECTION: SCORE_MODEL_FIELDS}, store.url(SETTINGS_FILE)
    )


def prepare_settings(
    store: DatasetStore,
    run_config: dict,
    clip_settings: ClipSettings | None = None,
    captioner: CaptionerSettings | None = None,
    scorers: ScoreSettings | None = None,
) -> tuple[ClipSettings, CaptionerSettings | None, ScoreSettings]:
    """The models of a run on `store`, and the dataset's settings file completed: an asset's section it
    lacks is written from this run's config (the first run writes them all). The models' sections are
    written by the assets that use them (`defs.config.record_section`), so they name what was used.

    Without `clip_settings`, the model is the dataset's (its `clip` section) under the LAION_ASSETS_CLIP_*
    variables that are set; so is the captioner, where the environment chooses no kind: the dataset's
    CoCa or transformers model (a chat endpoint's address is not recorded: see `refuse_another_captioner`),
    and so are the score models (`scores`, under the variables of `score.SETTINGS_ENV`)."""
    stored = load_settings(store) or DatasetSettings()
    if clip_settings is None:
        clip_settings = ClipSettings.from_dataset(stored)
    if captioner is None and environment_captioner() is CocaCaptionerResource:
        recorded = CocaCaptionerResource if coca_named() else recorded_captioner(stored)
        if recorded is HfCaptionerResource:  # its folder is recorded: the run follows the dataset
            env = values_from_env(HF_CAPTION_ENV)
            base = HfCaptionSettings(model_path="")
            captioner = stored.recorded_in(base, CAPTIONER_SECTION, HF_FIELDS, env)
        elif recorded is CocaCaptionerResource:
            env = values_from_env(CAPTION_ENV)
            captioner = stored.recorded_in(CaptionSettings(), CAPTIONER_SECTION, COCA_FIELDS, env)
        # a chat endpoint's section records no address: the recaptions asset refuses (OtherCaptioner)
    if scorers is None:
        env = values_from_env(SCORES_ENV)
        scorers = stored.recorded_in(ScoreSettings(), SCORES_SECTION, SCORE_MODEL_FIELDS, env)
    configs = {
        name: config_type(**explicit_config(run_config, name))
        for name, config_type in SETTINGS_SECTIONS.items()
        if name not in stored.sections
    }
    for config in configs.values():
        config.settings()  # one no run can use fails here, before it becomes the dataset's settings
    missing = {name: config_values(config) for name, config in configs.items()}
    if names.DUPLICATES_ASSET in missing and (recorded_dedup := recorded_dedup_settings(store)):
        missing[names.DUPLICATES_ASSET].update(recorded_dedup)  # a dataset deduplicated before the file
    if missing:
        add_missing_sections(store, missing)
    return clip_settings, captioner, scorers


def run_pipeline(
    root: str,
    assets: list[dg.AssetsDefinition],
    run_config: dict,
    force: bool = False,
    echo: Callable[[str], None] = print,
    clip: ClipSettings | None = None,
    captioner: CaptionSettings | None = None,
    rebuild_stale: bool = False,
    scorers: ScoreSettings | None = None,
) -> list[ShardOutcome]:
    """Register a shard per file in `incoming/`, materialise the selected assets where a shard is not done
    (see `pipeline/lineage.py`), then the selected dataset-level assets (catalog, dataset_card) over every
    shard. Settings the run config does not set are the dataset's (`prepare_settings`). A layer built with
    other settings than the dataset's is reported, and rebuilt (with the layers after it) only with
    `rebuild_stale`."""
    store = DatasetStore(root)
    for path in store.remove_abandoned():
        echo(f"removed {path}, left by a run that was killed")
    for line in settings_warnings(store, load_settings(store)):
        echo(line)
    defs = build_definitions(root, *prepare_settings(store, run_config, clip, captioner, scorers))
    sources = incoming_by_shard(store)
    echo(f"{len(sources)} shards in {store.url(INCOMING)}")
    outcomes = []
    changed = (
        {} if force else settings_changes(store, list(sources), load_settings(store) or DatasetSettings())
    )
    if changed and not rebuild_stale:
        echo(
            f"{len(changed)} shards have layers built with other settings than the dataset's "
            f"({store.url(SETTINGS_FILE)}): reported below, not rebuilt; `--rebuild-stale` rebuilds them"
        )
    with dagster_instance() as instance:
        known = set(instance.get_dynamic_partitions(shards.name))
        instance.add_dynamic_partitions(shards.name, [s for s in sources if s not in known])
        # the lists first: the downloads check what they record
        before = [a for a in assets if a.key.to_user_string() == names.BLOCKLIST_ASSET]
        outcomes.extend(_materialize_dataset_asset(instance, defs, asset, echo) for asset in before)
        per_shard = [a for a in PER_SHARD_ASSETS if a in assets]
        stale = {} if force else stale_layers(store, sources, [layer_of(a) for a in per_shard])
        # shards next to each other in the partitions' order that need the same assets share a run
        order = {shard: i for i, shard in enumerate(instance.get_dynamic_partitions(shards.name))}
        plan: list[ShardOutcome | tuple[list[str], list[dg.AssetsDefinition]]] = []
        for shard in sources:
            todo = per_shard if force else [a for a in per_shard if layer_of(a) in stale[shard]]
            for layer_name, changes in changed.get(shard, {}).items():
                echo(f"{shard}: {layer_name} was built with other settings ({'; '.join(changes)})")
            if changed.get(shard) and rebuild_stale:
                marked = [i for i, a in enumerate(per_shard) if layer_of(a).name in changed[shard]]
                todo = [a for i, a in enumerate(per_shard) if (marked and i >= marked[0]) or a in todo]
            busy = holder(store, shard) if todo else None
            last = plan[-1] if plan and isinstance(plan[-1], tuple) else None
            if busy:
                plan.append(ShardOutcome(shard, skipped=f"being written by {describe(busy)}; left to it"))
            elif not todo:
                plan.append(ShardOutcome(shard))
            elif (
                last
                and last[1] == todo
                and len(last[0]) < cli_shards_per_run()
                and order[shard] == order[last[0][-1]] + 1
            ):
                last[0].append(shard)
            else:
                plan.append(([shard], todo))
        for step in plan:
            if isinstance(step, ShardOutcome):
                echo(step.line())
                outcomes.append(step)
            else:
                group, todo = step
                outcomes.extend(
                    _materialize_group(instance, defs, store, sources, group, todo, run_config, echo, force)
                )
        # in the pipeline's order, not the order asked for: dedup removes rows the card and index count
        after = [a for a in ALL_ASSETS if a in assets and a not in PER_SHARD_ASSETS and a not in before]
        outcomes.extend(
            _materialize_dataset_asset(instance, defs, asset, echo, run_config) for asset in after
        )
    return outcomes


def _materialize_dataset_asset(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    asset: dg.AssetsDefinition,
    echo: Callable[[str], None],
    run_config: dict | None = None,
) -> ShardOutcome:
    """`asset` materialised by a run of the dataset job, with its own block of `run_config`'s ops, if it
    has one."""
    name = asset.key.to_user_string()
    block = ((run_config or {}).get("ops") or {}).get(name)
    result = run_job(
        defs,
        names.DATASET_JOB,
        run_config={"ops": {name: block}, **QUIET} if block else QUIET,
        instance=instance,
        asset_selection=[asset.key],
        tags={names.TRIGGER_TAG: "cli"},
    )
    error = failure_message(result)
    materializations = [] if error else result.asset_materializations_for_node(name)
    if error:
        echo(f"{name}: FAILED: {error}")
    elif not materializations:  # takedowns, when no sample is on a list
        echo(f"{name}: nothing to do")
    else:
        echo(f"{name}: {materializations[0].metadata['path'].value}")
    echo_rewrites(result, name, echo)
    return ShardOutcome("(dataset)", ran=[name], error=error)


def echo_rewrites(result: dg.ExecuteInProcessResult, name: str, echo: Callable[[str], None]) -> None:
    """A line per shard file a removal by `name` rewrote: its rows now, as the UI shows them."""
    for observation in result.asset_observations_for_node(name):
        if "changed_by" not in observation.metadata:  # not a rewrite (takedowns' "nothing matched")
            continue
        rows, why = observation.metadata["dagster/row_count"].value, observation.metadata["changed_by"].value
        where = f" {observation.partition}" if observation.partition else ""  # training_shards has none
        echo(f"  {observation.asset_key.to_user_string()}{where}: now {rows} rows ({why})")


def cli_shards_per_run() -> int:
    """Shards one `laion-assets run` run materialises together: $LAION_ASSETS_SHARDS_PER_RUN where set,
    else 8. Within a run the downloads are pipelined (the next shard fetches while the last one drains)
    and the run's fixed cost is paid once."""
    return shards_per_run() if os.environ.get(SHARDS_PER_RUN_ENV) else 8


def _materialize_group(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    store: DatasetStore,
    sources: dict,
    group: list[str],
    todo: list[dg.AssetsDefinition],
    run_config: dict,
    echo: Callable[[str], None],
    force: bool,
) -> list[ShardOutcome]:
    """The `todo` assets of the `group` shards in one run; where it fails, each shard again on its own,
    so that a bad shard fails alone and the others are done (what the failed run finished is kept,
    unless `force` asks for every layer again)."""
    outcomes = _materialize(instance, defs, group, todo, run_config)
    if len(group) > 1 and any(outcome.error for outcome in outcomes):
        echo(f"{group[0]}..{group[-1]}: the run of {len(group)} shards failed; each shard on its own")
        layers = [layer_of(a) for a in todo]
        stale = (
            {shard: layers for shard in group}
            if force
            else stale_layers(store, {shard: sources[shard] for shard in group}, layers)
        )
        outcomes = [
            _materialize(
                instance, defs, [shard], [a for a in todo if layer_of(a) in stale[shard]], run_config
            )[0]
            if stale[shard]
            else _done_by_the_failed_run(store, shard, todo)
            for shard in group
        ]
    for outcome in outcomes:
        echo(outcome.line())
    return outcomes


def _done_by_the_failed_run(store: DatasetStore, shard: str, todo: list[dg.AssetsDefinition]) -> ShardOutcome:
    """A shard the failed run of its group finished: its rows as its files hold them."""
    rows = {a.key.to_user_string(): store.parquet_num_rows(layer_of(a).parquet(shard)) for a in todo}
    return ShardOutcome(shard, ran=list(rows), rows=rows)


def _materialize(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    group: list[str],
    todo: list[dg.AssetsDefinition],
    run_config: dict,
) -> list[ShardOutcome]:
    """One run of the shard job, the `todo` assets (and their checks) over the `group` shards
    (consecutive partitions): an outcome each."""
    asset_names = [a.key.to_user_string() for a in todo]
    ops = {name: block for name, block in (run_config.get("ops") or {}).items() if name in asset_names}
    result = run_job(
        defs,
        names.SHARD_JOB,
        run_config={"ops": ops, **QUIET} if ops else QUIET,
        instance=instance,
        partition_key=group[0] if len(group) == 1 else None,
        asset_selection=[a.key for a in todo],
        tags={names.TRIGGER_TAG: "cli", **(range_tags(group[0], group[-1]) if len(group) > 1 else {})},
    )
    error = failure_message(result)
    if len(group) == 1 and getattr(_first_error(result), "cls_name", None) == ShardBusy.__name__:
        # another run took the shard since this one planned it: left to it, as the plan leaves a busy one
        return [ShardOutcome(group[0], skipped=error)]
    outcomes = {shard: ShardOutcome(shard, ran=asset_names, error=error) for shard in group}
    for name in asset_names:
        for materialization in result.asset_materializations_for_node(name):
            for shard, rows in _rows_by_shard(materialization.metadata, group).items():
                outcomes[shard].rows[name] = rows
    return list(outcomes.values())


def _rows_by_shard(metadata: dict, group: list[str]) -> dict[str, int]:
    """Rows per shard from a materialisation's metadata: its own for one shard, its `shards` table's
    rows for several (shards_materialized)."""
    if "dagster/row_count" in metadata:
        return {group[0]: metadata["dagster/row_count"].value} if len(group) == 1 else {}
    table = metadata.get("shards")
    records = table.value.records if table else []
    return {r.data["shard"]: r.data["dagster/row_count"] for r in records if "dagster/row_count" in r.data}


def failure_message(result: dg.ExecuteInProcessResult) -> str | None:
    """The first error of the first failed step that Dagster did not wrap, without its class name.

    Dagster wraps the asset's exception; that exception may itself wrap a library error, and its own
    message (with the advice in it) is the one to show. None if no step failed.
    """
    error = _first_error(result)
    return None if error is None else error.message.strip().split(f"{error.cls_name}: ", 1)[-1]


def _first_error(result: dg.ExecuteInProcessResult) -> SerializableErrorInfo | None:
    failure = next((e for e in result.all_events if e.is_step_failure), None)
    if failure is None:
        return None
    error = failure.step_failure_data.error
    while error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error


def run_takedown(root: str, list_file: Path, echo: Callable[[str], None] = print) -> int:
    """Copy `list_file` into `{root}/blocklist/` and run the takedown job, as the blocklist sensor does:
    the lists recorded, what they match removed, then dedup, the search index, catalog and card."""
    from laion_assets.pipeline.takedowns.blocklist import LIST_SUFFIXES, read_list

    if list_file.suffix.lower() not in LIST_SUFFIXES:
        raise ValueError(f"{list_file}: a block list is a {', '.join(LIST_SUFFIXES)} file")
    store = DatasetStore(root)
    target, data = f"{BLOCKLIST}/{list_file.name}", list_file.read_bytes()
    entries, problems = read_list(list_file.name, data)
    if not entries:  # copied, it would take nothing down and warn at every later takedown
        found = "; ".join(f"{problem.where}: {problem.problem}" for problem in problems[:3]) or "it is empty"
        raise ValueError(f"{list_file}: no entry to take down, nothing copied ({found})")
    if problem := store.no_dataset_here():  # a mistyped root: the list would take nothing down there
        raise ValueError(problem)
    if store.exists(target) and store.read_bytes(target) != data:  # its entries would no longer apply
        raise ValueError(
            f"{store.url(target)} exists with other entries: name this list otherwise, or edit that one"
        )
    for line in settings_warnings(store, load_settings(store)):
        echo(line)
    defs = build_definitions(root, *prepare_settings(store, {}))
    store.write_bytes(target, data)
    echo(f"copied {list_file} to {store.url(target)}")
    with dagster_instance() as instance:
        result = run_job(
            defs, names.TAKEDOWN_JOB, run_config=QUIET, instance=instance, tags={names.TRIGGER_TAG: "cli"}
        )
    for asset in DATASET_ASSETS:  # the takedown job's assets, in its order
        name = asset.key.to_user_string()
        done = result.asset_materializations_for_node(name)
        metadata = done[0].metadata if done else {}
        if name == names.BLOCKLIST_ASSET and metadata:
            entries, problems = metadata["dagster/row_count"].value, metadata["problems"].value
            echo(f"{name}: {entries} entries, {problems} problems")
        elif name == names.TAKEDOWNS_ASSET:
            removed = metadata["dagster/row_count"].value if metadata else 0
            shards_ = metadata["shards_rewritten"].value if metadata else 0
            echo(
                f"{name}: {removed} sample{'' if removed == 1 else 's'} removed from {shards_} "
                f"shard{'' if shards_ == 1 else 's'}"
                + (f", ledger {metadata['path'].value}" if metadata else "")
            )
        else:
            echo(f"{name}: {metadata['path'].value if metadata else 'not rebuilt'}")
        echo_rewrites(result, name, echo)
    error = failure_message(result)
    if error:
        echo(f"FAILED: {error}")
    return 1 if error else 0


def init_settings(root: str, run_config: dict) -> str:
    """Write the dataset's settings file: every section's defaults under `run_config`'s values. Refuses
    (FileExistsError) where the root has one: edit it instead."""
    store = DatasetStore(root)
    if load_settings(store) is not None:
        raise FileExistsError(f"{store.url(SETTINGS_FILE)} exists: edit it to change the dataset's settings")
    prepare_settings(store, run_config)
    return store.url(SETTINGS_FILE)


def dataset_status(root: str) -> tuple[list[str], bool]:
    """Lines saying, shard by shard, which layers are not done (their source changed or they are missing)
    and which were built with other settings than the dataset's, then whether dedup's rule is the
    dataset's; and whether anything is stale."""
    from laion_assets.pipeline.dedup.deduplicate import rule_changes

    store = DatasetStore(root)
    stored = load_settings(store)
    current = stored or DatasetSettings()  # before the first run: nothing built otherwise, all to make
    sources = incoming_by_shard(store)
    per_shard = [layer_of(a) for a in PER_SHARD_ASSETS]
    not_done = stale_layers(store, sources, per_shard)
    changed = settings_changes(store, list(sources), current)
    url = store.url(SETTINGS_FILE)
    settings = f"no settings in {url} yet: the first run writes them" if stored is None else f"settings {url}"
    lines = [f"{len(sources)} shards in {store.url(INCOMING)}; {settings}", *settings_warnings(store, stored)]
    for shard in sources:
        if not not_done[shard] and shard not in changed:
            lines.append(f"{shard}: up to date")
            continue
        if not_done[shard]:
            lines.append(f"{shard}: to make: {', '.join(layer.name for layer in not_done[shard])}")
        for layer_name, changes in changed.get(shard, {}).items():
            lines.append(f"{shard}: {layer_name} built with other settings: {'; '.join(changes)}")
    for shard, layers in sourceless_shards(store, sources, per_shard).items():
        lines.append(
            f"{shard}: built ({', '.join(layer.name for layer in layers)}) but no file in {INCOMING}/ makes "
            "it: its layers stay in the dataset, and no run makes them again"
        )
    dedup = current.section(names.DUPLICATES_ASSET)
    dedup_changes = rule_changes(store, dedup) if dedup else []
    if dedup_changes:
        lines.append(
            f"duplicates: deduplicated with other rules ({'; '.join(dedup_changes)}): the next dedup run "
            "refuses until the change is accepted (`laion-assets run --accept-settings-change`)"
        )
    stale = bool(changed or dedup_changes or any(not_done.values()))
    if changed:
        lines.append(
            "rebuild the layers built otherwise with `laion-assets run --rebuild-stale` or a backfill"
        )
    return lines, stale
