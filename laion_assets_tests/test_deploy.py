"""The production deployment: its files validate, and the real processes do what they promise."""

import json
import os
import signal
import socket
import subprocess
import sys

import dagster as dg
import pyarrow.compute as pc
import pytest
import yaml

from laion_assets import names
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import DatasetStore
from laion_assets_tests.dagster_helpers import LOCAL_WEB
from laion_assets_tests.deployment import DEPLOY, Deployment, Postgres, dagster_home, wait_for

RUN_LIMIT, DOWNLOAD_LIMIT = 3, 2  # small, so that six shards must queue
# the tags that say what launched a run: a sensor (and its tick), a schedule, a backfill, a retry
LAUNCHER_TAGS = (
    "dagster/sensor",
    "dagster/tick",
    "dagster/schedule",
    "dagster/backfill",
    "dagster/parent",
    "dagster/auto",
)
SLOW_URLS = 120  # the shard killed mid-download: 120 answers of 0.3 s, 8 at a time


def test_instance_yaml_passes_dagsters_own_validation(monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    for var in ("DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD"):
        monkeypatch.setenv(var, "x")
    monkeypatch.setenv("DAGSTER_POSTGRES_PORT", "5432")
    monkeypatch.setenv("DAGSTER_POSTGRES_DB", "dagster")
    config, _ = dagster_instance_config(str(DEPLOY), "dagster.yaml")
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["runs"]["max_concurrent_runs"] > 0
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert config["telemetry"]["enabled"] is False


def _events(instance: dg.DagsterInstance, run_id: str) -> list:
    return instance.all_logs(run_id)


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of the (start, end) intervals that overlap at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def _step_intervals(instance: dg.DagsterInstance, records: list, step: str) -> list[tuple[float, float]]:
    """When `step` ran in each of the runs (RunRecords), from its start and end events."""
    intervals = []
    for record in records:
        starts = {}
        events = _events(instance, record.dagster_run.run_id)
        for event in events:
            if event.step_key != step or not event.is_dagster_event:
                continue
            if event.dagster_event.event_type == dg.DagsterEventType.STEP_START:
                starts[step] = event.timestamp
            elif (
                event.dagster_event.event_type
                in (
                    dg.DagsterEventType.STEP_SUCCESS,
                    dg.DagsterEventType.STEP_FAILURE,
                )
                and step in starts
            ):
                intervals.append((starts.pop(step), event.timestamp))
        if step in starts:  # a step whose run died: it held its slot until the run's last event
            intervals.append((starts[step], record.end_time or events[-1].timestamp))
    return intervals


def _run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    for event in _events(instance, run_id):
        message = event.message or ""
        if message.startswith("Started process for run (pid: "):
            return int(message.split("pid: ", 1)[1].rstrip(")."))
    return None


def test_deployment_on_postgres_queues_pools_recovers_a_killed_run_and_backfills(
    tmp_path, s3_root, web, monkeypatch
):
    """Sensor → queued shard runs under the run limit and the pools → catalog and card follow; a run
    killed mid-download is failed and retried into a whole shard; a backfill the UI's way finishes."""
    postgres = Postgres().start()
    try:
        _exercise_deployment(tmp_path, s3_root, web, monkeypatch, postgres)
    finally:
        postgres.stop()


def _exercise_deployment(tmp_path, s3_root, web, monkeypatch, postgres: Postgres) -> None:
    home = dagster_home(tmp_path, RUN_LIMIT)
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump({"ops": {"downloaded_images": {"config": LOCAL_WEB}}}))
    env = {
        **postgres.env(),
        "DAGSTER_HOME": str(home),
        "LAION_ASSETS_ROOT": s3_root,
        "LAION_ASSETS_CLIP_MODEL": "laion-assets-tiny",
        "LAION_ASSETS_CLIP_PRETRAINED": "none",
        "LAION_ASSETS_CAPTION_MODEL": "laion-assets-demo-coca",
        "LAION_ASSETS_CAPTION_PRETRAINED": "none",
        "LAION_ASSETS_RUN_CONFIG": str(run_config),
        "LAION_ASSETS_EXECUTOR": "in_process",
        "GPU_POOL_LIMIT": "1",
        "DOWNLOAD_POOL_LIMIT": str(DOWNLOAD_LIMIT),
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The deployment's scripted step: named pool limits in the instance's PostgreSQL storage.
    pools = subprocess.run(
        ["bash", str(DEPLOY / "set-pools.sh")], capture_output=True, text=True, timeout=180, env=os.environ
    )
    assert pools.returncode == 0, pools.stdout + pools.stderr
    with dg.DagsterInstance.get() as instance:  # what the UI's "Auto-materialize off" badge reads
        from dagster._daemon.asset_daemon import get_auto_materialize_paused

        assert get_auto_materialize_paused(instance) is False

    store = DatasetStore(s3_root)
    shards = [f"web-{i}" for i in range(5)] + ["slow"]
    for shard in shards[:5]:
        urls = [web.url("/img/red.jpg"), web.url("/404.jpg"), web.url(f"/slow/{shard}.jpg")]
        store.write_bytes(f"incoming/{shard}.csv", _url_list(urls))
    store.write_bytes("incoming/slow.csv", _url_list([web.url(f"/slow/k{i}.jpg") for i in range(SLOW_URLS)]))

    deployment = Deployment(tmp_path, dict(os.environ)).start()
    try:
        with dg.DagsterInstance.get() as instance:
            _sensor_runs_and_recovery(instance, store, web, shards)
            _catalog_and_card_follow(instance, store)
            # two shards show the UI's backfill through; all six would only queue its runs again (minutes)
            _backfill_the_uis_way(instance, deployment, shards[:2])
            # Automation only ran dataset-level assets: the sensor's runs, the retry and the backfill's
            # runs made every per-shard asset, and no second run raced them.
            per_shard = {asset.key for asset in PER_SHARD_ASSETS}
            automation_runs = _runs(instance, **{"dagster/sensor_name": names.FOLLOW_UPSTREAM_SENSOR})
            assert automation_runs and not [
                (r.run_id, r.tags.get("dagster/partition"), r.asset_selection)
                for r in automation_runs
                if per_shard & set(r.asset_selection or per_shard)
            ]
    except BaseException:
        _print_what_went_wrong(deployment)
        raise
    finally:
        deployment.stop()


def _print_what_went_wrong(deployment: Deployment) -> None:
    """Each failed run's tags, engine events and step errors; the daemon's warnings and errors; each
    log's tail."""
    with dg.DagsterInstance.get() as instance:
        print("--- every run: id, job, partition or range, status, selection, who launched it, step timeline")
        for record in sorted(instance.get_run_records(), key=lambda r: r.create_timestamp):
            run, tags = record.dagster_run, record.dagster_run.tags
            shards = tags.get("dagster/partition") or tags.get("dagster/asset_partition_range_start")
            launcher = {k: v for k, v in tags.items() if k.startswith(LAUNCHER_TAGS)}
            steps = [
                f"{e.timestamp:.0f} {e.step_key} {e.dagster_event.event_type_value}"
                for e in _events(instance, run.run_id)
                if e.is_dagster_event
                and e.step_key
                and e.dagster_event.event_type_value in ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")
            ]
            print(
                f"  {run.run_id[:8]} {run.job_name} {shards} {run.status.value} "
                f"{sorted(k.to_user_string() for k in run.asset_selection or [])} {launcher} "
                f"created {record.create_timestamp.timestamp():.0f} {steps}"
            )
        for run in _runs(instance):
            if run.status == dg.DagsterRunStatus.FAILURE:
                print(f"--- failed run {run.run_id}: {dict(run.tags)}")
                for event in _events(instance, run.run_id):
                    if event.step_key is None:
                        print(f"  {event.timestamp:.1f} {event.message}")
                    elif event.is_dagster_event and event.dagster_event.is_step_failure:
                        error = event.dagster_event.step_failure_data.error
                        print(f"  {event.timestamp:.1f} {event.step_key}: {error and error.to_string()}")
            elif not run.is_finished:
                print(f"--- unfinished run {run.run_id} ({run.status.value}), its last events:")
                for event in _events(instance, run.run_id)[-5:]:
                    print(f"  {event.timestamp:.1f} {event.step_key} {event.message}")
        storage = instance.event_log_storage
        for pool in sorted(storage.get_concurrency_keys()):
            info = storage.get_concurrency_info(pool)
            held, queue = info.claimed_slots, info.pending_steps
            print(f"--- pool {pool}: {info.slot_count} slots, held {held}, queue {queue}")
    daemon = deployment.log("daemon").splitlines()
    trouble = [line for line in daemon if any(w in line for w in ("WARNING", "ERROR", "Error", "retry"))]
    print("--- daemon warnings and errors\n" + "\n".join(trouble[-80:]))
    for name in ("daemon", "code_server", "webserver"):
        print(f"--- {name} log (tail)\n{deployment.log(name)[-4000:]}")


def _url_list(urls: list[str]) -> bytes:
    return ("url,caption\n" + "".join(f"{url},a picture number {i}\n" for i, url in enumerate(urls))).encode()


def _runs(instance: dg.DagsterInstance, **tags: str) -> list:
    return list(instance.get_runs(filters=dg.RunsFilter(tags=tags or None)))


def _sensor_runs_and_recovery(
    instance: dg.DagsterInstance, store: DatasetStore, web, shards: list[str]
) -> None:
    # The sensor sees six new files and requests a run for each; the queue lets RUN_LIMIT run at once.
    slow_run = wait_for(
        lambda: next(
            (
                r
                for r in _runs(instance, **{"dagster/partition": "slow"})
                if r.status == dg.DagsterRunStatus.STARTED
            ),
            None,
        ),
        300,
        "the slow shard's run to start",
    )
    wait_for(lambda: sum(web.hits[f"/slow/k{i}.jpg"] for i in range(SLOW_URLS)) >= 10, 180, "its download")
    pid = wait_for(lambda: _run_worker_pid(instance, slow_run.run_id), 30, "its run worker's pid")
    os.kill(pid, signal.SIGKILL)  # in the middle of the download

    killed = wait_for(
        lambda: (run := instance.get_run_by_id(slow_run.run_id)).is_finished and run,
        120,
        "the crash to be noticed",
    )
    assert killed.status == dg.DagsterRunStatus.FAILURE
    retry = wait_for(
        lambda: next(iter(_runs(instance, **{"dagster/parent_run_id": slow_run.run_id})), None),
        180,
        "the run retry",
    )
    assert retry.tags.get("dagster/retry_number") == "1"

    def all_shards_done() -> bool:
        done = instance.get_materialized_partitions(dg.AssetKey(names.FILTERED_PAIRS_ASSET))
        return set(shards) <= done and not any(not r.is_finished for r in _runs(instance))

    wait_for(all_shards_done, 600, "every shard's filtered_pairs")
    # The retry alone finished the shard: no automation run raced it for the shard's lease.
    slow_runs = {r.run_id for r in _runs(instance, **{"dagster/partition": "slow"})}
    assert slow_runs == {slow_run.run_id, retry.run_id}
    assert instance.get_run_by_id(retry.run_id).status == dg.DagsterRunStatus.SUCCESS
    assert set(shards) <= instance.get_materialized_partitions(dg.AssetKey(names.QUALITY_SCORES_ASSET))

    # The killed shard is whole: one images row per crawl row, no duplicate, its samples once each,
    # and nothing half-written in the store.
    crawl = store.read_parquet("crawl_metadata/slow.parquet")
    images = store.read_parquet("images/slow.parquet")
    assert crawl.num_rows == images.num_rows == SLOW_URLS
    assert len(set(images.column("key").to_pylist())) == SLOW_URLS
    with store.open("images/slow.tar") as f:
        keys = [key for key, _ in read_samples(f)]
    successes = images.filter(pc.equal(images.column("status"), "success")).column("key").to_pylist()
    assert sorted(keys) == sorted(successes) and len(keys) == len(set(keys))
    for layer in ("crawl_metadata", "images", "embeddings", "scores", "pairs"):
        listed = {f.name for f in store.list(layer)}
        assert all(name.split(".", 1)[0] in shards for name in listed), listed
    assert store.fs.find(store.path("images")) == sorted(
        store.path(f"images/{shard}.{ext}") for shard in shards for ext in ("parquet", "tar")
    )

    # Never more than RUN_LIMIT runs at once, never two embedding steps at once, never more than
    # DOWNLOAD_LIMIT downloads at once: from the run records and the step events.
    runs = [r for r in instance.get_run_records() if r.dagster_run.job_name == names.SHARD_JOB]
    assert len(runs) >= len(shards) + 1
    assert _most_at_once([(r.start_time, r.end_time) for r in runs if r.start_time]) <= RUN_LIMIT
    most = {}
    for step, limit in ((names.CLIP_EMBEDDINGS_ASSET, 1), (names.DOWNLOADED_IMAGES_ASSET, DOWNLOAD_LIMIT)):
        by_run = {
            f"{r.dagster_run.tags.get('dagster/partition')} {r.dagster_run.run_id[:8]} "
            f"{r.dagster_run.status.value} {r.start_time}-{r.end_time}": _step_intervals(instance, [r], step)
            for r in runs
        }
        most[step] = _most_at_once([interval for intervals in by_run.values() for interval in intervals])
        assert most[step] <= limit, f"{most[step]} {step} steps at once, over {limit}: {by_run}"
    assert most[names.CLIP_EMBEDDINGS_ASSET] == 1
    # the gpu pool holds one step at a time, whichever of its assets
    gpu_assets = (names.CLIP_EMBEDDINGS_ASSET, names.QUALITY_SCORES_ASSET, names.RECAPTIONS_ASSET)
    assert _most_at_once([i for step in gpu_assets for i in _step_intervals(instance, runs, step)]) == 1


def _catalog_and_card_follow(instance: dg.DagsterInstance, store: DatasetStore) -> None:
    last_shard = max(
        e.timestamp
        for e in instance.fetch_materializations(dg.AssetKey(names.FILTERED_PAIRS_ASSET), limit=100).records
    )

    def followed(asset: str) -> bool:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        return event is not None and event.timestamp >= last_shard

    wait_for(
        lambda: followed(names.CATALOG_ASSET) and followed(names.DATASET_CARD_ASSET), 300, "catalog and card"
    )
    with store.open("card/README.md") as f:
        card = f.read().decode()
    assert "slow.csv" in card and "web-4.csv" in card


LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionSetNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}
"""
BACKFILL_STATUS = """
query Status($id: String!) {
  partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } }
}
"""


def _backfill_the_uis_way(instance: dg.DagsterInstance, deployment: Deployment, shards: list[str]) -> None:
    """The job page's "Launch backfill": every shard of shard_pipeline, through the GraphQL API."""
    params = {
        "selector": {
            "partitionSetName": f"{names.SHARD_JOB}_partition_set",
            "repositorySelector": {
                "repositoryLocationName": "laion_assets",
                "repositoryName": "__repository__",
            },
        },
        "partitionNames": shards,
    }
    launched = deployment.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def status() -> str | None:
        answer = deployment.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        finished = answer["status"] not in ("REQUESTED", "CANCELING")
        return answer["status"] if finished and not any(not r.is_finished for r in _runs(instance)) else None

    assert wait_for(status, 600, "the backfill", interval=2) == "COMPLETED_SUCCESS"
    runs = _runs(instance, **{"dagster/backfill": backfill_id})
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(shards)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)


