"""A dataset that lives: its settings kept with it, no run that rewrites it unasked, and real processes
killed with SIGKILL part way, then run again."""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from laion_assets import names
from laion_assets.cli import main
from laion_assets.definitions import DATASET_ASSETS
from laion_assets.defs.automation import done_shards
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.resources import build_resources
from laion_assets.demo.run import DEMO_DEDUP_CONFIG, MIN_IMAGES, demo_copies
from laion_assets.demo.world import EXACT_COPIES, NEAR_COPIES, make_world
from laion_assets.pipeline import leases
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.dedup.deduplicate import recorded_settings
from laion_assets.pipeline.leases import REMOVALS, ShardBusy, holder, shard_lease
from laion_assets.pipeline.lineage import incoming_by_shard
from laion_assets.pipeline.removal import TAKEN_DOWN, RemovedKeys, finish_interrupted, remove_keys
from laion_assets.pipeline.settings import DatasetSettings, SettingsFileError, load_settings, write_settings
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import (
    CRAWL_METADATA,
    DUPLICATES,
    EMBEDDINGS,
    IMAGES,
    LEASES,
    PAIRS,
    SEARCH_INDEX,
    SETTINGS_FILE,
    TAKEDOWNS,
    TAKEDOWNS_PENDING,
    DatasetStore,
    host_name,
)
from laion_assets.runner import run_pipeline, run_takedown
from laion_assets_tests.dagster_helpers import LOCAL_WEB, local_web_config
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_SHARDS, build_demo_dataset
from laion_assets_tests.deployment import wait_for
from laion_assets_tests.pid_namespaces import IN_NEW_PIDS, killed_in_new_pids, needs_new_pids

COPIES = {**dict.fromkeys(EXACT_COPIES, 4), **dict.fromkeys(NEAR_COPIES, 3)}
DEDUP_ASSETS = [a for a in DATASET_ASSETS if a.key.to_user_string() != names.BLOCKLIST_ASSET]


@pytest.fixture(scope="module")
def with_copies(tmp_path_factory) -> str:
    """The planted demo world, its shards built, no dataset-level asset yet; read-only (copy it)."""
    return build_demo_dataset(str(tmp_path_factory.mktemp("copies") / "data"), copies=COPIES)


@pytest.fixture(scope="module")
def deduplicated(with_copies, tmp_path_factory) -> str:
    """The planted demo world, deduplicated with the demo's settings (not the code's defaults) by a first
    `laion-assets run` of the dataset-level assets; read-only (copy it)."""
    root = str(shutil.copytree(with_copies, tmp_path_factory.mktemp("lives") / "data"))
    run_config = {"ops": {names.DUPLICATES_ASSET: {"config": DEMO_DEDUP_CONFIG}}}
    outcomes = run_pipeline(root, DEDUP_ASSETS, run_config, echo=lambda _: None, clip=DEMO_CLIP)
    assert not any(o.error for o in outcomes)
    return root


def _copy(root: str, tmp_path: Path) -> DatasetStore:
    return DatasetStore(str(shutil.copytree(root, tmp_path / "data")))


