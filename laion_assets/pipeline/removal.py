"""Removing samples from a built dataset: given keys and a reason, rewrite only the shards that hold them.

A takedown (`TAKEN_DOWN`) empties the sample everywhere: its image leaves `images/<shard>.tar`, its
images row stays with status `taken_down` (url and caption null, so no row goes missing and no link is
left in clear), and its rows leave embeddings, pairs (parquet and tar), pairs_embeddings and
recaptions, and dedup's survivors (its hashes and embedding in `duplicates/state/`, so that a copy a later
shard brings is not removed as a duplicate of a sample the dataset no longer holds). A duplicate
(`DUPLICATE`, dataset-level dedup) only leaves the dataset: pairs, their tar,
pairs_embeddings and recaptions. Nothing is downloaded again. Either way the sample leaves every
training-shards export that holds it (`exports/`), and the ledger's `export_shards` names those tars.

Only the files that hold a removed key are written, each atomically, with the footer it had (its
source stays, so the shard stays done by lineage.py's rule); every other file keeps its bytes.

The ledger is two-phase, so that it never claims a removal that has not happened and never counts one
twice: `takedowns/pending/<timestamp>.parquet` first (a search service filters its keys at once), then
the shards, then `takedowns/<timestamp>.parquet`, the ledger every reader counts, and the pending file
goes. A run cut short leaves a pending ledger, which the next removal (`finish_interrupted`) completes
before it looks for anything new: the same keys, removed once, under the same name. The pending ledger
records which pairs files it was begun on, so that dedup's record of a checked file is carried over to
the file the cut-short run wrote from it, too.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.exports.export import export_hits, remove_from_exports
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.pairs.filter import write_pairs_parquet
from laion_assets.pipeline.parallel import STORE_REWRITES, store_map
from laion_assets.pipeline.shard_tar import drop_samples
from laion_assets.pipeline.storage import (
    CARD,
    DEDUP_SHARDS,
    EMBEDDINGS,
    IMAGES,
    PAIRS,
    PAIRS_EMBEDDINGS,
    RECAPTIONS,
    SCORES,
    SEARCH_INDEX,
    SEARCH_INDEX_APPROXIMATE,
    TAKEDOWNS,
    TAKEDOWNS_PENDING,
    DatasetStore,
    Layer,
)
from laion_assets.pipeline.storage import footer as footer_of
from laion_assets.pipeline.tables import without_keys

TAKEN_DOWN = schemas.TAKEN_DOWN
EXPORT_SHARDS = "export_shards"  # the ledger's column naming the export tars that held each key
DUPLICATE = "duplicate"
# The layers each reason rewrites, the last made first: the images row, which says the sample is
# taken down, is written last.
LAYERS = {
    TAKEN_DOWN: (RECAPTIONS, PAIRS_EMBEDDINGS, PAIRS, SCORES, EMBEDDINGS, IMAGES),
    DUPLICATE: (RECAPTIONS, PAIRS_EMBEDDINGS, PAIRS),
}
# The pairs funnel's rule each reason's removal counts under: the last ones, since the pairs it removes
# passed every rule of the build.
FUNNEL_RULE = {TAKEN_DOWN: "taken_down_after_build", DUPLICATE: DUPLICATE}
# Built from every shard after a removal, and holding samples' links, captions or images: the search index
# (its file, and the FAISS build it names) and the card (its sample grid).
FOLLOWERS = (SEARCH_INDEX, SEARCH_INDEX_APPROXIMATE, CARD)


Fingerprints = dict[str, tuple[str | None, str | None]]


@dataclass
class RemovalResult:
    removed: int  # keys in the ledger
    shards: list[str]  # the shards rewritten
    files: list[str] = field(default_factory=list)  # the files rewritten, under the root
    ledger: str | None = None  # the ledger file written; None when there was nothing to remove
    by_list: list[tuple[str, str, int]] = field(default_factory=list)  # (list, kind, keys removed)
    by_shard: dict[str, int] = field(default_factory=dict)  # keys removed from each shard
    # each parquet rewritten: the fingerprint of the file read, and of the file written in its place
    fingerprints: Fingerprints = field(default_factory=dict)


def remove_keys(
    store: DatasetStore,
    removals: pa.Table,
    reason: str,
    now: datetime.datetime | None = None,
    footer: dict[str, str] | None = None,
) -> RemovalResult:
    """Remove the keys of `removals` (`schemas.REMOVALS`: key, list, kind, entry; the first row of a key
    counts) for `reason`: the pending ledger, the shards that hold them, then the ledger (with `footer`
    in its file metadata)."""
    if reason not in LAYERS:
        raise ValueError(f"unknown removal reason {reason!r}: one of {', '.join(LAYERS)}")
    removals = _first_per_key(schemas.conform(removals, schemas.REMOVALS).select(schemas.REMOVALS.names))
    if removals.num_rows == 0:
        return RemovalResult(0, [])
    keys = removals.column("key").to_pylist()
    shards = [schemas.shard_of_key(key) for key in keys]
    if None in shards:
        raise ValueError(f"not a dataset key: {keys[shards.index(None)]!r}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ledger = removals.append_column("shard", pa.array(shards, pa.string()))
    ledger = ledger.append_column("reason", pa.array([reason] * len(keys), pa.string()))
    ledger = ledger.append_column("removed_at", pa.array([now] * len(keys), pa.timestamp("us", tz="UTC")))
    ledger = _with_export_shards(store, ledger)
    name = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}.parquet"
    read = {shard: _pairs_build(store, shard) for shard in sorted(set(shards))}
    footer = {**(footer or {}), names.PAIRS_READ_FOOTER: json.dumps(read)}
    store.write_parquet(f"{TAKEDOWNS_PENDING}/{name}", schemas.conform(ledger, schemas.LEDGER), footer)
    return _complete(store, name)


def finish_interrupted(store: DatasetStore) -> list[RemovalResult]:
    """Complete the removals a run cut short left pending (see the module's docstring), oldest first."""
    return [_complete(store, f.name) for f in store.list(TAKEDOWNS_PENDING) if f.name.endswith(".parquet")]


def _complete(store: DatasetStore, name: str) -> RemovalResult:
    """Rewrite the shards holding the keys of the pending ledger `name`, then commit it."""
    pending = store.read_parquet(f"{TAKEDOWNS_PENDING}/{name}")
    reasons = set(pending.column("reason").to_pylist())
    if len(reasons) != 1 or not reasons <= LAYERS.keys():
        raise ValueError(f"{store.url(f'{TAKEDOWNS_PENDING}/{name}')}: not one known reason: {reasons}")
    reason = reasons.pop()
    if EXPORT_SHARDS not in pending.column_names:  # pending since before exports were looked up
        pending = _with_export_shards(store, pending)
        store.write_parquet(f"{TAKEDOWNS_PENDING}/{name}", pending)
    by_shard: dict[str, dict[str, str]] = {}
    for row in pending.select(["key", "list", "kind", "shard"]).to_pylist():
        by_shard.setdefault(row["shard"], {})[row["key"]] = f"{row['list']} ({row['kind']})"
    read = json.loads(footer_of(pending.schema).get(names.PAIRS_READ_FOOTER, "{}"))

    def rewrite(shard: str) -> tuple[list[str], Fingerprints]:
        with shard_lease(store, shard, f"removal {name}"):
            return _rewrite_shard(store, shard, by_shard[shard], reason, read.get(shard))

    written = list(store_map(rewrite, sorted(by_shard), STORE_REWRITES))  # a generator: the shards, now
    fingerprints = {path: both for _, rewritten in written for path, both in rewritten.items()}
    _carry_dedup_checks(store, fingerprints)
    keys, tars = pending.column("key").to_pylist(), pending.column(EXPORT_SHARDS).to_pylist()
    if reason == TAKEN_DOWN:
        from laion_assets.pipeline.dedup.deduplicate import forget_taken_down  # it imports this module

        forget_taken_down(store, keys)
    # looked up again: an export grown or rebuilt since the pending ledger was written took the keys
    # from pairs that still held them, into tars the ledger does not name
    found = export_hits(store, keys)
    tars = [sorted({*(held or []), *found.get(key, [])}) for key, held in zip(keys, tars, strict=True)]
    pending = pending.set_column(
        pending.schema.get_field_index(EXPORT_SHARDS), EXPORT_SHARDS, pa.array(tars, pa.list_(pa.string()))
    )
    hits = {key: held for key, held in zip(keys, tars, strict=True) if held}
    exported = remove_from_exports(store, hits, reason)
    ledger_path = f"{TAKEDOWNS}/{name}"
    store.write_parquet(ledger_path, pending)  # its footer included
    store.remove(f"{TAKEDOWNS_PENDING}/{name}")
    counts = Counter(zip(pending.column("list").to_pylist(), pending.column("kind").to_pylist(), strict=True))
    return RemovalResult(
        removed=pending.num_rows,
        shards=sorted(by_shard),
        files=[path for paths, _ in written for path in paths] + exported,
        ledger=ledger_path,
        by_list=[(list_, kind, n) for (list_, kind), n in sorted(counts.items())],
        by_shard={shard: len(keys) for shard, keys in sorted(by_shard.items())},
        fingerprints=fingerprints,
    )


def built_before_last_removal(store: DatasetStore) -> list[str]:
    """The `FOLLOWERS` older than the last removal ledger committed: a run cut short after its removal and
    before their rebuild left them holding the samples it removed, and a rerun finds nothing to remove."""
    folder = store.path(TAKEDOWNS)
    if not store.fs.isdir(folder):
        return []
    ledgers = [
        entry
        for entry in store.fs.ls(folder, detail=True)
        if entry["type"] == "file" and entry["name"].endswith(".parquet")
    ]
    if not ledgers:
        return []
    last = max(_modified(entry) for entry in ledgers)
    return [
        path for path in FOLLOWERS if store.exists(path) and _modified(store.fs.info(store.path(path))) < last
    ]


def _modified(entry: dict) -> float:
    """When a listed file was written: local `mtime`, or S3's `LastModified`."""
    when = entry.get("mtime") or entry.get("LastModified")
    return when.timestamp() if isinstance(when, datetime.datetime) else float(when)


def _with_export_shards(store: DatasetStore, ledger: pa.Table) -> pa.Table:
    """`ledger` with `export_shards`: the export tars that hold each key, which the removal rewrites."""
    hits = export_hits(store, ledger.column("key").to_pylist())
    tars = [hits.get(key, []) for key in ledger.column("key").to_pylist()]
    return ledger.append_column(EXPORT_SHARDS, pa.array(tars, pa.list_(pa.string())))


def _carry_dedup_checks(store: DatasetStore, fingerprints: Fingerprints) -> None:
    """Dedup's record of the pairs files it checked (by fingerprint) carried over to the files this
    removal wrote from them. Dedup checks a shard whose file changed again as new, its kept pairs
    forgotten, so that after a takedown a pair an earlier run kept went as a duplicate of a newer copy;
    a removal only takes rows out, so what was checked stays checked."""
    if not fingerprints or not store.exists(DEDUP_SHARDS):
        return
    checked = store.read_parquet(DEDUP_SHARDS)
    recorded = checked.column("fingerprint").to_pylist()
    shards = checked.column("shard").to_pylist()
    carried = [carried_check(fingerprints, shard, fp) for shard, fp in zip(shards, recorded, strict=True)]
    if carried != recorded:
        column = checked.schema.get_field_index("fingerprint")
        carried_column = pa.array(carried, checked.schema.field(column).type)
        store.write_parquet(DEDUP_SHARDS, checked.set_column(column, "fingerprint", carried_column))


def carried_check(fingerprints: Fingerprints, shard: str, checked: str | None) -> str | None:
    """What a check of `shard`'s pairs file, made when its fingerprint was `checked`, holds for after a
    removal that read and wrote `fingerprints`: the file the removal wrote from that very file, or still
    the file checked when the removal read another one (written meanwhile) or none."""
    read, written = fingerprints.get(PAIRS.parquet(shard), (None, None))
    return written if read is not None and read == checked else checked


def _pairs_build(store: DatasetStore, shard: str) -> tuple[str | None, str | None]:
    """The fingerprint of the shard's pairs file and the build it records (its provenance, which a removal
    keeps and a rebuild changes); (None, None) without one."""
    fingerprint = store.fingerprint(PAIRS.parquet(shard))
    if fingerprint is None:
        return None, None
    return fingerprint, store.parquet_metadata(PAIRS.parquet(shard)).get(names.PROVENANCE_FOOTER)


def _first_per_key(removals: pa.Table) -> pa.Table:
    seen: set[str] = set()
    keep = []
    for key in removals.column("key").to_pylist():
        keep.append(key not in seen)
        seen.add(key)
    return removals.filter(pa.array(keep, pa.bool_())).sort_by("key")


def _rewrite_shard(
    store: DatasetStore,
    shard: str,
    removed: dict[str, str],
    reason: str,
    pairs_read: list[str | None] | None,
) -> tuple[list[str], Fingerprints]:
    """The shard's files without `removed` (key -> the list and kind it is on): the paths rewritten, and
    the fingerprints of each parquet read and written (both under the shard's lease: no other writer's).
    A pairs file that holds none of them though it is no longer the one the removal was begun on
    (`pairs_read`, `_pairs_build`) but the same build counts as written from it: by a run of this removal
    that was cut short before dedup's record was carried over."""
    written: list[str] = []
    fingerprints: Fingerprints = {}
    for layer in LAYERS[reason]:
        if (
            layer.has_tar
            and store.exists(layer.tar(shard))
            and drop_samples(store, layer.tar(shard), removed)
        ):
            written.append(layer.tar(shard))
        path = layer.parquet(shard)
        read = store.fingerprint(path)
        if read is None:
            continue
        table = store.read_parquet(path)
        changed = _taken_down(table, removed) if layer is IMAGES else without_keys(table, removed)
        if changed is None:
            build = footer_of(table.schema).get(names.PROVENANCE_FOOTER)
            if layer is PAIRS and pairs_read and pairs_read[0] != read and pairs_read[1] == build:
                fingerprints[path] = (pairs_read[0], read)
            continue
        _write(store, layer, shard, changed, table.num_rows - changed.num_rows, reason)
        written.append(path)
        fingerprints[path] = (read, store.fingerprint(path))
    return written, fingerprints


def _taken_down(images: pa.Table, removed: dict[str, str]) -> pa.Table | None:
    """The images rows with each removed one marked `taken_down`: no link, no caption, no image size;
    its key, host, outcome and hashes stay. None when no row changes."""
    rows = images.to_pylist()
    changed = 0
    for row in rows:
        if row["key"] in removed and row["status"] != schemas.TAKEN_DOWN:
            schemas.take_down(row, removed[row["key"]])
            changed += 1
    if not changed:
        return None
    return pa.Table.from_pylist(rows, schema=schemas.IMAGES).replace_schema_metadata(images.schema.metadata)


def _write(store: DatasetStore, layer: Layer, shard: str, table: pa.Table, dropped: int, reason: str) -> None:
    """`table` over the layer's file of `shard`, encoded as its writer does, with its footer; a pairs
    file's funnel counts the rows dropped under `reason`'s rule (`FUNNEL_RULE`)."""
    if layer is PAIRS:
        metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if names.PAIRS_FUNNEL_FOOTER in metadata:
            funnel = json.loads(metadata[names.PAIRS_FUNNEL_FOOTER])
            rule = FUNNEL_RULE[reason]
            funnel["removed"][rule] = funnel["removed"].get(rule, 0) + dropped
            metadata[names.PAIRS_FUNNEL_FOOTER] = json.dumps(funnel)
        write_pairs_parquet(store, shard, table, metadata)
    elif layer is IMAGES:
        store.write_parquet(layer.parquet(shard), table, **schemas.IMAGES_PARQUET_OPTIONS)
    else:
        store.write_parquet(layer.parquet(shard), table)


class RemovedKeys:
    """The keys of every ledger in `takedowns/`, pending ones included: what a service must never answer
    with, even before the search index is rebuilt. Each call lists the two folders (a request each) and
    reads only new or changed ledgers."""

    def __init__(self, store: DatasetStore) -> None:
        self.store = store
        self._ledgers: dict[str, tuple[str, frozenset[str]]] = {}  # name -> (fingerprint, its keys)
        self._keys: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def current(self) -> frozenset[str]:
        # pending ones first: a removal commits its ledger before it removes the pending one, so one that
        # commits between the two listings is in the second
        listed = {
            f"{folder}/{f.name}": f.fingerprint
            for folder in (TAKEDOWNS_PENDING, TAKEDOWNS)
            for f in self.store.list(folder)
            if f.name.endswith(".parquet")
        }
        with self._lock:
            if {name: fp for name, (fp, _) in self._ledgers.items()} != listed:
                for path, fingerprint in listed.items():
                    if self._ledgers.get(path, ("",))[0] != fingerprint:
                        keys = self.store.read_parquet(path, columns=["key"]).column("key")
                        self._ledgers[path] = (fingerprint, frozenset(keys.to_pylist()))
                for path in self._ledgers.keys() - listed.keys():
                    del self._ledgers[path]
                self._keys = frozenset().union(*(keys for _, keys in self._ledgers.values()))
            return self._keys