def _processes_in(folder) -> list[int]:
    """The processes working in `folder`: a deployment's servers and their children."""
    found = []
    for proc in os.listdir("/proc"):
        try:
            if proc.isdigit() and os.readlink(f"/proc/{proc}/cwd") == str(folder):
                found.append(int(proc))
        except OSError:  # gone, or a zombie
            pass
    return found


def test_a_server_that_does_not_come_up_stops_those_started(tmp_path):
    """The webserver's port is taken: start() fails naming the webserver, and leaves neither the code
    server nor the daemon running."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry: {enabled: false}\n")
    deployment = Deployment(tmp_path, {**os.environ, "DAGSTER_HOME": str(home)})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", deployment.web_port))
        taken.listen()
        try:
            with pytest.raises(AssertionError, match="webserver"):
                deployment.start()
            assert _processes_in(tmp_path) == []
        finally:
            for pid in _processes_in(tmp_path):
                os.kill(pid, signal.SIGKILL)


def test_set_pools_runs_in_the_charts_daemon_pod(tmp_path):
    """On Kubernetes the script is fed to the daemon's pod (`kubectl exec -i ... bash -s < set-pools.sh`):
    that pod holds the instance, but runs Dagster's own image, with no laion_assets and no copy of the
    script. Here: a real PostgreSQL, the script on stdin, and a laion_assets that cannot be imported."""
    postgres = Postgres().start()
    try:
        no_project = tmp_path / "dagster_image"
        (no_project / "laion_assets").mkdir(parents=True)
        (no_project / "laion_assets" / "__init__.py").write_text(
            "raise ImportError('laion_assets is not in the daemon image')\n"
        )
        env = {
            **os.environ,
            **postgres.env(),
            "DAGSTER_HOME": str(dagster_home(tmp_path, RUN_LIMIT)),
            "PYTHONPATH": str(no_project),
            "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            "GPU_POOL_LIMIT": "8",
            "DOWNLOAD_POOL_LIMIT": "64",
        }
        done = subprocess.run(
            ["bash", "-s"],
            input=(DEPLOY / "set-pools.sh").read_text(),
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        check = (
            "import dagster as dg; from dagster._daemon.asset_daemon import get_auto_materialize_paused\n"
            "with dg.DagsterInstance.get() as i:\n"
            "    info = i.event_log_storage.get_concurrency_info\n"
            "    slots = [info(pool).slot_count for pool in ('gpu', 'download')]\n"
            "    print(*slots, get_auto_materialize_paused(i))"
        )
        read = subprocess.run(
            [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
        )
        assert read.returncode == 0, read.stderr
        assert read.stdout.split() == ["8", "64", "False"]
    finally:
        postgres.stop()


@pytest.mark.parametrize("path", ["docker-compose.yml", "workspace.yaml"])
def test_deploy_yaml_files_parse(path):
    assert isinstance(yaml.safe_load((DEPLOY / path).read_text()), dict)


def test_compose_restarts_every_service_that_exits():
    """A daemon killed (out of memory, SIGKILL) or stopped by a dead thread must come back: nothing else
    runs the sensors, the queue, run monitoring or retries on one host. Kubernetes restarts pods itself."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert {name: spec.get("restart") for name, spec in services.items()} == dict.fromkeys(
        ("postgres", "code", "webserver", "daemon"), "unless-stopped"
    )