def _digests(store: DatasetStore, shard: str) -> dict[str, str]:
    """sha256 of every file of `shard`, in every layer."""
    return {
        str(path.relative_to(store.root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in Path(store.root).glob(f"*/{shard}.*")
    }


def test_the_first_run_writes_the_settings_and_a_later_run_reads_them(deduplicated):
    settings = load_settings(DatasetStore(deduplicated))
    assert settings.section(names.DUPLICATES_ASSET)["eps"] == DEMO_DEDUP_CONFIG["eps"]
    assert settings.section(names.DUPLICATES_ASSET)["max_phash_distance"] == 10
    # the download section holds what the per-shard runs used (their run config over the defaults)
    assert settings.section(names.DOWNLOADED_IMAGES_ASSET)["allow_private_networks"] is True
    assert settings.section("clip")["model"] == DEMO_CLIP.model
    assert "accept_settings_change" not in settings.section(names.DUPLICATES_ASSET)  # a one-run field


def test_run_select_runs_the_dataset_assets_in_the_pipelines_order(with_copies, tmp_path, monkeypatch):
    """`--select dataset_card,search_index,duplicates` run as typed built the card and the index before
    dedup removed rows: the card counted the removed pairs and the index served them."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    store = _copy(with_copies, tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"ops": {names.DUPLICATES_ASSET: {"config": DEMO_DEDUP_CONFIG}}}))
    select = ",".join([names.DATASET_CARD_ASSET, names.SEARCH_INDEX_ASSET, names.DUPLICATES_ASSET])
    assert main(["run", "--root", store.root, "--select", select, "--config", str(config)]) == 0
    pairs = {
        k
        for s in DEMO_SHARDS
        for k in store.read_parquet(PAIRS.parquet(s), columns=["key"])["key"].to_pylist()
    }
    assert store.read_parquet(DUPLICATES).num_rows > 0  # dedup removed some
    assert set(store.read_parquet(SEARCH_INDEX, columns=["key"])["key"].to_pylist()) == pairs
    assert f"{len(pairs)} pairs from {len(DEMO_SHARDS)} shards" in store.read_bytes("card/README.md").decode()


def test_a_bad_value_in_the_settings_file_fails_the_run_with_one_line_naming_it(local_root):
    """A hand edit of laion_assets.yaml with a value of the wrong type: the run fails naming the file, its
    section and the field, not with pydantic's report on a config class the user never wrote."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", b"url,caption\nhttp://a.com/1.jpg,a cat\n")
    write_settings(store, DatasetSettings({names.CRAWL_METADATA_ASSET: {"min_alt_length": "five"}}))
    (outcome,) = run_pipeline(local_root, PER_SHARD_ASSETS[:1], {}, echo=lambda _: None, clip=DEMO_CLIP)
    assert outcome.error.startswith(f"{store.url(SETTINGS_FILE)}, section crawl_metadata: min_alt_length: ")
    assert "'five'" in outcome.error and "\n" not in outcome.error


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("clip:\n  pretrained:\n", "section clip: pretrained: expected str, got None"),
        ("clip:\n  seed: one\n", "section clip: seed: expected int, got 'one'"),
        ("captioner:\n  decoding: beams\n", "section captioner: decoding 'beams' is not one of"),
        ("scores:\n  watermark_model: false\n", "section scores: watermark_model: expected str, got False"),
    ],
)
def test_a_bad_model_value_in_the_settings_file_is_one_line_naming_it(local_root, monkeypatch, edit, says):
    """A hand edit of a model section (`pretrained:` left empty for random weights, say) reached the model
    resource or open_clip as it was: `run` ended in pydantic's traceback, and a deployment's step failed
    further on, naming neither the file nor the field."""
    for variable in ("LAION_ASSETS_CLIP_PRETRAINED", "LAION_ASSETS_WATERMARK_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("LAION_ASSETS_ROOT", local_root)
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", b"url,caption\nhttp://a.com/1.jpg,a cat\n")
    store.write_bytes(SETTINGS_FILE, edit.encode())
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--root", local_root, "--select", names.CRAWL_METADATA_ASSET])
    assert str(stopped.value.code).startswith(f"laion-assets run: {store.url(SETTINGS_FILE)}, {says}")
    deployment = build_resources()  # a run launched from the UI reads the file in its step
    section = edit.split(":")[0]
    with pytest.raises(SettingsFileError, match=f"^{re.escape(store.url(SETTINGS_FILE))}, {says}"):
        if section == "clip":
            deployment["clip"].get_encoder(store)
        elif section == "captioner":
            deployment["captioner"].captioner_settings(store)
        else:
            deployment["scorers"].get_scorers(store)


def test_a_takedown_changes_no_byte_of_a_shard_its_list_does_not_match(deduplicated, tmp_path):
    """The takedown flow runs dedup again, with the dataset's settings: the other shard keeps its bytes."""
    store = _copy(deduplicated, tmp_path)
    touched, untouched = DEMO_SHARDS
    before = _digests(store, untouched)
    pairs = store.read_parquet(PAIRS.parquet(touched)).to_pylist()[:3]
    listed = tmp_path / "three.txt"
    listed.write_text("url\n" + "".join(f"{row['url']}\n" for row in pairs))
    assert run_takedown(store.root, listed, echo=lambda _: None) == 0
    assert _digests(store, untouched) == before
    kept = set(store.read_parquet(PAIRS.parquet(touched), columns=["key"]).column("key").to_pylist())
    assert not kept & {row["key"] for row in pairs}
    ledger = catalog.connect(store).sql("SELECT reason, count(*) FROM takedowns GROUP BY 1").fetchall()
    assert dict(ledger)[TAKEN_DOWN] == 3


def test_dedup_with_another_rule_refuses_until_the_change_is_accepted(deduplicated, tmp_path):
    store = _copy(deduplicated, tmp_path)
    pairs_before = {s: _digests(store, s) for s in DEMO_SHARDS}
    looser = {"ops": {names.DUPLICATES_ASSET: {"config": {"eps": 0.01}}}}
    lines: list[str] = []
    outcomes = run_pipeline(store.root, DEDUP_ASSETS, looser, echo=lines.append, clip=DEMO_CLIP)
    failed = [o for o in outcomes if o.error]
    assert [o.ran for o in failed] == [[names.DUPLICATES_ASSET]]
    # both sets of settings named, the flag that accepts the change, and no file touched
    change = f"eps: {DEMO_DEDUP_CONFIG['eps']} -> 0.01"  # the demo's eps, then the run's
    assert change in failed[0].error and "accept_settings_change: true" in failed[0].error
    assert {s: _digests(store, s) for s in DEMO_SHARDS} == pairs_before

    accepted = {"ops": {names.DUPLICATES_ASSET: {"config": {"eps": 0.01, "accept_settings_change": True}}}}
    outcomes = run_pipeline(store.root, DEDUP_ASSETS, accepted, echo=lines.append, clip=DEMO_CLIP)
    assert not any(o.error for o in outcomes)
    assert recorded_settings(store)["eps"] == 0.01
    card = store.open("card/README.md").read().decode()
    assert change in card
    # the dataset's own file still says the demo's eps: the run config changed it for that run only
    assert load_settings(store).section(names.DUPLICATES_ASSET)["eps"] == DEMO_DEDUP_CONFIG["eps"]


_KILLED_WRITE = """
import os, signal, sys
from laion_assets.pipeline.storage import DatasetStore
store = DatasetStore(sys.argv[1])
with store.atomic_write("images/big.tar") as f:
    for _ in range(3):
        f.write(os.urandom(20 << 20))  # past s3fs's 50 MiB block: a multipart upload is under way
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""

_LIVE_WRITE = """
import sys, time
from laion_assets.pipeline.storage import DatasetStore
store = DatasetStore(sys.argv[1])
with store.atomic_write("images/live.tar") as f:
    f.write(b"x" * (60 << 20))
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def _leftovers(store: DatasetStore) -> list[str]:
    """Temporary files under the root, and (S3) incomplete uploads."""
    if store.is_s3:
        bucket, _, prefix = store.path("").partition("/")
        uploads = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        return [u["Key"] for u in uploads.get("Uploads", [])]
    return [str(p) for p in Path(store.root).rglob("*") if ".tmp-" in p.name]


def test_a_killed_write_leaves_nothing_once_a_later_run_has_looked(store):
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITE, store.root], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert _leftovers(store) and not store.exists("images/big.tar")
    live = subprocess.Popen([sys.executable, "-c", _LIVE_WRITE, store.root], stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline() == b"writing\n"
        removed = store.remove_abandoned()
        assert len(removed) == 1 and "big.tar" in removed[0]
        assert len(_leftovers(store)) == 1  # the live writer's, left alone
    finally:
        live.kill()
        live.wait()
    assert len(store.remove_abandoned()) == 1
    assert _leftovers(store) == [] and store.list("images") == []


_REMOVE = """
import sys
import pyarrow as pa
from laion_assets.pipeline.removal import TAKEN_DOWN, remove_keys
from laion_assets.pipeline.storage import DatasetStore
keys = sys.argv[2].split(",")
removals = pa.table({"key": keys, "list": ["l"] * len(keys), "kind": ["url"] * len(keys), "entry": keys})
remove_keys(DatasetStore(sys.argv[1]), removals, TAKEN_DOWN)
"""


def _kill_when(process: subprocess.Popen, folder: Path, timeout: float = 120) -> bool:
    """SIGKILL `process` as soon as a file appears whole in `folder`; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if folder.is_dir() and any(not path.name.startswith(".") for path in folder.iterdir()):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.0005)
    process.wait()
    return False


def _killed_with_a_pending_ledger(
    built: str, tmp_path: Path, command: Callable[[str], list[str]], env: dict | None = None
) -> DatasetStore:
    """A copy of `built` after `command(root)` was SIGKILLed the moment its pending ledger appeared."""
    for _ in range(5):  # the window is short; a removal that finished first proves nothing here
        store = _copy(built, tmp_path)
        process = subprocess.Popen(command(store.root), env=env, stdout=subprocess.DEVNULL)
        if _kill_when(process, Path(store.path(TAKEDOWNS_PENDING))):
            return store
        shutil.rmtree(store.root)
    pytest.fail("the removal ended before it could be killed, 5 times")


def test_a_removal_killed_after_its_pending_ledger_is_completed_once(deduplicated, tmp_path):
    """A takedown SIGKILLed between its pending ledger and the shards: the keys are filtered by services
    at once, no committed ledger claims them, and the next removal completes it, counted once."""
    shard = DEMO_SHARDS[1]
    pairs = DatasetStore(deduplicated).read_parquet(PAIRS.parquet(shard), columns=["key"])
    keys = pairs.column("key").to_pylist()[:4]
    store = _killed_with_a_pending_ledger(
        deduplicated, tmp_path, lambda root: [sys.executable, "-c", _REMOVE, root, ",".join(keys)]
    )
    assert store.list(TAKEDOWNS_PENDING)
    assert set(keys) <= RemovedKeys(store).current()  # a service filters them already
    claimed = "SELECT key FROM takedowns WHERE list_contains(?, key)"
    assert not catalog.connect(store).execute(claimed, [keys]).fetchall()
    # the next removal completes the pending one first: the keys leave the shard, the ledger counts them once
    store.remove_abandoned()
    (finished,) = finish_interrupted(store)
    assert finished.removed == len(keys) and finished.shards == [shard]
    assert not store.list(TAKEDOWNS_PENDING) and finish_interrupted(store) == []
    remaining = set(store.read_parquet(PAIRS.parquet(shard), columns=["key"]).column("key").to_pylist())
    assert not remaining & set(keys)
    ledger = catalog.connect(store).execute(f"{claimed} ORDER BY key", [keys]).fetchall()
    assert [key for (key,) in ledger] == sorted(keys)
    assert _leftovers(store) == []


def test_a_removal_that_meets_a_shard_being_written_commits_no_ledger(deduplicated, tmp_path):
    """A takedown whose shard another live run holds stops with ShardBusy before its ledger: the pending
    one stays for the next removal, which removes the keys once the shard is free. The committed ledger
    used to be written (and the pending one removed) before any shard was rewritten: it claimed removals
    that never happened, and nothing was left to complete them."""
    store = _copy(deduplicated, tmp_path)
    shard = DEMO_SHARDS[1]
    keys = store.read_parquet(PAIRS.parquet(shard), columns=["key"]).column("key").to_pylist()[:3]
    removals = pa.table({"key": keys, "list": ["l"] * 3, "kind": ["url"] * 3, "entry": keys})
    ledgers = store.list(TAKEDOWNS)  # dedup's
    holding = subprocess.Popen(
        [sys.executable, "-c", _HOLD, store.root, shard, "120"], stdout=subprocess.PIPE
    )
    try:
        assert holding.stdout.readline() == b"holding\n"
        before = _digests(store, shard)  # its lease among them
        with pytest.raises(ShardBusy, match="being written by run run-elsewhere"):
            remove_keys(store, removals, TAKEN_DOWN)
        assert store.list(TAKEDOWNS) == ledgers and len(store.list(TAKEDOWNS_PENDING)) == 1
        assert _digests(store, shard) == before  # nothing removed, and no ledger says so
    finally:
        holding.send_signal(signal.SIGKILL)
        holding.wait()
    (finished,) = finish_interrupted(store)
    assert finished.removed == 3 and finished.shards == [shard] and not store.list(TAKEDOWNS_PENDING)
    assert not set(keys) & set(
        store.read_parquet(PAIRS.parquet(shard), columns=["key"]).column("key").to_pylist()
    )
    images = store.read_parquet(IMAGES.parquet(shard)).to_pylist()
    assert {row["status"] for row in images if row["key"] in keys} == {TAKEN_DOWN}
    ledger = "SELECT count(*), count(DISTINCT key) FROM takedowns WHERE reason = 'taken_down'"
    assert catalog.connect(store).sql(ledger).fetchone() == (3, 3)


def test_a_takedown_killed_part_way_then_run_again_counts_each_removal_once(deduplicated, tmp_path):
    clean = _copy(deduplicated, tmp_path / "clean")
    shard = DEMO_SHARDS[0]
    pairs = clean.read_parquet(PAIRS.parquet(shard)).to_pylist()[:3]
    listed = tmp_path / "three.txt"
    listed.write_text("url\n" + "".join(f"{row['url']}\n" for row in pairs))
    command = [sys.executable, "-m", "laion_assets.cli", "takedown", str(listed), "--root"]
    env = {**os.environ, "LAION_ASSETS_CLIP_MODEL": DEMO_CLIP.model}
    env["LAION_ASSETS_CLIP_PRETRAINED"] = DEMO_CLIP.pretrained
    store = _killed_with_a_pending_ledger(deduplicated, tmp_path, lambda root: [*command, root], env)
    assert subprocess.run([*command, store.root], env=env, stdout=subprocess.DEVNULL).returncode == 0
    assert subprocess.run([*command, clean.root], env=env, stdout=subprocess.DEVNULL).returncode == 0
    assert _leftovers(store) == [] and not store.list(TAKEDOWNS_PENDING)
    connection = catalog.connect(store)
    by_reason = "SELECT reason, count(*), count(DISTINCT key) FROM takedowns GROUP BY 1 ORDER BY 1"
    assert connection.sql(by_reason).fetchall() == catalog.connect(clean).sql(by_reason).fetchall()
    taken = "SELECT count(*), count(DISTINCT key) FROM takedowns WHERE reason = 'taken_down'"
    assert connection.sql(taken).fetchone() == (3, 3)
    for layer in (PAIRS,):
        for s in DEMO_SHARDS:
            assert store.read_parquet(layer.parquet(s)) == clean.read_parquet(layer.parquet(s))
    assert _digests(store, DEMO_SHARDS[1]) == _digests(clean, DEMO_SHARDS[1])
    index = set(store.read_parquet("search_index/index.parquet", columns=["key"]).column("key").to_pylist())
    assert index == {k for (k,) in connection.sql("SELECT key FROM pairs").fetchall()}
    assert store.exists(DUPLICATES) and store.exists(SETTINGS_FILE) and store.list(TAKEDOWNS)


def test_a_layer_built_with_another_image_size_is_reported_and_rebuilt_only_when_asked(
    local_root, web, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("LAION_ASSETS_CLIP_MODEL", "laion-assets-tiny")
    monkeypatch.setenv("LAION_ASSETS_CLIP_PRETRAINED", "none")
    monkeypatch.setenv("LAION_ASSETS_CAPTION_MODEL", "laion-assets-demo-coca")
    monkeypatch.setenv("LAION_ASSETS_CAPTION_PRETRAINED", "none")
    store = DatasetStore(local_root)
    urls = [web.url("/img/red.jpg"), web.url("/img/blue.webp")]
    store.write_bytes("incoming/w.csv", ("url,caption\n" + "".join(f"{u},a photo\n" for u in urls)).encode())
    select = ["--select", ",".join(a.key.to_user_string() for a in PER_SHARD_ASSETS)]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(local_web_config()))
    assert main(["run", "--root", local_root, *select, "--config", str(config)]) == 0
    assert load_settings(store).section(names.DOWNLOADED_IMAGES_ASSET)["image_size"] == 256
    assert main(["status", "--root", local_root]) == 0
    assert "w: up to date" in capsys.readouterr().out

    # the dataset's image size changed on purpose, in its settings file
    text = Path(store.path(SETTINGS_FILE)).read_text().replace("image_size: 256", "image_size: 128")
    store.write_bytes(SETTINGS_FILE, text.encode())
    built = _digests(store, "w")
    assert main(["status", "--root", local_root]) == 1
    assert "w: images built with other settings: image_size: 256 -> 128" in capsys.readouterr().out
    assert main(["run", "--root", local_root, *select]) == 0
    out = capsys.readouterr().out
    assert (
        "w: images was built with other settings (image_size: 256 -> 128)" in out and "w: up to date" in out
    )
    assert _digests(store, "w") == built  # not rebuilt unasked
    assert done_shards(store, incoming_by_shard(store)) == {"w"}  # nor by the sensor or the schedule

    assert main(["run", "--root", local_root, *select, "--rebuild-stale"]) == 0
    assert (
        "w: downloaded_images 2 rows, clip_embeddings 2 rows, quality_scores 2 rows, filtered_pairs"
        in capsys.readouterr().out
    )
    with store.open(IMAGES.tar("w")) as f:
        sizes = {Image.open(io.BytesIO(m["jpg"])).size for _, m in read_samples(f)}
    assert sizes == {(128, 128)}
    assert main(["status", "--root", local_root]) == 0


def test_garbage_demo_sizes_are_refused_and_small_ones_run(tmp_path):
    with pytest.raises(SystemExit, match=f"--images must be at least {MIN_IMAGES}, got 5"):
        main(["demo", "--root", str(tmp_path), "--images", "5"])
    for images in range(MIN_IMAGES, 400):
        make_world(images=images, copies=demo_copies(images))  # every size it accepts plants its copies


@pytest.fixture
def tiny_models(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    for name, value in {
        "LAION_ASSETS_CLIP_MODEL": "laion-assets-tiny",
        "LAION_ASSETS_CLIP_PRETRAINED": "none",
        "LAION_ASSETS_CAPTION_MODEL": "laion-assets-demo-coca",
        "LAION_ASSETS_CAPTION_PRETRAINED": "none",
    }.items():
        monkeypatch.setenv(name, value)


def test_a_setting_edited_in_exponent_notation_is_the_same_number(
    local_root, web, tmp_path, tiny_models, capsys
):
    """PyYAML read `3e-1` as a string: the runs used 0.3, but `status` reported the pairs built with other
    settings (`min_similarity: 0.3 -> '3e-1'`) and dedup's rules changed, and exited 1, for ever."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/w.csv", f"url,caption\n{web.url('/img/red.jpg')},a photo\n".encode())
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(local_web_config()))
    select = ",".join([*(a.key.to_user_string() for a in PER_SHARD_ASSETS), names.DUPLICATES_ASSET])
    assert main(["run", "--root", local_root, "--select", select, "--config", str(config)]) == 0
    text = Path(store.path(SETTINGS_FILE)).read_text()
    assert "  min_similarity: 0.3\n" in text and "  eps: 0.01\n" in text
    text = text.replace("  min_similarity: 0.3\n", "  min_similarity: 3e-1\n")
    store.write_bytes(SETTINGS_FILE, text.replace("  eps: 0.01\n", "  eps: 1e-2\n").encode())
    capsys.readouterr()
    assert main(["status", "--root", local_root]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["w: up to date"]
    assert load_settings(store).section(names.FILTERED_PAIRS_ASSET)["min_similarity"] == 0.3


def test_a_shard_whose_every_download_failed_is_whole_not_failed(
    local_root, web, tmp_path, tiny_models, capsys
):
    """The real web's common case on a small shard: nothing to embed, pair or recaption."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/gone.csv", f"url,caption\n{web.url('/404.jpg')},a lost photo\n".encode())
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(local_web_config()))
    assert main(["run", "--root", local_root, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    layers = (
        "crawl_metadata 1, downloaded_images 1, clip_embeddings 0, quality_scores 0, filtered_pairs 0, "
        "recaptions 0"
    )
    assert "gone: " + layers.replace(",", " rows,") + " rows" in out
    assert store.parquet_num_rows("recaptions/gone.parquet") == 0


def test_two_runs_on_one_root_write_each_shard_once(local_root, web, tmp_path, tiny_models):
    """The second run reaches the shard while the first downloads it, and leaves it to the first."""
    store = DatasetStore(local_root)
    urls = [web.url(f"/slow/{i}.jpg") for i in range(400)]  # 0.3 s each, 8 at a time: 15 s
    store.write_bytes(
        "incoming/slow.csv", ("url,caption\n" + "".join(f"{u},a photo\n" for u in urls)).encode()
    )
    config = tmp_path / "run.yaml"
    slow = local_web_config()
    slow["ops"]["downloaded_images"]["config"] = {**LOCAL_WEB, "per_host_connections": 8}  # default: 128
    config.write_text(yaml.safe_dump(slow))
    command = [sys.executable, "-m", "laion_assets.cli", "run", "--root", local_root, "--config", str(config)]
    command += ["--select", "crawl_metadata,downloaded_images"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lease = Path(store.path(f"{LEASES}/slow.json"))
    while not (lease.exists() and Path(store.path(CRAWL_METADATA.parquet("slow"))).exists()):
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.01)
    second = subprocess.run(command, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"slow: skipped: being written by run {json.loads(lease.read_text())['owner']}" in second.stdout
    out, _ = first.communicate()
    assert first.returncode == 0 and "slow: crawl_metadata 400 rows, downloaded_images 400 rows" in out
    images = store.read_parquet(IMAGES.parquet("slow"))
    with store.open(IMAGES.tar("slow")) as f:
        in_tar = [key for key, _ in read_samples(f)]
    statuses = zip(images["key"].to_pylist(), images["status"].to_pylist(), strict=True)
    successes = [key for key, status in statuses if status == "success"]
    assert sorted(in_tar) == sorted(successes) and len(successes) == 400
    assert not lease.exists() and _leftovers(store) == []


def test_a_shard_another_run_takes_after_the_plan_is_skipped_not_failed(local_root, web, tiny_models):
    """Two overlapping `laion-assets run`s: the second takes a shard the first planned but had not reached
    (its crawl done, its download waiting behind the others). The first run's step met the lease and the
    shard was reported FAILED, the run exiting 1, where a shard busy at the plan is `skipped`."""
    store = DatasetStore(local_root)
    for shard in ("a", "b", "c"):
        urls = "".join(f"{web.url(f'/slow/{shard}{i}.jpg')},a photo\n" for i in range(16))
        store.write_bytes(f"incoming/{shard}.csv", f"url,caption\n{urls}".encode())
    taken, done = threading.Event(), threading.Event()

    def other_run() -> None:  # takes c once its crawl is written, before the downloads reach it
        while not Path(store.path(CRAWL_METADATA.parquet("c"))).exists():
            time.sleep(0.005)
        with shard_lease(store, "c", "other-run", wait=60, poll=0.005):  # once the crawl step lets it go
            taken.set()
            done.wait()

    other = threading.Thread(target=other_run)
    other.start()
    slow = local_web_config()  # 16 images of 0.3 s, 2 at a time: a shard's download takes 2.4 s
    slow["ops"]["downloaded_images"]["config"] = {**LOCAL_WEB, "per_host_connections": 2}
    try:
        outcomes = run_pipeline(local_root, PER_SHARD_ASSETS[:2], slow, echo=lambda _: None, clip=DEMO_CLIP)
    finally:
        done.set()
        other.join()
    assert taken.is_set()
    by_shard = {outcome.shard: outcome for outcome in outcomes}
    assert by_shard["c"].error is None
    assert by_shard["c"].skipped.startswith("c is being written by run other-run")
    assert not by_shard["a"].error and not by_shard["b"].error
    assert not store.exists(IMAGES.parquet("c")) and store.parquet_num_rows(IMAGES.parquet("b")) == 16


def test_the_ui_shows_the_row_counts_a_removal_left(deduplicated, tmp_path, monkeypatch):
    """A takedown rewrites a shard's files: each rewritten partition is observed with its rows now and why."""
    store = _copy(deduplicated, tmp_path)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    shard = DEMO_SHARDS[0]
    pairs = store.read_parquet(PAIRS.parquet(shard)).to_pylist()[:3]
    listed = tmp_path / "three.csv"
    listed.write_text("url\n" + "".join(f"{row['url']}\n" for row in pairs))
    lines: list[str] = []
    assert run_takedown(store.root, listed, echo=lines.append) == 0
    rows_now = store.parquet_num_rows(PAIRS.parquet(shard))
    assert any(f"filtered_pairs {shard}: now {rows_now} rows (takedowns run" in line for line in lines), lines
    with dg.DagsterInstance.get() as instance:
        (observed,) = instance.fetch_observations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(names.FILTERED_PAIRS_ASSET), asset_partitions=[shard]
            ),
            limit=10,
        ).records
    metadata = observed.asset_observation.metadata
    assert metadata["dagster/row_count"].value == rows_now and metadata["removed"].value == 3
    assert "removed 3 from" in metadata["changed_by"].value


