"""DuckDB views over the stored parquet, one per per-shard layer (`crawl_metadata`, `images`,
`embeddings`, `scores`, `pairs`, `pairs_embeddings`, `recaptions`), `scored_pairs` (the pairs with their
quality scores), `takedowns` (the removal ledger),
`blocklist_entries` (the block lists' active entries), `duplicates` (dataset-level dedup's finds) and
`pairs_unique` (the pairs without them, for a dataset whose duplicates are only recorded),
`annotated_pairs` (the pairs with their scores, recaptions and a `duplicate` flag: what an export's
`where` reads), `export_samples` (every sample of every training-shards export), `hosts` (the
images grouped by host, which the catalog writes to parquet: grouping 10 M rows over a million hosts is
a second's work, too slow to repeat in every query), and the downloader's `url_host(url)` and
`error_class(error_message)` as SQL functions.

On S3, DuckDB reads the files itself through its httpfs extension, loaded from the pip-installed
`duckdb-extension-httpfs` wheel (DuckDB cannot download extensions offline), with an S3 secret
made from the standard AWS_* variables. Nothing is copied.

DuckDB is imported where a connection is made, here and in the modules that query, never when a module
loads: the Dagster definitions load them all, and a run that only downloads then never maps DuckDB's
library (27 to 44 MB of RSS, as much of it as the page cache holds).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pyarrow as pa

from laion_assets.pipeline import schemas
from laion_assets.pipeline.storage import (
    BLOCKLIST_ENTRIES,
    CATALOG,
    CRAWL_METADATA,
    DUPLICATES,
    HOSTS,
    IMAGES,
    PAIRS,
    RECAPTIONS,
    SCORES,
    SHARD_LAYERS,
    TAKEDOWNS,
    DatasetStore,
    Export,
    S3Settings,
    remove_abandoned_beside,
    temporary_name,
)

if TYPE_CHECKING:
    import duckdb

HOSTS_VIEW = "hosts"  # over storage.HOSTS
DUPLICATES_VIEW = "duplicates"  # over storage.DUPLICATES
PAIRS_UNIQUE_VIEW = "pairs_unique"  # the pairs without the duplicates found, removed or not
SCORED_PAIRS_VIEW = "scored_pairs"  # the pairs with their quality scores (LAION-5B's, LAION-Aesthetics')
ANNOTATED_PAIRS_VIEW = "annotated_pairs"  # the pairs with their scores, recaptions and dedup's finds
EXPORT_SAMPLES_VIEW = "export_samples"  # every sample of every training-shards export


def httpfs_extension_path() -> Path:
    """The httpfs build shipped in the wheel that matches the installed duckdb."""
    import duckdb
    import duckdb_extension_httpfs

    path = (
        Path(duckdb_extension_httpfs.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "httpfs.duckdb_extension"
    )
    if not path.is_file():
        raise RuntimeError(
            f"no httpfs extension for duckdb {duckdb.__version__} at {path}: install the matching wheel, "
            f"pip install duckdb-extension-httpfs=={duckdb.__version__}"
        )
    return path


def _s3_secret_sql(s3: S3Settings) -> str:
    options = {"TYPE": "s3", "PROVIDER": "config"}
    if s3.key_id:
        options["KEY_ID"] = s3.key_id
        options["SECRET"] = s3.secret or ""
    if s3.session_token:
        options["SESSION_TOKEN"] = s3.session_token
    if s3.region:
        options["REGION"] = s3.region
    if s3.endpoint:  # MinIO, moto, R2: host:port, path-style URLs, TLS as the URL says
        parts = urlsplit(s3.endpoint)
        options["ENDPOINT"] = parts.netloc
        options["URL_STYLE"] = "path"
        options["USE_SSL"] = "true" if parts.scheme == "https" else "false"
    rendered = ", ".join(
        f"{name} {value}" if value in ("true", "false") else f"{name} '{quote_literal(value)}'"
        for name, value in options.items()
    )
    return f"CREATE OR REPLACE SECRET laion_assets_s3 ({rendered})"


def quote_literal(value: str) -> str:
    """`value` made safe inside a single-quoted SQL string."""
    return value.replace("'", "''")


def plain_connection(store: DatasetStore, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can read the store's files (httpfs and the S3 secret on an S3 root),
    without the views."""
    import duckdb

    connection = duckdb.connect(database)
    if store.is_s3:
        enable_s3(connection)
    return connection


