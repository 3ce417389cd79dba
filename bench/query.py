"""Query benchmark: the README's DuckDB queries over a generated pairs table of 10 million rows.

    .venv/bin/python bench/query.py [--rows 10000000] [--shards 20]

Writes `pairs/<shard>.parquet` files in the contract's schema under bench/.work/query-root (once),
then times each query through the views of `laion_assets.pipeline.catalog` and prints seconds and
rows scanned per second. It sets the baseline; there is no target yet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets.pipeline import catalog, schemas
from laion_assets.pipeline.storage import PAIRS, DatasetStore

WORK = Path(__file__).resolve().parent / ".work"
LICENSES = np.array(
    ["https://creativecommons.org/licenses/by/4.0/", "https://creativecommons.org/licenses/by-sa/4.0/"]
)
QUERIES = {
    "similarity histogram": "SELECT round(floor(similarity * 20) / 20, 2) AS bin, count(*) FROM pairs "
    "GROUP BY 1",
    "nsfw counts": "SELECT nsfw, count(*) AS n FROM pairs GROUP BY 1 ORDER BY n DESC",
    "pairs per license": "SELECT coalesce(license, '?') AS license, count(*) AS n FROM pairs GROUP BY 1",
    "pairs by host": "SELECT split_part(url, '/', 3) AS host, count(*) AS n FROM pairs GROUP BY 1 "
    "ORDER BY n DESC LIMIT 20",
    "10 random pairs": "SELECT caption, url, similarity FROM pairs USING SAMPLE 10 ROWS",
}


def make_shard(rng: np.random.Generator, shard: str, rows: int) -> pa.Table:
    index = pa.array(np.arange(rows))
    digits = pc.utf8_lpad(pc.cast(index, pa.string()), 8, "0")
    hosts = pc.cast(pa.array(rng.integers(0, 5000, rows)), pa.string())
    license_ = pa.array(np.where(rng.random(rows) < 0.3, LICENSES[rng.integers(0, 2, rows)], None))
    size = pa.array(rng.integers(200, 2000, rows).astype(np.int32))
    return pa.table(
        {
            "key": pc.binary_join_element_wise(f"{shard}-", digits, ""),
            "caption": pc.binary_join_element_wise("a generated caption number ", digits, ""),
            "url": pc.binary_join_element_wise("https://host", hosts, ".example/img/", digits, ".jpg", ""),
            "license": license_,
            "nsfw": pa.array(rng.choice(np.array(schemas.NSFW_TAGS[:3]), rows, p=[0.9, 0.07, 0.03])),
            "original_height": size,
            "original_width": size,
            "similarity": pa.array(rng.uniform(0.3, 0.45, rows)),
            "width": pa.array(np.full(rows, 256, np.int32)),
            "height": pa.array(np.full(rows, 256, np.int32)),
            "sha256": pc.binary_join_element_wise("sha-", shard, digits, ""),
        },
        schema=schemas.PAIRS,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)
    args = parser.parse_args()
    store = DatasetStore(str(WORK / f"query-root-{args.rows}"))
    per_shard = args.rows // args.shards
    rng = np.random.default_rng(0)
    for i in range(args.shards):
        path = PAIRS.parquet(f"bench{i:03d}")
        if not store.exists(path):
            store.write_parquet(path, make_shard(rng, f"bench{i:03d}", per_shard))
    connection = catalog.connect(store)
    total = connection.sql("SELECT count(*) FROM pairs").fetchone()[0]
    threads = connection.sql("SELECT current_setting('threads')").fetchone()[0]
    print(f"{total:,} pairs rows in {args.shards} shards, duckdb threads {threads}")
    print(f"{'query':<24}{'seconds':>9}{'rows/s':>16}")
    for name, query in QUERIES.items():
        start = time.perf_counter()
        connection.sql(query).fetchall()
        seconds = time.perf_counter() - start
        print(f"{name:<24}{seconds:>9.3f}{total / seconds:>16,.0f}")


if __name__ == "__main__":
    main()
