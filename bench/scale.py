"""Scale benchmark, by simulation: LAION-400M's 41,000 shards on a real PostgreSQL instance and moto's S3.

    .venv/bin/python bench/scale.py [--shards 41000] [--dataset-shards 5000] [--submit-seconds 60]
        [--shards-per-run 8,64] [--parts sensor,dataset,deployment]

Starts a PostgreSQL server (the test suite's, from the machine's binaries), moto's S3 server on loopback,
and a real dagster-webserver and dagster-daemon on deploy/dagster.yaml with the run queue paused
(max_concurrent_runs: 0), then times:

- registering --shards dynamic partitions in the instance;
- one tick of the incoming sensor with that many files in s3://.../incoming/ (first tick, and a tick
  with nothing new), against the same tick with one S3 request per shard and layer (the peer);
- launching a backfill of shard_pipeline over every partition through GraphQL, and how fast the
  daemon submits its runs (measured for --submit-seconds, then extrapolated);
- the UI's partition-status query for an asset with that many partitions;
- catalog, dataset_card and search_index over --dataset-shards small pair shards on S3, against the
  same footer reads one at a time (the peer).

Prints seconds, rates and peak memory: the RSS summed over this process and its servers (moto, the
webserver, the daemon; PostgreSQL detaches itself and is left out), sampled through each step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dagster as dg
from memory import tree_memory_peaks
from smoke import parse_args

from laion_assets import names
from laion_assets.defs.partitions import SHARDS_PER_RUN_ENV
from laion_assets.pipeline import lineage, parallel, schemas
from laion_assets.pipeline.card import write_card
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.search.index import write_search_index
from laion_assets.pipeline.shard_tar import TarShardWriter
from laion_assets.pipeline.storage import CRAWL_METADATA, EMBEDDINGS, IMAGES, PAIRS, DatasetStore
from laion_assets_tests.deployment import Deployment, Postgres, dagster_home, free_port, listening, wait_for

BUCKET = "scale"


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(out, "JPEG")
    return out.getvalue()


TINY_JPEG = _tiny_jpeg()


def timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    with tree_memory_peaks(os.getpid()) as peaks:
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s (peak RSS {peaks[0] / 2**20:.0f} MB with the servers)", flush=True)
    return result, seconds


def put_objects(s3, keys_and_bodies: list[tuple[str, bytes]]) -> None:
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda kb: s3.put_object(Bucket=BUCKET, Key=kb[0], Body=kb[1]), keys_and_bodies))


@contextlib.contextmanager
def parallel_reads(n: int) -> Iterator[None]:
    """The pipeline's store reads in flight set to `n`, for the peer runs."""
    saved, parallel.STORE_READS = parallel.STORE_READS, n
    try:
        yield
    finally:
        parallel.STORE_READS = saved


