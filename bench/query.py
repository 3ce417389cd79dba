"""Query benchmark: every query of docs/sql.md ("Querying with DuckDB"), over generated layers of 10 M rows.

    .venv/bin/python bench/query.py [--rows 10000000] [--shards 20] [--repeat 5] [--dim 512]
                                    [--only NAME ...] [--generate-only]

Writes, under bench/.work/query-root-<rows>x<shards> (once; again when a layer's schema or encodings changed),
`<shards>` shards of each layer with the pipeline's own schemas and writers, with realistic values:
`crawl_metadata` (`schemas.CRAWL_METADATA`, written as `crawl.write_crawl_metadata` does), `images` (one
row per crawl row, `schemas.IMAGES`, written as `download.write_images` does: about 60% `success`, the
rest over the other statuses with the fetcher's and decoder's error messages, hosts Zipf-distributed
with a success rate of their own), `embeddings` (one row per `success` image, `schemas.embeddings(dim)`
with float16 vectors, written as `embed.write_embeddings` does: 11 GB at 10 M rows and D = 512, of which
the histogram reads `similarity` only) and `pairs` (`pairs.write_pairs_parquet`).
Then it writes `hosts/hosts.parquet` as the catalog asset does (the images grouped by host, which
"success rate by host" reads), timed, and times each query through the views of
`laion_assets.pipeline.catalog.views` and, as the peer, the same query over in-memory DuckDB tables of the
same rows (DuckDB without parquet). Prints, per query, the best of `--repeat` runs for each: seconds and
rows scanned per second (the rows of every view the query reads), and the ratio views / in-memory; then
the peak RSS with the views alone and with the in-memory tables loaded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from smoke import parse_args

from laion_assets.pipeline import schemas
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.pairs.filter import PAIRS_PARQUET_OPTIONS, write_pairs_parquet
from laion_assets.pipeline.storage import CRAWL_METADATA, EMBEDDINGS, IMAGES, PAIRS, DatasetStore, footer

WORK = Path(__file__).resolve().parent / ".work"
LICENSES = np.array(
    ["https://creativecommons.org/licenses/by/4.0/", "https://creativecommons.org/licenses/by-sa/4.0/"]
)
# The queries of docs/sql.md ("Querying with DuckDB"), each with the views it reads, in its order.
QUERIES = {
    "downloads by status": (
        ("images",),
        "SELECT status, count(*) AS n FROM images GROUP BY 1 ORDER BY n DESC",
    ),
    "success rate by host": (
        ("hosts",),
        "SELECT host, urls, round(success_rate, 3) AS success_rate FROM hosts "
        "WHERE urls >= 10 ORDER BY success_rate LIMIT 20",
    ),
    "similarity histogram": (
        ("embeddings",),
        "SELECT floor(similarity * 20) / 20 AS bin, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1",
    ),
    "error classes": (
        ("images",),
        "SELECT split_part(error_message, ':', 1) AS error, count(*) AS n "
        "FROM images WHERE error_message IS NOT NULL GROUP BY 1 ORDER BY n DESC LIMIT 10",
    ),
    "nsfw counts": (("pairs",), "SELECT nsfw, count(*) AS n FROM pairs GROUP BY 1 ORDER BY n DESC"),
    "pairs per license": (
        ("pairs",),
        "SELECT coalesce(license, '?') AS license, count(*) AS n FROM pairs "
        "GROUP BY pairs.license ORDER BY n DESC",
    ),
    "pairs by host": (
        ("pairs",),
        "SELECT host, count(*) AS n FROM pairs GROUP BY 1 ORDER BY n DESC LIMIT 20",
    ),
    "10 random pairs": (
        ("pairs",),
        "SELECT caption, url, round(similarity, 3) AS similarity FROM pairs USING SAMPLE 10 ROWS",
    ),
    "10 random captions": (
        ("crawl_metadata", "images"),
        "WITH downloaded AS (SELECT key FROM images WHERE status = 'success') "
        "SELECT c.key, c.caption, c.url FROM crawl_metadata c "
        "JOIN (FROM downloaded USING SAMPLE 10 ROWS) USING (key)",
    ),
    # not in docs/sql.md: its histogram over pairs, which pairs.PAIRS_PARQUET_OPTIONS encode for
    "histogram over pairs": (
        ("pairs",),
        "SELECT floor(similarity * 20) / 20 AS bin, count(*) AS n FROM pairs GROUP BY 1 ORDER BY 1",
    ),
}
# The columns the queries read, which the in-memory tables hold.
QUERIED_COLUMNS = {
    "crawl_metadata": ["key", "caption", "url"],
    "images": ["key", "status", "error_message", "host"],
    "hosts": ["host", "urls", "success_rate"],
    "embeddings": ["similarity"],
    "pairs": ["similarity", "nsfw", "license", "host", "caption", "url"],
}

# images: hosts are ranks drawn Zipf-like from a universe of HOSTS, each with its own success rate
# (Beta-distributed, mean 0.6: many hosts all good, many dead); a failure's status and message as the
# fetcher and decoder word them, in proportions like a LAION crawl's.
HOSTS = 1_000_000
HOST_SUCCESS = np.random.default_rng(400).beta(1.2, 0.8, HOSTS)
FAILED_STATUSES = {
    schemas.FAILED_TO_DOWNLOAD: 0.78,
    schemas.FILTERED_SIZE: 0.09,
    schemas.FAILED_TO_DECODE: 0.08,
    schemas.OPTED_OUT: 0.04,
    schemas.BLOCKED: 0.01,
}
GAVE_UP = " (gave up after 3 attempts)"
# (message, http_status, weight); {host}, {path}, {n} filled per row
DOWNLOAD_ERRORS = [
    ("HTTP 404: Not Found", 404, 0.30),
    ("HTTP 403: Forbidden", 403, 0.13),
    ("HTTP 410: Gone", 410, 0.03),
    ("HTTP 500: Internal Server Error" + GAVE_UP, 500, 0.02),
    ("HTTP 503: Service Unavailable" + GAVE_UP, 503, 0.02),
    ("HTTP 429: Too Many Requests" + GAVE_UP, 429, 0.02),
    ("timeout: no response within 10s" + GAVE_UP, None, 0.08),
    ("timeout: no connection within 10s" + GAVE_UP, None, 0.05),
    ("timeout: body stalled for 10s" + GAVE_UP, 200, 0.01),
    ("connection failed: [Errno 111] Connection refused" + GAVE_UP, None, 0.05),
    ("connection failed: [Errno 104] Connection reset by peer" + GAVE_UP, None, 0.03),
    (
        "connection failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
        "local issuer certificate (_ssl.c:1000)" + GAVE_UP,
        None,
        0.04,
    ),
    ("dns: cannot resolve {host}: [Errno -2] Name or service not known", None, 0.19),
    ("too large: Content-Length {n} is over max_bytes=20000000", 200, 0.01),
    ("too many redirects: more than max_redirects=5", 301, 0.01),
    ("HTTP 200: not an image (Content-Type text/html)", 200, 0.01),
]
OTHER_ERRORS = {
    schemas.FAILED_TO_DECODE: [
        ("not an image: no known image format in the bytes", 200, 0.6),
        ("cannot decode: image file is truncated ({n} bytes not processed)", 200, 0.3),
        ("empty body", 200, 0.1),
    ],
    schemas.FILTERED_SIZE: [
        ("too small: {w}x{h} is under min_image_size=200", 200, 0.8),
        ("aspect ratio: {ratio} is over max_aspect_ratio=3", 200, 0.2),
    ],
    schemas.OPTED_OUT: [
        ("X-Robots-Tag: noai", 200, 0.5),
        ("X-Robots-Tag: noimageai", 200, 0.2),
        ("robots.txt: disallows {path} for laion_assets", None, 0.3),
    ],
    schemas.BLOCKED: [
        ("private address: {host} resolves to 10.0.{n} (set allow_private_networks to fetch it)", None, 1.0)
    ],
}
_WORDS = (
    "photo of a the with red blue green old new vintage modern wooden house dog cat girl man woman "
    "beach city street night sunset mountain lake car bike logo poster print shirt dress shoes bag "
    "ring watch table chair sofa lamp kitchen garden flower tree bird food cake coffee wine book art "
    "painting drawing illustration vector icon design pattern texture background wallpaper"
)
WORDS = np.array(_WORDS.split())


def digits_of(rows: int) -> pa.Array:
    return pc.utf8_lpad(pc.cast(pa.array(np.arange(rows)), pa.string()), 8, "0")


def crawl_shard(rng: np.random.Generator, shard: str, rows: int) -> tuple[pa.Table, np.ndarray]:
    """crawl_metadata as `build_crawl_metadata` makes it from a URL list, and each row's host rank."""
    digits = digits_of(rows)
    ranks = (rng.zipf(1.1, rows) - 1) % HOSTS
    rank_text = pc.cast(pa.array(ranks), pa.string())
    suffix = pc.cast(pa.array(ranks % 13), pa.string())
    host = pc.binary_join_element_wise("cdn", rank_text, ".example", suffix, ".com", "")
    words = [pa.array(WORDS[rng.integers(0, len(WORDS), rows)]) for _ in range(4)]
    table = pa.table(
        {
            "key": pc.binary_join_element_wise(f"{shard}-", digits, ""),
            "url": pc.binary_join_element_wise("https://", host, "/images/", digits, ".jpg", ""),
            "caption": pc.binary_join_element_wise(*words, "number", digits, " "),
            "page_url": pc.if_else(
                pa.array(rng.random(rows) < 0.9),
                pc.binary_join_element_wise("https://", host, "/posts/", digits, ".html", ""),
                pa.nulls(rows, pa.string()),
            ),
            "license": pa.array(np.where(rng.random(rows) < 0.3, LICENSES[rng.integers(0, 2, rows)], None)),
            "source_file": pa.array(np.full(rows, f"{shard}.parquet")),
            "source_offset": pa.array(np.arange(rows)),
        }
    )
    return schemas.conform(table, schemas.CRAWL_METADATA), ranks


