import datetime
import json

import dagster as dg

from laion_assets.defs.automation import SOURCE_FILE_TAG, catch_up_schedule, incoming_files_sensor
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.storage import DatasetStore
from laion_assets_tests.dagster_helpers import local_web_config, materialize_shard

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
    assert set(json.loads(first.cursor)) == {"a.csv", "CC-MAIN-0001.warc.wat.gz"}

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


def test_sensor_requested_run_materialises_the_shard(local_root, web):
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode())
    instance = dg.DagsterInstance.ephemeral()
    (request,) = _tick(instance, local_root, None).run_requests
    assert materialize_shard(instance, local_root, request.partition_key, local_web_config()).success
    assert store.read_parquet("crawl_metadata/a.parquet").num_rows == 1
    assert store.read_parquet("images/a.parquet").column("status").to_pylist() == ["success"]


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
    config = local_web_config()
    with dg.instance_for_test() as instance:  # on disk: schedules need an instance they can reload
        instance.add_dynamic_partitions(shards.name, ["done", "broken", "never", "gone"])  # gone: no source
        assert materialize_shard(instance, local_root, "done", config).success
        assert not materialize_shard(instance, local_root, "broken", config).success

        requests = _schedule(instance, local_root)
        assert sorted(r.partition_key for r in requests) == ["broken", "never"]
        assert all(r.run_key.startswith("catch-up:2026-11-23:") for r in requests)

        store.write_bytes("incoming/broken.csv", good)  # fixed at the source
        assert materialize_shard(instance, local_root, "broken", config).success
        assert materialize_shard(instance, local_root, "never", config).success
        assert isinstance(_schedule(instance, local_root), dg.SkipReason)
