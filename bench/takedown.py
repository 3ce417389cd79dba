"""Takedown matching benchmark: `blocklist.find_matches` over generated images shards, against raw DuckDB.

    .venv/bin/python bench/takedown.py [--shards 200] [--rows 10000] [--entries 100000]

Writes, under bench/.work/takedown-<shards>x<rows> (once), `<shards>` images parquet files of `<rows>` rows
(`schemas.IMAGES`, written as `download.write_images` does; URLs over Zipf-distributed hosts, random
sha256 and md5), and block lists of `<entries>` url hashes, `<entries>` image sha256, `<entries> // 10`
md5 and 1,000 domains; a link and an image of each shard, and 5 domains, are drawn from the images.
Times the `takedowns` asset's matching (`find_matches`: every shard's images against the active
entries) and, as the peer, one DuckDB query that finds the same keys over the same files (hash joins
on sha256(url), md5(url), the image hashes, and on every parent domain of each host); checks that
both find the same keys; prints rows/s for each, the ratio, and the peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from smoke import parse_args

from laion_assets.pipeline import schemas
from laion_assets.pipeline.storage import BLOCKLIST, BLOCKLIST_ENTRIES, IMAGES, DatasetStore
from laion_assets.pipeline.takedowns.blocklist import find_matches, read_lists, write_active

WORK = Path(__file__).parent / ".work"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def generate(store: DatasetStore, shards: int, rows: int, entries: int, rng: np.random.Generator) -> None:
    hosts = [f"img{i}.site{i % 997}.example{i % 13}.com" for i in range(20_000)]
    picked_urls, picked_shas = [], []
    for s in range(shards):
        shard = f"shard-{s:05d}"
        host_ids = np.minimum(rng.zipf(1.3, rows) - 1, len(hosts) - 1)
        urls = [f"https://{hosts[h]}/images/{s}/{i}.jpg" for i, h in enumerate(host_ids)]
        sha = [hashlib.sha256(f"{s}/{i}".encode()).hexdigest() for i in range(rows)]
        md5 = [hashlib.md5(f"{s}/{i}".encode()).hexdigest() for i in range(rows)]
        table = pa.table(
            {
                "key": [schemas.make_key(shard, i) for i in range(rows)],
                "url": urls,
                "caption": [f"a caption {i}" for i in range(rows)],
                "status": [schemas.SUCCESS] * rows,
                "error_message": pa.nulls(rows, pa.string()),
                "http_status": [200] * rows,
                "width": [256] * rows,
                "height": [256] * rows,
                "original_width": [640] * rows,
                "original_height": [480] * rows,
                "sha256": sha,
                "md5": md5,
                "phash": np.random.default_rng(rows).integers(0, 2**63 - 1, rows),  # own stream: rng's stays
                "num_bytes": [50_000] * rows,
                "host": [hosts[h] for h in host_ids],
            }
        ).cast(schemas.IMAGES)
        store.write_parquet(IMAGES.parquet(shard), table, **schemas.IMAGES_PARQUET_OPTIONS)
        link, image = rng.choice(rows, 2, replace=False)  # a listed link and a listed image per shard
        picked_urls.append(urls[link])
        picked_shas.append(sha[image])
    picked_hosts = [hosts[i].split(".", 1)[1] for i in rng.choice(len(hosts), 5, replace=False)]

    def hexes(n: int, width: int) -> list[str]:
        return [rng.bytes(width // 2).hex() for _ in range(n)]

    url_hashes = [hashlib.sha256(u.encode()).hexdigest() for u in picked_urls] + hexes(entries, 64)
    store.write_bytes(
        f"{BLOCKLIST}/link-hashes.txt", ("url_sha256\n" + "\n".join(url_hashes) + "\n").encode()
    )
    image_hashes = picked_shas + hexes(entries, 64)
    store.write_bytes(f"{BLOCKLIST}/image-hashes.txt", ("sha256\n" + "\n".join(image_hashes) + "\n").encode())
    store.write_bytes(
        f"{BLOCKLIST}/image-md5.txt", ("md5\n" + "\n".join(hexes(entries // 10, 32)) + "\n").encode()
    )
    domains = picked_hosts + [f"nowhere{i}.org" for i in range(995)]
    store.write_bytes(f"{BLOCKLIST}/domains.txt", ("domain\n" + "\n".join(domains) + "\n").encode())


PEER_SQL = """
WITH e AS (SELECT kind, entry FROM read_parquet('{entries}')),
i AS (
    SELECT key, url, sha256, md5,
           string_split(lower(regexp_replace(host, ':[0-9]+$', '')), '.') AS labels
    FROM read_parquet('{images}') WHERE status <> 'taken_down'
),
suffixes AS (
    SELECT key,
           unnest(list_transform(range(len(labels)), n -> array_to_string(labels[n + 1:], '.'))) AS domain
    FROM i
)
SELECT key FROM i JOIN e ON e.kind IN ('url', 'url_sha256') AND sha256(i.url) = e.entry
UNION SELECT key FROM i JOIN e ON e.kind = 'url_md5' AND md5(i.url) = e.entry
UNION SELECT key FROM i JOIN e ON e.kind = 'sha256' AND i.sha256 = e.entry
UNION SELECT key FROM i JOIN e ON e.kind = 'md5' AND i.md5 = e.entry
UNION SELECT key FROM suffixes JOIN e ON e.kind = 'domain' AND suffixes.domain = e.entry
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=100_000)
    args = parse_args(parser, shards=2, rows=200, entries=100)
    root = WORK / f"takedown-{args.shards}x{args.rows}"
    store = DatasetStore(str(root))
    if not store.exists(IMAGES.parquet(f"shard-{args.shards - 1:05d}")):
        generate(store, args.shards, args.rows, args.entries, np.random.default_rng(0))
    total = args.shards * args.rows

    start = time.perf_counter()
    lists = read_lists(store)
    write_active(store, lists)
    record_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = find_matches(store, lists)
    ours_seconds = time.perf_counter() - start
    ours_rss = peak_rss_mib()

    connection = duckdb.connect()
    sql = PEER_SQL.format(entries=store.url(BLOCKLIST_ENTRIES), images=store.url(f"{IMAGES.name}/*.parquet"))
    start = time.perf_counter()
    peer = {key for (key,) in connection.sql(sql).fetchall()}
    peer_seconds = time.perf_counter() - start
    assert set(ours.column("key").to_pylist()) == peer, "the two found different keys"

    print(
        f"{total:,} images rows in {args.shards} shards; {len(lists):,} active entries "
        f"(recorded in {record_seconds:.2f} s); {len(peer):,} matches"
    )
    print(
        f"find_matches      {ours_seconds:7.2f} s  {total / ours_seconds:12,.0f} rows/s  "
        f"peak RSS {ours_rss:,.0f} MiB"
    )
    print(
        f"raw DuckDB query  {peer_seconds:7.2f} s  {total / peer_seconds:12,.0f} rows/s  "
        f"peak RSS {peak_rss_mib():,.0f} MiB (both)"
    )
    print(f"ratio (find_matches / DuckDB, rows/s): {peer_seconds / ours_seconds:.2f}x")


if __name__ == "__main__":
    main()
