"""When a shard is done: the one rule that `laion-assets run`, the incoming sensor and the catch-up
schedule share.

Every per-shard parquet records in its footer the incoming content it was made from (the source file's
name and fingerprint, and, since they were recorded, its size and sha256), copied down from the layer
before it. A layer of a shard is current when its parquet exists, records the content the source file
has now and has the contract's columns. A shard is done when every layer asked for is current; when one
is not, it and every layer after it must be made again.

The file has the recorded content when its name is the one recorded and its fingerprint is too (no
read), or, where the fingerprint is another (a root copied without its mtimes, or moved to S3, where it
is an ETag), when its size and sha256 are the recorded ones. That digest is read once per file and
fingerprint: the root keeps it (`SOURCE_DIGESTS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.crawl.sources import parse_source_name
from laion_assets.pipeline.parallel import store_map
from laion_assets.pipeline.settings import (
    CAPTIONER_SECTION,
    CLIP_SECTION,
    SCORES_SECTION,
    DatasetSettings,
    differences,
)
from laion_assets.pipeline.storage import (
    CRAWL_METADATA,
    EMBEDDINGS,
    IMAGES,
    INCOMING,
    PAIRS,
    RECAPTIONS,
    SCORES,
    SOURCE_DIGESTS,
    DatasetStore,
    Layer,
    StoredFile,
    footer,
    replaced_while_read,
)


def source_footer(file: StoredFile, sha256: str | None = None) -> dict[str, str]:
    """The footer entry of a crawl_metadata parquet read from `file`, whose content has the digest `sha256`
    (`source_digest`) where it is known."""
    entry: dict[str, str | int] = {"file": file.name, "fingerprint": file.fingerprint}
    if sha256 is not None:
        entry |= {"size": file.size, "sha256": sha256}
    return {names.SOURCE_FOOTER: json.dumps(entry)}


def source_digest(store: DatasetStore, name: str) -> tuple[str, str]:
    """The fingerprint and the sha256 of one version of `incoming/<name>`: one more sequential read of the
    whole file, so that a copy of it, whose fingerprint is another, is known for the same content."""
    digest = hashlib.sha256()
    with store.open(f"{INCOMING}/{name}") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
        return store.opened_fingerprint(f), digest.hexdigest()


def inherited_footer(upstream: pa.Table) -> dict[str, str]:
    """The source entry of `upstream`, a table read from the layer before, for a file made from it, and
    what that file was (`_identity`)."""
    stored = footer(upstream.schema)
    source = stored.get(names.SOURCE_FOOTER)
    return {names.SOURCE_FOOTER: source, names.MADE_FROM_FOOTER: _identity(stored)} if source else {}


# The columns of images that the layers after it read.
CONTENT_COLUMNS = ("key", "caption", "status", "sha256")


def content_footer(images: pa.Table) -> dict[str, str]:
    """The footer entry of an images file that tells its `CONTENT_COLUMNS` from another download's: its
    source and settings do not fix what a download gets (the web answers otherwise another day), so the
    files made from the last download are not current after one that came out otherwise."""
    digest = hashlib.sha256()
    for row in zip(*(images.column(name).to_pylist() for name in CONTENT_COLUMNS), strict=True):
        digest.update(json.dumps(row).encode())
    return {names.CONTENT_FOOTER: digest.hexdigest()[:32]}


# What a layer's file records about how it was made: its source, its settings, and what it was made from.
# A removal rewrites a file's rows with its footer; a run writes these again only if it rebuilds it.
_IDENTITY_FOOTERS = (
    names.SOURCE_FOOTER,
    names.MADE_FROM_FOOTER,
    names.CONTENT_FOOTER,
    names.SETTINGS_FOOTER,
    names.CLIP_MODEL_FOOTER,
    names.CLIP_PRETRAINED_FOOTER,
    names.CLIP_WEIGHTS_FOOTER,
    names.SCORES_FOOTER,
    names.SCORES_READ_FOOTER,
    names.PAIRS_SETTINGS_FOOTER,
    names.CAPTIONER_FOOTER,
)
# The layer whose file each layer's writer reads for inherited_footer.
_MADE_FROM = {
    IMAGES: CRAWL_METADATA,
    EMBEDDINGS: IMAGES,
    SCORES: EMBEDDINGS,
    PAIRS: EMBEDDINGS,
    RECAPTIONS: PAIRS,
}
# A file a layer's writer reads beside that one when its settings ask for it, and the footer entry that
# records what it was (`identity_of`): pairs whose rules filter on quality scores.
_ALSO_READ = {PAIRS: (SCORES, names.SCORES_READ_FOOTER)}


def _identity(stored: Mapping[str, str]) -> str:
    recorded = {key: stored[key] for key in _IDENTITY_FOOTERS if key in stored}
    return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:32]


def identity_of(table: pa.Table) -> str:
    """What the file `table` was read from is (`identities`), for a file whose writer also read it."""
    return _identity(footer(table.schema))


def identities(
    store: DatasetStore, shards: Iterable[str], layers: Iterable[Layer]
) -> dict[str, dict[str, str]]:
    """shard -> layer name -> what its file is, for each file of `layers` that `shards` have: a rebuild
    changes it (another source, other settings, made from another upstream), a removal's rewrite keeps it."""
    found: dict[str, dict[str, str]] = {}
    for (shard, layer), schema in _stored_schemas(store, shards, layers):
        found.setdefault(shard, {})[layer.name] = _identity(footer(schema))
    return found


