import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from laion_assets.definitions import defs
from laion_assets.defs.card import DatasetCardConfig
from laion_assets.defs.config import settings_from
from laion_assets.defs.dedup import DuplicatesConfig
from laion_assets.defs.download import DownloadImagesConfig
from laion_assets.defs.pairs import FilteredPairsConfig
from laion_assets.defs.resources import (
    ChatCaptionerResource,
    ClipEncoderResource,
    CocaCaptionerResource,
    DatasetStoreResource,
    HfCaptionerResource,
    build_resources,
    captioner_resource,
)
from laion_assets.pipeline.card import CardSettings
from laion_assets.pipeline.dedup.deduplicate import DedupSettings
from laion_assets.pipeline.download.downloader import DownloadSettings
from laion_assets.pipeline.embeddings.clip import ClipSettings
from laion_assets.pipeline.pairs.filter import PairsSettings
from laion_assets.pipeline.recaptions.caption import CaptionSettings
from laion_assets.pipeline.recaptions.chat_caption import ChatCaptionSettings
from laion_assets.pipeline.recaptions.hf_caption import HfCaptionSettings

REPO = Path(__file__).resolve().parent.parent


def test_definitions_list_assets_sensor_schedule():
    repo = defs.get_repository_def()
    assert {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()} == {
        "crawl_metadata",
        "downloaded_images",
        "clip_embeddings",
        "quality_scores",
        "filtered_pairs",
        "recaptions",
        "catalog",
        "dataset_card",
        "search_index",
        "blocklist",
        "takedowns",
        "duplicates",
        "training_shards",
    }
    assert {c.name for c in repo.asset_graph.asset_check_keys} == {
        "one_row_per_crawl_row",
        "keys_are_success_images",
        "one_row_per_embedding",
        "follows_the_contract",
        "one_row_per_kept_pair",
    }
    assert sorted(s.name for s in repo.sensor_defs) == [
        "blocklist_sensor",
        "follow_upstream_sensor",
        "incoming_files_sensor",
        "pool_slots_sensor",
    ]
    assert repo.get_job("takedown").partitions_def is None
    dataset_level = {
        "blocklist",
        "takedowns",
        "duplicates",
        "training_shards",
        "catalog",
        "dataset_card",
        "search_index",
    }
    for job in ("takedown", "dataset_assets"):  # what a takedown changes; what `laion-assets run` runs
        selected = repo.get_job(job).asset_layer.selected_asset_keys
        assert {k.to_user_string() for k in selected} == dataset_level
    assert [s.name for s in repo.schedule_defs] == ["catch_up_schedule"]
    assert repo.get_job("shard_pipeline").partitions_def.name == "shards"


def test_backfills_run_one_shard_per_run_and_assets_follow_their_upstream():
    graph = defs.get_repository_def().asset_graph
    per_shard = [
        "crawl_metadata",
        "downloaded_images",
        "clip_embeddings",
        "quality_scores",
        "filtered_pairs",
        "recaptions",
    ]
    for name in per_shard:
        assert graph.get(dg.AssetKey(name)).backfill_policy == dg.BackfillPolicy.multi_run(1)
    labels = {key.to_user_string(): graph.get(key).automation_condition for key in graph.get_all_asset_keys()}
    # The runs that make a shard make all of it (the incoming sensor's, retries, catch-up, backfills);
    # automation starts none of its assets. The blocklist sensor starts the takedowns.
    for name in (*per_shard, "blocklist", "takedowns"):
        assert labels.pop(name) is None, name
    assert {name: condition.get_label() for name, condition in labels.items()} == {
        "catalog": "after any shard is updated",
        "dataset_card": "after any shard is updated",
        "duplicates": "after any shard is updated",
        "training_shards": "after any shard is updated",
        "search_index": "after any shard is updated",
    }


def test_root_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAION_ASSETS_ROOT", "s3://bucket/prefix")
    monkeypatch.setenv("LAION_ASSETS_CLIP_BATCH_SIZE", "7")
    # This asserted the root resolved when the definitions load; it is a dg.EnvVar now, so the UI shows
    # where the value comes from (#12), and it resolves when a run starts.
    resources = build_resources()
    assert isinstance(resources["store"].root, dg.EnvVar) and resources["store"].root.env_var_name == (
        "LAION_ASSETS_ROOT"
    )

    @dg.asset
    def settings_seen(store: DatasetStoreResource, clip: ClipEncoderResource) -> None:
        assert (store.get_store().root, clip.batch_size, clip.model) == ("s3://bucket/prefix", 7, "ViT-B-32")

    assert dg.materialize([settings_seen], resources=resources).success
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


