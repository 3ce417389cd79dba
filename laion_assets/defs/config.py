"""Run config and resource fields are written out in each asset's module, with the pipeline settings'
defaults; `settings_from` turns them into those settings, and a test holds the two to the same fields."""

import dataclasses
import os
import typing
from pathlib import Path

import pydantic

from laion_assets.pipeline.settings import (
    MODEL_FIELDS,
    DatasetSettings,
    SettingsFileError,
    add_missing_sections,
    read_yaml,
    unknown_settings,
)
from laion_assets.pipeline.storage import SETTINGS_FILE, DatasetStore

if typing.TYPE_CHECKING:
    import dagster as dg

T = typing.TypeVar("T")


def settings_from(config: object, settings_type: type[T]) -> T:
    """The pipeline settings `settings_type` made from the same-named fields of a `dg.Config` or resource
    (lists become the tuples the settings hold)."""
    values = {}
    for field in dataclasses.fields(settings_type):
        value = getattr(config, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return settings_type(**values)


RUN_CONFIG_ENV = "LAION_ASSETS_RUN_CONFIG"


def read_run_config(path: Path) -> dict:
    """A launchpad-style run config file: `ops: {<asset>: {config: {...}}}`. ValueError if it is not one."""
    import yaml

    try:
        config = read_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(config, dict) or set(config) - {"ops"}:
        raise ValueError(f"{path}: expected a mapping with only an `ops:` block, got {config!r}")
    return config


def deployment_run_config() -> dict:
    """The run config of the deployment's shard runs: the file $LAION_ASSETS_RUN_CONFIG names, if set.

    Runs the sensor, the catch-up schedule or a job backfill launches carry no run config of their own;
    this is where a deployment sets, say, `max_in_flight` or `respect_robots_txt` for all of them."""
    path = os.environ.get(RUN_CONFIG_ENV)
    return read_run_config(Path(path)) if path else {}


C = typing.TypeVar("C", bound="dg.Config")


def explicit_config(run_config: dict, asset: str) -> dict:
    """The fields a run's own config sets for `asset` (`ops: {asset: {config: ...}}`), as submitted:
    Dagster's defaults are not in it."""
    block = ((run_config or {}).get("ops") or {}).get(asset) or {}
    return dict(block.get("config") or {})


# Fields that ask for something once (train again, accept a change) rather than shape the dataset: a
# run's own config sets them, the settings file never holds them.
RUN_ONLY_FIELDS = frozenset({"accept_settings_change", "retrain", "reshuffle"})


def config_values(config: "dg.Config") -> dict:
    """A config's fields as plain values, as the settings file holds them."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in RUN_ONLY_FIELDS}


def dataset_config(context: "dg.AssetExecutionContext", config: C, store: DatasetStore) -> C:
    """The asset's config as this run uses it: the dataset's settings for the asset (`laion_assets.yaml`),
    with the fields the run's own config sets over them. Where the file has no section for the asset
    yet, this run's config becomes it (the first run writes the dataset's settings); the config's
    `settings()` (each such config has one) first refuses one that no run can use, which would else stay
    the dataset's and fail every later run."""
    name = context.asset_key.to_user_string()
    config.settings()
    stored = record_section(store, name, config_values(config))
    if stored is None:
        return config
    own = stored.section(name)
    fields = set(type(config).model_fields) - RUN_ONLY_FIELDS
    for line in unknown_settings(DatasetSettings({name: own}), {name: fields}, store.url(SETTINGS_FILE)):
        context.log.warning(line)  # in the run's log, wherever it was launched
    section = {k: v for k, v in own.items() if k in fields}
    try:
        return type(config)(**{**section, **explicit_config(context.run.run_config, name)})
    except pydantic.ValidationError as exc:  # the run's own config was checked when it was launched
        wrong = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors()
        )
        raise SettingsFileError(f"{store.url(SETTINGS_FILE)}, section {name}: {wrong}") from None


def record_section(store: DatasetStore, name: str, values: dict) -> DatasetSettings | None:
    """The dataset's settings, where their section `name` is not `values`; else None: `values` is the
    section, written by this run where the file lacked it."""
    stored = add_missing_sections(store, {name: values})
    return None if stored.section(name) == values else stored


def model_settings(resource: object, fields: tuple[str, ...] = MODEL_FIELDS) -> dict:
    """The fields of a model resource that shape what it makes (those of `fields` it has)."""
    return {name: getattr(resource, name) for name in fields if hasattr(resource, name)}
