"""The fixed cost of a run, measured on a real deployment: the same shards as one-shard runs, and as
runs of several shards (`LAION_ASSETS_SHARDS_PER_RUN`), under each executor.

    .venv/bin/python bench/run_overhead.py [--shards 8] [--per-run 8] [--urls 20]

Starts a PostgreSQL server, a local image server on 127.0.0.1, and for each executor and shards-per-run
a code server, webserver and daemon on deploy/dagster.yaml with one run at a time, then drops --shards
URL files into `incoming/` and lets the sensor launch their runs. From the run records it prints the
shards' run time, the runs' summed duration and the fixed cost per run:
(summed duration of the one-shard runs - that of the grouped runs) / (the difference in run counts).
Peak memory is the RSS summed over this process and the deployment's (the code server, which runs the
in-process runs, their run workers, the webserver and the daemon; PostgreSQL detaches itself and is left
out).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dagster as dg
from memory import tree_memory_peaks
from smoke import parse_args

from laion_assets import names
from laion_assets.defs.partitions import SHARDS_PER_RUN_ENV
from laion_assets.demo import DEMO_WATERMARK_MODEL
from laion_assets.pipeline.storage import DatasetStore
from laion_assets_tests.dagster_helpers import LOCAL_WEB
from laion_assets_tests.deployment import Deployment, Postgres, dagster_home, wait_for
from laion_assets_tests.web import TestWeb


def shard_runs(instance: dg.DagsterInstance, prefix: str) -> list[dg.RunRecord]:
    records = instance.get_run_records(dg.RunsFilter(job_name=names.SHARD_JOB))
    return [r for r in records if r.dagster_run.tags.get(names.SOURCE_FILE_TAG, "").startswith(prefix)]


def measure(work: Path, env: dict, web: TestWeb, executor: str, per_run: int, args) -> tuple[int, float]:
    """(runs, their summed seconds) for --shards shards run `per_run` at a time under `executor`."""
    label = f"{executor}-{per_run}"
    folder = work / label
    folder.mkdir()
    root = str(folder / "root")
    store = DatasetStore(root)
    prefix = f"{label}-"
    for i in range(args.shards):
        lines = "".join(f"{web.url('/img/red.jpg')},a red square {i} {j}\n" for j in range(args.urls))
        store.write_bytes(f"incoming/{prefix}{i:03d}.csv", f"url,caption\n{lines}".encode())
    run_env = {
        **env,
        "LAION_ASSETS_ROOT": root,
        "LAION_ASSETS_EXECUTOR": executor,
        SHARDS_PER_RUN_ENV: str(per_run),
    }
    with tree_memory_peaks(os.getpid()) as peaks:
        deployment = Deployment(folder, run_env).start()
        try:
            with dg.DagsterInstance.get() as instance:
                expected = -(-args.shards // per_run)

                def finished() -> list[dg.RunRecord] | None:
                    runs = shard_runs(instance, prefix)
                    done = len(runs) == expected and all(r.dagster_run.is_finished for r in runs)
                    return runs if done else None

                runs = wait_for(finished, 1800, f"the {label} runs", interval=2)
        finally:
            deployment.stop()
    failed = [r.dagster_run.run_id for r in runs if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
    log = deployment.log("code_server")[-3000:]  # the runs' own output: the folder goes with the bench
    assert not failed, f"runs failed: {failed}; the code server's log ends:\n{log}"
    seconds = sum(r.end_time - r.start_time for r in runs)
    span = max(r.end_time for r in runs) - min(r.start_time for r in runs)
    shards_per_s = args.shards / span
    print(
        f"{executor:12} {per_run:2} shard(s)/run: {len(runs)} runs, {seconds:.1f} s summed, "
        f"{span:.1f} s first start to last end = {shards_per_s:.2f} shards/s "
        f"(peak RSS {peaks[0] / 2**20:.0f} MB with the deployment's processes)",
        flush=True,
    )
    return len(runs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-run", type=int, default=8)
    parser.add_argument("--urls", type=int, default=20, help="URLs per shard")
    parser.add_argument("--executors", default="in_process,multiprocess")
    args = parse_args(parser, shards=2, per_run=2, urls=3, executors="in_process")
    print(f"machine: {os.cpu_count()} cores; {args.shards} shards of {args.urls} URLs; one run at a time")
    with tempfile.TemporaryDirectory(prefix="laion-overhead-") as folder, ExitStack() as stack:
        work = Path(folder)
        run_config = work / "run.yaml"
        run_config.write_text(yaml.safe_dump({"ops": {"downloaded_images": {"config": LOCAL_WEB}}}))
        postgres = Postgres().start()
        stack.callback(postgres.stop)
        web = TestWeb().start()
        stack.callback(web.stop)
        env = {
            **os.environ,
            **postgres.env(),
            "DAGSTER_HOME": str(dagster_home(work, max_concurrent_runs=1)),
            "LAION_ASSETS_CLIP_MODEL": "laion-assets-tiny",
            "LAION_ASSETS_CLIP_PRETRAINED": "none",
            "LAION_ASSETS_CAPTION_MODEL": "laion-assets-demo-coca",  # recaptions: no weights from a hub
            "LAION_ASSETS_CAPTION_PRETRAINED": "none",
            "LAION_ASSETS_WATERMARK_MODEL": str(DEMO_WATERMARK_MODEL),  # quality_scores: the same
            "LAION_ASSETS_RUN_CONFIG": str(run_config),
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        }
        os.environ.update(env)
        for executor in args.executors.split(","):
            one = measure(work, env, web, executor, 1, args)
            grouped = measure(work, env, web, executor, args.per_run, args)
            per_run = (one[1] - grouped[1]) / (one[0] - grouped[0])
            print(
                f"  {executor}: fixed cost per run {per_run:.1f} s; runs of {args.per_run} shards take "
                f"{grouped[1] / one[1]:.2f}x the time of one-shard runs",
                flush=True,
            )


if __name__ == "__main__":
    main()