def incoming_by_shard(store: DatasetStore) -> dict[str, StoredFile]:
    """The source files in `incoming/`, by the shard each one makes, sorted by shard.

    A shard that several files make (`a.b.csv` and `a_b.csv`) stands for all of them: their names and
    fingerprints joined, which no layer records. So it is never done, even where its layers were made
    from one of the files, and its crawl runs and fails naming the files (`find_source`) until all but
    one are renamed; keeping one of the files would leave the others unnoticed."""
    by_shard: dict[str, list[StoredFile]] = {}
    for file in store.list(INCOMING):
        by_shard.setdefault(parse_source_name(file.name).shard, []).append(file)
    return {shard: _one_file(files) for shard, files in sorted(by_shard.items())}


def _one_file(files: list[StoredFile]) -> StoredFile:
    if len(files) == 1:
        return files[0]
    files = sorted(files, key=lambda f: f.name)
    return StoredFile(
        name=" + ".join(f.name for f in files),
        size=sum(f.size for f in files),
        fingerprint=" + ".join(f.fingerprint for f in files),
    )


def stale_layers(
    store: DatasetStore, sources: Mapping[str, StoredFile], layers: Sequence[Layer]
) -> dict[str, list[Layer]]:
    """For each shard of `sources` (shard -> its source file now), the layers of `layers` (in pipeline
    order) to make again: from the first one that is not current on; empty when the shard is done.

    The footers are read as `_stored_schemas` reads them."""
    if not sources:
        return {}
    upstream = [_MADE_FROM[layer] for layer in layers if layer in _MADE_FROM]
    upstream += [_ALSO_READ[layer][0] for layer in layers if layer in _ALSO_READ]
    stored = dict(_stored_schemas(store, sources, dict.fromkeys([*layers, *upstream])))
    recorded = {(shard, layer): _recorded_source(layer, schema) for (shard, layer), schema in stored.items()}
    to_read = {
        shard
        for (shard, layer), entry in recorded.items()
        if layer in layers and entry is not None and _same_source(sources[shard], entry, None) is None
    }
    digests = _digests_now(store, {shard: sources[shard] for shard in sorted(to_read)})
    stale = {}
    for shard, source in sources.items():
        now = (source, digests.get(shard))
        first = next(
            (i for i, layer in enumerate(layers) if not _current(stored, recorded, shard, layer, now)),
            len(layers),
        )
        stale[shard] = list(layers[first:])
    return stale


def _same_source(file: StoredFile, entry: dict, sha256: str | None) -> bool | None:
    """Whether `file`, as it is now, is the source that a layer's footer `entry` records: the same name and
    fingerprint, or the same name, size and content, where the entry records its digest and `sha256` is
    the file's now. None where that digest would tell and is not given."""
    if entry.get("file") != file.name:
        return False
    if entry.get("fingerprint") == file.fingerprint:
        return True
    if entry.get("sha256") is None or entry.get("size") != file.size:
        return False
    return None if sha256 is None else entry["sha256"] == sha256


