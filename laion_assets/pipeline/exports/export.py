"""Training shards: a named subset of the pairs, resharded into shuffled webdataset tars of a fixed size.

An export (`storage.Export`) selects pairs with a SQL `where` over the catalog's `annotated_pairs` view
(the pairs with their quality scores, recaptions and dedup's finds) and/or a key list, and writes them
as `exports/<name>/<nnnnn>.tar`: each sample is the image as stored, `txt` (the export's caption:
`caption` or `re_caption`), `json` (every column of its row) and, if asked, `npy` (its image embedding).
Beside each tar, `<nnnnn>.parquet` holds its samples' rows and `<nnnnn>_stats.json` its counts; then
`sizes.json` (each tar's samples, which open_clip's trainer reads) and `manifest.json`, written last,
which lists the shards, the sources read, the query and the settings.

The shuffle is DataComp's resharder's: the source shards in a seeded order, each sample through a
shuffle buffer of `shuffle_buffer` samples, so memory holds the buffer, never the export.

An export grows with the dataset: a run reads only the source shards its manifest does not list, and
appends shards after the last (so each append may leave one shard short of `shard_size`). A source shard
whose pairs, scores or recaptions were rebuilt after it was read (another source file, other settings)
is read again: its old samples are taken out of the tars that hold them first. A shard that
lacks a layer `annotated_pairs` joins (`scores`, `recaptions`) which the dataset builds for other
shards waits for it (`waiting`): read before, its rows would have had no recaption or no score, and it
would never have been read again. So does a shard whose pairs dedup (where the dataset runs it) has not
checked yet: its `duplicate` flags are not known. Nothing
else written is rewritten unless asked (`reshuffle`), and an export built with other settings refuses to
grow until then. A removal (takedown or dedup, `pipeline/removal.py`) rewrites the shards that hold a
removed key (`export_hits`, `remove_from_exports`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_assets import names
from laion_assets.pipeline.catalog import views
from laion_assets.pipeline.lineage import identities
from laion_assets.pipeline.pairs.filter import stored_pair_shards
from laion_assets.pipeline.settings import SettingsChanged, differences
from laion_assets.pipeline.shard_tar import TarShardWriter, drop_samples, encode_sample, read_samples
from laion_assets.pipeline.storage import (
    DEDUP_SHARDS,
    EMBEDDINGS,
    EXPORTS,
    PAIRS,
    RECAPTIONS,
    SCORES,
    DatasetStore,
    Export,
)
from laion_assets.pipeline.tables import without_keys

if TYPE_CHECKING:
    import duckdb

CAPTION_FIELDS = ("caption", "re_caption")  # what a sample's txt can hold
SOURCE_SHARD = "source_shard"  # the column (and json field) naming the dataset shard a sample came from
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_KEY_FILE_SUFFIXES = (".txt", ".parquet")
# The layers of a source shard an export's rows come from: when one is rebuilt, the shard is read again.
_READ_LAYERS = (PAIRS, SCORES, RECAPTIONS)


@dataclass(frozen=True)
class ExportSettings:
    """One export: which pairs, which caption, and how they are sharded."""

    name: str  # the folder under exports/: letters, digits, `_` and `-`
    where: str = ""  # SQL over annotated_pairs' columns; blank: every pair
    keys_file: str = ""  # only these keys: a .txt (a key a line) or .parquet (a `key` column); under the root
    caption: str = "caption"  # the txt of each sample: `caption` (the web's) or `re_caption`
    shard_size: int = 10_000  # samples per tar
    shuffle_buffer: int = 20_000  # samples held to shuffle (0: only the source shards' order is shuffled)
    seed: int = 0
    embeddings: bool = False  # add each sample's CLIP image embedding as `npy` (float16)

    def check(self) -> None:
        """ValueError naming the export and the setting that cannot be used."""
        problems = []
        if not _NAME.fullmatch(self.name):
            problems.append(f"name {self.name!r} must be letters, digits, `_` and `-`")
        if self.caption not in CAPTION_FIELDS:
            problems.append(f"caption {self.caption!r} is not one of {', '.join(CAPTION_FIELDS)}")
        if self.shard_size < 1:
            problems.append(f"shard_size {self.shard_size} must be at least 1")
        if self.shuffle_buffer < 0:
            problems.append(f"shuffle_buffer {self.shuffle_buffer} must not be negative")
        if self.keys_file and not self.keys_file.endswith(_KEY_FILE_SUFFIXES):
            problems.append(f"keys_file {self.keys_file!r} must be a {' or '.join(_KEY_FILE_SUFFIXES)} file")
        if problems:
            raise ValueError(f"export {self.name!r}: {'; '.join(problems)}")

    def selection_sql(self) -> str:
        """The query that selects the export's pairs, as its manifest records it."""
        where = f"({self.where})" if self.where.strip() else "true"
        keys = f" AND key IN (SELECT key FROM {_KEYS_TABLE})" if self.keys_file else ""
        return f"SELECT * FROM {views.ANNOTATED_PAIRS_VIEW} WHERE {where}{keys}"


