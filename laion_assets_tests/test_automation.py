import datetime
import json
import os
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from laion_assets.definitions import build_definitions
from laion_assets.defs.automation import catch_up_schedule, incoming_files_sensor
from laion_assets.defs.checks import over_shards
from laion_assets.defs.jobs import PER_SHARD_ASSETS, PER_SHARD_CHECKS
from laion_assets.defs.partitions import SHARDS_PER_RUN_ENV, shards, shards_per_run
from laion_assets.defs.resources import DatasetStoreResource, build_resources
from laion_assets.names import SOURCE_FILE_TAG
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.storage import SEARCH_INDEX, SETTINGS_FILE, DatasetStore
from laion_assets.runner import dataset_status
from laion_assets_tests.captioners import RANDOM_COCA
from laion_assets_tests.dagster_helpers import TINY_CLIP, local_web_config, materialize_shard

GOOD = b"url,caption\nhttp://a.com/1.jpg,a cat\n"


def _tick(instance: dg.DagsterInstance, root: str, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"store": DatasetStoreResource(root=root)}
    )
    result = incoming_files_sensor(context)
    # What the daemon does with the result: add the partitions.
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_sensor_adds_shards_once_and_reruns_changed_files(root):
    store = DatasetStore(root)
    instance = dg.DagsterInstance.ephemeral()
    assert _tick(instance, root, None).run_requests == []

    store.write_bytes("incoming/a.csv", GOOD)
    store.write_bytes("incoming/CC-MAIN-0001.warc.wat.gz", b"")
    first = _tick(instance, root, None)
    assert sorted(instance.get_dynamic_partitions(shards.name)) == ["CC-MAIN-0001", "a"]
    assert sorted((r.partition_key, r.tags[SOURCE_FILE_TAG]) for r in first.run_requests) == [
        ("CC-MAIN-0001", "CC-MAIN-0001.warc.wat.gz"),
        ("a", "a.csv"),
    ]
    assert set(json.loads(first.cursor)["files"]) == {"a.csv", "CC-MAIN-0001.warc.wat.gz"}

    second = _tick(instance, root, first.cursor)
    assert second.run_requests == [] and second.dynamic_partitions_requests == []

    store.write_bytes("incoming/a.csv", GOOD + b"http://a.com/2.jpg,another cat\n")
    store.write_bytes("incoming/b.jsonl", b'{"url": "http://b.com/1.jpg", "caption": "a dog"}\n')
    third = _tick(instance, root, second.cursor)
    requests = {r.partition_key: r for r in third.run_requests}
    assert set(requests) == {"a", "b"}
    assert requests["a"].tags["laion_assets/trigger"] == "changed"
    assert requests["b"].tags["laion_assets/trigger"] == "new"
    first_a = next(r for r in first.run_requests if r.partition_key == "a")
    assert requests["a"].run_key != first_a.run_key  # a new key, so the daemon does not drop it as seen
    assert [r.partition_keys for r in third.dynamic_partitions_requests] == [["b"]]


def test_a_file_restored_to_content_it_had_before_runs_again(root):
    """The daemon drops a run request whose key an earlier run of the sensor had: a file restored to
    its first content (on S3 a re-upload has the same ETag; locally `cp -p` keeps size and mtime) must
    get a new key, or its shard keeps the edit's rows for good."""
    store = DatasetStore(root)
    instance = dg.DagsterInstance.ephemeral()

    def write(content: bytes) -> None:
        store.write_bytes("incoming/a.csv", content)
        if not store.is_s3:
            os.utime(store.path("incoming/a.csv"), (1_767_225_600, 1_767_225_600))

    write(GOOD)
    first = _tick(instance, root, None)
    write(GOOD + b"http://a.com/2.jpg,an edit\n")
    second = _tick(instance, root, first.cursor)
    write(GOOD)
    third = _tick(instance, root, second.cursor)
    keys = [request.run_key for tick in (first, second, third) for request in tick.run_requests]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert third.run_requests[0].tags["laion_assets/trigger"] == "changed"
    # a cursor of before the count, the files alone, is still read: nothing new, nothing to run
    assert _tick(instance, root, json.dumps(json.loads(third.cursor)["files"])).run_requests == []


