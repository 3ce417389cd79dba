"""Helpers for the metadata that assets attach to their definitions and materialisations."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

from laion_assets import names
from laion_assets.pipeline import markdown
from laion_assets.pipeline.exports.export import SUMMARY_COLUMNS, stored_exports, summary_rows
from laion_assets.pipeline.removal import RemovalResult
from laion_assets.pipeline.storage import EXPORTS, SHARD_LAYERS, DatasetStore, Layer

_LAYERS = {layer.name: layer for layer in SHARD_LAYERS}


def writes_layer(layer: Layer) -> dict[str, str]:
    """Definition metadata of a per-shard asset: the store layer it writes, shown in the UI."""
    return {names.LAYER_METADATA: layer.name}


def reads(*stored: Layer | str) -> dict[str, str]:
    """Definition metadata of a dataset-level asset: the layers and files of the store it reads, shown
    in the UI. Its `deps` only order it (after the shards, after removals), so the lineage reads at a
    glance instead of drawing an edge from every layer it reads."""
    return {names.READS_METADATA: ", ".join(s.name if isinstance(s, Layer) else s for s in stored)}


def layer_of(asset: dg.AssetsDefinition) -> Layer:
    """The store layer a per-shard asset writes (from its `writes_layer` metadata)."""
    return _LAYERS[asset.metadata_by_key[asset.key][names.LAYER_METADATA]]


def preview(table: pa.Table, columns: list[str], rows: int = 5, width: int = 40) -> dg.MetadataValue:
    """The first rows as a markdown table that fits the UI's metadata panel: text cut to `width`
    characters and shown as written (a caption's HTML, links and images are the web's), numbers to 4
    decimals (a float32 similarity printed whole has 16)."""
    head = table.select(columns).slice(0, rows).to_pylist()
    cells = ([_shown(row[column], width) for column in columns] for row in head)
    return dg.MetadataValue.md(markdown.table(columns, cells))


def _shown(value: object, width: int) -> object:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, str):
        return markdown.literal(markdown.shorten(value, width))
    return value


def counts_table(counts: list[tuple[str, int]], label: str) -> dg.MetadataValue:
    """`(name, count)` pairs as a two-column markdown table."""
    return dg.MetadataValue.md(markdown.table([label, "rows"], counts))


def similarity_quantiles(table: pa.Table) -> str:
    """p10, p50 and p90 of the `similarity` column, for a glance at a shard's CLIP scores."""
    values = table.column("similarity").to_numpy()
    return str(np.quantile(values, [0.1, 0.5, 0.9]).round(4).tolist() if len(values) else [])


_COLUMN_TYPES = {bool: "bool", int: "int", float: "float", str: "string"}


def shards_materialized(metadata_by_shard: dict[str, dict]) -> dg.MaterializeResult:
    """The materialisation of the shards a run made, from each shard's metadata.

    One shard keeps its metadata as it is. Dagster 1.13 gives every partition of a multi-shard run the
    same metadata, so there each shard is a row of a table of its plain values (numbers and strings)."""
    if len(metadata_by_shard) == 1:
        return dg.MaterializeResult(metadata=next(iter(metadata_by_shard.values())))
    columns: dict[str, str] = {}
    for metadata in metadata_by_shard.values():
        for name, value in metadata.items():
            if type(value) in _COLUMN_TYPES:
                columns.setdefault(name, _COLUMN_TYPES[type(value)])
    records = [
        dg.TableRecord({"shard": shard, **{name: metadata.get(name) for name in columns}})
        for shard, metadata in metadata_by_shard.items()
    ]
    schema = dg.TableSchema(
        columns=[dg.TableColumn("shard", "string")] + [dg.TableColumn(n, t) for n, t in columns.items()]
    )
    return dg.MaterializeResult(
        metadata={"shards_in_run": len(records), "shards": dg.MetadataValue.table(records, schema)}
    )


@contextmanager
def shards_written(context: dg.AssetExecutionContext) -> Iterator[dict[str, dict]]:
    """The metadata of each shard the step writes, by shard, for `shards_materialized`. Where the step
    fails part-way through its run's shards, each shard written before the failure is recorded as
    materialised first, with its own metadata, and the failure then fails the step: Dagster counts every
    shard of a failed step as failed, so the UI showed shards whose files were written as failed, and the
    catch-up schedule made them again."""
    metadata: dict[str, dict] = {}
    try:
        yield metadata
    except BaseException:
        for shard, values in metadata.items():
            context.log_event(dg.AssetMaterialization(context.asset_key, partition=shard, metadata=values))
        raise


def rewritten_partitions(
    store: DatasetStore, removal: RemovalResult, assets: list[dg.AssetsDefinition], why: str
) -> list[dg.AssetObservation]:
    """An observation of each per-shard asset partition whose file a removal rewrote: its row count now
    and why it changed, so that the UI shows what the files hold. (An observation, not a materialisation:
    the assets downstream have already had the same rows removed and need not run again.)"""
    by_layer = {layer_of(asset).name: asset.key for asset in assets}
    observations = []
    for path in removal.files:
        layer, _, name = path.partition("/")
        shard, _, suffix = name.rpartition(".")
        if suffix != "parquet" or layer not in by_layer:
            continue
        observations.append(
            dg.AssetObservation(
                asset_key=by_layer[layer],
                partition=shard,
                metadata={
                    "dagster/row_count": store.parquet_num_rows(path),
                    "removed": removal.by_shard.get(shard, 0),
                    "changed_by": f"{why} removed {removal.by_shard.get(shard, 0)} from {shard}",
                    "path": dg.MetadataValue.path(store.url(path)),
                },
            )
        )
    return observations


def rewritten_exports(store: DatasetStore, removal: RemovalResult, why: str) -> list[dg.AssetObservation]:
    """An observation of `training_shards` when a removal rewrote export tars: each export's samples now
    and the tars rewritten, so that the UI shows what the exports hold."""
    tars = [path for path in removal.files if path.startswith(f"{EXPORTS}/")]
    if not tars:
        return []
    return [
        dg.AssetObservation(
            asset_key=dg.AssetKey(names.TRAINING_SHARDS_ASSET),
            metadata={
                **exports_metadata(store),
                "changed_by": f"{why} rewrote {len(tars)} export shards: {', '.join(tars[:20])}",
            },
        )
    ]


def exports_metadata(store: DatasetStore) -> dict[str, Any]:
    """`training_shards`' row count and table: every export under `exports/` (those the settings no longer
    name included: they stay, and removals, the catalog and the card still count them)."""
    manifests = stored_exports(store)
    return {
        "dagster/row_count": sum(m.get("samples", 0) for m in manifests),
        "exports": dg.MetadataValue.md(markdown.table(SUMMARY_COLUMNS, summary_rows(manifests), 200)),
    }
