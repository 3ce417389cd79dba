import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.cli import main
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.storage import DatasetStore, temporary_name


def _two_shards(store: DatasetStore) -> None:
    store.write_parquet(
        "images/a.parquet",
        pa.table(
            {
                "key": ["a-00000000", "a-00000001", "a-00000002"],
                "url": ["http://x.com/1.jpg", "http://y.org/2.jpg", "http://x.com/3.jpg"],
                "status": ["success", "failed_to_download", "success"],
            }
        ),
    )
    store.write_parquet(
        "images/b.parquet",
        pa.table(
            {
                "key": ["b-00000000"],
                "url": ["http://y.org/9.jpg"],
                "status": ["opted_out"],
            }
        ),
    )
    store.write_bytes("images/a.tar", b"not parquet: the views read *.parquet only")
    store.write_parquet(
        "crawl_metadata/a.parquet", pa.table({"key": ["a-00000000"], "caption": ["x"], "TEXT2": [1]})
    )
    store.write_parquet(
        "crawl_metadata/b.parquet", pa.table({"key": ["b-00000000"], "caption": ["y"], "extra": ["e"]})
    )


def test_views_over_every_shard(root):
    store = DatasetStore(root)
    assert catalog.create_views(duckdb.connect(), store) == []  # nothing yet: no views, no error
    _two_shards(store)
    connection = catalog.connect(store)
    assert connection.sql("SELECT status, count(*) FROM images GROUP BY 1 ORDER BY 1").fetchall() == [
        ("failed_to_download", 1),
        ("opted_out", 1),
        ("success", 2),
    ]
    # shards with different pass-through columns are unioned by name
    assert connection.sql("SELECT key, TEXT2, extra FROM crawl_metadata ORDER BY key").fetchall() == [
        ("a-00000000", 1, None),
        ("b-00000000", None, "e"),
    ]
    views = {
        name
        for (name,) in connection.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    assert views == {"images", "crawl_metadata", "hosts"}  # hosts: the images grouped by host


def test_hosts_view_groups_the_images_and_the_catalog_writes_it(root, tmp_path):
    from laion_assets.pipeline import schemas
    from laion_assets.pipeline.storage import HOSTS

    store = DatasetStore(root)
    _two_shards(store)  # images without the stored host column: grouped by url_host(url)
    expected = [
        {
            "host": "x.com",
            "urls": 2,
            "failed_to_download": 0,
            "opted_out": 0,
            "success": 2,
            "success_rate": 1.0,
        },
        {
            "host": "y.org",
            "urls": 2,
            "failed_to_download": 1,
            "opted_out": 1,
            "success": 0,
            "success_rate": 0.0,
        },
    ]
    columns = "host, urls, failed_to_download, opted_out, success, success_rate"

    def hosts(connection):
        return [
            dict(zip(columns.split(", "), row, strict=True))
            for row in connection.sql(f"SELECT {columns} FROM hosts ORDER BY 1").fetchall()
        ]

    assert not store.exists(HOSTS)
    assert hosts(catalog.connect(store)) == expected  # before the catalog: the view groups the images
    catalog.write_catalog(store, str(tmp_path / "c.duckdb"))
    written = store.read_parquet(HOSTS)
    assert written.schema.remove_metadata() == schemas.HOSTS
    assert written.select(columns.split(", ")).to_pylist() == expected
    assert written.column("blocked").to_pylist() == written.column("failed_to_decode").to_pylist() == [0, 0]
    # a new shard: the view reads the written file, as of the last catalog, until the catalog runs again
    store.write_parquet(
        "images/c.parquet",
        pa.table({"key": ["c-00000000"], "url": ["http://x.com/5.jpg"], "status": ["blocked"]}),
    )
    assert hosts(catalog.connect(store)) == expected
    catalog.write_catalog(store, str(tmp_path / "c.duckdb"))
    assert hosts(catalog.connect(store))[0] == {**expected[0], "urls": 3, "success_rate": 2 / 3}
    database = duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True)
    if store.is_s3:
        catalog.enable_s3(database)
    assert database.sql("SELECT sum(blocked) FROM hosts").fetchone() == (1,)  # the catalog file has it too
    for name in ("a", "b", "c"):
        store.remove(f"images/{name}.parquet")
    catalog.write_catalog(store, str(tmp_path / "c.duckdb"))  # no images: no hosts
    assert not store.exists(HOSTS)
    assert "hosts" not in catalog.create_views(catalog.connect(store), store)