def test_a_file_changed_while_its_shard_is_being_made_runs_after_that_run(root):
    """A file replaced while a run makes its shard (the end of an upload the sensor saw half-written): a run
    requested then fails on the shard's lease, and the new content waited for the nightly catch-up. The
    sensor leaves the file for a tick after that run; the same for a shard a `laion-assets run` writes."""
    store = DatasetStore(root)
    instance = dg.DagsterInstance.ephemeral()
    store.write_bytes("incoming/a.csv", GOOD)
    first = _tick(instance, root, None)
    (request,) = first.run_requests
    job = build_definitions(root, TINY_CLIP, RANDOM_COCA).resolve_job_def("shard_pipeline")
    # the daemon submits the sensor's run: a queued run plans the shard's assets
    run = instance.create_run_for_job(job, tags={**request.tags, "dagster/partition": "a"})

    store.write_bytes("incoming/a.csv", GOOD + b"http://a.com/2.jpg,the rest of the upload\n")
    waiting = _tick(instance, root, first.cursor)
    assert waiting.run_requests == []
    assert waiting.skip_reason.skip_message == "1 changed files wait for the runs making their shards: a"
    instance.report_run_canceled(run)
    (again,) = _tick(instance, root, waiting.cursor).run_requests
    assert again.partition_key == "a" and again.tags["laion_assets/trigger"] == "changed"

    store.write_bytes("incoming/b.csv", GOOD)
    with shard_lease(store, "b", "a laion-assets run"):
        held = _tick(instance, root, waiting.cursor)
        assert [r.partition_key for r in held.run_requests] == ["a"]
        assert "b" not in instance.get_dynamic_partitions(shards.name)
    assert [r.partition_key for r in _tick(instance, root, held.cursor).run_requests] == ["b"]


def test_sensor_requested_run_materialises_the_shard(local_root, web):
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode())
    instance = dg.DagsterInstance.ephemeral()
    (request,) = _tick(instance, local_root, None).run_requests
    assert materialize_shard(instance, local_root, request.partition_key, local_web_config()).success
    assert store.read_parquet("crawl_metadata/a.parquet").num_rows == 1
    assert store.read_parquet("images/a.parquet").column("status").to_pylist() == ["success"]

    # Another instance (say `dagster dev` after `laion-assets run`) finds the shard in the store, from
    # this very file: it registers the partition and runs nothing, until the file changes.
    other = dg.DagsterInstance.ephemeral()
    tick = _tick(other, local_root, None)
    assert tick.run_requests == [] and other.get_dynamic_partitions(shards.name) == ["a"]
    store.write_bytes("incoming/a.csv", f"url,caption\n{web.url('/img/blue.webp')},a blue square\n".encode())
    assert [r.partition_key for r in _tick(other, local_root, tick.cursor).run_requests] == ["a"]


def _schedule(instance: dg.DagsterInstance, root: str):
    # The context reloads the instance from its ref; leaving the block closes it again.
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime.datetime(2026, 11, 23, 3, 0, tzinfo=datetime.timezone.utc),
        resources={"store": DatasetStoreResource(root=root)},
    ) as context:
        return catch_up_schedule(context)


