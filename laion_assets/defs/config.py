"""Dagster run config generated from the pipeline's settings dataclasses, so each setting is declared once."""

import dataclasses
import typing

import dagster as dg
import pydantic


def config_class(settings_type: type, name: str, base: type[dg.Config] = dg.Config) -> type:
    """A `dg.Config` (or a subclass such as a resource) with the fields and defaults of `settings_type`."""
    hints = typing.get_type_hints(settings_type)
    fields = {}
    for field in dataclasses.fields(settings_type):
        annotation = hints[field.name]
        default = field.default
        if typing.get_origin(annotation) is tuple:  # run config has lists, not tuples
            annotation, default = list[typing.get_args(annotation)[0]], list(default)
        fields[field.name] = (annotation, pydantic.Field(default=default))
    return pydantic.create_model(name, __base__=base, __module__=base.__module__, **fields)


def settings_from(config: dg.Config, settings_type: type):
    """The pipeline settings for a config or resource built by `config_class`."""
    values = {}
    for field in dataclasses.fields(settings_type):
        value = getattr(config, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return settings_type(**values)