def with_nulls(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` cast to `schema`, a null column for each nullable one it lacks: a column the contract
    gains later (`phash`, say) does not break the bench."""
    for field in schema:
        if field.name not in table.column_names and field.nullable:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def dataset_shard(shard: str, rows: int, rng: np.random.Generator) -> dict[str, bytes]:
    """A small shard's four parquet files, as the pipeline writes them (schemas, footers)."""
    import io

    import pyarrow.parquet as pq

    keys = [schemas.make_key(shard, i) for i in range(rows)]
    urls = [f"http://example.com/{shard}/{i}.jpg" for i in range(rows)]
    captions = [f"caption {i} of {shard}" for i in range(rows)]
    source = {names.SOURCE_FOOTER: json.dumps({"file": f"{shard}.parquet", "fingerprint": "x"})}
    vectors = rng.standard_normal((rows, 512)).astype(np.float16)
    vector = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 512)
    tables = {
        CRAWL_METADATA.parquet(shard): pa.table(
            {
                "key": keys,
                "url": urls,
                "caption": captions,
                "page_url": [None] * rows,
                "license": [None] * rows,
            }
            | {"source_file": [f"{shard}.parquet"] * rows, "source_offset": list(range(rows))}
        ),
        IMAGES.parquet(shard): pa.table(
            {"key": keys, "url": urls, "caption": captions, "status": ["success"] * rows}
            | {"error_message": [None] * rows, "http_status": [200] * rows, "width": [256] * rows}
            | {"height": [256] * rows, "original_width": [640] * rows, "original_height": [480] * rows}
            | {"sha256": [f"{shard}{i}" for i in range(rows)], "md5": [f"{shard}{i}" for i in range(rows)]}
            | {"num_bytes": [1000] * rows, "host": ["example.com"] * rows}
        ),
        EMBEDDINGS.parquet(shard): pa.table(
            {"key": keys, "image_embedding": vector, "text_embedding": vector, "similarity": [0.35] * rows}
        ),
        PAIRS.parquet(shard): pa.table(
            {
                "key": keys,
                "caption": captions,
                "url": urls,
                "license": [None] * rows,
                "nsfw": ["UNLIKELY"] * rows,
            }
            | {"original_height": [480] * rows, "original_width": [640] * rows, "similarity": [0.35] * rows}
            | {"width": [256] * rows, "height": [256] * rows, "sha256": [f"{shard}{i}" for i in range(rows)]}
            | {"host": ["example.com"] * rows}
        ),
    }
    schema_of = {
        CRAWL_METADATA.name: schemas.CRAWL_METADATA,
        IMAGES.name: schemas.IMAGES,
        EMBEDDINGS.name: schemas.embeddings(512),
        PAIRS.name: schemas.PAIRS,
    }
    files = {}
    for path, table in tables.items():
        table = with_nulls(table, schema_of[path.split("/", 1)[0]])
        footer = {**source, names.CLIP_MODEL_FOOTER: "ViT-B-32", names.CLIP_PRETRAINED_FOOTER: "openai"}
        if path.startswith(PAIRS.name):
            footer |= {names.PAIRS_FUNNEL_FOOTER: json.dumps({"rows_in": rows, "removed": {}})}
        out = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(footer), out)
        files[path] = out.getvalue()
    tar = io.BytesIO()
    with TarShardWriter(tar) as writer:
        for key, caption in zip(keys, captions, strict=True):
            writer.write(key, {"jpg": TINY_JPEG, "txt": caption.encode()})
    files[PAIRS.tar(shard)] = tar.getvalue()
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=41_000)
    parser.add_argument("--dataset-shards", type=int, default=5_000)
    parser.add_argument("--rows-per-dataset-shard", type=int, default=10)
    parser.add_argument("--submit-seconds", type=float, default=60)
    parser.add_argument("--shards-per-run", default="8,64", help="comma-separated sizes of grouped runs")
    parser.add_argument(
        "--parts", default="sensor,dataset,deployment", help="which of sensor, dataset, deployment to time"
    )
    args = parse_args(
        parser, shards=40, dataset_shards=4, rows_per_dataset_shard=2, submit_seconds=2, shards_per_run="2"
    )
    print(f"machine: {os.cpu_count()} cores; shards {args.shards}; dataset shards {args.dataset_shards}")

    with tempfile.TemporaryDirectory(prefix="laion-scale-") as folder, contextlib.ExitStack() as stack:
        measure(Path(folder), stack, args)


def measure(work: Path, stack: contextlib.ExitStack, args: argparse.Namespace) -> None:
    """The parts of --parts; the servers it starts stop with `stack`."""
    s3_port = free_port()
    # moto in a process of its own, so that it does not share this process's GIL with the clients
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(moto.wait)
    stack.callback(moto.terminate)
    wait_for(lambda: listening(s3_port), 60, "moto's S3 server")
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket=BUCKET)
    postgres = Postgres().start()
    stack.callback(postgres.stop)
    os.environ.update(postgres.env())
    home = dagster_home(work, max_concurrent_runs=0)  # the queue paused: runs are submitted, none starts
    os.environ["DAGSTER_HOME"] = str(home)
    root = f"s3://{BUCKET}/laion"
    os.environ["LAION_ASSETS_ROOT"] = root
    store = DatasetStore(root)
    shard_names = [f"shard-{i:06d}" for i in range(args.shards)]
    parts = args.parts.split(",")
    with dg.DagsterInstance.get() as instance:
        timed(f"register {args.shards} partitions", instance.add_dynamic_partitions, "shards", shard_names)
        if "sensor" in parts:
            timed(
                f"put {args.shards} files into incoming/ (setup)",
                put_objects,
                s3,
                [(f"laion/incoming/{s}.csv", b"url,caption\n") for s in shard_names],
            )
            sensor_ticks(instance, root, store)
            # The incoming files go again, so that the deployments below time the backfills alone.
            store.fs.rm(store.path("incoming"), recursive=True)
        if "dataset" in parts:
            dataset_assets(store, args, s3, work)
        if "deployment" in parts:
            deployment_figures(instance, work, args, shard_names)


def sensor_ticks(instance: dg.DagsterInstance, root: str, store: DatasetStore) -> None:
    from laion_assets.defs.automation import PER_SHARD_LAYERS, incoming_files_sensor
    from laion_assets.defs.resources import DatasetStoreResource

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"store": DatasetStoreResource(root=root)}
        )
        return incoming_files_sensor(context)

    first, seconds = timed("incoming sensor, first tick", tick, None)
    print(f"  {len(first.run_requests)} run requests, {len(first.run_requests) / seconds:.0f} files/s")
    timed("incoming sensor, a tick with nothing new", tick, first.cursor)
    timed("  of which: listing incoming/", store.list, "incoming")
    sources = lineage.incoming_by_shard(store)
    sample = dict(list(sources.items())[:500])
    _, ours = timed(
        "done rule over 500 new shards (ours: a listing per layer)",
        lineage.stale_layers,
        store,
        sample,
        PER_SHARD_LAYERS,
    )
    _, peer = timed(
        "done rule over 500 new shards (peer: a request per shard and layer)",
        lambda: {
            s: [layer for layer in PER_SHARD_LAYERS if not store.exists(layer.parquet(s))] for s in sample
        },
    )
    print(f"  ratio {peer / ours:.1f}x", flush=True)


def dataset_assets(store: DatasetStore, args, s3, work: Path) -> None:
    rng = np.random.default_rng(0)
    shards = [f"pairs-{i:05d}" for i in range(args.dataset_shards)]
    bodies = [
        (f"laion/{path}", body)
        for shard in shards
        for path, body in dataset_shard(shard, args.rows_per_dataset_shard, rng).items()
    ]
    timed(f"put {len(bodies)} shard files (setup)", put_objects, s3, bodies)
    from laion_assets.defs.automation import PER_SHARD_LAYERS
    from laion_assets.pipeline.storage import StoredFile

    stored = {shard: StoredFile(f"{shard}.parquet", 1, "x") for shard in shards}  # as dataset_shard records
    _, ours = timed(
        f"done rule over {len(stored)} stored shards (32 footer reads in flight)",
        lineage.stale_layers,
        store,
        stored,
        PER_SHARD_LAYERS,
    )
    sample = dict(list(stored.items())[:500])
    with parallel_reads(1):
        _, peer = timed(
            "  500 of them, one footer read at a time (peer)",
            lineage.stale_layers,
            store,
            sample,
            PER_SHARD_LAYERS,
        )
    print(f"  ratio per shard {peer / len(sample) / (ours / len(stored)):.1f}x", flush=True)
    timed(
        "catalog (views over every layer)",
        catalog.write_catalog,
        store,
        str(work / "catalog.duckdb"),
    )
    _, ours = timed("search_index (8 shards in flight)", write_search_index, store)
    with parallel_reads(1):
        _, peer = timed("search_index (peer: one read at a time)", write_search_index, store)
    print(f"  ratio {peer / ours:.1f}x", flush=True)
    _, ours = timed("dataset_card (32 footer reads in flight)", write_card, store)
    with parallel_reads(1):
        _, peer = timed("dataset_card (peer: one footer read at a time)", write_card, store)
    print(f"  ratio {peer / ours:.1f}x", flush=True)


LAUNCH = """mutation L($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
CANCEL = """mutation C($id: String!) { cancelPartitionBackfill(backfillId: $id) { __typename } }"""
STATUSES = """query S($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
  assetPartitionStatuses { __typename ... on DefaultPartitionStatuses { materializedPartitions
  failedPartitions unmaterializedPartitions materializingPartitions } } } } }"""


def deployment_figures(instance: dg.DagsterInstance, work: Path, args, shard_names: list[str]) -> None:
    deployment = Deployment(work, dict(os.environ)).start()
    try:
        repository = {"repositoryLocationName": "laion_assets", "repositoryName": "__repository__"}
        key = {"path": [names.FILTERED_PAIRS_ASSET]}
        timed("UI partition-status query (one asset)", deployment.graphql, STATUSES, {"k": key})
        # The asset page's backfill call, as the issue saw it fail in-process.
        ranged = {
            "partitionsByAssets": [
                {"assetKey": key, "partitions": {"range": {"start": shard_names[0], "end": shard_names[9]}}}
            ]
        }
        answer, _ = timed(
            "asset backfill with partitionsByAssets + range (10 shards)", _launch, deployment, ranged
        )
        print(f"  answer: {answer}")
    finally:
        deployment.stop()
    # The daemon creating the runs of a backfill over every shard: one at a time as Dagster does by
    # default (the peer), with deploy/dagster.yaml's submit threads, and with runs of several shards.
    threaded = os.environ["DAGSTER_HOME"]
    serial = serial_home(Path(threaded), work / "serial")
    grouped = [int(n) for n in args.shards_per_run.split(",")]
    variants = [
        ("one at a time (Dagster's default)", serial, 1),
        ("8 submit threads (deploy/dagster.yaml)", threaded, 1),
        *((f"8 submit threads, {n} shards per run", threaded, n) for n in grouped),
    ]
    if args.smoke:  # each variant is the same code on another instance; a deployment costs a minute
        variants = variants[-1:]
    for label, home, per_run in variants:
        env = {**os.environ, "DAGSTER_HOME": str(home), SHARDS_PER_RUN_ENV: str(per_run)}
        folder = work / f"submit-{per_run}-{Path(home).name}"
        folder.mkdir()
        deployment = Deployment(folder, env).start()
        try:
            submission(instance, deployment, repository, shard_names, label, per_run, args.submit_seconds)
        finally:
            deployment.stop()


def serial_home(home: Path, folder: Path) -> Path:
    """A DAGSTER_HOME like `home` whose daemon creates and launches runs one at a time."""
    instance = yaml.safe_load((home / "dagster.yaml").read_text())
    for section in ("sensors", "backfills"):
        instance.pop(section)
    instance["run_coordinator"].pop("config")
    folder.mkdir(parents=True)
    (folder / "dagster.yaml").write_text(yaml.safe_dump(instance))
    return folder


def submission(
    instance: dg.DagsterInstance,
    deployment: Deployment,
    repository: dict,
    shard_names: list[str],
    label: str,
    per_run: int,
    seconds: float,
) -> None:
    """How fast the daemon creates the runs of a job backfill over `shard_names`, then cancels it."""
    params = {
        "selector": {
            "partitionSetName": f"{names.SHARD_JOB}_partition_set",
            "repositorySelector": repository,
        },
        "partitionNames": shard_names,
    }
    answer, _ = timed(f"launch a job backfill of {len(shard_names)} shards", _launch, deployment, params)
    backfill_id = answer["backfillId"]
    backfill = dg.RunsFilter(tags={"dagster/backfill": backfill_id})
    first = wait_for(lambda: instance.get_runs_count(backfill) > 0 and time.time(), 300, "the first run")
    time.sleep(seconds)
    submitted = instance.get_runs_count(backfill)
    rate = submitted / (time.time() - first)
    deployment.graphql(CANCEL, {"id": backfill_id})
    shards_per_s = rate * per_run
    print(
        f"daemon submission, {label}: {submitted} runs in {seconds:.0f} s = {rate:.1f} runs/s, "
        f"{shards_per_s:.1f} shards/s: {len(shard_names)} shards take "
        f"{len(shard_names) / max(shards_per_s, 1e-9) / 3600:.2f} h to submit",
        flush=True,
    )


def _launch(deployment: Deployment, params: dict) -> dict:
    try:
        return deployment.graphql(LAUNCH, {"p": params})["launchPartitionBackfill"]
    except AssertionError as exc:
        return {"error": str(exc)[:500]}


if __name__ == "__main__":
    main()