def test_sql_command_formats_and_outputs(root, tmp_path, capsys):
    _two_shards(DatasetStore(root))
    query = "SELECT split_part(url, '/', 3) AS host, count(*) AS n FROM images GROUP BY 1 ORDER BY 1"
    assert main(["sql", "--root", root, "--format", "csv", query]) == 0
    assert capsys.readouterr().out.splitlines() == ["host,n", "x.com,2", "y.org,2"]
    assert main(["sql", "--root", root, "--format", "json", query]) == 0
    assert json.loads(capsys.readouterr().out) == [{"host": "x.com", "n": 2}, {"host": "y.org", "n": 2}]
    assert main(["sql", "--root", root, query]) == 0
    table = capsys.readouterr().out
    assert "x.com" in table and "host" in table
    assert main(["sql", "--root", root, "--output", str(tmp_path / "hosts.parquet"), query + ";"]) == 0
    assert pq.read_table(tmp_path / "hosts.parquet").to_pylist() == [
        {"host": "x.com", "n": 2},
        {"host": "y.org", "n": 2},
    ]
    assert main(["sql", "--root", root, "--output", str(tmp_path / "hosts.json"), query]) == 0
    assert json.loads((tmp_path / "hosts.json").read_text()) == [
        {"host": "x.com", "n": 2},
        {"host": "y.org", "n": 2},
    ]
    with pytest.raises(SystemExit, match="--output must end in one of"):
        main(["sql", "--root", root, "--output", str(tmp_path / "hosts.xlsx"), query])


def test_sql_output_takes_a_query_ending_in_a_comment(root, tmp_path):
    """The query was pasted into `COPY (...) TO`: a trailing `-- comment` (as docs/dedup.md's queries end)
    swallowed the `) TO ...`, and `--output` failed on a query that prints without it."""
    _two_shards(DatasetStore(root))
    for n, query in enumerate(
        ["SELECT count(*) AS n FROM images -- all", "SELECT count(*) AS n FROM images;  -- all"]
    ):
        output = tmp_path / f"n{n}.csv"
        assert main(["sql", "--root", root, "--output", str(output), query]) == 0
        assert output.read_text().splitlines() == ["n", "4"]


def test_sql_runs_a_statement_that_returns_no_rows(root, tmp_path, capsys):
    """DuckDB's own `COPY (...) TO` (or a SET) returns no relation: the command wrote the file, then
    ended in an AttributeError traceback and exit status 1."""
    _two_shards(DatasetStore(root))
    for fmt in ("table", "csv", "json"):
        target = tmp_path / f"images-{fmt}.parquet"
        assert main(["sql", "--root", root, "--format", fmt, f"COPY (FROM images) TO '{target}'"]) == 0
        assert pq.read_table(target).num_rows == 4
    assert capsys.readouterr().out == ""


def test_unknown_view_is_a_clear_error(local_root):
    # one line, DuckDB's message, where it was DuckDB's exception and a traceback
    with pytest.raises(SystemExit, match=r"^laion-assets sql: Catalog Error: .*pairs"):
        main(["sql", "--root", local_root, "SELECT * FROM pairs"])
    with pytest.raises(SystemExit, match=r"^laion-assets sql: Parser Error: .*SELEC"):
        main(["sql", "--root", local_root, "SELEC 1"])


def test_a_query_naming_a_missing_view_says_what_the_root_has(root, tmp_path):
    """DuckDB's message alone ("Table with name images does not exist! Did you mean "pg_namespace"?")
    did not say that the root was mistyped, or had nothing built yet, or which views it has."""
    store = DatasetStore(root)
    for output in ([], ["--output", str(tmp_path / "out.csv")]):
        with pytest.raises(
            SystemExit,
            match=rf"(?s)^laion-assets sql: Catalog Error: .*images.*\n"
            rf"no dataset at {re.escape(store.root)}: nothing is stored there",
        ):
            main(["sql", "--root", root, *output, "SELECT * FROM images"])
    store.write_bytes("incoming/a.csv", b"url,caption\nhttp://a.com/1.jpg,a cat\n")
    with pytest.raises(
        SystemExit, match=rf"\n{re.escape(store.root)} has no views yet: no layer has parquet"
    ):
        main(["sql", "--root", root, "SELECT * FROM images"])
    _two_shards(store)
    with pytest.raises(
        SystemExit, match=rf"\nthe views of {re.escape(store.root)}: crawl_metadata, hosts, images$"
    ):
        main(["sql", "--root", root, "SELECT * FROM pairs"])


