"""The dataset's settings: `{root}/laion_assets.yaml`, the one record of what shapes its content.

It holds a section per asset with settings (the fields of its run config, by asset name) and the models
(`clip`, `captioner`, `scores`). The first run writes it from its own settings; every later run,
whoever starts it, reads it, and a run's own config overrides it for that run only. Changing it is
deliberate: edit the file; a layer built with other settings is then reported stale (`laion-assets
status`), and a removal with other settings refuses until the change is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from laion_assets.pipeline.leases import SETTINGS as SETTINGS_LEASE
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.storage import SETTINGS_FILE, DatasetStore

T = TypeVar("T")

CLIP_SECTION = "clip"
CAPTIONER_SECTION = "captioner"
SCORES_SECTION = "scores"  # the quality_scores models
SETTINGS_WAIT = 60.0  # how long a run waits for another to finish adding its sections
# The model fields that shape embeddings and captions; device and batch size do not.
MODEL_FIELDS = ("model", "pretrained", "seed")
# A CoCa captioner's: its model's, and the decoding and length, which shape its captions as much.
COCA_FIELDS = (*MODEL_FIELDS, "decoding", "beams", "max_tokens")
# The captioner's: a CoCa's; a chat endpoint's model, prompt, length and temperature; a transformers
# captioner's folder, prompt and length.
CAPTIONER_FIELDS = (
    *COCA_FIELDS,
    "model_path",
    "prompt",
    "max_completion_tokens",
    "temperature",
    "max_new_tokens",
)
_HEADER = """\
# The settings that shape this dataset's content, read by every run on this root: `laion-assets run`,
# `takedown` and `demo`, the sensors, the catch-up schedule and runs launched from the Dagster UI.
# A run's own config overrides a value for that run only. Edit a value here to change the dataset on
# purpose: `laion-assets status` then lists the layers built otherwise, and a removal (dedup) with
# other settings than the dataset's refuses until the change is accepted (see docs/cli.md, "The
# dataset's settings").
"""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


# YAML 1.1, PyYAML's, reads `eps: 1e-2` or `max_bytes: 2e7` as strings (its floats need a dot and a signed
# exponent); the runs' configs take them as numbers, but a string never equals the number a layer records,
# so the layer would be reported built otherwise, and rebuilt by every `--rebuild-stale`. Here they are
# numbers, as in YAML 1.2, and a string that looks like one is written quoted.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def read_yaml(text: str | bytes) -> Any:
    """`text` read as YAML, exponent numbers as numbers (see `_EXPONENT_FLOAT`): the settings file's rule,
    and a run config file's, as the launchpad's YAML reads it."""
    return yaml.load(text, Loader=_Loader)


class SettingsChanged(ValueError):
    """A run would change the dataset with settings other than those it was built with."""


class SettingsFileError(ValueError):
    """The dataset's settings file cannot be read as one; the message names it."""


