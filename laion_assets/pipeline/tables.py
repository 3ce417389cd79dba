"""Small Arrow helpers shared by several stages."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def keep_first(table: pa.Table, columns: list[str]) -> pa.Table:
    """The first row of each distinct combination of `columns`, in the table's order."""
    rows = table.select(columns).append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = rows.group_by(columns, use_threads=False).aggregate([("_row", "min")]).column("_row_min")
    return table.take(pc.take(first, pc.sort_indices(first)))