def test_schedule_requests_missing_and_failed_shards(local_root, web):
    store = DatasetStore(local_root)
    good = f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode()
    store.write_bytes("incoming/done.csv", good)
    store.write_bytes("incoming/broken.csv", b"link,words\nx,y\n")
    store.write_bytes("incoming/never.csv", good)
    store.write_bytes("incoming/elsewhere.csv", good)
    config = local_web_config()
    # `laion-assets run` on its own temporary instance: the store holds the shard, this instance does not
    assert materialize_shard(dg.DagsterInstance.ephemeral(), local_root, "elsewhere", config).success
    with dg.instance_for_test() as instance:  # on disk: schedules need an instance they can reload
        partitions = ["done", "broken", "never", "elsewhere", "gone"]  # gone: no source
        instance.add_dynamic_partitions(shards.name, partitions)
        assert materialize_shard(instance, local_root, "done", config).success
        assert not materialize_shard(instance, local_root, "broken", config).success

        requests = _schedule(instance, local_root)
        assert sorted(r.partition_key for r in requests) == ["broken", "never"]
        assert all(r.run_key.startswith("catch-up:2026-11-23:") for r in requests)

        store.write_bytes("incoming/broken.csv", good)  # fixed at the source
        assert materialize_shard(instance, local_root, "broken", config).success
        assert materialize_shard(instance, local_root, "never", config).success
        assert isinstance(_schedule(instance, local_root), dg.SkipReason)

        # the dataset's image size changed on purpose: the schedule reports the shards, requests none
        settings = Path(store.path(SETTINGS_FILE)).read_text().replace("image_size: 256", "image_size: 384")
        store.write_bytes(SETTINGS_FILE, settings.encode())
        skipped = _schedule(instance, local_root)
        assert isinstance(skipped, dg.SkipReason)
        assert "4 shards have layers built with other settings" in skipped.skip_message
        assert "images: image_size: 256 -> 384" in skipped.skip_message


def test_a_file_touched_with_the_same_content_is_not_run_again(local_root, web):
    """`touch`, or a copy of the same bytes, gives a file a new fingerprint (size and mtime). Its shard is
    still done, since lineage compares content; the sensor, which asked lineage only about files it had
    never seen, downloaded and rewrote it all over again. A real change still runs."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode())
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(instance, local_root, None)
    (request,) = first.run_requests
    assert materialize_shard(instance, local_root, request.partition_key, local_web_config()).success
    source = Path(local_root) / "incoming" / "a.csv"
    later = source.stat().st_mtime + 60
    os.utime(source, (later, later))
    touched = _tick(instance, local_root, first.cursor)
    assert touched.run_requests == [] and "a: up to date" in dataset_status(local_root)[0]
    store.write_bytes("incoming/a.csv", f"url,caption\n{web.url('/img/blue.webp')},a blue square\n".encode())
    assert [r.partition_key for r in _tick(instance, local_root, touched.cursor).run_requests] == ["a"]


def test_schedule_leaves_a_failed_shard_made_since_on_another_instance(local_root, web):
    """A shard whose run failed here, made since by `laion-assets run` on its own instance: `laion-assets
    status` says it is up to date, and the schedule must not download and embed it all over again."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", b"link,words\nx,y\n")
    config = local_web_config()
    with dg.instance_for_test() as instance:
        assert not materialize_shard(instance, local_root, "a", config).success
        store.write_bytes("incoming/a.csv", f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode())
        assert materialize_shard(dg.DagsterInstance.ephemeral(), local_root, "a", config).success
        assert "a: up to date" in dataset_status(local_root)[0]
        assert isinstance(_schedule(instance, local_root), dg.SkipReason)


def _requested(evaluation) -> dict[str, set]:
    return {
        key.to_user_string(): evaluation.get_requested_partitions(key)
        for key in (r.key for r in evaluation.results)
        if evaluation.get_num_requested(key)
    }


