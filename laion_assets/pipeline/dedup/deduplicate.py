"""Dataset-level deduplication: exact duplicates across every shard, and near-duplicate images found
from the stored CLIP embeddings the way SemDeDup does (Abbas et al., 2023).

Kinds, checked in this order; a pair removed by one is not compared again:
- `url_caption`: the same URL and caption (as the crawl stage normalised them);
- `sha256`: the same downloaded bytes;
- `semantic`: image embeddings with a cosine of at least `1 - eps`, compared only inside their k-means
  cluster;
- `perceptual` (with `max_phash_distance` >= 0): perceptual hashes at most that many bits apart, among
  the same cluster's members whose cosine is at least `1 - perceptual_eps` (a looser gate, so that two
  unrelated images whose 63-bit hashes happen to be close are never compared). Both near kinds are one
  pass; a pair that both would remove is `semantic`.

Which pair survives: a pair already in the dataset (from an earlier run) is never removed for a newer
one; among the pairs of one run, the smallest key survives (semantic: each pair, in key order, is
compared with the survivors before it and removed as a copy of the most similar one). So a run over
every shard at once keeps the smallest key of each group, and the same shards arriving in the same
runs always give the same answer.

Each run handles only the shards it has not seen (or whose pairs file changed since), against the state
in `duplicates/state/`: the survivors' hashes (a DuckDB join, no embedding read), the trained centroids,
and the survivors' vectors by cluster bucket. The centroids are trained on the first run, and again
when the number of clusters asked for changes, when `retrain` is set, or (with `clusters` 0) when the
pairs have grown `regrow` times past what they were sized for, so that a first run over one shard does
not fix a few clusters for the whole dataset; the survivors are then assigned again. Memory: one shard's
vectors, the training sample, then one bucket's, at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import time
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_assets import names
from laion_assets.pipeline import schemas, storage
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.embeddings.clip import ModelIdentity, ModelMismatch
from laion_assets.pipeline.pairs.filter import stored_pair_shards
from laion_assets.pipeline.parallel import store_map
from laion_assets.pipeline.removal import (
    DUPLICATE,
    RemovalResult,
    carried_check,
    finish_interrupted,
    remove_keys,
)
from laion_assets.pipeline.settings import SettingsChanged, differences
from laion_assets.pipeline.storage import (
    DEDUP_CENTROIDS,
    DEDUP_HASHES,
    DEDUP_MEMBERS,
    DEDUP_SHARDS,
    DEDUP_STAGED,
    DUPLICATES,
    EMBEDDINGS,
    IMAGES,
    PAIRS,
    PAIRS_EMBEDDINGS,
    SETTINGS_FILE,
    DatasetStore,
)
from laion_assets.pipeline.tables import unit_rows

if TYPE_CHECKING:
    import duckdb
    import faiss

URL_CAPTION, SHA256, SEMANTIC, PERCEPTUAL = "url_caption", "sha256", "semantic", "perceptual"
KINDS = (URL_CAPTION, SHA256, SEMANTIC, PERCEPTUAL)
NEAR_KINDS = (SEMANTIC, PERCEPTUAL)
LEDGER_LIST = "dedup"  # the `list` of dedup's rows in the removal ledger; `entry` is the pair kept
BLOCK = 1024  # rows of a cluster compared at once
HASH_BATCH = 1 << 20  # survivor hashes written at once (a row group)
BUCKET_ROWS = 250_000  # pairs per bucket when `buckets` is 0: about 0.25 GiB of fp16 vectors, 1 GiB compared
FLUSH_ROWS = 131_072  # assigned vectors gathered from the shards before each bucket gets a file of them
RUN_ID = "%Y%m%dT%H%M%S%fZ"  # a run's id, its start time; the state files' names begin with it
RUN_ID_LENGTH = len("20260101T000000000000Z")
_FOUND = pa.schema([("key", pa.string()), ("duplicate_of", pa.string())])
_SHARDS = pa.schema([("shard", pa.string()), ("fingerprint", pa.string()), ("run", pa.string())])
# The run that trained the centroids: in their footer, and in the shards file's once a run that used them
# finished. A training is only trusted once committed there: the survivors it reassigned are files named
# after its run, and the files of earlier runs are then superseded.
TRAINED_BY = "trained_by"


@dataclass(frozen=True)
class DedupSettings:
    exact: bool = True  # url_caption and sha256
    semantic: bool = True
    eps: float = 0.01  # a semantic match has a cosine of at least 1 - eps
    max_phash_distance: int = -1  # >= 0: the perceptual kind, perceptual hashes at most this many bits apart
    perceptual_eps: float = 0.05  # ... between images whose cosine is at least 1 - perceptual_eps
    clusters: int = 0  # k-means clusters; 0: the square root of the pairs when trained
    buckets: int = 0  # cluster % buckets, the groups of clusters held in memory in turn; 0: one per
    # BUCKET_ROWS pairs when trained (fixed with the centroids, like `clusters`)
    train_per_cluster: int = 256  # training vectors per cluster, sampled by key
    retrain: bool = False
    regrow: float = 4.0  # with `clusters` 0: train again once the pairs are this many times those trained for
    seed: int = 0
    remove: bool = True  # False: record the duplicates only (the `pairs_unique` view leaves them out)
    max_shards: int = 0  # > 0: check at most this many new shards (in name order) a run, the rest later


@dataclass
class DedupResult:
    run: str
    shards: list[str]  # the shards checked this run
    left: int  # new shards left for a later run (`max_shards`)
    duplicates: pa.Table  # schemas.DUPLICATES, the rows found this run
    removal: RemovalResult
    # "trained on N vectors (why)", "reused (trained ...)", "not needed: no new vectors (stored: ...)",
    # "none yet: ..." or "off"
    centroids: str
    clusters: int = 0
    buckets: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    # exact, semantic (reading, training, assignment, comparison), removal
    seconds: dict[str, float] = field(default_factory=dict)


# The settings that decide what is a duplicate and what happens to it. The others say how a run gets
# there (k-means and its buckets are fixed when trained, `retrain` and `max_shards` are for one run).
RULE_FIELDS = ("exact", "semantic", "eps", "max_phash_distance", "perceptual_eps", "remove")


def recorded_settings(store: DatasetStore) -> dict | None:
    """The rule fields of the settings the dataset was deduplicated with (the duplicates file's footer);
    None before the first run."""
    if not store.exists(DUPLICATES):
        return None
    recorded = store.parquet_metadata(DUPLICATES).get(names.DEDUP_SETTINGS_FOOTER)
    return {k: v for k, v in json.loads(recorded).items() if k in RULE_FIELDS} if recorded else None


def rule_changes(store: DatasetStore, settings: Mapping[str, object]) -> list[str]:
    """What differs between the rule fields of `settings` (field -> value) and those the dataset was
    deduplicated with; nothing before the first run."""
    recorded = recorded_settings(store)
    current = {k: v for k, v in settings.items() if k in RULE_FIELDS}
    return differences(recorded, current) if recorded is not None else []


def check_settings(store: DatasetStore, settings: DedupSettings, accept_change: bool) -> list[str]:
    """What differs between `settings` and those the dataset was deduplicated with; SettingsChanged when
    something does and the change is not accepted. A rule's change would also remove pairs from shards
    that no new shard repeats, so it is never made unasked."""
    changes = rule_changes(store, dataclasses.asdict(settings))
    if changes and not accept_change:
        recorded = recorded_settings(store)
        current = {k: v for k, v in dataclasses.asdict(settings).items() if k in RULE_FIELDS}
        raise SettingsChanged(
            f"{store.url(DUPLICATES)} was deduplicated with {json.dumps(recorded, sort_keys=True)}; this "
            f"run asks for {json.dumps(current, sort_keys=True)} ({'; '.join(changes)}). To change the "
            f"dataset's dedup settings, set them in {store.url(SETTINGS_FILE)} and run once with "
            "`accept_settings_change: true` in the duplicates asset's run config (`laion-assets run "
            "--accept-settings-change`); otherwise set them back."
        )
    return changes


def deduplicate(
    store: DatasetStore,
    settings: DedupSettings,
    now: datetime.datetime | None = None,
    accept_settings_change: bool = False,
) -> DedupResult:
    """Find the duplicates of the shards not checked yet, record them in `duplicates/duplicates.parquet`,
    remove them from the built dataset (reason `duplicate`) and keep the survivors in the state.

    SettingsChanged, before anything is written, when the rule differs from the dataset's last one and
    `accept_settings_change` is not set; an accepted change is recorded in the duplicates file, the
    ledger and so the card."""
    finish_interrupted(store)  # a removal an earlier run left half-done, before its finds are judged
    changes = check_settings(store, settings, accept_settings_change)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    run = now.strftime(RUN_ID)
    pairs = {shard: store.fingerprint(PAIRS.parquet(shard)) for shard in stored_pair_shards(store, "dedup")}
    done = _read_or_empty(store, DEDUP_SHARDS, _SHARDS)
    seen = dict(zip(done.column("shard").to_pylist(), done.column("fingerprint").to_pylist(), strict=True))
    waiting = sorted(shard for shard, fingerprint in pairs.items() if seen.get(shard) != fingerprint)
    new = waiting[: settings.max_shards] if settings.max_shards else waiting
    state = store.parquet_metadata(DEDUP_SHARDS) if store.exists(DEDUP_SHARDS) else {}
    committed = state.get(TRAINED_BY)
    near = settings.semantic or settings.max_phash_distance >= 0
    model = ModelIdentity.from_footer(state)
    if near and new:
        model, before = (
            _embedded_with(store, new, [shard for shard in seen if shard not in new], model),
            model,
        )
        if before is not None and model != before:  # every shard checked again: the old model's go
            store.remove(DEDUP_CENTROIDS)
    if _clear_unfinished(store, {*done.column("run").to_pylist(), committed}):
        _drop_found(store, waiting)
    if _trained_by(store) != committed:  # trained by a run that stopped before it reassigned every survivor
        store.remove(DEDUP_CENTROIDS)
    _drop_superseded(store, committed)
    _forget(store, [shard for shard in new if shard in seen])
    connection = catalog.plain_connection(store)
    found: list[pa.Table] = []
    clock = time.monotonic()
    seconds = {}
    if new:
        _load_new_pairs(connection, store, new)
        if settings.exact:
            for kind in (URL_CAPTION, SHA256):
                found.append(_exact(connection, store, kind, now))
    seconds["exact"], clock = time.monotonic() - clock, time.monotonic()
    centroids = "off"
    clusters = buckets = 0
    if near and new:
        exact_finds = {key for table in found for key in table.column("key").to_pylist()}
        semantic, centroids, clusters, buckets = _semantic(
            store, new, exact_finds, settings, run, now, seconds
        )
        found.append(semantic)
    elif near:
        centroids, clusters, buckets = _stored_centroids(store)
    seconds["semantic"], clock = time.monotonic() - clock, time.monotonic()
    duplicates = pa.concat_tables(found) if found else schemas.DUPLICATES.empty_table()
    removed = set(duplicates.column("key").to_pylist())
    if new and settings.exact:
        _write_hashes(connection, store, removed, run)
    _append_duplicates(store, duplicates, settings, changes, now)
    removals = pa.table(
        {
            "key": duplicates.column("key"),
            "list": pa.array([LEDGER_LIST] * duplicates.num_rows, pa.string()),
            "kind": duplicates.column("kind"),
            "entry": duplicates.column("duplicate_of"),
        }
    )
    change_footer = {names.SETTINGS_CHANGE_FOOTER: json.dumps(changes)} if changes else {}
    removal = (
        remove_keys(store, removals, DUPLICATE, now, change_footer)
        if settings.remove
        else RemovalResult(0, [])
    )
    seconds["removal"] = time.monotonic() - clock
    for shard in new:  # as checked: a file another run wrote meanwhile differs, and is checked next time
        seen[shard] = carried_check(removal.fingerprints, shard, pairs[shard])
    runs = dict(zip(done.column("shard").to_pylist(), done.column("run").to_pylist(), strict=True))
    runs.update(dict.fromkeys(new, run))
    trained_by = _trained_by(store) if store.exists(DEDUP_CENTROIDS) else committed
    store.write_parquet(
        DEDUP_SHARDS,
        pa.table(
            {
                "shard": list(seen),
                "fingerprint": list(seen.values()),
                "run": [runs[shard] for shard in seen],
            },
            schema=_SHARDS,
        ),
        metadata={**({TRAINED_BY: trained_by} if trained_by else {}), **(model.footer() if model else {})}
        or None,
    )
    _drop_superseded(store, trained_by)
    counts = Counter(duplicates.column("kind").to_pylist())
    by_kind = {k: counts[k] for k in KINDS}
    return DedupResult(
        run, new, len(waiting) - len(new), duplicates, removal, centroids, clusters, buckets, by_kind, seconds
    )


def _embedded_with(
    store: DatasetStore, new: list[str], old: list[str], stored: ModelIdentity | None
) -> ModelIdentity | None:
    """The model that embedded the vectors of the `new` shards. ModelMismatch, before anything is written,
    when they differ, or differ from `stored` (the model of the state's survivors) while shards checked
    before (`old`) keep survivors there: cosines across two models' embeddings mean nothing."""
    by_model: dict[ModelIdentity | None, list[str]] = {}
    footers = store_map(lambda shard: store.parquet_metadata(_vectors_path(store, shard)), new)
    for shard, footer in zip(new, footers, strict=True):  # a round trip each on S3: read in parallel
        by_model.setdefault(ModelIdentity.from_footer(footer), []).append(shard)
    model = next(iter(by_model))
    if len(by_model) > 1 or (stored is not None and model != stored and old):
        listed = "; ".join(f"{m or 'not recorded'}: {', '.join(shards)}" for m, shards in by_model.items())
        before = f"; the shards checked before with {stored}" if stored is not None and old else ""
        raise ModelMismatch(
            f"dedup compares image embeddings of one model only: the new shards were embedded with {listed}"
            f"{before}. Re-materialise clip_embeddings (and the layers after it) of the shards made with "
            "another model than the dataset's, then run dedup again"
        )
    return model


def _vectors_path(store: DatasetStore, shard: str) -> str:
    """The file of the shard's pairs' image embeddings that dedup reads."""
    kept = PAIRS_EMBEDDINGS.parquet(shard)
    return kept if store.exists(kept) else EMBEDDINGS.parquet(shard)


def _read_or_empty(store: DatasetStore, path: str, schema: pa.Schema) -> pa.Table:
    return store.read_parquet(path) if store.exists(path) else schema.empty_table()


def _forget(store: DatasetStore, shards: list[str]) -> None:
    """Drop from the state what came from `shards`, whose pairs were rebuilt since they were checked: they
    are checked again as new."""
    if not shards:
        return
    _drop_survivors(store, lambda keys: pc.is_in(_shards_of(keys), pa.array(shards)))
    _drop_found(store, shards)


def forget_taken_down(store: DatasetStore, keys: Collection[str]) -> None:
    """Drop taken-down `keys` from the survivors: a sample out of the dataset keeps no copy of it out (a
    copy a later shard brings is no duplicate), and its hashes and embedding leave the state with it."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    _drop_survivors(store, lambda found: pc.is_in(found, value_set=wanted))


def _drop_survivors(store: DatasetStore, dropped: Callable[[pa.Array], pa.Array]) -> None:
    """Rewrite each state file of survivors (hashes, members) holding a key `dropped` marks, without it."""
    for folder in (DEDUP_HASHES, *_buckets(store)):
        for stored in store.list(folder):
            path = f"{folder}/{stored.name}"
            if not pc.any(dropped(store.read_parquet(path, columns=["key"]).column("key"))).as_py():
                continue
            table = store.read_parquet(path)
            keep = pc.invert(dropped(table.column("key")))
            if folder == DEDUP_HASHES:
                store.write_parquet(path, table.filter(keep))
            else:
                _write_member_file(store, path, table.filter(keep))


def _drop_found(store: DatasetStore, shards: list[str]) -> None:
    """The duplicates rows whose key is in the pairs of `shards` again (rebuilt, or never removed by a run
    that stopped part way): they are found again."""
    if not shards or not store.exists(DUPLICATES):
        return
    back = pa.concat_arrays(
        [
            store.read_parquet(PAIRS.parquet(shard), columns=["key"]).column("key").combine_chunks()
            for shard in shards
        ]
    )
    _rewrite_duplicates(store, lambda batch: batch.filter(pc.invert(pc.is_in(batch.column("key"), back))))


def _clear_unfinished(store: DatasetStore, finished: set[str]) -> bool:
    """Remove the state files of runs that stopped before recording their shards as done (whether any)."""
    unfinished = [
        f"{folder}/{stored.name}"
        for folder in (DEDUP_HASHES, DEDUP_STAGED, *_buckets(store))
        for stored in store.list(folder)
        if stored.name[:RUN_ID_LENGTH] not in finished
    ]
    for path in unfinished:
        store.remove(path)
    return bool(unfinished)


def _trained_by(store: DatasetStore) -> str | None:
    """The run that trained the stored centroids; None without them, or for centroids trained before runs
    were recorded."""
    return store.parquet_metadata(DEDUP_CENTROIDS).get(TRAINED_BY) if store.exists(DEDUP_CENTROIDS) else None


def _drop_superseded(store: DatasetStore, trained_by: str | None) -> None:
    """Remove the member files older than the committed training `trained_by`: its run reassigned them."""
    if trained_by:
        for folder in _buckets(store):
            for stored in store.list(folder):
                if stored.name[:RUN_ID_LENGTH] < trained_by:
                    store.remove(f"{folder}/{stored.name}")


def _buckets(store: DatasetStore) -> list[str]:
    """The folders of the member buckets."""
    if not store.fs.isdir(store.path(DEDUP_MEMBERS)):
        return []
    return sorted(
        f"{DEDUP_MEMBERS}/{entry['name'].rstrip('/').rsplit('/', 1)[-1]}"
        for entry in store.fs.ls(store.path(DEDUP_MEMBERS), detail=True)
        if entry["type"] == "directory"
    )


def _shards_of(keys: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pa.array([schemas.shard_of_key(key) for key in keys.to_pylist()], pa.string())


# exact kinds: DuckDB over the new shards' pairs and the stored hashes


def _load_new_pairs(connection: duckdb.DuckDBPyConnection, store: DatasetStore, new: list[str]) -> None:
    files = ", ".join(f"'{catalog.quote_literal(store.url(PAIRS.parquet(shard)))}'" for shard in new)
    connection.execute(
        f"CREATE TEMP TABLE candidates AS SELECT key, md5(url || chr(31) || caption) AS {URL_CAPTION}, "
        f"sha256 AS {SHA256} FROM read_parquet([{files}])"
    )


def _known_hashes_sql(store: DatasetStore, kind: str) -> str:
    if not store.list(DEDUP_HASHES):
        return "SELECT NULL::VARCHAR AS hash, NULL::VARCHAR AS key LIMIT 0"
    glob = catalog.quote_literal(store.url(f"{DEDUP_HASHES}/*.parquet"))
    return f"SELECT hash, key FROM read_parquet('{glob}') WHERE kind = '{kind}'"


def _exact(
    connection: duckdb.DuckDBPyConnection, store: DatasetStore, kind: str, now: datetime.datetime
) -> pa.Table:
    """The candidates whose `kind` hash a stored survivor has (its duplicates), or a smaller-keyed
    candidate has; they leave the candidates."""
    found = connection.sql(
        f"SELECT c.key, coalesce(k.key, min(c.key) OVER (PARTITION BY c.{kind})) AS duplicate_of "
        f"FROM candidates c LEFT JOIN ({_known_hashes_sql(store, kind)}) k ON k.hash = c.{kind} "
        f"WHERE c.{kind} IS NOT NULL QUALIFY duplicate_of <> c.key ORDER BY c.key"
    ).to_arrow_table()
    connection.register("found", found)
    connection.execute("DELETE FROM candidates WHERE key IN (SELECT key FROM found)")
    connection.unregister("found")
    return _duplicates(found, kind, now)


def _write_hashes(
    connection: duckdb.DuckDBPyConnection, store: DatasetStore, removed: set[str], run: str
) -> None:
    """The survivors' hashes of this run, one file."""
    connection.register(
        "removed", pa.table({"key": sorted(removed)}, schema=pa.schema([("key", pa.string())]))
    )
    hashes = connection.sql(
        f"SELECT '{URL_CAPTION}' AS kind, {URL_CAPTION} AS hash, key FROM candidates "
        f"WHERE key NOT IN (SELECT key FROM removed) UNION ALL "
        f"SELECT '{SHA256}', {SHA256}, key FROM candidates "
        f"WHERE {SHA256} IS NOT NULL AND key NOT IN (SELECT key FROM removed) ORDER BY 1, 2"
    ).to_arrow_reader(HASH_BATCH)
    store.write_parquet_batches(
        f"{DEDUP_HASHES}/{run}.parquet",
        schemas.DEDUP_HASHES,
        (schemas.conform(pa.Table.from_batches([batch]), schemas.DEDUP_HASHES) for batch in hashes),
    )


def _duplicates(
    found: pa.Table,
    kind: str | list[str],  # one for every row, or each row's
    now: datetime.datetime,
    cosine: list[float] | None = None,
    distance: list[int | None] | None = None,
) -> pa.Table:
    rows = found.num_rows
    return pa.table(
        {
            "key": found.column("key"),
            "duplicate_of": found.column("duplicate_of"),
            "kind": pa.array([kind] * rows if isinstance(kind, str) else kind, pa.string()),
            "cosine": pa.array(cosine if cosine is not None else [None] * rows, pa.float32()),
            "phash_distance": pa.array(distance if distance is not None else [None] * rows, pa.int32()),
            "shard": _shards_of(found.column("key")),
            "duplicate_of_shard": _shards_of(found.column("duplicate_of")),
            "found_at": pa.array([now] * rows, pa.timestamp("us", tz="UTC")),
        },
        schema=schemas.DUPLICATES,
    )


def _append_duplicates(
    store: DatasetStore,
    duplicates: pa.Table,
    settings: DedupSettings,
    changes: list[str],
    now: datetime.datetime,
) -> None:
    """This run's rows (sorted by key) after every earlier run's; the footer the settings of the dataset,
    and every accepted change of them (when, and what)."""
    if duplicates.num_rows == 0 and store.exists(DUPLICATES) and not changes:
        return
    footer = {names.DEDUP_SETTINGS_FOOTER: json.dumps(dataclasses.asdict(settings))}
    if changes:
        before = store.parquet_metadata(DUPLICATES).get(names.SETTINGS_CHANGE_FOOTER, "[]")
        history = [*json.loads(before), {"at": now.isoformat(), "changes": changes}]
        footer[names.SETTINGS_CHANGE_FOOTER] = json.dumps(history)
    _rewrite_duplicates(store, lambda batch: batch, duplicates.sort_by("key"), footer)


def _rewrite_duplicates(
    store: DatasetStore,
    keep: Callable[[pa.RecordBatch], pa.RecordBatch],
    add: pa.Table | None = None,
    footer: dict[str, str] | None = None,
) -> None:
    """The duplicates file rewritten batch by batch, `keep` applied to each stored batch and `add`
    appended, so that memory holds one batch however many runs the file spans."""
    with contextlib.ExitStack() as stack:
        stored = (
            pq.ParquetFile(stack.enter_context(store.open(DUPLICATES))) if store.exists(DUPLICATES) else None
        )
        batches = (keep(batch) for batch in stored.iter_batches()) if stored else iter(())
        store.write_parquet_batches(
            DUPLICATES,
            schemas.DUPLICATES,
            itertools.chain(batches, [add] if add is not None else []),
            {**(storage.footer(stored.schema_arrow) if stored else {}), **(footer or {})},
        )


# semantic: k-means centroids, then each cluster's new vectors against its survivors


@dataclass
class _Vectors:
    keys: list[str]
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    phashes: np.ndarray  # int64, -1 where unknown

    @staticmethod
    def concat(parts: list[_Vectors]) -> _Vectors:
        return _Vectors(
            [key for part in parts for key in part.keys],
            np.concatenate([part.vectors for part in parts]),
            np.concatenate([part.phashes for part in parts]),
        )


def _shard_vectors(store: DatasetStore, shard: str, keep: set[str]) -> _Vectors:
    """The image embeddings and perceptual hashes of the shard's pairs in `keep`, sorted by key."""
    table = store.read_parquet(_vectors_path(store, shard), columns=["key", "image_embedding"])
    table = table.filter(pc.is_in(table.column("key"), pa.array(sorted(keep), pa.string()))).sort_by("key")
    images = store.read_parquet(IMAGES.parquet(shard))
    phash = (
        images.column("phash") if "phash" in images.column_names else pa.nulls(images.num_rows, pa.int64())
    )
    by_key = dict(zip(images.column("key").to_pylist(), phash.to_pylist(), strict=True))
    keys = table.column("key").to_pylist()
    return _Vectors(
        keys,
        unit_rows(table.column("image_embedding")),
        np.array([-1 if by_key.get(k) is None else by_key[k] for k in keys], np.int64),
    )


def _semantic(
    store: DatasetStore,
    new: list[str],
    exact_finds: set[str],
    settings: DedupSettings,
    run: str,
    now: datetime.datetime,
    seconds: dict[str, float],
) -> tuple[pa.Table, str, int, int]:
    """The near copies (semantic, perceptual) among the pairs the exact kinds left, how the centroids
    came, the clusters and the buckets; `seconds` gets the times of its steps: reading the new vectors,
    training, assignment to clusters, comparison inside them."""
    clock = time.monotonic()
    staged = _stage(store, new, exact_finds, run)
    seconds["reading"] = time.monotonic() - clock
    if not staged:
        return (
            _duplicates(pa.table({"key": [], "duplicate_of": []}, schema=_FOUND), [], now),
            *_stored_centroids(store),
        )
    clock = time.monotonic()
    centroids, buckets, how = _centroids(store, staged, settings, run)
    seconds["training"] = time.monotonic() - clock
    index = _centroid_index(centroids)
    pending = f"{run}-pending"
    clock = time.monotonic()
    for number, path in enumerate(staged):
        part = _members(store.read_parquet(path))
        _write_members(store, part, _nearest(index, part), buckets, f"{pending}-{number:05d}")
        store.remove(path)
    seconds["assignment"], clock = time.monotonic() - clock, time.monotonic()
    found = []
    for bucket in _buckets(store):
        found.extend(_dedup_bucket(store, bucket, pending, run, settings, _trained_by(store) or ""))
    seconds["comparison"] = time.monotonic() - clock
    found.sort(key=lambda row: row[0])
    table = pa.table({"key": [r[0] for r in found], "duplicate_of": [r[1] for r in found]}, schema=_FOUND)
    return (
        _duplicates(table, [r[4] for r in found], now, [r[2] for r in found], [r[3] for r in found]),
        how,
        len(centroids),
        buckets,
    )


def _stage(store: DatasetStore, new: list[str], exact_finds: set[str], run: str) -> list[str]:
    """The vectors of the new pairs the exact kinds left, read from their shards once (lists of fp16 are
    slow to decode) into files of about FLUSH_ROWS in `staged/`, where training samples them and the
    assignment reads them; the paths."""
    paths: list[str] = []
    gathered: list[_Vectors] = []
    for shard in new:
        gathered.append(_shard_vectors(store, shard, _pair_keys(store, shard) - exact_finds))
        if sum(len(part.keys) for part in gathered) >= FLUSH_ROWS or shard == new[-1]:
            part = _Vectors.concat(gathered)
            gathered = []
            if part.keys:
                paths.append(f"{DEDUP_STAGED}/{run}-{shard}.parquet")
                _write_member_file(store, paths[-1], _members_table(part, np.full(len(part.keys), -1)))
    return paths


def _pair_keys(store: DatasetStore, shard: str) -> set[str]:
    return set(store.read_parquet(PAIRS.parquet(shard), columns=["key"]).column("key").to_pylist())


def _write_members(
    store: DatasetStore, part: _Vectors, clusters: np.ndarray, buckets: int, name: str
) -> None:
    for bucket in np.unique(clusters % buckets):
        rows = np.flatnonzero(clusters % buckets == bucket)
        table = _members_table(part, clusters, rows)
        _write_member_file(store, f"{DEDUP_MEMBERS}/{bucket:04d}/{name}.parquet", table)


def _members_table(part: _Vectors, clusters: np.ndarray, rows: np.ndarray | None = None) -> pa.Table:
    """`part`'s `rows` (every row by default) as `schemas.dedup_members`, in `clusters`."""
    rows = np.arange(len(part.keys)) if rows is None else rows
    dim = part.vectors.shape[1]
    return pa.table(
        {
            "key": [part.keys[i] for i in rows],
            "cluster": pa.array(clusters[rows], pa.int32()),
            "phash": pa.array(
                [None if part.phashes[i] < 0 else int(part.phashes[i]) for i in rows], pa.int64()
            ),
            "image_embedding": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(2 * dim),
                len(rows),
                [None, pa.py_buffer(part.vectors[rows].astype("<f2").tobytes())],
            ),
        },
        schema=schemas.dedup_members(dim),
    )


def _write_member_file(store: DatasetStore, path: str, members: pa.Table) -> None:
    """The embeddings, random-looking fp16, are stored uncompressed: zstd would only cost time."""
    store.write_parquet(
        path,
        members,
        compression={"key": "zstd", "cluster": "zstd", "phash": "zstd", "image_embedding": "none"},
        use_dictionary=["cluster"],
        write_statistics=["key", "cluster"],
    )


def _dedup_bucket(
    store: DatasetStore, folder: str, pending: str, run: str, settings: DedupSettings, trained_by: str
) -> list[tuple[str, str, float, int | None, str]]:
    """The new members of one bucket compared with its survivors (the files since the centroids'
    training), cluster by cluster; the survivors written as this run's file of the bucket, the pending
    files removed."""
    files = [f for f in store.list(folder) if f.name[:RUN_ID_LENGTH] >= trained_by]
    new_files = [f.name for f in files if f.name.startswith(pending)]
    if not new_files:
        return []
    new = _by_cluster(pa.concat_tables([store.read_parquet(f"{folder}/{name}") for name in new_files]))
    touched = pa.array(np.unique(new.column("cluster").to_numpy()), pa.int32())
    old_parts = [
        table.filter(pc.is_in(table.column("cluster"), touched))
        for table in (store.read_parquet(f"{folder}/{f.name}") for f in files if f.name not in new_files)
    ]
    old = _by_cluster(pa.concat_tables(old_parts) if old_parts else new.schema.empty_table())
    found: list[tuple[str, str, float, int | None, str]] = []
    removed: set[str] = set()
    old_clusters = old.column("cluster").to_numpy()
    new_clusters = new.column("cluster").to_numpy()
    for cluster in touched.to_pylist():
        o, n = _cluster_rows(old, old_clusters, cluster), _cluster_rows(new, new_clusters, cluster)
        for copy in near_copies(_members(o), _members(n), settings):
            found.append(copy)
            removed.add(copy[0])
    survivors = new.filter(pc.invert(pc.is_in(new.column("key"), pa.array(sorted(removed), pa.string()))))
    _write_member_file(store, f"{folder}/{run}.parquet", survivors)
    for name in new_files:
        store.remove(f"{folder}/{name}")
    return found


def _by_cluster(members: pa.Table) -> pa.Table:
    """Sorted by cluster, then key, in one chunk: each cluster's rows are then a zero-copy slice (a take
    per cluster would copy the whole bucket each time)."""
    return members.sort_by([("cluster", "ascending"), ("key", "ascending")]).combine_chunks()


def _cluster_rows(members: pa.Table, clusters: np.ndarray, cluster: int) -> pa.Table:
    """The rows of `cluster` in `members`, sorted by `_by_cluster` (`clusters` its cluster column)."""
    start, end = np.searchsorted(clusters, [cluster, cluster + 1])
    return members.slice(start, end - start)


def _members(table: pa.Table) -> _Vectors:
    phash = table.column("phash").to_pylist()
    return _Vectors(
        table.column("key").to_pylist(),
        unit_rows(table.column("image_embedding")),
        np.array([-1 if p is None else p for p in phash], np.int64),
    )


def near_copies(
    old: _Vectors, new: _Vectors, settings: DedupSettings
) -> Iterator[tuple[str, str, float, int | None, str]]:
    """(key, the key it copies, cosine, phash distance, kind) of each `new` member removed: one as close
    as `settings` asks to a survivor, old ones first, then the new ones kept before it in key order; the
    most similar by cosine when several are."""
    semantic = 1.0 - settings.eps if settings.semantic else np.inf
    perceptual = settings.max_phash_distance >= 0
    everyone = np.concatenate([old.vectors, new.vectors])
    phashes = np.concatenate([old.phashes, new.phashes])
    keys = old.keys + new.keys
    kept = np.concatenate([np.ones(len(old.keys), bool), np.zeros(len(new.keys), bool)])
    start = len(old.keys)
    for first in range(0, len(new.keys), BLOCK):
        rows = np.arange(start + first, start + min(first + BLOCK, len(new.keys)))
        end = rows[-1]  # a member is compared with those before it
        cosine = everyone[rows] @ everyone[:end].T
        similar = cosine >= semantic
        if perceptual:
            distance = np.bitwise_count(phashes[rows, None] ^ phashes[None, :end])
            known = (phashes[rows, None] >= 0) & (phashes[None, :end] >= 0)
            similar |= (
                known & (distance <= settings.max_phash_distance) & (cosine >= 1.0 - settings.perceptual_eps)
            )
        similar &= np.arange(end)[None, :] < rows[:, None]
        matched = similar.any(axis=1)
        kept[rows[~matched]] = True  # before the loop: a row's match may be an earlier row of the block
        for i in np.flatnonzero(matched):
            row = rows[i]
            match = similar[i] & kept[:end]
            if match.any():
                j = int(np.flatnonzero(match)[np.argmax(cosine[i][match])])
                hash_distance = (
                    int(np.bitwise_count(phashes[row] ^ phashes[j]))
                    if min(phashes[row], phashes[j]) >= 0
                    else None
                )
                kind = SEMANTIC if cosine[i, j] >= semantic else PERCEPTUAL
                yield keys[row], keys[j], float(cosine[i, j]), hash_distance, kind
                kept[row] = False
            else:
                kept[row] = True


def _stored_centroids(store: DatasetStore) -> tuple[str, int, int]:
    """How a run that compares no new vectors describes the centroids (as `_semantic` does), their clusters
    and buckets: the stored ones, untouched, or none yet."""
    if not store.exists(DEDUP_CENTROIDS):
        return "none yet: no new vectors to train on", 0, 0
    meta = store.parquet_metadata(DEDUP_CENTROIDS)
    return (
        f"not needed: no new vectors (stored: trained {meta['trained_at']} on {meta['trained_on']} vectors)",
        store.parquet_num_rows(DEDUP_CENTROIDS),
        int(meta["buckets"]),
    )


def _centroids(
    store: DatasetStore, staged: list[str], settings: DedupSettings, run: str
) -> tuple[np.ndarray, int, str]:
    """The centroids, the number of buckets and how they came: the stored ones, or new ones trained by
    `run` on a sample of the survivors' and the new pairs' vectors (and the survivors assigned again)."""
    members = [f"{folder}/{f.name}" for folder in _buckets(store) for f in store.list(folder)]
    total = sum(store.parquet_num_rows(path) for path in members + staged)
    why = "retrain set" if settings.retrain else "no centroids stored" if members else "first run"
    if store.exists(DEDUP_CENTROIDS) and not settings.retrain:
        stored = unit_rows(store.read_parquet(DEDUP_CENTROIDS).column("centroid"))
        meta = store.parquet_metadata(DEDUP_CENTROIDS)
        grown = not settings.clusters and total > settings.regrow * int(meta["sized_for"])
        if settings.clusters in (0, len(stored)) and not grown:
            return (
                stored,
                int(meta["buckets"]),
                f"reused (trained {meta['trained_at']} on {meta['trained_on']} vectors)",
            )
        why = f"the pairs grew from {meta['sized_for']} to {total}" if grown else "clusters changed"
    clusters = settings.clusters or max(1, round(math.sqrt(total)))
    buckets = settings.buckets or max(1, math.ceil(total / BUCKET_ROWS))
    every = max(1, total // (clusters * settings.train_per_cluster))

    def sampled(part: _Vectors) -> np.ndarray:  # fp16 until stacked: the sample is the peak memory
        chosen = [i for i, key in enumerate(part.keys) if zlib.crc32(key.encode()) % every == 0]
        return part.vectors[chosen].astype(np.float16)

    vectors = np.concatenate(
        [sampled(_members(store.read_parquet(path))) for path in members + staged], dtype=np.float32
    )
    clusters = max(1, min(clusters, len(vectors)))
    import faiss  # here: its import takes a tenth of a second from every run that never dedups

    # min_points_per_centroid only sets when faiss warns of few points per cluster, which a small dataset
    # has by design (a cluster per sqrt(rows)); the clustering is the same
    kmeans = faiss.Kmeans(
        vectors.shape[1], clusters, niter=20, seed=settings.seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(vectors)
    centroids = kmeans.centroids / np.linalg.norm(kmeans.centroids, axis=1, keepdims=True)
    dim = centroids.shape[1]
    table = pa.table(
        {
            "cluster": pa.array(range(clusters), pa.int32()),
            "centroid": pa.FixedSizeListArray.from_arrays(
                pa.array(centroids.astype(np.float32).ravel()), dim
            ),
        }
    )
    trained_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    store.write_parquet(
        DEDUP_CENTROIDS,
        table,
        metadata={
            "trained_at": trained_at,
            "trained_on": str(len(vectors)),
            "sized_for": str(total),
            "buckets": str(buckets),
            TRAINED_BY: run,
        },
    )
    _reassign(store, members, centroids, buckets, run)
    return centroids.astype(np.float32), buckets, f"trained on {len(vectors)} vectors ({why})"


def _reassign(store: DatasetStore, members: list[str], centroids: np.ndarray, buckets: int, run: str) -> None:
    """The stored members (files) copied to their new clusters' buckets after a retraining by `run`, as
    files of that run; the old files go once the run has finished (`_drop_superseded`)."""
    index = _centroid_index(centroids)
    for number, path in enumerate(members):
        part = _members(store.read_parquet(path))
        if part.keys:
            _write_members(store, part, _nearest(index, part), buckets, f"{run}-reassigned-{number:05d}")


def _centroid_index(centroids: np.ndarray) -> faiss.IndexFlatIP:
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids.astype(np.float32))
    return index


def _nearest(index: faiss.IndexFlatIP, part: _Vectors) -> np.ndarray:
    """The cluster of each vector: its nearest centroid by cosine."""
    return index.search(part.vectors, 1)[1][:, 0]
