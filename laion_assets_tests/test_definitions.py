import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from laion_assets.definitions import defs
from laion_assets.defs.resources import build_resources

REPO = Path(__file__).resolve().parent.parent


def test_definitions_list_assets_sensor_schedule():
    repo = defs.get_repository_def()
    assert {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()} == {
        "crawl_metadata",
        "downloaded_images",
        "clip_embeddings",
        "filtered_pairs",
        "catalog",
        "dataset_card",
        "search_index",
    }
    assert {c.name for c in repo.asset_graph.asset_check_keys} == {
        "one_row_per_crawl_row",
        "keys_are_success_images",
        "follows_the_contract",
    }
    assert sorted(s.name for s in repo.sensor_defs) == ["follow_upstream_sensor", "incoming_files_sensor"]
    assert [s.name for s in repo.schedule_defs] == ["catch_up_schedule"]
    assert repo.get_job("shard_pipeline").partitions_def.name == "shards"


def test_backfills_run_one_shard_per_run_and_assets_follow_their_upstream():
    graph = defs.get_repository_def().asset_graph
    per_shard = ["crawl_metadata", "downloaded_images", "clip_embeddings", "filtered_pairs"]
    for name in per_shard:
        assert graph.get(dg.AssetKey(name)).backfill_policy == dg.BackfillPolicy.multi_run(1)
    labels = {key.to_user_string(): graph.get(key).automation_condition for key in graph.get_all_asset_keys()}
    assert labels.pop("crawl_metadata") is None  # the incoming sensor starts each shard
    assert {name: condition.get_label() for name, condition in labels.items()} == {
        "downloaded_images": "eager",
        "clip_embeddings": "eager",
        "filtered_pairs": "eager",
        "catalog": "after any shard is updated",
        "dataset_card": "after any shard is updated",
        "search_index": "after any shard is updated",
    }


def test_root_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAION_ASSETS_ROOT", "s3://bucket/prefix")
    assert build_resources()["store"].root == "s3://bucket/prefix"
    assert build_resources("/data/x")["store"].root == "/data/x"
    monkeypatch.delenv("LAION_ASSETS_ROOT")
    assert build_resources()["store"].root == "./data"


def test_dagster_cli_validates_the_workspace():
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    done = subprocess.run(
        [dagster, "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All code locations passed validation" in done.stdout + done.stderr


def test_loading_definitions_does_not_import_torch():
    """Every run process and CLI call loads the definitions; torch (0.5 GB, seconds) waits for the encoder."""
    check = "import sys, laion_assets.definitions; print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