def test_loading_definitions_imports_neither_torch_nor_duckdb_nor_opencv():
    """Every run process and CLI call loads the definitions; torch (0.5 GB, seconds) waits for the encoder,
    DuckDB for a query and OpenCV for a resize, so that a run's own process, which downloads but never
    queries or resizes, maps none of their libraries (27 to 44 MB of RSS each for the last two)."""
    modules = "{'torch', 'open_clip', 'duckdb', 'cv2'}"
    check = f"import sys, laion_assets.definitions; print(sorted({modules} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_dagster_dg_cli_checks_and_lists_the_definitions():
    """`dg check defs` and `dg list defs`, as Dagster 1.13 users type them, on this layout."""
    dg_cli = os.path.join(os.path.dirname(sys.executable), "dg")
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}

    def dg_command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dg_cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

    checked = dg_command("check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = dg_command("list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr
    assets = {asset["asset_key"] for asset in json.loads(listed.stdout)["assets"]}
    per_shard = {
        "crawl_metadata",
        "downloaded_images",
        "clip_embeddings",
        "quality_scores",
        "filtered_pairs",
        "recaptions",
    }
    assert assets == per_shard | {
        "catalog",
        "dataset_card",
        "search_index",
        "blocklist",
        "takedowns",
        "duplicates",
        "training_shards",
    }


@pytest.mark.parametrize(
    ("config", "settings"),
    [
        (DownloadImagesConfig, DownloadSettings),
        (FilteredPairsConfig, PairsSettings),
        (DatasetCardConfig, CardSettings),
        (DuplicatesConfig, DedupSettings),
        (ClipEncoderResource, ClipSettings),
        (CocaCaptionerResource, CaptionSettings),
    ],
)
def test_run_config_classes_carry_every_setting_with_its_default(config, settings):
    """The config classes are written out for editors and the launchpad; they must not drift from the
    pipeline's settings they are turned into."""
    assert {f.name for f in dataclasses.fields(settings)} <= set(config.model_fields)
    assert settings_from(config(), settings) == settings()


@pytest.mark.parametrize(
    ("resource", "settings"),
    [(ChatCaptionerResource, ChatCaptionSettings), (HfCaptionerResource, HfCaptionSettings)],
)
def test_captioner_resources_with_required_fields_carry_every_setting(resource, settings):
    fields = dataclasses.fields(settings)
    required = {f.name: f"/{f.name}" for f in fields if f.default is dataclasses.MISSING}
    assert {f.name for f in dataclasses.fields(settings)} <= set(resource.model_fields)
    assert settings_from(resource(**required), settings) == settings(**required)


def test_the_environment_chooses_the_captioner(monkeypatch):
    for name in ("CHAT_BASE_URL", "HF_CAPTION_MODEL", "CAPTION_MODEL"):
        monkeypatch.delenv(f"LAION_ASSETS_{name}", raising=False)
    coca = captioner_resource()
    assert isinstance(coca, CocaCaptionerResource) and coca.model == "coca_ViT-B-32"
    monkeypatch.setenv("LAION_ASSETS_CAPTION_MODEL", "laion-assets-demo-coca")
    assert captioner_resource().model.env_var_name == "LAION_ASSETS_CAPTION_MODEL"
    monkeypatch.setenv("LAION_ASSETS_HF_CAPTION_MODEL", "/models/blip")
    assert isinstance(captioner_resource(), HfCaptionerResource)
    monkeypatch.setenv("LAION_ASSETS_CHAT_BASE_URL", "http://vllm:8000/v1")
    monkeypatch.setenv("LAION_ASSETS_CHAT_MODEL", "llava")
    monkeypatch.setenv("LAION_ASSETS_CHAT_API_KEY", "secret")
    chat = captioner_resource()
    assert isinstance(chat, ChatCaptionerResource)
    # the key is read when a run starts and never shown: the UI shows the variable's name
    assert chat.api_key.env_var_name == "LAION_ASSETS_CHAT_API_KEY"
    given = captioner_resource(CaptionSettings(model="m", pretrained="none"))
    assert (type(given), given.model) == (CocaCaptionerResource, "m")


def test_previews_fit_the_ui_numbers_rounded_and_text_cut():
    from laion_assets.defs.metadata import preview

    table = pa.table(
        {"key": ["s-00000001"], "similarity": pa.array([0.31234567], pa.float32()), "caption": ["x" * 90]}
    )
    shown = preview(table, ["key", "similarity", "caption"]).value
    assert shown.splitlines()[-1] == f"| s-00000001 | 0.3123 | {'x' * 39}… |"


def test_a_preview_shows_a_captions_html_and_images_as_written():
    """A crawled caption is the web's text: its markdown image, HTML and emphasis showed in the UI's preview
    as an image loaded from the caption's host, a tag and italics."""
    from markdown import markdown as rendered

    from laion_assets.defs.metadata import preview

    captions = ["![x](http://t.example/p.gif)", '<img src="http://t.example/p.gif">', "*a* | b"]
    html = rendered(preview(pa.table({"caption": captions}), ["caption"]).value, extensions=["tables"])
    assert html.count("<td>") == 3
    assert "<img" not in html and "<em>" not in html
    assert "![x](http://t.example/p.gif)" in html and "*a* | b" in html


def test_the_lineage_opens_on_three_groups_that_say_what_they_hold():
    graph = defs.get_repository_def().asset_graph
    groups: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    assert groups == {
        "per_shard": {
            "crawl_metadata",
            "downloaded_images",
            "clip_embeddings",
            "quality_scores",
            "filtered_pairs",
            "recaptions",
        },
        "dataset": {"duplicates", "training_shards", "catalog", "dataset_card", "search_index"},
        "takedowns": {"blocklist", "takedowns"},
    }


def test_dataset_level_assets_depend_on_what_orders_them_and_say_what_they_read():
    """The lineage draws an edge only where one asset must run before another; what a dataset-level
    asset reads is in its metadata, shown on its page."""
    graph = defs.get_repository_def().asset_graph
    parents = _parents(graph)
    assert parents == {
        "crawl_metadata": set(),
        "downloaded_images": {"crawl_metadata"},
        "clip_embeddings": {"downloaded_images"},
        "quality_scores": {"clip_embeddings"},
        "filtered_pairs": {"quality_scores"},
        "recaptions": {"filtered_pairs"},
        "blocklist": set(),
        "takedowns": {"blocklist", "recaptions"},
        "duplicates": {"recaptions", "takedowns"},
        "training_shards": {"duplicates"},
        "catalog": {"training_shards"},
        "dataset_card": {"training_shards"},
        "search_index": {"duplicates"},
    }
    reads = {
        key.to_user_string(): graph.get(key).metadata.get("laion_assets/reads")
        for key in graph.get_all_asset_keys()
    }
    assert reads["search_index"] == "pairs, embeddings"
    assert reads["duplicates"] == "pairs, pairs_embeddings, embeddings, images"
    assert reads["training_shards"] == "pairs, scores, recaptions, embeddings, duplicates/duplicates.parquet"
    every_layer = "crawl_metadata, images, embeddings, scores, pairs, pairs_embeddings, recaptions"
    assert reads["takedowns"] == f"blocklist_entries/entries.parquet, {every_layer}"
    assert reads["dataset_card"] == f"{every_layer}, takedowns, duplicates/duplicates.parquet, exports"
    # the catalog has a view over the block lists' active entries too
    assert reads["catalog"] == (
        f"{every_layer}, takedowns, blocklist_entries/entries.parquet, duplicates/duplicates.parquet, exports"
    )


def _parents(graph) -> dict[str, set[str]]:
    return {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }


def test_the_readme_diagram_draws_the_uis_lineage():
    """The README's solid edges between assets are the definitions' dependencies, no more, no fewer."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    diagram = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    assets = set(_parents(defs.get_repository_def().asset_graph))
    drawn: dict[str, set[str]] = {name: set() for name in assets}
    for line in diagram.splitlines():
        if " --> " not in line:
            continue
        source, targets = line.split(" --> ")
        source = re.split(r"[\[(/ ]", source.strip(), maxsplit=1)[0]
        for target in targets.split("&"):
            target = re.split(r"[\[(/ ]", target.strip(), maxsplit=1)[0]
            if source in assets and target in assets:
                drawn[target].add(source)
    assert drawn == _parents(defs.get_repository_def().asset_graph)