_KEYS_TABLE = "export_keys"  # the keys file's keys, registered on the connection


@dataclass
class ExportResult:
    name: str
    manifest: dict[str, Any]  # as written
    sources_added: list[str] = field(default_factory=list)  # the dataset shards read by this run
    shards_added: list[str] = field(default_factory=list)  # the tars this run wrote, by name (`00003`)
    samples_added: int = 0
    rebuilt: bool = False  # written anew (first run, or `reshuffle`)
    waiting: dict[str, list[str]] = field(default_factory=dict)  # shard -> the layers it waits for
    reread: list[str] = field(default_factory=list)  # the dataset shards rebuilt since they were read


def read_manifest(store: DatasetStore, export: Export) -> dict[str, Any] | None:
    """The export's manifest; None where it has none. ValueError naming the file if it is not one."""
    if not store.exists(export.manifest):
        return None
    with store.open(export.manifest) as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{store.url(export.manifest)}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not {"settings", "shards", "sources"} <= manifest.keys():
        raise ValueError(f"{store.url(export.manifest)}: not an export manifest (settings, shards, sources)")
    return manifest


def stored_exports(store: DatasetStore) -> list[dict[str, Any]]:
    """The manifest of every export under the root, by name."""
    manifests = (read_manifest(store, Export(name)) for name in store.list_folders(EXPORTS))
    return [manifest for manifest in manifests if manifest is not None]


def write_export(store: DatasetStore, settings: ExportSettings, reshuffle: bool = False) -> ExportResult:
    """Add to the export the pairs of the dataset shards it has not read yet (all of them, in new shards
    from `00000`, on the first run or with `reshuffle`). SettingsChanged where the export was built with
    other settings and `reshuffle` is not set; ValueError naming the export for a `where` DuckDB cannot
    run or a keys file it cannot read. Other keys in the keys file are other settings."""
    settings.check()
    export = Export(settings.name)
    manifest = read_manifest(store, export)
    keys = read_keys_file(store, settings.keys_file) if settings.keys_file else None
    if manifest is not None and not reshuffle:
        changed = differences(manifest["settings"], dataclasses.asdict(settings))
        if keys is not None and manifest.get("keys_sha256", _keys_digest(keys)) != _keys_digest(keys):
            changed.append(f"keys_file {settings.keys_file} lists other keys")
        if changed:
            raise SettingsChanged(
                f"export {settings.name!r} in {store.url(export.folder)} was built with other settings "
                f"({'; '.join(changed)}): it grows only with its own; set `reshuffle: [{settings.name}]` "
                "in the run's config to rebuild it with these"
            )
    rebuilt = manifest is None or reshuffle
    if rebuilt:
        store.remove(export.manifest)  # first, so that no manifest claims the shards while they change
        store.remove(export.sizes)
        manifest = _new_manifest(settings)
        if keys is not None:
            manifest["keys_sha256"] = _keys_digest(keys)
    _remove_unlisted(store, export, manifest)
    made_from = manifest.setdefault("made_from", {})  # manifests before it: their sources count as current
    manifest.setdefault("skipped_by_source", {})  # manifests before it: their skips stay counted
    reread = _rebuilt_since_read(store, made_from)
    if reread:
        _drop_sources(store, export, manifest, reread)
    sources = sorted(set(stored_pair_shards(store, f"export {settings.name!r}")) - manifest["sources"].keys())
    waiting = _waiting(store, sources)
    sources = [source for source in sources if source not in waiting]
    read_from = identities(store, sources, _READ_LAYERS)  # before reading: a rebuild meanwhile shows later
    rng = random.Random(f"{settings.seed}:{len(manifest['appends'])}")
    rng.shuffle(sources)
    connection, schema = _selection_connection(store, settings, keys)
    buffer = _ShuffleBuffer(settings.shuffle_buffer, rng)
    skipped: Counter[str] = Counter()
    with _ShardSink(store, export, len(manifest["shards"]), settings, schema) as sink:
        for source in sources:
            selected = _selected_rows(connection, settings, source)
            of_source: Counter[str] = Counter()
            for sample in _samples(store, source, selected, settings, of_source):
                for ready in buffer.push(sample):
                    sink.write(ready)
            manifest["sources"][source] = selected.num_rows
            if of_source:
                manifest["skipped_by_source"][source] = dict(of_source)
            skipped += of_source
            made_from[source] = read_from.get(source, {})
        for ready in buffer.drain():
            sink.write(ready)
    connection.close()
    added = sum(shard["samples"] for shard in sink.shards)
    shards_added = [shard["shard"] for shard in sink.shards]
    sources = sorted(sources)
    manifest["shards"] += sink.shards
    for reason, count in skipped.items():
        manifest["skipped"][reason] = manifest["skipped"].get(reason, 0) + count
    if sources or rebuilt or reread:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        manifest["appends"].append(
            {
                "at": now,
                "sources": sources,
                "samples": added,
                "shards": shards_added,
            }
        )
        _write_manifest(store, export, manifest)
    return ExportResult(settings.name, manifest, sources, shards_added, added, rebuilt, waiting, reread)