def connect(
    store: DatasetStore, database: str = ":memory:", shards: Collection[str] | None = None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view for each layer that has parquet files under the store's root; the
    per-shard layers' views over `shards` only, where given (see `create_views`)."""
    connection = plain_connection(store, database)
    connection.create_function("url_host", schemas.url_host, ["VARCHAR"], "VARCHAR")
    connection.create_function("error_class", schemas.error_class, ["VARCHAR"], "VARCHAR")
    create_views(connection, store, shards)
    return connection


def enable_s3(connection: duckdb.DuckDBPyConnection) -> None:
    """httpfs from the wheel and an S3 secret from AWS_*: what a session needs to read an S3 root.

    A secret lives in the session, not in a database file, so every connection to a catalog of an S3
    root calls this (DuckDB's own shell: docs/sql.md)."""
    connection.execute(f"LOAD '{quote_literal(str(httpfs_extension_path()))}'")
    connection.execute(_s3_secret_sql(S3Settings.from_env()))


def default_catalog_path(store: DatasetStore) -> str:
    """Beside a local root; in the working folder for an S3 root (DuckDB cannot write its file to S3)."""
    return CATALOG if store.is_s3 else store.path(CATALOG)


def write_catalog(store: DatasetStore, database: str) -> list[str]:
    """`hosts/hosts.parquet` from the images, then a DuckDB database file with the views, replaced whole.
    Returns the view names."""
    os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
    remove_abandoned_beside(database)  # a database file (or its WAL) a killed run left half-written
    tmp = temporary_name(database)
    connection = connect(store, tmp)
    try:
        write_hosts(store, connection)
        _create_hosts_view(connection, store, has_images=IMAGES.name in view_names(connection))
        views = view_names(connection)
    finally:
        connection.close()
    # a WAL beside the old file (a session on it killed before its checkpoint) is the old file's: DuckDB
    # would replay it onto the new one, whatever that holds
    with contextlib.suppress(FileNotFoundError):
        os.remove(f"{database}.wal")
    os.replace(tmp, database)
    return sorted(views)


def view_names(connection: duckdb.DuckDBPyConnection) -> list[str]:
    return [
        name
        for (name,) in connection.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    ]


def hosts_query(connection: duckdb.DuckDBPyConnection) -> str:
    """The SQL of `images` grouped by host (schema `schemas.HOSTS`): what the catalog writes to
    hosts/hosts.parquet, and the `hosts` view itself until it has. Images written before the stored
    `host` column are grouped by `url_host(url)`, its definition."""
    columns = {name for (name, *_) in connection.sql(f"DESCRIBE {IMAGES.name}").fetchall()}
    host = "host" if "host" in columns else "url_host(url)"
    counts = "".join(f", count(*) FILTER (status = '{status}') AS {status}" for status in schemas.STATUSES)
    return (
        f"SELECT {host} AS host, count(*) AS urls{counts}, avg((status = '{schemas.SUCCESS}')::int) "
        f"AS success_rate FROM {IMAGES.name} GROUP BY 1"
    )


def write_hosts(store: DatasetStore, connection: duckdb.DuckDBPyConnection) -> int:
    """hosts/hosts.parquet from the `images` view of `connection`, sorted by host; removed when there are
    no images. Returns its rows."""
    if IMAGES.name not in view_names(connection):
        if store.exists(HOSTS):
            store.remove(HOSTS)
        return 0
    hosts = connection.sql(f"{hosts_query(connection)} ORDER BY 1").to_arrow_table()
    store.write_parquet(HOSTS, schemas.conform(hosts, schemas.HOSTS), **schemas.HOSTS_PARQUET_OPTIONS)
    return hosts.num_rows


def create_views(
    connection: duckdb.DuckDBPyConnection, store: DatasetStore, shards: Collection[str] | None = None
) -> list[str]:
    """(Re)create the views; a layer with no files yet gets none. With `shards`, each per-shard layer's view
    reads those shards' files only, and `hosts` groups their images; otherwise `hosts` reads
    hosts/hosts.parquet where the catalog has written it, else groups the images itself. Returns the view
    names."""
    created = []
    for layer in SHARD_LAYERS:
        stored = store.shards(layer)
        if shards is not None:
            stored = [shard for shard in stored if shard in shards]
        if not stored:
            continue
        paths = [layer.parquet_glob] if shards is None else [layer.parquet(shard) for shard in stored]
        files = ", ".join("'" + quote_literal(store.url(path)) + "'" for path in paths)
        # URL lists pass their own extra columns through, so crawl_metadata shards may differ and need
        # union_by_name, which reads every file's footer when the view is bound. The other layers have
        # one schema: their views read a footer only when a query reads that file.
        union = "true" if layer == CRAWL_METADATA else "false"
        connection.execute(
            f"CREATE OR REPLACE VIEW {layer.name} AS SELECT * FROM "
            f"read_parquet([{files}], union_by_name = {union})"
        )
        created.append(layer.name)
    for view, folder, pattern in _DATASET_VIEWS:
        if any(f.name.endswith(".parquet") for f in store.list(folder)):
            url = quote_literal(store.url(f"{folder}/{pattern}"))
            # union_by_name: ledgers written before a column was added (export_shards) lack it
            connection.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet('{url}', union_by_name = true)"
            )
            created.append(view)
        elif view in view_names(connection):
            connection.execute(f"DROP VIEW {view}")
    if _create_hosts_view(connection, store, IMAGES.name in created, from_file=shards is None):
        created.append(HOSTS_VIEW)
    if PAIRS.name in created:
        unique = f"ANTI JOIN {DUPLICATES_VIEW} d USING (key)" if DUPLICATES_VIEW in created else ""
        connection.execute(
            f"CREATE OR REPLACE VIEW {PAIRS_UNIQUE_VIEW} AS SELECT p.* FROM {PAIRS.name} p {unique}"
        )
        created.append(PAIRS_UNIQUE_VIEW)
    if PAIRS.name in created and SCORES.name in created:
        score_columns = ", ".join(f"s.{name}" for name in schemas.SCORES.names if name != "key")
        connection.execute(
            f"CREATE OR REPLACE VIEW {SCORED_PAIRS_VIEW} AS SELECT p.*, {score_columns} "
            f"FROM {PAIRS.name} p LEFT JOIN {SCORES.name} s USING (key)"
        )
        created.append(SCORED_PAIRS_VIEW)
    elif SCORED_PAIRS_VIEW in view_names(connection):
        connection.execute(f"DROP VIEW {SCORED_PAIRS_VIEW}")
    if PAIRS.name in created:
        connection.execute(f"CREATE OR REPLACE VIEW {ANNOTATED_PAIRS_VIEW} AS {annotated_pairs_sql(created)}")
        created.append(ANNOTATED_PAIRS_VIEW)
    elif ANNOTATED_PAIRS_VIEW in view_names(connection):
        connection.execute(f"DROP VIEW {ANNOTATED_PAIRS_VIEW}")
    if _create_export_samples_view(connection, store):
        created.append(EXPORT_SAMPLES_VIEW)
    return created