def test_catalog_asset_writes_a_database_file_with_the_views(root, tmp_path):
    import dagster as dg

    from laion_assets.defs.catalog import catalog as catalog_asset
    from laion_assets.defs.resources import build_resources

    store = DatasetStore(root)
    _two_shards(store)
    config = (
        {} if not store.is_s3 else {"ops": {"catalog": {"config": {"database": str(tmp_path / "c.duckdb")}}}}
    )
    result = dg.materialize([catalog_asset], resources=build_resources(root), run_config=config)
    path = result.asset_materializations_for_node("catalog")[0].metadata["path"].value
    assert path == (str(tmp_path / "c.duckdb") if store.is_s3 else store.path("catalog.duckdb"))
    connection = duckdb.connect(path, read_only=True)
    if store.is_s3:  # a secret is per session: an S3 catalog needs httpfs and one, as docs/sql.md says
        catalog.enable_s3(connection)
    assert connection.sql("SELECT count(*) FROM images").fetchall() == [(4,)]
    assert connection.sql("SELECT count(*) FROM crawl_metadata").fetchall() == [(2,)]


def test_a_killed_sessions_wal_is_not_replayed_onto_the_rewritten_catalog_file(local_root):
    """`duckdb data/catalog.duckdb` opens the file read-write; a session killed before its checkpoint
    leaves catalog.duckdb.wal, and DuckDB replays a WAL onto whatever file has its name: the catalog
    written next showed that session's changes (here its own `images` view) in place of its own views."""
    store = DatasetStore(local_root)
    _two_shards(store)
    database = store.path("catalog.duckdb")
    catalog.write_catalog(store, database)
    session = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, duckdb\n"
            f"connection = duckdb.connect({database!r})\n"
            "connection.execute(\"CREATE OR REPLACE VIEW images AS SELECT 'mine' AS status\")\n"
            "print('changed', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert session.stdout.readline() == "changed\n"
    finally:
        session.send_signal(signal.SIGKILL)
        session.wait()
    assert os.path.exists(f"{database}.wal")
    catalog.write_catalog(store, database)
    connection = duckdb.connect(database, read_only=True)
    assert connection.sql("SELECT status, count(*) FROM images GROUP BY 1 ORDER BY 1").fetchall() == [
        ("failed_to_download", 1),
        ("opted_out", 1),
        ("success", 2),
    ]


