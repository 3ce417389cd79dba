"""Run config and resource fields are written out in each asset's module, with the pipeline settings'
defaults; `settings_from` turns them into those settings, and a test holds the two to the same fields."""

import dataclasses
import typing

T = typing.TypeVar("T")


def settings_from(config: object, settings_type: type[T], **overrides: object) -> T:
    """The pipeline settings `settings_type` made from the same-named fields of a `dg.Config` or resource
    (lists become the tuples the settings hold)."""
    values = {}
    for field in dataclasses.fields(settings_type):
        if field.name in overrides:
            continue
        value = getattr(config, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return settings_type(**values, **overrides)