def images_shard(rng: np.random.Generator, crawl: pa.Table, rank: np.ndarray) -> pa.Table:
    """images as `download_shard` records them for `crawl`: one row per crawl row, sorted by key, `host`
    as `download._record` fills it (`url_host(url)`)."""
    rows = crawl.num_rows
    host = pa.array([schemas.url_host(url) for url in crawl.column("url").to_pylist()], pa.string())
    success = rng.random(rows) < HOST_SUCCESS[rank]
    failed = np.array(list(FAILED_STATUSES))[
        rng.choice(len(FAILED_STATUSES), rows, p=list(FAILED_STATUSES.values()))
    ]
    status = np.where(success, schemas.SUCCESS, failed)
    error = np.full(rows, None, dtype=object)
    http_status = np.where(success, 200, 0).astype(object)
    hosts, urls = host.to_pylist(), crawl.column("url").to_pylist()
    original = rng.integers(200, 2000, (rows, 2))
    for name, templates in [(schemas.FAILED_TO_DOWNLOAD, DOWNLOAD_ERRORS), *OTHER_ERRORS.items()]:
        where = np.flatnonzero(status == name)
        weights = np.array([w for _, _, w in templates])
        picks = rng.choice(len(templates), len(where), p=weights / weights.sum())
        numbers = rng.integers(1, 250, len(where))
        for row, pick, n in zip(where.tolist(), picks.tolist(), numbers.tolist(), strict=True):
            template, code, _ = templates[pick]
            if "{" in template:
                w, h = int(original[row, 0] // 10), int(original[row, 1])
                if name == schemas.FILTERED_SIZE:
                    original[row, 0] = w  # the size the message names
                template = template.format(
                    host=hosts[row],
                    path="/" + urls[row].split("/", 3)[3],
                    n=f"{n}.{n % 7}" if name == schemas.BLOCKED else 20_000_000 + n * 4096,
                    w=w,
                    h=h,
                    ratio=f"{h / max(w, 1):.2f}",
                )
            error[row], http_status[row] = template, code
    http_status[http_status == 0] = None
    fetched = success | np.isin(status, [schemas.FAILED_TO_DECODE, schemas.FILTERED_SIZE])
    sha = pa.array(np.frombuffer(rng.bytes(rows * 32).hex().encode(), "S64")).cast(pa.string())
    sizes = (rng.lognormal(11, 1, rows)).astype(np.int64)
    table = pa.table(
        {
            "key": crawl.column("key"),
            "url": crawl.column("url"),
            "caption": crawl.column("caption"),
            "status": pa.array(status),
            "error_message": pa.array(error, pa.string()),
            "http_status": pa.array(http_status, pa.int32()),
            "width": nulls_unless(np.full(rows, 256, np.int32), success),
            "height": nulls_unless(np.full(rows, 256, np.int32), success),
            "original_width": nulls_unless(original[:, 0].astype(np.int32), fetched),
            "original_height": nulls_unless(original[:, 1].astype(np.int32), fetched),
            "sha256": nulls_unless(sha, fetched),
            "md5": nulls_unless(pc.utf8_slice_codeunits(sha, 0, 32), fetched),
            "phash": nulls_unless(
                np.random.default_rng(rows).integers(0, 2**63 - 1, rows), success
            ),  # own stream
            "num_bytes": nulls_unless(sizes, fetched),
            "host": host,
        }
    )
    return table.cast(schemas.IMAGES)


def nulls_unless(values: np.ndarray | pa.Array, mask: np.ndarray) -> pa.Array:
    return pa.array(values, mask=~mask)


def embeddings_shard(rng: np.random.Generator, images: pa.Table, dim: int) -> pa.Table:
    """embeddings as `embed_shard` makes them: one row per success image, L2-normalised float16 vectors
    (drawn from a pool), `similarity` their float32 cosine as CLIP gives it for LAION pairs."""
    keys = images.filter(pc.equal(images.column("status"), schemas.SUCCESS)).column("key")
    rows = len(keys)
    pool = rng.standard_normal((4096, dim)).astype(np.float32)
    pool = (pool / np.linalg.norm(pool, axis=1, keepdims=True)).astype(np.float16)

    def vectors() -> pa.FixedSizeListArray:
        flat = pool[rng.integers(0, len(pool), rows)].reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)

    similarity = np.clip(rng.normal(0.29, 0.05, rows), -0.1, 0.6).astype(np.float32)
    return pa.table(
        {"key": keys, "image_embedding": vectors(), "text_embedding": vectors(), "similarity": similarity},
        schema=schemas.embeddings(dim),
    )