# annotated_pairs: the recaption columns it adds to the pairs (the others repeat a pairs column)
RECAPTION_COLUMNS = ("re_caption", "org_clip_score", "re_clip_score", "re_length", "re_caption_error")
_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.int64(): "BIGINT"}


def annotated_pairs_sql(views: list[str]) -> str:
    """The SQL of `annotated_pairs`: every pair with its quality scores, its recaption and both captions'
    CLIP scores, and `duplicate` (dataset-level dedup found it, removed or only recorded). A layer not
    built yet gives null columns of its type, so that a query (an export's `where`) can always name them."""
    columns, joins = [], []
    for view, alias, schema, names in (
        (SCORES.name, "s", schemas.SCORES, [n for n in schemas.SCORES.names if n != "key"]),
        (RECAPTIONS.name, "r", schemas.RECAPTIONS, list(RECAPTION_COLUMNS)),
    ):
        if view in views:
            columns += [f"{alias}.{name}" for name in names]
            joins.append(f"LEFT JOIN {view} {alias} USING (key)")
        else:
            columns += [f"NULL::{_DUCKDB_TYPES[schema.field(name).type]} AS {name}" for name in names]
    if DUPLICATES_VIEW in views:
        joins.append(f"LEFT JOIN (SELECT DISTINCT key FROM {DUPLICATES_VIEW}) d USING (key)")
        columns.append("d.key IS NOT NULL AS duplicate")
    else:
        columns.append("false AS duplicate")
    return f"SELECT p.*, {', '.join(columns)} FROM {PAIRS.name} p {' '.join(joins)}"