def _digests_now(store: DatasetStore, files: Mapping[str, StoredFile]) -> dict[str, str]:
    """shard -> the sha256 of its file of `files` (shard -> its source file), as it is now: from the root's
    record (`SOURCE_DIGESTS`) where it has the file's fingerprint now, else read (`source_digest`) and
    added to it. A file replaced since it was listed is left out (its shard is not done). The record is
    shared by every run, sensor tick and `status`: a lost or unreadable one, or a write of it that fails
    (a root this process may only read) or that another's write replaces, costs a read of a file again."""
    if not files:
        return {}
    known = _read_digests(store)
    unknown = sorted(
        {file.name for file in files.values() if known.get(file.name, ["", ""])[0] != file.fingerprint}
    )
    found = zip(unknown, store_map(lambda name: _digest_if_there(store, name), unknown, 4), strict=True)
    read = {name: list(digest) for name, digest in found if digest is not None}
    if read:
        with contextlib.suppress(OSError):
            store.write_bytes(SOURCE_DIGESTS, json.dumps({**known, **read}, sort_keys=True).encode())
        known |= read
    return {
        shard: known[file.name][1]
        for shard, file in files.items()
        if known.get(file.name, [""])[0] == file.fingerprint
    }


def _digest_if_there(store: DatasetStore, name: str) -> tuple[str, str] | None:
    """`source_digest`, or None where the file was removed or replaced while it was read."""
    try:
        return source_digest(store, name)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or (store.is_s3 and replaced_while_read(exc)):
            return None
        raise


def _read_digests(store: DatasetStore) -> dict[str, list[str]]:
    """The root's record of its sources' digests (name -> [fingerprint, sha256]); empty where it has none
    that can be read."""
    try:
        loaded = json.loads(store.read_bytes(SOURCE_DIGESTS))
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {
        name: list(pair)
        for name, pair in loaded.items()
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
    }


def _current(
    stored: Mapping[tuple[str, Layer], pa.Schema],
    recorded: Mapping[tuple[str, Layer], dict | None],
    shard: str,
    layer: Layer,
    source: tuple[StoredFile, str | None],
) -> bool:
    """Whether the file of `layer` records the shard's `source` (its file now, and that file's sha256 where
    it was read) as its `recorded` entry, was made from the file before it as it is now (files written
    before they recorded it are taken to be), and read any other file (`_ALSO_READ`) as it is now."""
    schema, entry = stored.get((shard, layer)), recorded.get((shard, layer))
    if schema is None or entry is None or not _same_source(source[0], entry, source[1]):
        return False
    made_from = footer(schema).get(names.MADE_FROM_FOOTER)
    upstream = stored.get((shard, _MADE_FROM.get(layer)))
    if made_from is not None and upstream is not None and made_from != _identity(footer(upstream)):
        return False
    other_layer, entry = _ALSO_READ.get(layer, (None, ""))
    read = footer(schema).get(entry)
    if read is None:
        return True
    other = stored.get((shard, other_layer))
    return other is not None and read == _identity(footer(other))


def sourceless_shards(
    store: DatasetStore, sources: Mapping[str, StoredFile], layers: Sequence[Layer]
) -> dict[str, list[Layer]]:
    """shard -> its layers of `layers` that have a file, for each shard no file of `sources` makes (its
    source was removed from incoming/): the dataset keeps them, and no run makes them again."""
    found: dict[str, list[Layer]] = {}
    for layer in layers:
        for shard in store.shards(layer):
            if shard not in sources:
                found.setdefault(shard, []).append(layer)
    return dict(sorted(found.items()))


# The columns a layer's file must have to be current: one written before a column joined the contract
# (`host`) is made again, as one made from an older source is. The other layers' columns vary (a URL
# list's own columns, the model's dimension).
_CONTRACT_COLUMNS = {IMAGES: frozenset(schemas.IMAGES.names), PAIRS: frozenset(schemas.PAIRS.names)}


def _recorded_source(layer: Layer, schema: pa.Schema) -> dict | None:
    """The source a layer's file records (`source_footer`'s entry), or None when it records none or lacks a
    column of the contract."""
    if not _CONTRACT_COLUMNS.get(layer, frozenset()) <= set(schema.names):
        return None
    entry = footer(schema).get(names.SOURCE_FOOTER)
    return json.loads(entry) if entry else None