def test_compose_passes_every_variable_the_definitions_read():
    """A container sees only the variables compose names: one left out is silently its default there, e.g.
    the CLIP model, which the dataset then records."""
    from laion_assets.defs.config import RUN_CONFIG_ENV
    from laion_assets.defs.execution import EXECUTOR_ENV
    from laion_assets.defs.partitions import SHARDS_PER_RUN_ENV
    from laion_assets.pipeline.embeddings import clip
    from laion_assets.pipeline.recaptions import caption, chat_caption, hf_caption
    from laion_assets.pipeline.scores import score
    from laion_assets.pipeline.storage import ROOT_ENV

    read = {ROOT_ENV, EXECUTOR_ENV, SHARDS_PER_RUN_ENV, RUN_CONFIG_ENV}
    for module in (clip, caption, chat_caption, hf_caption, score):
        read |= set(module.SETTINGS_ENV.values())
    passed = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["x-laion-env"]
    assert sorted(read - set(passed)) == []


# The keys of Dagster's Helm chart (1.13) in the sections these values use, from the chart's
# values.schema.json. Most of these sections reject any other key there (`additionalProperties: false`);
# here every section is held to them, so a misspelt key fails the test rather than being ignored.
CHART_KEYS = {
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "dagster-user-deployments.deployments[]": {
        "name",
        "image",
        "dagsterApiGrpcArgs",
        "codeServerArgs",
        "port",
        "env",
        "envConfigMaps",
    }
    | {"envSecrets", "resources", "replicaCount", "nodeSelector", "tolerations", "labels", "annotations"},
    "runLauncher": {"type", "config"},
    "runLauncher.config.k8sRunLauncher": {
        "imagePullPolicy",
        "image",
        "jobNamespace",
        "loadInclusterConfig",
        "kubeconfigFile",
        "envConfigMaps",
    }
    | {"envSecrets", "envVars", "volumes", "volumeMounts", "labels", "resources", "failPodOnRunFailure"}
    | {"schedulerName", "securityContext", "runK8sConfig"},
    "runLauncher.config.k8sRunLauncher.runK8sConfig": {
        "containerConfig",
        "podSpecConfig",
        "podTemplateSpecMetadata",
        "jobSpecConfig",
        "jobMetadata",
    },
    "postgresql": {
        "enabled",
        "image",
        "postgresqlHost",
        "postgresqlUsername",
        "postgresqlPassword",
        "postgresqlDatabase",
    }
    | {"postgresqlParams", "postgresqlScheme", "service"},
    "dagsterDaemon": {
        "runCoordinator",
        "runMonitoring",
        "runRetries",
        "env",
        "envConfigMaps",
        "envSecrets",
        "resources",
    }
    | {"heartbeatTolerance", "sensors", "schedules", "backfills", "logFormat", "image", "annotations"},
    "dagsterDaemon.runCoordinator": {"enabled", "type", "config"},
    "dagsterDaemon.runCoordinator.config.queuedRunCoordinator": {
        "maxConcurrentRuns",
        "tagConcurrencyLimits",
        "dequeueIntervalSeconds",
        "dequeueUseThreads",
    }
    | {"dequeueNumWorkers", "blockOpConcurrencyLimitedRuns"},
    "dagsterDaemon.runMonitoring": {
        "enabled",
        "startTimeoutSeconds",
        "pollIntervalSeconds",
        "cancelTimeoutSeconds",
    }
    | {"maxResumeRunAttempts", "freeSlotsAfterRunEndSeconds"},
    "dagsterDaemon.runRetries": {"enabled", "maxRetries", "retryOnAssetOrOpFailure"},
    "dagsterDaemon.sensors": {"useThreads", "numWorkers", "numSubmitWorkers"},
    "dagsterDaemon.backfills": {"useThreads", "numWorkers", "numSubmitWorkers"},
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    "telemetry": {"enabled"},
}