def _rebuilt_since_read(store: DatasetStore, made_from: Mapping[str, dict[str, str]]) -> list[str]:
    """The sources read whose layers of `_READ_LAYERS` are not the files they were read from now: rebuilt,
    built since, or gone."""
    now = identities(store, made_from, _READ_LAYERS)
    return sorted(source for source, read in made_from.items() if now.get(source, {}) != read)


def _drop_sources(store: DatasetStore, export: Export, manifest: dict[str, Any], dropped: list[str]) -> None:
    """Take the samples of the sources `dropped` out of the export's shards (tar, then parquet and stats)
    and out of its manifest, which lists them as not read. A shard whose parquet has fewer rows than its
    entry says was rewritten by a run killed before its manifest: its entry is made again from its files."""
    for shard in manifest["shards"]:
        rows = store.read_parquet(export.parquet(shard["shard"]), columns=["key", SOURCE_SHARD])
        hit = pc.is_in(rows.column(SOURCE_SHARD), value_set=pa.array(dropped, pa.string()))
        keys = set(rows.filter(hit).column("key").to_pylist())
        if keys or rows.num_rows != shard["samples"]:
            shard.update(
                _without_samples(store, export, shard["shard"], keys, manifest["settings"]["caption"])
            )
    for source in dropped:
        manifest["sources"].pop(source, None)
        manifest["made_from"].pop(source)
        for reason, count in manifest["skipped_by_source"].pop(source, {}).items():
            manifest["skipped"][reason] -= count


def _waiting(store: DatasetStore, sources: list[str]) -> dict[str, list[str]]:
    """The `sources` that lack a layer the export's rows join (scores, recaptions) which some other shard
    of the dataset has, or whose pairs dataset-level dedup (where it runs) has not checked as they are now,
    and those layers: not read until they are built. Read before dedup, a pair's `duplicate` is false, and
    dedup recording it later (`remove: false`) would never take it out of an export of `NOT duplicate`."""
    waiting: dict[str, list[str]] = {}
    for layer in (SCORES, RECAPTIONS):
        built = set(store.shards(layer))
        for source in sources:
            if built and source not in built:
                waiting.setdefault(source, []).append(layer.name)
    if store.exists(DEDUP_SHARDS):
        done = store.read_parquet(DEDUP_SHARDS, columns=["shard", "fingerprint"]).to_pylist()
        checked = {row["shard"]: row["fingerprint"] for row in done}  # the pairs file each check read
        for source in sources:
            if checked.get(source) != store.fingerprint(PAIRS.parquet(source)):
                waiting.setdefault(source, []).append(names.DUPLICATES_ASSET)
    return waiting