_HOLD = """
import sys, time
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.storage import DatasetStore
with shard_lease(DatasetStore(sys.argv[1]), sys.argv[2], "run-elsewhere"):
    print("holding", flush=True)
    time.sleep(float(sys.argv[3]))
print("released", flush=True)
"""


def test_a_lease_is_one_writer_s_until_it_ends_or_its_process_is_gone(store):
    hold = [sys.executable, "-c", _HOLD, store.root]
    holding = subprocess.Popen([*hold, REMOVALS, "120"], stdout=subprocess.PIPE)
    try:
        assert holding.stdout.readline() == b"holding\n"
        busy = r"dataset.removals is being written by run run-elsewhere \(host "
        with pytest.raises(ShardBusy, match=busy), shard_lease(store, REMOVALS, "this-run"):
            pass
    finally:
        holding.send_signal(signal.SIGKILL)
        holding.wait()
    with shard_lease(store, REMOVALS, "this-run"):  # its holder is gone: taken over
        assert holder(store, REMOVALS)["owner"] == "this-run"
    assert holder(store, REMOVALS) is None and not store.list(LEASES)

    ending = subprocess.Popen([*hold, "w", "1"], stdout=subprocess.PIPE)
    assert ending.stdout.readline() == b"holding\n"
    with shard_lease(store, "w", "this-run", wait=60):  # waits for the other run's step to end
        assert ending.stdout.readline() == b"released\n" and holder(store, "w")["owner"] == "this-run"
    ending.wait()


