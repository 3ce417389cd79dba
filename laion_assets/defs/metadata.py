"""Helpers for the metadata that assets attach to their definitions and materialisations."""

import dagster as dg
import numpy as np
import pyarrow as pa

from laion_assets.pipeline.storage import DatasetStore

# Asset definition metadata: the storage layer (folder under the root) holding `<shard>.parquet`.
LAYER = "laion_assets/layer"


def shard_output(asset: dg.AssetsDefinition, shard: str) -> str:
    """The parquet file a per-shard asset writes for `shard`, under the root: what tells it is done."""
    return DatasetStore.shard_file(asset.metadata_by_key[asset.key][LAYER], shard, "parquet")


def preview(table: pa.Table, columns: list[str], rows: int = 5, width: int = 80) -> dg.MetadataValue:
    """The first rows as a markdown table, long cells cut."""

    def cell(value: object) -> str:
        text = "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= width else text[: width - 1] + "…"

    head = table.select(columns).slice(0, rows).to_pylist()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in head]
    return dg.MetadataValue.md("\n".join(lines))


def counts_table(counts: list[tuple[str, int]], label: str) -> dg.MetadataValue:
    """`(name, count)` pairs as a two-column markdown table."""
    lines = [f"| {label} | rows |", "|---|---|"] + [f"| {name} | {n} |" for name, n in counts]
    return dg.MetadataValue.md("\n".join(lines) if counts else "none")


def similarity_quantiles(table: pa.Table) -> str:
    """p10, p50 and p90 of the `similarity` column, for a glance at a shard's CLIP scores."""
    values = table.column("similarity").to_numpy()
    return str(np.quantile(values, [0.1, 0.5, 0.9]).round(4).tolist() if len(values) else [])