def pairs_shard(rng: np.random.Generator, shard: str, rows: int) -> pa.Table:
    """A pairs table as `build_pairs` makes it: the contract's columns, `host` from the URLs."""
    digits = digits_of(rows)
    hosts = pc.cast(pa.array(rng.integers(0, 5000, rows)), pa.string())
    license_ = pa.array(np.where(rng.random(rows) < 0.3, LICENSES[rng.integers(0, 2, rows)], None))
    size = pa.array(rng.integers(200, 2000, rows).astype(np.int32))
    # the pipeline's similarity is the embeddings' float32 cosine, cast to LAION-400M's float64
    similarity = rng.uniform(0.3, 0.45, rows).astype(np.float32).astype(np.float64)
    table = pa.table(
        {
            "key": pc.binary_join_element_wise(f"{shard}-", digits, ""),
            "caption": pc.binary_join_element_wise("a generated caption number ", digits, ""),
            "url": pc.binary_join_element_wise("https://Host", hosts, ".example/img/", digits, ".jpg", ""),
            "license": license_,
            "nsfw": pa.array(rng.choice(np.array(schemas.NSFW_TAGS[:3]), rows, p=[0.9, 0.07, 0.03])),
            "original_height": size,
            "original_width": size,
            "similarity": pa.array(similarity),
            "width": pa.array(np.full(rows, 256, np.int32)),
            "height": pa.array(np.full(rows, 256, np.int32)),
            "sha256": pc.binary_join_element_wise("sha-", shard, digits, ""),
        }
    )
    return schemas.conform(schemas.with_host(table), schemas.PAIRS)


