"""Run config and resource fields are written out in each asset's module, with the pipeline settings'
defaults; `settings_from` turns them into those settings, and a test holds the two to the same fields."""

import dataclasses
import os
import typing
from pathlib import Path

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

    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict) or set(config) - {"ops"}:
        raise ValueError(f"{path}: expected a mapping with only an `ops:` block, got {config!r}")
    return config


def deployment_run_config() -> dict:
    """The run config of the deployment's shard runs: the file $LAION_ASSETS_RUN_CONFIG names, if set.

    Runs the sensor, the catch-up schedule or a job backfill launches carry no run config of their own;
    this is where a deployment sets, say, `threads` or `respect_robots_txt` for all of them."""
    path = os.environ.get(RUN_CONFIG_ENV)
    return read_run_config(Path(path)) if path else {}
