from pathlib import Path

import dagster as dg

from laion_assets import names
from laion_assets.definitions import build_definitions
from laion_assets.defs.download import one_row_per_crawl_row
from laion_assets.defs.partitions import range_tags, shards
from laion_assets.pipeline import schemas
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import DatasetStore
from laion_assets.runner import failure_message
from laion_assets_tests.captioners import RANDOM_COCA
from laion_assets_tests.dagster_helpers import LOCAL_WEB, TINY_CLIP, local_web_config, materialize_shard


def _url_list(web, paths: list[str]) -> bytes:
    return "".join(f'{{"url": "{web.url(p)}", "caption": "image at {p}"}}\n' for p in paths).encode()


def test_shard_downloads_with_status_metadata_and_check(root, web):
    store = DatasetStore(root)
    paths = ["/img/red.jpg", "/img/green.png", "/404.jpg", "/html.jpg", "/noai.jpg", "/down/1"]
    web.down.add("/down/1")
    store.write_bytes("incoming/web-1.jsonl", _url_list(web, paths))
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_shard(instance, root, "web-1", local_web_config())
    assert result.success

    images = store.read_parquet("images/web-1.parquet")
    assert images.schema.names == schemas.IMAGES.names
    assert images.num_rows == store.parquet_num_rows("crawl_metadata/web-1.parquet") == 6
    assert images.column("status").to_pylist() == [
        "success",
        "success",
        "failed_to_download",
        "failed_to_decode",
        "opted_out",
        "failed_to_download",
    ]
    with store.open("images/web-1.tar") as f:
        assert {key for key, _ in read_samples(f)} == {"web-1-00000000", "web-1-00000001"}

    meta = result.asset_materializations_for_node("downloaded_images")[0].metadata
    assert meta["dagster/row_count"].value == 6
    assert meta["status/success"].value == 2 and meta["status/opted_out"].value == 1
    assert meta["success_rate"].value == round(2 / 6, 4)
    assert "| HTTP 404 | 1 |" in meta["top_errors"].value
    assert f"| 127.0.0.1:{web.port} | 3 |" in meta["top_failing_hosts"].value
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "one_row_per_crawl_row"]
    assert check.passed and check.metadata["images_rows"].value == 6

    # retry only what failed, through run config; the 404 is asked again, the successes are not
    web.down.clear()
    hits = web.hits.copy()
    config = {"ops": {"downloaded_images": {"config": {**LOCAL_WEB, "retry_failed": True}}}}
    retry = materialize_shard(instance, root, "web-1", config, selection=["downloaded_images"])
    assert retry.success
    images = store.read_parquet("images/web-1.parquet")
    assert images.column("status").to_pylist()[-1] == "success"
    assert web.hits["/img/red.jpg"] == hits["/img/red.jpg"]
    meta = retry.asset_materializations_for_node("downloaded_images")[0].metadata
    assert (meta["fetched"].value, meta["reused_from_previous"].value) == (2, 4)
    with store.open("images/web-1.tar") as f:
        assert len(list(read_samples(f))) == 3


def test_check_fails_on_a_damaged_shard(local_root, web):
    store = DatasetStore(local_root)
    store.write_bytes("incoming/s.jsonl", _url_list(web, ["/img/red.jpg", "/404.jpg", "/img/blue.webp"]))
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_shard(instance, local_root, "s", local_web_config()).success
    images = store.read_parquet("images/s.parquet")
    store.write_parquet("images/s.parquet", images.slice(0, 1))  # two rows lost
    check = one_row_per_crawl_row(store, "s")
    assert not check.passed
    assert check.description == "shard s: images has 1 rows, crawl_metadata 3 (2 missing)"


def test_run_config_yaml_with_resize_mode_no(local_root, web):
    """`resize_mode: no` in YAML run config (read as false by YAML 1.1) is the mode `no`, not a type error."""
    import yaml

    store = DatasetStore(local_root)
    store.write_bytes("incoming/s.jsonl", _url_list(web, ["/img/red.jpg"]))
    text = "resize_mode: no\n" + yaml.safe_dump(LOCAL_WEB)
    run_config = {"ops": {"downloaded_images": {"config": yaml.safe_load(text)}}}
    selection = ["crawl_metadata", "downloaded_images"]
    assert materialize_shard(dg.DagsterInstance.ephemeral(), local_root, "s", run_config, selection).success
    row = store.read_parquet("images/s.parquet").to_pylist()[0]
    assert (row["width"], row["height"]) == (row["original_width"], row["original_height"]) == (640, 480)


def test_a_launched_config_no_run_can_use_is_not_recorded_as_the_dataset_s(local_root, web):
    """A run launched from the UI with `max_pixels: 0` (the right type, so the launchpad takes it): the
    first run wrote it into laion_assets.yaml before the downloader refused it, and every later run failed
    on it. The step now fails first; the next run, with no such value, downloads."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/s.jsonl", _url_list(web, ["/img/red.jpg"]))
    bad = {"ops": {"downloaded_images": {"config": {**LOCAL_WEB, "max_pixels": 0}}}}
    selection = ["crawl_metadata", "downloaded_images"]
    instance = dg.DagsterInstance.ephemeral()
    assert not materialize_shard(instance, local_root, "s", bad, selection).success
    assert "max_pixels" not in store.read_bytes("laion_assets.yaml").decode()
    assert materialize_shard(instance, local_root, "s", local_web_config(), selection).success
    assert store.read_parquet("images/s.parquet").column("status").to_pylist() == ["success"]


def test_a_failed_shard_of_a_run_over_several_fails_alone_and_the_shards_written_are_materialised(
    local_root, web
):
    """A run over a, b, c whose b fails (its tar cannot be written): a, done before b, and c, under way
    when b failed, have their files, and each is recorded materialised with its own metadata; b alone is
    failed, with its error. Before, the step recorded none of them, so the UI showed a and c failed while
    their files were done, and the catch-up schedule downloaded them again."""
    store = DatasetStore(local_root)
    for shard in "abc":
        store.write_bytes(f"incoming/{shard}.jsonl", _url_list(web, ["/img/red.jpg", f"/up/{shard}"]))
    (Path(local_root) / "images" / "b.tar").mkdir(parents=True)
    job = build_definitions(local_root, TINY_CLIP, RANDOM_COCA).resolve_job_def(names.SHARD_JOB)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shards.name, list("abc"))
    result = job.execute_in_process(
        instance=instance,
        run_config=local_web_config(),
        tags=range_tags("a", "c"),
        asset_selection=[dg.AssetKey("crawl_metadata"), dg.AssetKey("downloaded_images")],
        raise_on_error=False,
    )
    assert not result.success
    assert "b.tar" in failure_message(result)
    key = dg.AssetKey("downloaded_images")
    assert instance.get_materialized_partitions(key) == {"a", "c"}
    statuses = instance.get_status_by_partition(key, list("abc"), shards)
    assert statuses["b"] == dg.AssetPartitionStatus.FAILED
    for shard in "ac":
        assert store.read_parquet(f"images/{shard}.parquet").column("status").to_pylist() == ["success"] * 2
    records = instance.fetch_materializations(key, limit=10).records
    materialized = {r.asset_materialization.partition: r.asset_materialization.metadata for r in records}
    assert set(materialized) == {"a", "c"}
    assert all(metadata["dagster/row_count"].value == 2 for metadata in materialized.values())
    assert not store.exists("images/b.parquet")
    assert not list((Path(local_root) / "_leases").iterdir())  # each shard's lease let go
