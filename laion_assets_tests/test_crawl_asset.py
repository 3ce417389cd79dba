import dagster as dg

from laion_assets import names
from laion_assets.definitions import build_definitions
from laion_assets.defs.partitions import range_tags, shards
from laion_assets.pipeline.storage import DatasetStore
from laion_assets.runner import failure_message
from laion_assets_tests.captioners import RANDOM_COCA
from laion_assets_tests.dagster_helpers import TINY_CLIP, materialize_shard
from laion_assets_tests.wat_files import Page, img, wat_bytes

CRAWL = ["crawl_metadata"]  # these tests are about reading sources; their URLs go nowhere
URLS = (
    b"url,caption,extra\nhttp://a.com/1.jpg,one cat,x\nhttp://a.com/2.jpg,two cats,y\n"
    b"http://a.com/2.jpg,two cats,z\nnot-a-url,three cats,w\n"
)


def test_materialize_writes_parquet_and_metadata(root):
    store = DatasetStore(root)
    store.write_bytes("incoming/part-7.csv", URLS)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_shard(instance, root, "part-7", selection=CRAWL)
    assert result.success
    table = store.read_parquet("crawl_metadata/part-7.parquet")
    assert table.column("key").to_pylist() == ["part-7-00000000", "part-7-00000001"]
    assert table.column("extra").to_pylist() == ["x", "y"]
    meta = result.asset_materializations_for_node("crawl_metadata")[0].metadata
    assert meta["dagster/row_count"].value == 2
    assert meta["rows_read"].value == 4
    assert meta["dropped/duplicate"].value == 1
    assert meta["dropped/invalid_url"].value == 1
    assert meta["path"].value == store.url("crawl_metadata/part-7.parquet")
    assert "two cats" in meta["preview"].value


def test_rematerialising_replaces_the_shard(local_root):
    store = DatasetStore(local_root)
    store.write_bytes("incoming/s.csv", URLS)
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_shard(instance, local_root, "s", selection=CRAWL).success
    first = store.read_parquet("crawl_metadata/s.parquet")
    assert materialize_shard(instance, local_root, "s", selection=CRAWL).success
    assert store.read_parquet("crawl_metadata/s.parquet").equals(first)  # same inputs, same result
    store.write_bytes("incoming/s.csv", b"url,caption\nhttp://b.com/9.jpg,only one\n")
    assert materialize_shard(instance, local_root, "s", selection=CRAWL).success
    assert store.read_parquet("crawl_metadata/s.parquet").column("url").to_pylist() == ["http://b.com/9.jpg"]


def test_run_config_names_the_columns(local_root):
    store = DatasetStore(local_root)
    store.write_bytes("incoming/s.tsv", b"link\tdescription\nhttp://a.com/1.jpg\ta cat\n")
    config = {"ops": {"crawl_metadata": {"config": {"url_column": "link", "caption_column": "description"}}}}
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_shard(instance, local_root, "s", config, selection=CRAWL)
    assert result.success
    assert store.read_parquet("crawl_metadata/s.parquet").column("caption").to_pylist() == ["a cat"]


def test_bad_file_fails_the_partition_with_a_message(local_root):
    store = DatasetStore(local_root)
    store.write_bytes("incoming/bad.csv", b"link,words\nhttp://a.com/1.jpg,a cat\n")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_shard(instance, local_root, "bad", selection=CRAWL)
    assert not result.success
    assert failure_message(result).startswith("bad.csv: no URL column found")
    assert "columns are ['link', 'words']" in failure_message(result)
    assert not store.exists("crawl_metadata/bad.parquet")


def test_wat_shard_on_s3(s3_root):
    store = DatasetStore(s3_root)
    page = Page("https://x.example/", links=[img("a.jpg", "a long enough caption"), img("b.jpg", "tiny")])
    store.write_bytes("incoming/seg-1.warc.wat.gz", wat_bytes([page]))
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_shard(instance, s3_root, "seg-1", selection=CRAWL)
    assert result.success
    meta = result.asset_materializations_for_node("crawl_metadata")[0].metadata
    assert meta["dropped/short_alt"].value == 1
    assert store.read_parquet("crawl_metadata/seg-1.parquet").column("url").to_pylist() == [
        "https://x.example/a.jpg"
    ]


def test_a_bad_file_in_the_middle_of_a_run_over_several_shards_fails_alone(local_root):
    """A run over a, b, c whose b is not a readable file fails with b's message; a, written before it, is
    recorded materialised with its own rows (before, the failed step recorded none of its shards, so the
    UI showed a failed while its parquet was done)."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", URLS)
    store.write_bytes("incoming/b.jsonl.gz", b"not gzip")
    store.write_bytes("incoming/c.csv", URLS)
    job = build_definitions(local_root, TINY_CLIP, RANDOM_COCA).resolve_job_def(names.SHARD_JOB)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shards.name, list("abc"))
    key = dg.AssetKey("crawl_metadata")
    result = job.execute_in_process(
        instance=instance, tags=range_tags("a", "c"), asset_selection=[key], raise_on_error=False
    )
    assert failure_message(result).startswith("b.jsonl.gz: not a readable gzip file")
    assert instance.get_materialized_partitions(key) == {"a"}
    statuses = instance.get_status_by_partition(key, list("abc"), shards)
    assert statuses["b"] == dg.AssetPartitionStatus.FAILED
    (record,) = instance.fetch_materializations(key, limit=10).records
    assert record.asset_materialization.metadata["dagster/row_count"].value == 2
    assert store.exists("crawl_metadata/a.parquet") and not store.exists("crawl_metadata/c.parquet")
