import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.cli import main
from laion_assets.pipeline import catalog
from laion_assets.pipeline.storage import DatasetStore


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
    assert views == {"images", "crawl_metadata"}


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


def test_unknown_view_is_a_clear_error(local_root):
    with pytest.raises(duckdb.CatalogException, match="pairs"):
        main(["sql", "--root", local_root, "SELECT * FROM pairs"])


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
    if store.is_s3:  # a secret is per session: an S3 catalog needs httpfs and one, as the README says
        catalog.enable_s3(connection)
    assert connection.sql("SELECT count(*) FROM images").fetchall() == [(4,)]
    assert connection.sql("SELECT count(*) FROM crawl_metadata").fetchall() == [(2,)]


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
    from laion_assets.pipeline.pairs import write_pairs_parquet

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