def _stored_schemas(
    store: DatasetStore, shards: Iterable[str], layers: Iterable[Layer]
) -> list[tuple[tuple[str, Layer], pa.Schema]]:
    """((shard, layer), its file's schema, footer included) for each file of `layers` that `shards` have.

    One listing per layer, then the footers of the files that exist, read in parallel: over 41,000
    shards on S3 that is seconds, where a round trip per shard and layer would be many minutes."""
    layers = list(layers)
    listed = {layer: {f.name for f in store.list(layer.name)} for layer in layers}
    present = [(shard, layer) for shard in shards for layer in layers if f"{shard}.parquet" in listed[layer]]
    read = store_map(lambda item: _schema_or_none(store, item[1].parquet(item[0])), present)
    return [(item, schema) for item, schema in zip(present, read, strict=True) if schema is not None]


def _schema_or_none(store: DatasetStore, path: str) -> pa.Schema | None:
    try:
        with store.open(path) as f:
            return pq.read_schema(f)
    except FileNotFoundError:  # removed since the listing
        return None


# Settings: a layer built with settings other than the dataset's is stale too, but only reported (and
# rebuilt where asked): the done rule above stays the source's, so no sensor or schedule re-downloads a
# dataset because a setting changed.

# The section of the dataset's settings each layer is built with.
SECTION_OF_LAYER = {
    CRAWL_METADATA: names.CRAWL_METADATA_ASSET,
    IMAGES: names.DOWNLOADED_IMAGES_ASSET,
    EMBEDDINGS: CLIP_SECTION,
    SCORES: SCORES_SECTION,
    PAIRS: names.FILTERED_PAIRS_ASSET,
    RECAPTIONS: CAPTIONER_SECTION,
}
# Fields that say how a layer is made, not what it holds: a change of them leaves it current.
HOW_NOT_WHAT = frozenset(
    {
        "max_in_flight",
        "dns_timeout",
        "dns_cache_seconds",
        "tdmrep_wait",
        "dns_lookups",
        "dns_servers",
        "processes",
        "shard_timeout",
        "retry_failed",
        "connect_timeout",
        "read_timeout",
        "request_timeout",
        "retries",
        "retry_backoff",
        "max_retry_after",
        "per_host_connections",
        "user_agent_token",
        "allow_private_networks",
        "write_embeddings",
        "device",
        "batch_size",
    }
)


def settings_changes(
    store: DatasetStore, shards: Sequence[str], settings: DatasetSettings
) -> dict[str, dict[str, list[str]]]:
    """shard -> layer name -> what differs (`field: built with -> the dataset's now`), for each layer of
    `shards` built with other settings than `settings`; shards with none are left out. Footers only,
    read as `_stored_schemas` reads them."""
    changed: dict[str, dict[str, list[str]]] = {}
    for (shard, layer), schema in _stored_schemas(store, shards, SECTION_OF_LAYER):
        recorded = _built_with(layer, footer(schema))
        current = settings.section(SECTION_OF_LAYER[layer])
        if recorded is None or not current:
            continue
        # every captioner's footer records all its section's fields: one it lacks is another captioner's
        compared = current.keys() if layer is RECAPTIONS else recorded.keys() & current.keys()
        compared -= HOW_NOT_WHAT
        if layer in (RECAPTIONS, SCORES):  # their footers hold strings
            current = {k: str(v) for k, v in current.items()}
        found = differences(
            {k: recorded[k] for k in compared if k in recorded}, {k: current[k] for k in compared}
        )
        if found:
            changed.setdefault(shard, {})[layer.name] = found
    return changed


def _built_with(layer: Layer, stored: dict[str, str]) -> dict | None:
    """The settings a layer's footer records (None where it records none, as files before them do)."""
    if layer is EMBEDDINGS:
        model = stored.get(names.CLIP_MODEL_FOOTER)
        return {"model": model, "pretrained": stored.get(names.CLIP_PRETRAINED_FOOTER)} if model else None
    key = {
        CRAWL_METADATA: names.SETTINGS_FOOTER,
        IMAGES: names.SETTINGS_FOOTER,
        PAIRS: names.PAIRS_SETTINGS_FOOTER,
        RECAPTIONS: names.CAPTIONER_FOOTER,
        SCORES: names.SCORES_FOOTER,
    }[layer]
    return json.loads(stored[key]) if key in stored else None