def _section(values: dict, path: str) -> list[dict]:
    found = [values]
    for part in path.split("."):
        many = part.endswith("[]")
        found = [item.get(part.removesuffix("[]"), [] if many else {}) for item in found]
        if many:
            found = [entry for items in found for entry in items]
    return found


def test_helm_values_use_only_the_charts_keys_and_match_the_instance_yaml():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    assert set(values) <= {path.split(".", 1)[0] for path in CHART_KEYS}
    for path, keys in CHART_KEYS.items():
        for section in _section(values, path):
            assert set(section) <= keys, f"{path}: keys the chart does not know: {set(section) - keys}"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    # the same production settings as deploy/dagster.yaml
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    daemon = values["dagsterDaemon"]
    assert daemon["runRetries"]["maxRetries"] == instance["run_retries"]["max_retries"]
    assert (
        daemon["runRetries"]["retryOnAssetOrOpFailure"]
        is instance["run_retries"]["retry_on_asset_or_op_failure"]
    )
    assert (
        daemon["runMonitoring"]["startTimeoutSeconds"] == instance["run_monitoring"]["start_timeout_seconds"]
    )
    assert values["concurrency"]["pools"]["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]
    assert (
        daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"]
        == instance["run_monitoring"]["free_slots_after_run_end_seconds"]
    )
    queue = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queue["dequeueNumWorkers"] == instance["run_coordinator"]["config"]["dequeue_num_workers"]
    for section in ("sensors", "backfills"):
        assert daemon[section] == {
            "useThreads": instance[section]["use_threads"],
            "numWorkers": instance[section]["num_workers"],
            "numSubmitWorkers": instance[section]["num_submit_workers"],
        }
    assert values["telemetry"]["enabled"] is instance["telemetry"]["enabled"] is False


def _chart_instance(values: dict) -> dict:
    """The run queue and concurrency sections of the dagster.yaml that Dagster's chart (1.13) renders from
    `values`, as its templates helpers/instance/_run-coordinator.tpl and _concurrency.tpl write them (no
    helm here to render them): with `concurrency.enabled`, the queue's `max_concurrent_runs` is written
    only where the values set it, beside a `concurrency:` block with the pools and runs they set."""
    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    concurrency = values.get("concurrency", {})
    enabled = concurrency.get("enabled", False)
    queue_config = {}
    if not enabled or queue.get("maxConcurrentRuns") is not None:
        queue_config["max_concurrent_runs"] = queue.get("maxConcurrentRuns", -1)
    for key, name in (
        ("dequeueIntervalSeconds", "dequeue_interval_seconds"),
        ("dequeueUseThreads", "dequeue_use_threads"),
        ("dequeueNumWorkers", "dequeue_num_workers"),
    ):
        if queue.get(key):
            queue_config[name] = queue[key]
    instance = {
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": queue_config,
        }
    }
    if enabled:
        pools, runs = concurrency.get("pools", {}), concurrency.get("runs", {})
        rendered = {}
        if pools.get("defaultLimit") is not None:
            rendered["pools"] = {"default_limit": pools["defaultLimit"]}
        if runs.get("maxConcurrentRuns") is not None:
            rendered["runs"] = {"max_concurrent_runs": runs["maxConcurrentRuns"]}
        instance["concurrency"] = rendered
    return instance