_TAKE = """
import sys
from laion_assets.pipeline.leases import ShardBusy, holder, shard_lease
from laion_assets.pipeline.storage import DatasetStore
store = DatasetStore(sys.argv[1])
try:
    with shard_lease(store, sys.argv[2], "run-restarted"):
        print("took it over from", sys.argv[3], "as", holder(store, sys.argv[2])["owner"], flush=True)
except ShardBusy as busy:
    print(busy, flush=True)
"""


def test_a_lease_whose_holder_was_killed_and_not_yet_reaped_is_taken_over(store):
    """A killed holder whose parent has not reaped it yet is a zombie: its pid still takes signals, so it
    counted as alive and its shard as busy until the parent got to it (a killed run worker, while its
    busy code server has not: the run's retry is then told the shard is busy). It has ended: the lease
    is taken over."""
    holding = subprocess.Popen([sys.executable, "-c", _HOLD, store.root, "w", "120"], stdout=subprocess.PIPE)
    try:
        assert holding.stdout.readline() == b"holding\n"
        holding.send_signal(signal.SIGKILL)
        wait_for(
            lambda: Path(f"/proc/{holding.pid}/stat").read_text().split(") ")[1][0] == "Z", 30, "a zombie"
        )
        with shard_lease(store, "w", "this-run"):  # not reaped yet
            assert holder(store, "w")["owner"] == "this-run"
    finally:
        holding.kill()
        holding.wait()