def _create_export_samples_view(connection: duckdb.DuckDBPyConnection, store: DatasetStore) -> bool:
    """(Re)create `export_samples`: a row per sample of every export, with its export and shard (the tar
    that holds it), from the per-shard parquet its manifest lists (not those a killed run wrote before its
    manifest). Dropped when no export lists a shard."""
    from laion_assets.pipeline.exports.export import stored_exports  # it imports this module

    listed = [
        f"'{quote_literal(store.url(Export(manifest['name']).parquet(shard['shard'])))}'"
        for manifest in stored_exports(store)
        for shard in manifest["shards"]
    ]
    if not listed:
        if EXPORT_SAMPLES_VIEW in view_names(connection):
            connection.execute(f"DROP VIEW {EXPORT_SAMPLES_VIEW}")
        return False
    connection.execute(
        f"CREATE OR REPLACE VIEW {EXPORT_SAMPLES_VIEW} AS SELECT "
        "regexp_extract(filename, '([^/]+)/[0-9]+[.]parquet$', 1) AS export, "
        "regexp_replace(filename, '[.]parquet$', '.tar') AS shard, * EXCLUDE (filename) "
        f"FROM read_parquet([{', '.join(listed)}], union_by_name = true, filename = true)"
    )
    return True


# Views over dataset-level files: (view, folder, file pattern)
_DATASET_VIEWS = (
    ("takedowns", TAKEDOWNS, "*.parquet"),  # the removal ledger, a file per removal run
    ("blocklist_entries", *BLOCKLIST_ENTRIES.split("/")),  # the active entries of the block lists
    (DUPLICATES_VIEW, *DUPLICATES.split("/")),  # dataset-level dedup's finds
)


def _create_hosts_view(
    connection: duckdb.DuckDBPyConnection, store: DatasetStore, has_images: bool, from_file: bool = True
) -> bool:
    """(Re)create `hosts`: over hosts/hosts.parquet where it is written and `from_file`, else over the
    images; dropped when there are neither. Whether there is one."""
    if from_file and store.exists(HOSTS):
        pattern = quote_literal(store.url(HOSTS))
        connection.execute(f"CREATE OR REPLACE VIEW {HOSTS_VIEW} AS SELECT * FROM read_parquet('{pattern}')")
        return True
    if has_images:
        connection.execute(f"CREATE OR REPLACE VIEW {HOSTS_VIEW} AS {hosts_query(connection)}")
        return True
    if HOSTS_VIEW in view_names(connection):
        connection.execute(f"DROP VIEW {HOSTS_VIEW}")
    return False
