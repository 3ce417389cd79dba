"""Small Arrow helpers shared by several stages."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def keep_first(table: pa.Table, columns: list[str]) -> pa.Table:
    """The first row of each distinct combination of `columns`, in the table's order."""
    rows = table.select(columns).append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = rows.group_by(columns, use_threads=False).aggregate([("_row", "min")]).column("_row_min")
    return table.take(pc.take(first, pc.sort_indices(first)))


def without_keys(table: pa.Table, keys: Collection[str]) -> pa.Table | None:
    """`table` without the rows whose `key` is in `keys`; None when it has none of them."""
    hit = pc.is_in(table.column("key"), value_set=pa.array(list(keys), pa.string()))
    if not pc.any(hit).as_py():
        return None
    return table.filter(pc.invert(hit))


def unit_rows(column: pa.ChunkedArray) -> np.ndarray:
    """The L2-normalised float32 rows of a column of vectors: fixed-size lists (the embeddings, stored in
    float16, whose rounding changes their length a little), or fp16 packed as fixed-size binary (dedup's
    members)."""
    if pa.types.is_fixed_size_binary(column.type):
        dim = column.type.byte_width // 2
        array = column.combine_chunks()
        vectors = np.frombuffer(array.buffers()[1], "<f2", len(array) * dim, array.offset * dim * 2)
    else:
        dim = column.type.list_size
        vectors = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = vectors.astype(np.float32).reshape(len(column), dim)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