def _new_manifest(settings: ExportSettings) -> dict[str, Any]:
    return {
        "name": settings.name,
        "settings": dataclasses.asdict(settings),
        "query": settings.selection_sql(),
        "shards": [],  # {"shard", "samples", "bytes"}, in order
        "sources": {},  # dataset shard -> pairs it selected
        "skipped": {},  # why -> selected pairs not written (no caption of the export's kind, no image)
        "skipped_by_source": {},  # dataset shard -> why -> its pairs in `skipped`, taken back when read again
        "removed": {},  # removal reason -> samples removed since
        "made_from": {},  # dataset shard -> layer -> the identity of the file it was read from (lineage)
        "appends": [],  # a record per run that added shards
    }


def _write_manifest(store: DatasetStore, export: Export, manifest: dict[str, Any]) -> None:
    manifest["samples"] = sum(shard["samples"] for shard in manifest["shards"])
    manifest["bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
    sizes = {f"{shard['shard']}.tar": shard["samples"] for shard in manifest["shards"]}
    store.write_bytes(export.sizes, json.dumps(sizes, indent=1).encode())
    store.write_bytes(export.manifest, json.dumps(manifest, indent=1, ensure_ascii=False).encode())


def _remove_unlisted(store: DatasetStore, export: Export, manifest: dict[str, Any]) -> None:
    """Remove the files of the export's folder that its manifest does not list: shards a killed run wrote
    before its manifest, or those of an export being rebuilt."""
    listed = {export.manifest, export.sizes}
    for shard in manifest["shards"]:
        listed |= {export.tar(shard["shard"]), export.parquet(shard["shard"]), export.stats(shard["shard"])}
    for stored in store.list(export.folder):
        if f"{export.folder}/{stored.name}" not in listed:
            store.remove(f"{export.folder}/{stored.name}")


def _selection_connection(
    store: DatasetStore, settings: ExportSettings, keys: list[str] | None
) -> tuple[duckdb.DuckDBPyConnection, pa.Schema]:
    """The catalog's views and the keys file's `keys`; the schema of the export's rows, which also checks
    its query once."""
    import duckdb  # where it queries: see catalog.views

    if settings.where.strip():
        try:  # alone, so that it cannot close the parentheses selection_sql puts it in (`true) OR (true`)
            duckdb.SQLExpression(settings.where)
        except duckdb.Error as exc:
            raise ValueError(
                f"export {settings.name!r}: its where is not one SQL expression ({settings.where!r}): {exc}"
            ) from exc
    connection = views.connect(store)
    if keys is not None:
        connection.register(_KEYS_TABLE, pa.table({"key": keys}))
    try:
        schema = connection.execute(f"{settings.selection_sql()} LIMIT 0").to_arrow_table().schema
    except duckdb.Error as exc:
        connection.close()
        raise ValueError(
            f"export {settings.name!r}: its query cannot run ({settings.selection_sql()}): {exc}"
        ) from exc
    return connection, schema.append(pa.field(SOURCE_SHARD, pa.string()))


def read_keys_file(store: DatasetStore, path: str) -> list[str]:
    """The keys a keys file lists (`path` under the root, or an absolute path or URL): a .txt with a key a
    line, or a .parquet with a `key` column. ValueError naming the file if it cannot be read as one."""
    absolute = path.startswith("/") or "://" in path
    location = path if absolute else store.url(path)
    try:
        with fsspec.open(location, "rb") if absolute else store.open(path) as f:
            if path.endswith(".parquet"):
                return pq.read_table(f, columns=["key"]).column("key").to_pylist()
            return [line.strip() for line in f.read().decode().splitlines() if line.strip()]
    except (OSError, KeyError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{location}: not a keys file (a .txt with a key a line, or a .parquet with a `key` column): "
            f"{exc}"
        ) from exc


def _keys_digest(keys: list[str]) -> str:
    """What a keys file lists, whatever its order, duplicates or format: a manifest records it, so that the
    same file with other keys reads as a change of the export's settings."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()


def _selected_rows(connection: duckdb.DuckDBPyConnection, settings: ExportSettings, source: str) -> pa.Table:
    """The export's rows of the dataset shard `source`, by key, with `source_shard`. Its keys are
    `<source>-<8 digits>`: the range lets DuckDB skip the other shards' files by their statistics, the
    length keeps out a shard whose name starts with this one's. ValueError naming the export where its
    `where` fails on the rows (a cast of a caption), which the schema's check (no rows) cannot see."""
    import duckdb  # loaded already: _selection_connection made the connection

    try:
        table = connection.execute(
            f"SELECT * FROM ({settings.selection_sql()}) "
            "WHERE key BETWEEN ? AND ? AND length(key) = ? ORDER BY key",
            [f"{source}-00000000", f"{source}-99999999", len(source) + 9],
        ).to_arrow_table()
    except duckdb.Error as exc:
        raise ValueError(
            f"export {settings.name!r}: its query cannot run on shard {source} ({settings.selection_sql()}): "
            f"{exc}"
        ) from exc
    return table.append_column(SOURCE_SHARD, pa.array([source] * table.num_rows, pa.string()))


@dataclass
class _Sample:
    key: str
    encoded: bytes  # its tar members (shard_tar.encode_sample)
    row: dict[str, Any]


def _samples(
    store: DatasetStore, source: str, selected: pa.Table, settings: ExportSettings, skipped: Counter[str]
) -> Iterator[_Sample]:
    """The selected pairs of `source` as export samples, in the order of its pairs tar; those without the
    export's caption or without an image are counted in `skipped`, not written."""
    rows = {row["key"]: row for row in selected.to_pylist()}
    vectors = _image_embeddings(store, source, rows) if settings.embeddings and rows else {}
    found = set()
    with store.open(PAIRS.tar(source)) as tar:
        for key, members in read_samples(tar):
            row = rows.get(key)
            if row is None:
                continue
            found.add(key)
            caption = row[settings.caption]
            if not caption:
                skipped[f"no {settings.caption}"] += 1
                continue
            image = {ext: data for ext, data in members.items() if ext not in ("txt", "json")}
            sample = {
                **image,
                "txt": caption.encode(),
                "json": json.dumps(row, ensure_ascii=False).encode(),
            }
            if key in vectors:
                sample["npy"] = vectors[key]
            yield _Sample(key, encode_sample(key, sample), row)
    if len(found) < len(rows):
        skipped["no image"] += len(rows) - len(found)


def _image_embeddings(store: DatasetStore, source: str, rows: Collection[str]) -> dict[str, bytes]:
    """key -> its image embedding as .npy bytes (float16, as stored), for the keys of `rows`."""
    path = EMBEDDINGS.parquet(source)
    if not store.exists(path):
        raise ValueError(f"{store.url(path)} is missing: the export asks for embeddings")
    table = store.read_parquet(path, columns=["key", "image_embedding"])
    table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(list(rows), pa.string())))
    dim = table.schema.field("image_embedding").type.list_size
    vectors = table.column("image_embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = vectors.astype(np.float16).reshape(-1, dim)
    out = {}
    for key, vector in zip(table.column("key").to_pylist(), vectors, strict=True):
        buffer = io.BytesIO()
        np.save(buffer, vector)
        out[key] = buffer.getvalue()
    return out


class _ShuffleBuffer:
    """Holds up to `size` samples; each new one sends a random held one out (DataComp's resharder's
    shuffle): memory is bounded by the buffer, not by the export."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng, self.held = size, rng, []

    def push(self, item: _Sample) -> Iterator[_Sample]:
        self.held.append(item)
        if len(self.held) > self.size:
            chosen = self.rng.randrange(len(self.held))
            self.held[chosen], self.held[-1] = self.held[-1], self.held[chosen]
            yield self.held.pop()

    def drain(self) -> Iterator[_Sample]:
        self.rng.shuffle(self.held)
        while self.held:
            yield self.held.pop()


def _without_samples(
    store: DatasetStore, export: Export, shard: str, keys: Collection[str], caption: str
) -> dict:
    """Rewrite the export's shard without the samples of `keys` (those it still holds): the tar, then its
    parquet and stats. Its entry in the manifest."""
    drop_samples(store, export.tar(shard), keys)
    rows = store.read_parquet(export.parquet(shard))
    kept = without_keys(rows, keys)
    return _write_shard_files(store, export, shard, rows if kept is None else kept, caption)


def _write_shard_files(store: DatasetStore, export: Export, shard: str, rows: pa.Table, caption: str) -> dict:
    """The parquet (`rows`, its samples') and the stats of the export's shard whose tar is written; its
    entry in the manifest."""
    store.write_parquet(export.parquet(shard), rows)
    size = store.fs.size(store.path(export.tar(shard)))
    stats = {
        "export": export.name,
        "shard": shard,
        "samples": rows.num_rows,
        "bytes": size,
        "caption": caption,
        "sources": dict(sorted(Counter(rows.column(SOURCE_SHARD).to_pylist()).items())),
    }
    store.write_bytes(export.stats(shard), json.dumps(stats, indent=1).encode())
    return {"shard": shard, "samples": rows.num_rows, "bytes": size}


class _ShardSink:
    """Writes samples to `<nnnnn>.tar` shards of `shard_size` samples from `first`, each tar atomically,
    then its parquet and stats; `shards` lists what was written. An exception leaves no part of a tar."""

    def __init__(
        self, store: DatasetStore, export: Export, first: int, settings: ExportSettings, schema: pa.Schema
    ) -> None:
        self.store, self.export, self.settings, self.schema = store, export, settings, schema
        self.index = first
        self.shards: list[dict[str, Any]] = []
        self._open: contextlib.ExitStack | None = None
        self._writer: TarShardWriter | None = None
        self._rows: list[dict[str, Any]] = []

    def write(self, sample: _Sample) -> None:
        if self._writer is None:
            self._open = contextlib.ExitStack()
            self._writer = TarShardWriter(self._open.enter_context(self.store.atomic_write(self._tar)))
        self._writer.write_encoded(sample.encoded)
        self._rows.append(sample.row)
        if self._writer.samples == self.settings.shard_size:
            self._finish()

    @property
    def _tar(self) -> str:
        return self.export.tar(self._name)

    @property
    def _name(self) -> str:
        return f"{self.index:05d}"

    def _finish(self) -> None:
        self._writer.close()
        self._open.close()  # the tar is complete
        rows = pa.Table.from_pylist(self._rows, schema=self.schema)
        self.shards.append(
            _write_shard_files(self.store, self.export, self._name, rows, self.settings.caption)
        )
        self.index += 1
        self._writer, self._open, self._rows = None, None, []

    def __enter__(self) -> _ShardSink:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> None:
        if self._open is None:
            return
        if error is None:
            self._finish()
        else:
            self._open.__exit__(kind, error, traceback)  # the temporary tar goes; nothing is committed


SUMMARY_COLUMNS = ["export", "txt", "shards", "samples", "MB", "sources", "skipped", "removed", "query"]


def summary_rows(manifests: list[dict[str, Any]]) -> list[tuple]:
    """A row per export (`SUMMARY_COLUMNS`), as the card and the asset's metadata show them."""
    return [
        (
            m["name"],
            m["settings"]["caption"],
            len(m["shards"]),
            m.get("samples", 0),
            round(m.get("bytes", 0) / 1e6, 1),
            len(m["sources"]),
            sum(m["skipped"].values()),
            sum(m["removed"].values()),
            m["query"],
        )
        for m in manifests
    ]


def export_hits(store: DatasetStore, keys: Collection[str]) -> dict[str, list[str]]:
    """key -> the export tars (paths under the root) that hold it, for those of `keys` in an export."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    hits: dict[str, list[str]] = {}
    for manifest in stored_exports(store):
        export = Export(manifest["name"])
        for shard in manifest["shards"]:
            found = store.read_parquet(export.parquet(shard["shard"]), columns=["key"]).column("key")
            for key in found.filter(pc.is_in(found, value_set=wanted)).to_pylist():
                hits.setdefault(key, []).append(export.tar(shard["shard"]))
    return hits


def remove_from_exports(store: DatasetStore, hits: Mapping[str, list[str]], reason: str) -> list[str]:
    """Rewrite each export shard that `hits` (`export_hits`) names without its removed keys: the tar, its
    parquet and stats, then the manifest. The paths rewritten. A rerun after a crash finishes the job."""
    by_tar: dict[str, set[str]] = {}
    for key, tars in hits.items():
        for tar in tars:
            by_tar.setdefault(tar, set()).add(key)
    written = []
    for name in sorted({tar.split("/")[1] for tar in by_tar}):
        export = Export(name)
        manifest = read_manifest(store, export)
        if manifest is None:
            continue
        for shard in manifest["shards"]:
            removed = by_tar.get(export.tar(shard["shard"]))
            if not removed:
                continue
            # a rerun finishing the job finds the tar or its rows without them already
            entry = _without_samples(store, export, shard["shard"], removed, manifest["settings"]["caption"])
            removed_now = shard["samples"] - entry["samples"]
            manifest["removed"][reason] = manifest["removed"].get(reason, 0) + removed_now
            shard.update(entry)
            written.append(export.tar(shard["shard"]))
        _write_manifest(store, export, manifest)
    return written