def test_the_instance_the_chart_renders_from_the_helm_values_loads(tmp_path):
    """Dagster refuses an instance whose run coordinator sets `max_concurrent_runs` beside a `concurrency:`
    block: the webserver, the daemon and every run pod would stop at start-up."""
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator

    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    rendered = _chart_instance(values)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(rendered))
    config, _ = dagster_instance_config(str(tmp_path), "dagster.yaml")
    queue = config["run_coordinator"]["config"]
    assert validate_config(QueuedRunCoordinator.config_type(), queue).success
    # the run limit the values mean, and the one the instance gets
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 256
    assert config["concurrency"]["pools"]["default_limit"] == 1


@pytest.mark.parametrize(
    ("value", "executor"),
    [(None, "in_process"), ("in_process", "in_process"), ("multiprocess", "multiprocess"), ("k8s", "k8s")],
)
def test_the_executor_is_chosen_by_the_environment(monkeypatch, value, executor):
    from laion_assets.defs.execution import EXECUTOR_ENV, executor_from_env

    if value is None:
        monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    else:
        monkeypatch.setenv(EXECUTOR_ENV, value)
    assert executor_from_env().name == executor


def test_an_unknown_executor_is_refused(monkeypatch):
    from laion_assets.defs.execution import EXECUTOR_ENV, executor_from_env

    monkeypatch.setenv(EXECUTOR_ENV, "celery")
    with pytest.raises(ValueError, match="celery"):
        executor_from_env()