def test_the_duckdb_shell_reads_an_s3_catalog_as_docs_sql_md_says(s3_root, tmp_path):
    """docs/sql.md's set-up for DuckDB's own shell on an S3 root's catalog file, run as written (the
    venv's binaries for `.venv/bin/`; moto's endpoint added as it says): it gave `LOAD httpfs`, which the
    shell refuses for an extension not installed, and a credential_chain secret, whose `aws` extension
    is not in the wheel and cannot be downloaded."""
    store = DatasetStore(s3_root)
    _two_shards(store)
    database = str(tmp_path / "c.duckdb")
    catalog.write_catalog(store, database)
    text = SQL_DOCS.read_text()
    install = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "INSTALL" in b)
    session = next(b for b in re.findall(r"```sql\n(.*?)```", text, re.S) if "CREATE SECRET" in b)
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    session = session.replace("));", f"), ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false);")
    venv = f"{os.path.dirname(sys.executable)}/"
    env = {**os.environ, "HOME": str(tmp_path)}  # the extension is installed under ~/.duckdb
    subprocess.run(["bash", "-c", install.replace(".venv/bin/", venv)], env=env, check=True, timeout=120)
    done = subprocess.run(
        [f"{venv}duckdb", "-readonly", "-csv", database],
        input=f"{session}SELECT count(*) AS n FROM images;\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.split()[-2:] == ["n", "4"], done.stdout + done.stderr


def test_a_moved_root_is_queried_at_once_and_its_catalog_file_rebuilt_by_one_command(
    local_root, tmp_path, capsys, monkeypatch
):
    """The catalog file's views hold the root's paths, so a moved root's file is stale; `laion-assets sql`
    makes its views afresh and works at once, and `laion-assets run --select catalog` rebuilds the file."""
    import shutil

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    DatasetStore(local_root).write_bytes("incoming/a.csv", b"url,caption\nhttp://a.com/1.jpg,a cat\n")
    assert main(["run", "--root", local_root, "--select", "crawl_metadata,catalog"]) == 0
    moved = str(tmp_path / "moved")
    shutil.move(local_root, moved)
    stale = duckdb.connect(str(Path(moved) / "catalog.duckdb"), read_only=True)
    with pytest.raises(duckdb.IOException, match="No files found"):
        stale.sql("SELECT caption FROM crawl_metadata").fetchall()
    stale.close()
    capsys.readouterr()
    assert main(["sql", "--root", moved, "--format", "csv", "SELECT caption FROM crawl_metadata"]) == 0
    assert capsys.readouterr().out.splitlines() == ["caption", "a cat"]
    assert main(["run", "--root", moved, "--select", "catalog"]) == 0
    rebuilt = duckdb.connect(str(Path(moved) / "catalog.duckdb"), read_only=True)
    assert rebuilt.sql("SELECT caption FROM crawl_metadata").fetchall() == [("a cat",)]


def test_run_writes_the_catalog_after_the_shards(local_root, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", b"url,caption\nhttp://a.com/1.jpg,a cat\n")
    assert main(["run", "--root", local_root, "--select", "crawl_metadata,catalog"]) == 0
    assert f"catalog: {store.path('catalog.duckdb')}" in capsys.readouterr().out
    connection = duckdb.connect(store.path("catalog.duckdb"), read_only=True)
    assert connection.sql("SELECT caption FROM crawl_metadata").fetchall() == [("a cat",)]


def test_duckdb_resource_gives_the_same_views(root):
    from laion_assets.defs.resources import build_resources

    _two_shards(DatasetStore(root))
    connection = build_resources(root)["duckdb"].get_connection()
    assert connection.sql("SELECT count(*) FROM images WHERE status = 'success'").fetchall() == [(2,)]


def test_readme_queries_on_pairs(local_root):
    from laion_assets.pipeline import schemas
    from laion_assets.pipeline.pairs.filter import write_pairs_parquet

    store = DatasetStore(local_root)
    for shard, urls, licenses, similarity in (
        ("a", ["http://X.com/1.jpg", "http://y.org/2.jpg"], [None, "cc-by"], [0.31, 0.42]),
        ("b", ["https://x.com/3.jpg"], [None], [0.37]),
    ):
        n = len(urls)
        table = pa.table(
            {
                "key": [schemas.make_key(shard, i) for i in range(n)],
                "caption": ["a caption"] * n,
                "url": urls,
                "license": pa.array(licenses, pa.string()),
                "nsfw": ["UNLIKELY"] * n,
                "original_height": [480] * n,
                "original_width": [640] * n,
                "similarity": similarity,
                "width": [256] * n,
                "height": [256] * n,
                "sha256": [f"{shard}{i}" for i in range(n)],
            }
        )
        write_pairs_parquet(store, shard, schemas.conform(schemas.with_host(table), schemas.PAIRS))
    row_group = pq.ParquetFile(store.path("pairs/a.parquet")).metadata.row_group(0)
    encodings = {row_group.column(i).path_in_schema: row_group.column(i).encodings for i in range(12)}
    assert "BYTE_STREAM_SPLIT" in encodings["similarity"] and "RLE_DICTIONARY" in encodings["host"]
    assert "RLE_DICTIONARY" not in encodings["url"]
    connection = catalog.connect(store)
    by_host = "SELECT host, count(*) AS n FROM pairs GROUP BY 1 ORDER BY n DESC LIMIT 20"
    assert connection.sql(by_host).fetchall() == [("x.com", 2), ("y.org", 1)]
    licenses = (
        "SELECT coalesce(license, '?') AS license, count(*) AS n FROM pairs GROUP BY pairs.license "
        "ORDER BY n DESC"
    )
    assert connection.sql(licenses).fetchall() == [("?", 2), ("cc-by", 1)]
    histogram = "SELECT floor(similarity * 20) / 20 AS bin, count(*) AS n FROM pairs GROUP BY 1 ORDER BY 1"
    old_histogram = "SELECT round(floor(similarity * 20) / 20, 2), count(*) FROM pairs GROUP BY 1 ORDER BY 1"
    assert (
        connection.sql(histogram).fetchall()
        == connection.sql(old_histogram).fetchall()
        == [
            (0.3, 1),
            (0.35, 1),
            (0.4, 1),
        ]
    )


SQL_DOCS = Path(__file__).resolve().parents[1] / "docs" / "sql.md"
# shard -> (url, status, error_message) of each crawl row; x.com and y.org have the 10 rows the
# success-rate query asks for
_DOWNLOADS = {
    "a": [
        *[(f"http://X.com/{i}.jpg", "success", None) for i in range(7)],
        ("http://x.com/7.jpg", "failed_to_download", "HTTP 404: Not Found"),
        ("http://x.com/8.jpg", "failed_to_download", "HTTP 404: Not Found"),
        ("http://x.com/9.jpg", "failed_to_download", "timeout: no response within 10s"),
        ("http://y.org/1.jpg", "failed_to_decode", "cannot decode: image file is truncated"),
        ("http://y.org/2.jpg", "success", None),
        ("http://z.net/1.jpg", "opted_out", "X-Robots-Tag: noai"),
        ("http://z.net/2.jpg", "filtered_size", "too small: 90x120 is under min_image_size=200"),
        ("http://z.net/3.jpg", "failed_to_download", "dns: cannot resolve z.net: [Errno -2] Name unknown"),
    ],
    "b": [
        *[(f"http://y.org/{i}.jpg", "success", None) for i in range(3, 7)],
        *[(f"http://y.org/{i}.jpg", "failed_to_download", "HTTP 403: Forbidden") for i in range(7, 11)],
        ("http://x.com/10.jpg", "blocked", "private address: x.com resolves to 10.0.0.1"),
        ("http://z.net/4.jpg", "success", None),
    ],
}
_SIMILARITY = [0.21, 0.26, 0.31, 0.33, 0.34, 0.36, 0.42]


def _layers(store: DatasetStore, monkeypatch) -> None:
    """crawl_metadata, images, embeddings and pairs of two shards, each written by the pipeline's writer
    (images by `download.write_images`, its download replaced by the records above)."""
    from laion_assets.pipeline import schemas
    from laion_assets.pipeline.crawl import metadata as crawl
    from laion_assets.pipeline.download import downloader as download
    from laion_assets.pipeline.pairs.filter import write_pairs_parquet
    from laion_assets.pipeline.storage import EMBEDDINGS

    for shard, rows in _DOWNLOADS.items():
        lines = "".join(f"{url},a caption of {url}\n" for url, _, _ in rows)
        store.write_bytes(f"incoming/{shard}.csv", f"url,caption\n{lines}".encode())
        crawl.write_crawl_metadata(store, shard, crawl.CrawlSettings())

        def downloaded(table, settings, tar_out, previous, progress, blocklist, draining, workers, rows=rows):
            records = [
                {**row, "status": status, "error_message": error, "host": schemas.url_host(row["url"])}
                for row, (_, status, error) in zip(table.to_pylist(), rows, strict=True)
            ]
            images = pa.Table.from_pylist(records, schema=schemas.IMAGES)
            return download.DownloadResult(table=images, seconds=0.0, fetched=len(rows), reused=0)

        monkeypatch.setattr(download, "download_shard", downloaded)
        download.write_images(store, shard, download.DownloadSettings())
    success = [
        key
        for (key,) in catalog.connect(store)
        .sql("SELECT key FROM images WHERE status = 'success' ORDER BY key")
        .fetchall()
    ]
    for shard in _DOWNLOADS:
        keys = [key for key in success if key.startswith(f"{shard}-")]
        vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.5] * 4 * len(keys), pa.float16()), 4)
        similarity = [_SIMILARITY[success.index(key) % len(_SIMILARITY)] for key in keys]
        embeddings = pa.table(
            {"key": keys, "image_embedding": vectors, "text_embedding": vectors, "similarity": similarity},
            schema=schemas.embeddings(4),
        )
        store.write_parquet(EMBEDDINGS.parquet(shard), embeddings)
        pairs = pa.table(
            {
                "key": keys,
                "caption": ["a caption"] * len(keys),
                "url": [f"http://x.com/{key}.jpg" for key in keys],
                "license": pa.nulls(len(keys), pa.string()),
                "nsfw": ["UNLIKELY"] * len(keys),
                "original_height": [480] * len(keys),
                "original_width": [640] * len(keys),
                "similarity": similarity,
                "width": [256] * len(keys),
                "height": [256] * len(keys),
                "sha256": keys,
            }
        )
        write_pairs_parquet(store, shard, schemas.conform(schemas.with_host(pairs), schemas.PAIRS))