def written_with(options: dict) -> dict[str, str]:
    return {"bench.writer": json.dumps(options, sort_keys=True)}


def up_to_date(store: DatasetStore, path: str, schema: pa.Schema, options: dict) -> bool:
    if not store.exists(path):
        return False
    stored = pq.read_schema(store.path(path))
    return stored.remove_metadata() == schema and footer(stored) == written_with(options)


def generate(root: str, shards: int, per_shard: int, dim: int) -> None:
    """The shards that are missing, or were written with another schema or other encodings."""
    store = DatasetStore(root)
    for i in range(shards):
        shard = f"bench{i:03d}"
        if not up_to_date(store, PAIRS.parquet(shard), schemas.PAIRS, PAIRS_PARQUET_OPTIONS):
            table = pairs_shard(np.random.default_rng(i), shard, per_shard)
            write_pairs_parquet(store, shard, table, written_with(PAIRS_PARQUET_OPTIONS))
        # the options of the pipeline's writers: crawl.write_crawl_metadata and embed.write_embeddings
        # take write_parquet's defaults, download.write_images schemas.IMAGES_PARQUET_OPTIONS
        layers = [
            (CRAWL_METADATA.parquet(shard), schemas.CRAWL_METADATA, {}),
            (IMAGES.parquet(shard), schemas.IMAGES, schemas.IMAGES_PARQUET_OPTIONS),
            (EMBEDDINGS.parquet(shard), schemas.embeddings(dim), {}),
        ]
        stale = [layer for layer in layers if not up_to_date(store, *layer)]
        if not stale:
            continue
        # the three from one seed, in this order, so that a layer written again agrees with the others
        rng = np.random.default_rng(1000 + i)
        crawl, ranks = crawl_shard(rng, shard, per_shard)
        images = images_shard(rng, crawl, ranks)
        for path, _, options in stale:
            table = {"crawl_metadata": crawl, "images": images}.get(path.split("/")[0])
            if table is None:
                table = embeddings_shard(rng, images, dim)
            store.write_parquet(path, table, metadata=written_with(options), **options)
            del table