@dataclass(frozen=True)
class DatasetSettings:
    """Section name (an asset's, `clip`, `captioner` or `scores`) -> field -> value."""

    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = SETTINGS_FILE  # the file they were read from, for errors

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name) or {})

    def with_sections(self, sections: Mapping[str, Mapping[str, Any]]) -> DatasetSettings:
        """These settings with `sections` added or replaced."""
        return dataclasses.replace(
            self, sections={**self.sections, **{k: dict(v) for k, v in sections.items()}}
        )

    def recorded_in(self, base: T, section: str, fields: Iterable[str], overrides: Mapping[str, Any]) -> T:
        """`base` (a model's settings dataclass) with the `fields` that `section` records, and `overrides`
        (the environment's, say) over them: how every entry point finds the dataset's models.
        SettingsFileError, naming the file, where a recorded value is not one the field takes (a hand edit's
        `pretrained:` left empty reached open_clip as None)."""
        chosen = {k: v for k, v in self.section(section).items() if k in fields and k not in overrides}
        hints = typing.get_type_hints(type(base))
        wrong = [
            f"{k}: expected {getattr(hints[k], '__name__', hints[k])}, got {v!r}"
            for k, v in chosen.items()
            if not _fits(v, hints[k])
        ]
        try:
            if wrong:
                raise ValueError("; ".join(wrong))
            recorded = dataclasses.replace(base, **chosen)  # its own checks (a decoding it lacks, ...)
        except ValueError as exc:
            raise SettingsFileError(f"{self.source}, section {section}: {exc}") from None
        return dataclasses.replace(recorded, **overrides)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of the type `hint` names (an int where a float is asked for too)."""
    if hint is float:
        hint = float | int
    if not isinstance(hint, type | types.UnionType):  # a generic (tuple[str, ...]): not checked
        return True
    return isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool)


def load_settings(store: DatasetStore) -> DatasetSettings | None:
    """The root's settings; None where no run has written them yet. SettingsFileError, one line naming the
    file, if it is not a mapping of sections, each a mapping of named fields."""
    try:
        text = store.read_bytes(SETTINGS_FILE)  # whole, though another run may be replacing it
    except FileNotFoundError:
        return None
    url = store.url(SETTINGS_FILE)
    try:
        loaded = read_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise SettingsFileError(f"{url}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, dict | type(None)) for v in loaded.values()):
        raise SettingsFileError(f"{url}: expected a mapping of sections (asset name -> settings)")
    sections = {name: dict(values or {}) for name, values in loaded.items()}
    # `on:` or `2024:` is a bool or an int to YAML: sorting and matching the names failed on it (TypeError)
    keys = [*sections, *(key for values in sections.values() for key in values)]
    unnamed = next((key for key in keys if not isinstance(key, str)), None)
    if unnamed is not None:
        kind = type(unnamed).__name__
        raise SettingsFileError(f"{url}: a key is read as {kind} {unnamed!r}, not a name: quote it")
    return DatasetSettings(sections, url)


def add_missing_sections(store: DatasetStore, sections: Mapping[str, Mapping[str, Any]]) -> DatasetSettings:
    """The dataset's settings once each of `sections` the file lacks is written into it; a section it has
    stays as it is. Under the settings lease: runs that start together on a new dataset each add their
    sections, and none writes over another's (a read, then a write, from two runs at once would)."""
    stored = load_settings(store) or DatasetSettings()
    if not set(sections) - set(stored.sections):
        return stored
    with shard_lease(store, SETTINGS_LEASE, "adding settings", wait=SETTINGS_WAIT, poll=0.05):
        stored = load_settings(store) or DatasetSettings()  # as it is now, under the lease
        missing = {name: values for name, values in sections.items() if name not in stored.sections}
        if missing:
            stored = stored.with_sections(missing)
            write_settings(store, stored)
    return stored


def write_settings(store: DatasetStore, settings: DatasetSettings) -> None:
    body = yaml.dump(
        {name: dict(values) for name, values in sorted(settings.sections.items())},
        Dumper=_Dumper,
        sort_keys=True,
        default_flow_style=False,
    )
    store.write_bytes(SETTINGS_FILE, (_HEADER + body).encode())


def unknown_settings(
    settings: DatasetSettings, known: Mapping[str, Collection[str]], where: str
) -> list[str]:
    """A line, naming the file `where`, per section of `settings` that `known` (section -> its fields)
    lacks, and per field of a section that is not one of its fields. The runs ignore them, so a misspelt
    key would change nothing without a word; a field an older version wrote, since removed, is one too,
    and it stays a warning, never an error, so that an older dataset still runs."""
    lines = []
    for name in sorted(settings.sections):
        if name not in known:
            lines.append(f"{where}: {name} is not a section{did_you_mean(name, known)}: ignored")
            continue
        for key in sorted(set(settings.section(name)) - set(known[name])):
            hint = did_you_mean(key, known[name])
            lines.append(f"{where}, section {name}: {key} is not one of its settings{hint}: ignored")
    return lines


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean <the closest of choices>?)`, or nothing where none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`field: recorded -> current` for each field whose value differs (a field only one side has is
    compared with the other side's absence), sorted by field."""
    changed = []
    for name in sorted(recorded.keys() | current.keys()):
        before, after = recorded.get(name, "(unset)"), current.get(name, "(unset)")
        if _comparable(before) != _comparable(after):
            changed.append(f"{name}: {before!r} -> {after!r}")
    return changed


def _comparable(value: Any) -> str:
    """Tuples and lists, ints and equal floats compare alike (YAML and JSON round trips change them)."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, default=str)