@needs_new_pids
def test_a_lease_whose_pid_a_restarted_process_has_is_taken_over(store):
    """A restarted container's processes get the pids its killed ones had, on the same host name. A lease
    left by a killed holder whose pid a later process has used to count as held for as long as that
    process lived: here the later run itself, which was told the shard is busy (by itself) for good."""
    killed_in_new_pids([sys.executable, "-c", _HOLD, store.root, "w", "120"], b"holding\n")
    assert json.loads(store.read_bytes(f"{LEASES}/w.json"))["pid"] == 1
    time.sleep(1.5)  # the later process starts over a second after the lease was written, as it would
    later = subprocess.run(
        [*IN_NEW_PIDS, sys.executable, "-c", _TAKE, store.root, "w", "run-elsewhere"],
        capture_output=True,
        check=True,
    )
    assert later.stdout == b"took it over from run-elsewhere as run-restarted\n"
    assert holder(store, "w") is None and not store.list(LEASES)


_HOLD_PAUSED = """
import sys
from laion_assets.pipeline import leases
from laion_assets.pipeline.storage import DatasetStore
leases.LEASE_SECONDS, leases.RENEW_SECONDS = 2.0, 0.2  # a lease that goes stale in 2 s
with leases.shard_lease(DatasetStore(sys.argv[1]), "w", "run-paused"):
    print("holding", flush=True)
    sys.stdin.readline()  # until the test says
"""
_ON_ANOTHER_HOST = ["unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$0" "$@"']


@pytest.mark.skipif(
    subprocess.run([*_ON_ANOTHER_HOST, "true"], capture_output=True).returncode != 0,
    reason="needs unshare with new UTS namespaces",
)
def test_a_paused_holder_leaves_the_lease_a_run_took_over_and_fails(store):
    """A holder paused past its lease's expiry (SIGSTOP here; a frozen VM, a long stall) whose lease a
    run on another host took over as stale: resumed, it used to renew the lease as its own, taking it
    back, then remove it at its end, so a third run could take the shard while the second wrote. Now it
    leaves the other run's lease alone and its step fails, saying both may have written the shard."""
    paused = subprocess.Popen(
        [sys.executable, "-c", _HOLD_PAUSED, store.root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert paused.stdout.readline() == b"holding\n"
    paused.send_signal(signal.SIGSTOP)
    time.sleep(2.5)  # past its lease's expiry
    other = subprocess.Popen(
        [*_ON_ANOTHER_HOST, sys.executable, "-c", _HOLD, store.root, "w", "120"], stdout=subprocess.PIPE
    )
    try:
        assert other.stdout.readline() == b"holding\n"
        assert holder(store, "w")["host"] == "elsewhere"
        paused.send_signal(signal.SIGCONT)
        time.sleep(1)  # its renewal thread wakes several times
        _, stderr = paused.communicate(b"done\n", timeout=60)
        assert paused.returncode == 1
        assert "LeaseLost: w: this run's lease went to run run-elsewhere (host elsewhere" in stderr.decode()
        assert holder(store, "w")["owner"] == "run-elsewhere"
    finally:
        other.kill()
        other.wait()


def test_a_stale_lease_that_another_run_takes_over_first_is_left_to_it(store, monkeypatch):
    """Two runs find the lease of a run that is gone at once: the one that takes it over first holds it,
    and the other, whose look at the old lease came before that, is told the shard is busy and leaves
    the new holder's lease in place (it used to remove it and take the shard too: two writers)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    record = {"owner": "run-gone", "host": host_name(), "pid": int(gone.stdout), "expires": time.time() + 600}
    store.write_bytes(f"{LEASES}/w.json", json.dumps(record).encode())
    judge = leases._alive
    with contextlib.ExitStack() as other_run:

        def other_run_takes_it_first(found: dict) -> bool:
            monkeypatch.setattr(leases, "_alive", judge)
            other_run.enter_context(shard_lease(store, "w", "run-b"))  # it also found the lease stale
            return judge(found)

        monkeypatch.setattr(leases, "_alive", other_run_takes_it_first)
        with pytest.raises(ShardBusy, match="being written by run run-b"), shard_lease(store, "w", "run-a"):
            pass
        assert holder(store, "w")["owner"] == "run-b"
    assert holder(store, "w") is None and not store.list(LEASES)


_CUT_LEASE = """
import resource, sys
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.storage import DatasetStore
store = DatasetStore(sys.argv[1])
store.write_bytes("_leases/other.json", b"{}")  # the folder is there, as in a store in use
resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))  # a full disk: the lease's record is cut at 16 bytes
with shard_lease(store, "w", "run-cut"):
    print("held", flush=True)
"""


def test_a_lease_whose_writing_failed_leaves_the_shard_to_a_later_run(local_root):
    """A run whose lease could not be written whole (a full disk here; SIGKILL between the lease's
    creation and its record did the same) leaves no lease: it used to leave a cut one, which no reader
    could parse, and every later run was told the shard is busy, for good."""
    store = DatasetStore(local_root)
    cut = subprocess.run([sys.executable, "-c", _CUT_LEASE, store.root], capture_output=True)
    assert cut.returncode != 0 and b"File too large" in cut.stderr and b"held" not in cut.stdout
    store.remove_abandoned()
    assert sorted(p.name for p in Path(store.path(LEASES)).iterdir()) == ["other.json"]
    with shard_lease(store, "w", "this-run"):
        assert holder(store, "w")["owner"] == "this-run"
    assert holder(store, "w") is None


_ADD_SECTIONS = """
import sys, time
from laion_assets.pipeline.settings import add_missing_sections
from laion_assets.pipeline.storage import DatasetStore
store, worker, start = DatasetStore(sys.argv[1]), sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # every process starts at once
for n in range(int(sys.argv[4])):
    add_missing_sections(store, {f"{worker}-{n}": {"n": n}, "shared": {"by": worker}})
"""


def test_runs_that_start_together_each_keep_their_settings_sections(store):
    """Processes adding sections to one new dataset's settings at once: none loses another's, and no
    lease is left."""
    workers, sections = 4, 8
    start = time.time() + 3  # after every interpreter has imported
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _ADD_SECTIONS, store.root, f"w{i}", f"{start}", str(sections)]
        )
        for i in range(workers)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0] * workers
    recorded = load_settings(store).sections
    expected = {f"w{i}-{n}" for i in range(workers) for n in range(sections)} | {"shared"}
    assert set(recorded) == expected
    assert not store.list(LEASES)


_REWRITE_SETTINGS = """
import sys
from laion_assets.pipeline.settings import DatasetSettings, write_settings
from laion_assets.pipeline.storage import DatasetStore
store = DatasetStore(sys.argv[1])
print("writing", flush=True)
for n in range(100000):
    write_settings(store, DatasetSettings({"clip": {"seed": n, "model": "x" * (n % 7)}}))
"""


def test_the_settings_read_whole_while_another_process_replaces_them(store):
    write_settings(store, DatasetSettings({"clip": {"seed": -1}}))
    writer = subprocess.Popen([sys.executable, "-c", _REWRITE_SETTINGS, store.root], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"writing\n"
        seeds = [load_settings(store).section("clip")["seed"] for _ in range(300)]
    finally:
        writer.kill()
        writer.wait()
    assert len(set(seeds)) > 1  # it did read while the file was replaced


def test_a_deployment_embeds_with_the_dataset_s_model_unless_its_environment_names_one(
    local_root, web, monkeypatch
):
    """Runs launched from the UI, a sensor or the schedule use the deployment's resources: the model
    comes from the dataset's settings, and the LAION_ASSETS_CLIP_* variables, where set, over them."""
    monkeypatch.setenv("LAION_ASSETS_ROOT", local_root)
    for variable in ("LAION_ASSETS_CLIP_MODEL", "LAION_ASSETS_CLIP_PRETRAINED"):
        monkeypatch.delenv(variable, raising=False)
    store = DatasetStore(local_root)
    store.write_bytes("incoming/w.csv", f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode())
    dataset_model = {"clip": {"model": "laion-assets-tiny", "pretrained": "none"}}
    store.write_bytes(SETTINGS_FILE, yaml.safe_dump(dataset_model).encode())
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["w"])
    deployment = build_resources()
    web_config = local_web_config()
    for env_model, expected in ((None, "laion-assets-tiny"), ("laion-assets-demo", "laion-assets-demo")):
        if env_model:
            monkeypatch.setenv("LAION_ASSETS_CLIP_MODEL", env_model)
            deployment = build_resources()
        three = PER_SHARD_ASSETS[:3]  # crawl_metadata, downloaded_images, clip_embeddings
        run = dg.materialize(
            three, partition_key="w", instance=instance, resources=deployment, run_config=web_config
        )
        assert run.success
        assert store.parquet_metadata(EMBEDDINGS.parquet("w"))[names.CLIP_MODEL_FOOTER] == expected