def test_new_files_flow_to_pairs_card_and_catalog_and_a_failed_shard_is_caught_up(local_root, web):
    """The whole automation on a real instance: sensor → shard runs → automation conditions → dataset
    assets; then a shard whose download fails is requested again by the nightly schedule."""
    store = DatasetStore(local_root)
    for shard, paths in (("first", ["/img/red.jpg", "/img/green.png"]), ("second", ["/img/blue.webp"])):
        lines = "".join(f"{web.url(p)},a picture of {p}\n" for p in paths)
        store.write_bytes(f"incoming/{shard}.csv", f"url,caption\n{lines}".encode())
    config = local_web_config()
    config["ops"]["filtered_pairs"] = {"config": {"min_similarity": -1.0, "drop_minors": False}}
    definitions = build_definitions(local_root, TINY_CLIP, RANDOM_COCA)
    job = definitions.resolve_job_def("shard_pipeline")
    assets = {a.key.to_user_string(): a for a in definitions.assets}
    resources = build_resources(local_root, TINY_CLIP, RANDOM_COCA)

    def run_shard(request: dg.RunRequest) -> bool:
        return job.execute_in_process(
            partition_key=request.partition_key,
            instance=instance,
            run_config=config,
            tags=request.tags,
            raise_on_error=False,
        ).success

    with dg.instance_for_test() as instance:
        # The automation sensor ticks all along; its cursor tells what changed since the last tick.
        evaluation = dg.evaluate_automation_conditions(definitions, instance)
        assert evaluation.total_requested == 0
        requests = _tick(instance, local_root, None).run_requests
        assert sorted(r.partition_key for r in requests) == ["first", "second"]
        assert all(run_shard(r) for r in requests)

        evaluation = dg.evaluate_automation_conditions(definitions, instance, cursor=evaluation.cursor)
        # The shard runs included every per-shard asset: only the dataset-level assets follow.
        assert _requested(evaluation) == {
            "duplicates": {None},
            "training_shards": {None},
            "catalog": {None},
            "dataset_card": {None},
            "search_index": {None},
        }
        assert dg.materialize(
            [assets[name] for name in _requested(evaluation)], instance=instance, resources=resources
        ).success
        assert (
            dg.evaluate_automation_conditions(definitions, instance, cursor=evaluation.cursor).total_requested
            == 0
        )

        assert [store.read_parquet(f"pairs/{s}.parquet").num_rows for s in ("first", "second")] == [2, 1]
        with store.open("card/README.md") as f:
            card = f.read().decode()
        assert "first.csv" in card and "second.csv" in card and "## Duplicates" in card
        assert store.read_parquet("duplicates/state/shards.parquet").column("shard").to_pylist() == [
            "first",
            "second",
        ]
        with duckdb.connect(f"{local_root}/catalog.duckdb", read_only=True) as catalog:
            assert catalog.sql("SELECT count(*) FROM pairs").fetchone() == (3,)
        keys = store.read_parquet(SEARCH_INDEX, columns=["key"]).column("key").to_pylist()
        assert sorted(keys) == ["first-00000000", "first-00000001", "second-00000000"]

        # A person re-materialises one shard's crawl_metadata alone: automation starts nothing for the
        # shard's other assets (a run of its own could race the ones that make shards); the person
        # materialises them too, or launches shard_pipeline for the shard.
        assert dg.materialize(
            [assets["crawl_metadata"]], partition_key="first", instance=instance, resources=resources
        ).success
        following = _requested(
            dg.evaluate_automation_conditions(definitions, instance, cursor=evaluation.cursor)
        )
        assert not {a.key.to_user_string() for a in PER_SHARD_ASSETS} & set(following)

        # A download that fails (its tar cannot be written) leaves the shard for the nightly catch-up.
        tar = Path(local_root) / "images" / "second.tar"
        tar.unlink()
        tar.mkdir()
        second = next(r for r in requests if r.partition_key == "second")
        assert not run_shard(second)
        # The failed run updated the shard's crawl_metadata, but nothing follows it: the shard is left
        # to the catch-up (or, in a deployment, the run's retry), not raced by a second run.
        after_failure = dg.evaluate_automation_conditions(definitions, instance, cursor=evaluation.cursor)
        assert not any("second" in partitions for partitions in _requested(after_failure).values())
        caught_up = _schedule(instance, local_root)
        assert [r.partition_key for r in caught_up] == ["second"]
        tar.rmdir()
        assert all(run_shard(r) for r in caught_up)
        assert isinstance(_schedule(instance, local_root), dg.SkipReason)