def test_heavy_assets_size_their_pods_and_run_in_their_pools():
    from laion_assets.definitions import defs

    graph = defs.get_repository_def().asset_graph
    embed = graph.get(dg.AssetKey(names.CLIP_EMBEDDINGS_ASSET)).assets_def
    download = graph.get(dg.AssetKey(names.DOWNLOADED_IMAGES_ASSET)).assets_def

    def resources(asset: dg.AssetsDefinition) -> dict:  # Dagster keeps a tag's value as JSON text
        return json.loads(asset.op.tags["dagster-k8s/config"])["container_config"]["resources"]

    assert resources(embed)["limits"]["nvidia.com/gpu"] == "1"
    cpu = resources(download)["requests"]
    assert {"cpu", "memory"} <= set(cpu)
    # the download step starts a worker per core of its container's CPU limit (cpu.max), the whole node
    # without one: the limit is what the request sized
    assert resources(download)["limits"]["cpu"] == cpu["cpu"]
    assert (embed.op.pool, download.op.pool) == (names.GPU_POOL, names.DOWNLOAD_POOL)


def test_the_images_wheel_installs_and_loads_the_definitions(tmp_path):
    """What deploy/Dockerfile does: build the wheel with no dependencies, install it, load the
    definitions from it (outside the checkout) and find the packaged model and data files."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "pip wheel --no-deps --wheel-dir /wheels ." in dockerfile
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), str(DEPLOY.parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("laion_assets-*.whl")
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    check = (
        "import laion_assets, laion_assets.definitions as d; "
        "from laion_assets.demo import DEMO_CAPTION_CHECKPOINT, DEMO_CHECKPOINT, DEMO_WATERMARK_MODEL; "
        "from laion_assets.pipeline.scores.score import PACKAGED_HEADS; "
        "from laion_assets.pipeline.pairs.filter import CATEGORIES_FILE; "
        "from laion_assets.pipeline.embeddings.clip import MODEL_CONFIGS; "
        "print(laion_assets.__file__, len(d.defs.assets), "
        "DEMO_CHECKPOINT.is_file() and DEMO_CAPTION_CHECKPOINT.is_file() and DEMO_WATERMARK_MODEL.is_file() "
        "and all(p.is_file() for heads in PACKAGED_HEADS.values() for p in heads), "
        "CATEGORIES_FILE.is_file(), sorted(p.name for p in MODEL_CONFIGS.glob('*.json')))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert loaded.returncode == 0, loaded.stderr
    path, assets, checkpoint, categories, configs = loaded.stdout.split(" ", 4)
    assert path.startswith(str(target)) and assets == "13" and checkpoint == categories == "True"
    assert "laion-assets-tiny.json" in configs and "laion-assets-demo.json" in configs
    assert "laion-assets-demo-coca.json" in configs
