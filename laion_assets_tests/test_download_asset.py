import dagster as dg

from laion_assets.defs.download import one_row_per_crawl_row
from laion_assets.pipeline import schemas
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import DatasetStore
from laion_assets_tests.dagster_helpers import LOCAL_WEB, local_web_config, materialize_shard


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