def test_new_shards_share_runs_of_shards_per_run_and_each_is_materialised(local_root, web, monkeypatch):
    """With LAION_ASSETS_SHARDS_PER_RUN=2, consecutive new shards share a run (a partition range); a run
    over a range materialises each of its shards, with one check evaluation for the range."""
    monkeypatch.setenv(SHARDS_PER_RUN_ENV, "2")
    store = DatasetStore(local_root)
    red = web.url("/img/red.jpg")
    for shard in "abcde":
        line = f"{red},a red square named {shard}"
        store.write_bytes(f"incoming/{shard}.csv", f"url,caption\n{line}\n".encode())
    config = local_web_config()
    config["ops"]["filtered_pairs"] = {"config": {"min_similarity": -1.0, "drop_minors": False}}
    # c is done in the store already: it gets a partition and no run, so a-b and d-e are the ranges
    assert materialize_shard(dg.DagsterInstance.ephemeral(), local_root, "c", config).success
    definitions = build_definitions(local_root, TINY_CLIP, RANDOM_COCA)
    job = definitions.resolve_job_def("shard_pipeline")
    with dg.instance_for_test() as instance:
        first = _tick(instance, local_root, None)
        assert instance.get_dynamic_partitions(shards.name) == list("abcde")
        ranges = [
            (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
            for r in first.run_requests
        ]
        assert ranges == [("a", "b"), ("d", "e")]
        assert [r.tags[SOURCE_FILE_TAG] for r in first.run_requests] == ["a.csv..b.csv", "d.csv..e.csv"]
        assert all(r.partition_key is None for r in first.run_requests)

        for request in first.run_requests:  # as a run worker runs it: the range from the tags
            result = job.execute_in_process(instance=instance, run_config=config, tags=request.tags)
            checks = result.get_asset_check_evaluations()
            assert len(checks) == len(PER_SHARD_CHECKS) and all(c.passed for c in checks)
        for asset in (a.key.to_user_string() for a in PER_SHARD_ASSETS):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == {"a", "b", "d", "e"}
        event = instance.get_latest_materialization_event(dg.AssetKey("downloaded_images"))
        metadata = event.asset_materialization.metadata
        assert metadata["shards_in_run"].value == 2
        rows = {r.data["shard"]: r.data for r in metadata["shards"].value.records}
        assert set(rows) == {"d", "e"} and rows["d"]["dagster/row_count"] == 1
        assert rows["d"]["status/success"] == 1
        assert store.read_parquet("pairs/e.parquet").column("caption").to_pylist() == ["a red square named e"]

        # A changed file of a known shard runs alone: its neighbours need not run.
        store.write_bytes("incoming/b.csv", f"url,caption\n{web.url('/img/blue.webp')},b again\n".encode())
        (again,) = _tick(instance, local_root, first.cursor).run_requests
        assert again.partition_key == "b" and again.tags["laion_assets/trigger"] == "changed"


def test_a_check_over_several_shards_passes_only_if_each_does_and_names_those_that_fail():
    results = {
        "a": dg.AssetCheckResult(passed=True),
        "b": dg.AssetCheckResult(passed=False, description="shard b: 1 missing"),
        "c": dg.AssetCheckResult(passed=False, description="shard c: 2 extra"),
    }
    combined = over_shards(results)
    assert not combined.passed
    assert combined.metadata["failed_shards"].value == ["b", "c"]
    assert combined.description == "shard b: 1 missing; shard c: 2 extra"
    assert over_shards({"a": results["a"]}) is results["a"]
    assert over_shards({"a": results["a"], "x": dg.AssetCheckResult(passed=True)}).passed


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_shards_per_run_must_be_a_whole_number(monkeypatch, value):
    monkeypatch.setenv(SHARDS_PER_RUN_ENV, value)
    with pytest.raises(ValueError, match=SHARDS_PER_RUN_ENV):
        shards_per_run()