def best_of(connection: duckdb.DuckDBPyConnection, query: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        connection.sql(query).fetchall()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of crawl_metadata, images, pairs")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (ViT-B/32: 512)")
    parser.add_argument("--only", nargs="*", help="time only these queries (names as printed)")
    parser.add_argument("--generate-only", action="store_true", help="write the layers, time nothing")
    args = parse_args(parser, rows=2000, shards=2, repeat=1)
    root = str(WORK / f"query-root-{args.rows}x{args.shards}")
    # in a child process, so that the peak memory printed below is the queries' alone
    child = multiprocessing.get_context("fork").Process(
        target=generate, args=(root, args.shards, args.rows // args.shards, args.dim)
    )
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(f"generating the layers failed (exit code {child.exitcode})")
    if args.generate_only:
        return
    queries = {name: QUERIES[name] for name in args.only or QUERIES}

    store = DatasetStore(root)
    start = time.perf_counter()
    hosts = catalog.write_hosts(store, catalog.connect(store))  # what the catalog asset writes
    hosts_seconds = time.perf_counter() - start
    views = catalog.connect(store)
    counts = {view: views.sql(f"SELECT count(*) FROM {view}").fetchone()[0] for view in QUERIED_COLUMNS}
    threads = views.sql("SELECT current_setting('threads')").fetchone()[0]
    print(
        ", ".join(f"{count:,} {view}" for view, count in counts.items())
        + f" rows in {args.shards} shards each; {os.cpu_count()} CPUs, duckdb {duckdb.__version__} "
        f"threads {threads}; best of {args.repeat}"
    )
    print(
        f"hosts/hosts.parquet ({hosts:,} hosts) written in {hosts_seconds:.2f} s: "
        f"{counts['images'] / hosts_seconds / 1e6:.1f} M images rows/s"
    )
    view_seconds = {name: best_of(views, sql, args.repeat) for name, (_, sql) in queries.items()}
    views_rss = peak_rss_mib()
    views.close()

    memory = duckdb.connect()
    for view, columns in QUERIED_COLUMNS.items():
        pattern = catalog.quote_literal(store.url(f"{view}/*.parquet"))
        memory.execute(f"CREATE TABLE {view} AS SELECT {', '.join(columns)} FROM read_parquet('{pattern}')")
    memory_seconds = {name: best_of(memory, sql, args.repeat) for name, (_, sql) in queries.items()}

    print(
        f"{'query':<22}{'rows':>12}{'views s':>9}{'rows/s':>14}{'in-memory s':>13}{'rows/s':>14}{'ratio':>7}"
    )
    for name, (read, _) in queries.items():
        rows = sum(counts[view] for view in read)
        seconds, reference = view_seconds[name], memory_seconds[name]
        print(
            f"{name:<22}{rows:>12,}{seconds:>9.3f}{rows / seconds / 1e6:>12.1f} M{reference:>13.3f}"
            f"{rows / reference / 1e6:>12.1f} M{reference / seconds:>7.2f}"
        )
    tables = "; ".join(f"{view}: {', '.join(columns)}" for view, columns in QUERIED_COLUMNS.items())
    print(
        f"peak RSS: {views_rss:,.0f} MiB with the views, {peak_rss_mib():,.0f} MiB with the in-memory tables "
        f"({tables}) loaded"
    )


if __name__ == "__main__":
    main()