def _readme_queries() -> list[str]:
    """The SQL of every `laion-assets sql` example in docs/sql.md, "Querying with DuckDB", one line each."""
    section = SQL_DOCS.read_text().split("# Querying with DuckDB", 1)[1].split("```bash", 1)[1]
    block = section.split("```", 1)[0]
    return [
        " ".join(sql.split()) for sql in re.findall(r'laion-assets sql (?:--\S+ \S+ )*"(.*?)"', block, re.S)
    ]


def test_every_readme_query_runs_and_is_benchmarked(local_root, monkeypatch):
    store = DatasetStore(local_root)
    _layers(store, monkeypatch)
    connection = catalog.connect(store)
    queries = _readme_queries()
    assert len(queries) == 9
    for sql in queries:
        connection.sql(sql).fetchall()
    bench_folder = SQL_DOCS.parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench_folder))  # as when it runs: its own helpers (smoke.py)
    spec = importlib.util.spec_from_file_location("bench_query", bench_folder / "query.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    timed = {" ".join(sql.split()) for _, sql in bench.QUERIES.values()}
    assert set(queries) <= timed and len(timed - set(queries)) == 1  # and its histogram over pairs


def test_hosts_of_the_pipelines_images_answer_the_success_rate_query(local_root, monkeypatch, tmp_path):
    store = DatasetStore(local_root)
    _layers(store, monkeypatch)
    catalog.write_catalog(store, str(tmp_path / "c.duckdb"))
    connection = catalog.connect(store)
    by_host = (
        "SELECT host, urls, round(success_rate, 3) AS success_rate FROM hosts "
        "WHERE urls >= 10 ORDER BY success_rate LIMIT 20"
    )
    assert by_host in _readme_queries()
    assert connection.sql(by_host).fetchall() == [("y.org", 10, 0.5), ("x.com", 11, 0.636)]
    assert connection.sql("SELECT sum(urls), sum(success) FROM hosts").fetchone() == (25, 13)


def test_readme_queries_on_images_embeddings_and_crawl_metadata(local_root, monkeypatch):
    from collections import Counter

    from laion_assets.pipeline import schemas

    store = DatasetStore(local_root)
    _layers(store, monkeypatch)
    row_group = pq.ParquetFile(store.path("images/a.parquet")).metadata.row_group(0)
    assert row_group.num_rows == 15  # IMAGES_PARQUET_OPTIONS: 20,000 rows a row group, a small shard one
    connection = catalog.connect(store)
    rows = [row for shard_rows in _DOWNLOADS.values() for row in shard_rows]
    by_status = "SELECT status, count(*) AS n FROM images GROUP BY 1 ORDER BY n DESC, status"
    assert connection.sql(by_status).fetchall() == sorted(
        Counter(status for _, status, _ in rows).items(), key=lambda item: (-item[1], item[0])
    )
    by_host = (
        "SELECT host, count(*) AS n, round(avg((status = 'success')::int), 3) AS success_rate "
        "FROM images GROUP BY 1 HAVING n >= 10 ORDER BY success_rate LIMIT 20"
    )
    assert connection.sql(by_host).fetchall() == [("y.org", 10, 0.5), ("x.com", 11, 0.636)]
    errors = (
        "SELECT split_part(error_message, ':', 1) AS error, count(*) AS n "
        "FROM images WHERE error_message IS NOT NULL GROUP BY 1 ORDER BY n DESC LIMIT 10"
    )
    expected = Counter(schemas.error_class(error) for _, _, error in rows if error)
    assert sorted(connection.sql(errors).fetchall(), key=lambda item: (-item[1], item[0])) == sorted(
        expected.items(), key=lambda item: (-item[1], item[0])
    )
    histogram = (
        "SELECT floor(similarity * 20) / 20 AS bin, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1"
    )
    assert [(round(b, 2), n) for b, n in connection.sql(histogram).fetchall()] == [
        (0.2, 2),
        (0.25, 2),
        (0.3, 6),
        (0.35, 2),
        (0.4, 1),
    ]
    # 10 random captions of downloaded images: the sample is taken of the successes, then joined; the
    # the docs' earlier phrasing sampled the join before its WHERE, so it gave fewer than 10 rows
    sample = (
        "WITH downloaded AS (SELECT key FROM images WHERE status = 'success') "
        "SELECT c.key, c.caption, c.url FROM crawl_metadata c "
        "JOIN (FROM downloaded USING SAMPLE 10 ROWS) USING (key)"
    )
    joined = (
        "SELECT c.key, c.caption, c.url FROM crawl_metadata c JOIN images i USING (key) "
        "WHERE i.status = 'success'"
    )
    downloaded = set(connection.sql(joined).fetchall())
    assert len(downloaded) == 13
    samples = [connection.sql(sample).fetchall() for _ in range(3)]
    assert all(len(set(rows)) == 10 and set(rows) <= downloaded for rows in samples)
    old = [len(connection.sql(joined + " USING SAMPLE 10 ROWS").fetchall()) for _ in range(3)]
    assert min(old) < 10


def test_sql_without_a_query_is_an_interactive_shell(local_root):
    """`laion-assets sql` alone, as a user types into it: statements over several lines, an error that
    does not end the shell, `.tables`, `.quit`."""
    _two_shards(DatasetStore(local_root))
    script = os.path.join(os.path.dirname(sys.executable), "laion-assets")
    typed = ".tables\nSELECT count(*) AS n\nFROM images;\nSELECT * FROM nowhere;\nSELECT 42 AS answer;\n"
    typed += ".quit\n"
    done = subprocess.run(
        [script, "sql", "--root", local_root], input=typed, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"DuckDB on {local_root}: crawl_metadata, hosts, images"
    assert lines[2].endswith("crawl_metadata, hosts, images")  # .tables
    cells = [line.strip("│ ") for line in lines if line.startswith("│")]
    assert cells == ["n", "int64", "4", "answer", "int32", "42"]
    assert any("CatalogException:" in line and "nowhere" in line for line in lines)  # and it went on


def test_sql_output_goes_to_s3_or_whole_to_a_local_file(local_root, s3_root, tmp_path):
    """--output took a path only: `s3://bucket/x.parquet` became `s3:/bucket/x.parquet`, a local folder."""
    query = "SELECT count(*) AS n FROM images"
    folder = tmp_path / "out"
    folder.mkdir()
    _two_shards(DatasetStore(local_root))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    left = folder / Path(temporary_name(str(folder / "n.parquet"))).name.replace(
        f"-{os.getpid()}-", f"-{int(gone.stdout)}-"
    )
    left.write_bytes(b"PAR1 half")  # the temporary file of a query killed while it wrote
    assert main(["sql", "--root", local_root, "--output", str(folder / "n.parquet"), query]) == 0
    assert os.listdir(folder) == ["n.parquet"]  # written under a temporary name, then renamed
    assert pq.read_table(folder / "n.parquet").to_pylist() == [{"n": 4}]
    _two_shards(DatasetStore(s3_root))
    for n, root in enumerate((local_root, s3_root)):  # from a local root too: DuckDB then needs S3 set up
        assert main(["sql", "--root", root, "--output", f"{s3_root}/queries/n{n}.csv", query]) == 0
        assert DatasetStore(s3_root).read_bytes(f"queries/n{n}.csv").decode().splitlines() == ["n", "4"]
    assert not Path("s3:").exists()


def test_sql_output_into_a_folder_that_does_not_exist_is_one_line_naming_it(local_root, tmp_path):
    """--output into a missing folder ended in a FileNotFoundError traceback (from the look for a killed
    query's temporary file), not a line saying which folder is missing."""
    _two_shards(DatasetStore(local_root))
    output = tmp_path / "no-such-folder" / "n.csv"
    with pytest.raises(SystemExit) as stopped:
        main(["sql", "--root", local_root, "--output", str(output), "SELECT count(*) AS n FROM images"])
    assert str(stopped.value.code) == f"laion-assets sql: --output {output}: no folder {output.parent}"
    assert not output.parent.exists()
