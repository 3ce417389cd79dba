"""Training shards (pipeline/exports/export.py, the `training_shards` asset): the chosen pairs in shuffled
tars of a fixed size, grown by new shards, emptied of removed keys, and read by the trainers users have:
open_clip's own trainer, webdataset and Hugging Face `datasets`."""

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import webdataset

from laion_assets import names
from laion_assets.defs.exports import training_shards
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.metadata import rewritten_exports
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.catalog import views
from laion_assets.pipeline.dedup.deduplicate import deduplicate
from laion_assets.pipeline.exports.export import SOURCE_SHARD, ExportSettings, read_manifest, write_export
from laion_assets.pipeline.leases import ShardBusy
from laion_assets.pipeline.removal import DUPLICATE, finish_interrupted, remove_keys
from laion_assets.pipeline.settings import SettingsChanged, load_settings, write_settings
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import (
    EMBEDDINGS,
    PAIRS,
    RECAPTIONS,
    SCORES,
    TAKEDOWNS,
    TAKEDOWNS_PENDING,
    DatasetStore,
    Export,
)
from laion_assets_tests.dagster_helpers import materialize_shard
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_SHARDS, build_demo_dataset
from laion_assets_tests.test_dedup import COPIES, DEMO_DEDUP

RECAP = ExportSettings(
    "recap", where="NOT duplicate", caption="re_caption", shard_size=7, seed=3, embeddings=True
)


@pytest.fixture
def demo_store(demo_root: str, root: str) -> DatasetStore:
    """A copy of the demo dataset, on a local folder and on S3."""
    store = DatasetStore(root)
    if store.is_s3:
        store.fs.put(f"{demo_root}/", store.path(""), recursive=True)
    else:
        shutil.copytree(demo_root, root)
    return store


@pytest.fixture
def local_demo(demo_root: str, tmp_path: Path) -> DatasetStore:
    shutil.copytree(demo_root, tmp_path / "data")
    return DatasetStore(str(tmp_path / "data"))


def _samples(store: DatasetStore, path: str) -> list[tuple[str, dict[str, bytes]]]:
    with store.open(path) as f:
        return list(read_samples(f))


def _export_samples(store: DatasetStore, name: str) -> list[tuple[str, dict[str, bytes]]]:
    manifest = read_manifest(store, Export(name))
    return [s for shard in manifest["shards"] for s in _samples(store, Export(name).tar(shard["shard"]))]


def _files(store: DatasetStore, folder: str) -> dict[str, bytes]:
    return {f.name: store.open(f"{folder}/{f.name}").read() for f in store.list(folder)}


def test_an_export_holds_the_chosen_pairs_in_shuffled_tars_of_a_fixed_size(demo_store):
    store = demo_store
    result = write_export(store, RECAP)
    expected = {
        row["key"]: row
        for row in views.connect(store)
        .sql("SELECT * FROM annotated_pairs WHERE NOT duplicate AND re_caption IS NOT NULL")
        .to_arrow_table()
        .to_pylist()
    }
    samples = _export_samples(store, "recap")
    keys = [key for key, _ in samples]
    assert sorted(keys) == sorted(expected) and len(expected) > 2 * RECAP.shard_size
    assert keys != sorted(keys)  # shuffled
    manifest = result.manifest
    sizes = [shard["samples"] for shard in manifest["shards"]]
    assert sizes[:-1] == [RECAP.shard_size] * (len(sizes) - 1) and 0 < sizes[-1] <= RECAP.shard_size
    assert manifest["samples"] == len(keys) and manifest["query"] == RECAP.selection_sql()
    assert manifest["sources"].keys() == set(DEMO_SHARDS) and manifest["settings"]["caption"] == "re_caption"
    embeddings = {
        row["key"]: row["image_embedding"]
        for row in store.read_parquet(EMBEDDINGS.parquet(DEMO_SHARDS[0])).to_pylist()
    }
    stored_images = {key: members["jpg"] for key, members in _samples(store, PAIRS.tar(DEMO_SHARDS[0]))}
    for key, members in samples:
        assert set(members) == {"jpg", "txt", "json", "npy"}
        assert members["txt"].decode() == expected[key]["re_caption"]
        row = json.loads(members["json"])
        assert row[SOURCE_SHARD] == schemas.shard_of_key(key)
        for column in ("caption", "re_caption", "similarity", "punsafe", "aesthetic", "re_clip_score"):
            assert row[column] == expected[key][column]
        if key in stored_images:
            assert members["jpg"] == stored_images[key]  # the image as stored
            vector = np.load(io.BytesIO(members["npy"]))
            assert vector.dtype == np.float16 and np.array_equal(
                vector, np.asarray(embeddings[key], np.float16)
            )
    # per-shard stats, the rows beside each tar, sizes.json for open_clip's trainer, and the catalog's view
    export = Export("recap")
    for shard in manifest["shards"]:
        stats = json.loads(store.open(export.stats(shard["shard"])).read())
        assert stats["samples"] == shard["samples"] and stats["bytes"] == store.fs.size(
            store.path(export.tar(shard["shard"]))
        )
        assert sum(stats["sources"].values()) == shard["samples"]
    assert json.loads(store.open(export.sizes).read()) == {
        f"{s['shard']}.tar": s["samples"] for s in manifest["shards"]
    }
    listed = (
        views.connect(store).sql("SELECT key, shard FROM export_samples WHERE export = 'recap'").fetchall()
    )
    tar_of = {
        key: store.url(export.tar(shard["shard"]))
        for shard in manifest["shards"]
        for key, _ in _samples(store, export.tar(shard["shard"]))
    }
    assert dict(listed) == tar_of
    # the same settings make the same bytes
    first = _files(store, export.folder)
    write_export(store, RECAP, reshuffle=True)
    again = _files(store, export.folder)
    assert {k: v for k, v in again.items() if k != "manifest.json"} == {
        k: v for k, v in first.items() if k != "manifest.json"
    }


_BUILT_AFTER_DOWNLOAD = (PAIRS, RECAPTIONS, SCORES, EMBEDDINGS)


def _set_aside(store: DatasetStore, shard: str, aside: Path) -> None:
    """`shard`'s layers after the download moved into `aside`, as if they were not built yet."""
    for layer in _BUILT_AFTER_DOWNLOAD:
        os.makedirs(aside / layer.name)
        for suffix in ("parquet", "tar"):
            path = Path(store.path(f"{layer.name}/{shard}.{suffix}"))
            if path.exists():
                shutil.move(path, aside / layer.name / path.name)


def _put_back(store: DatasetStore, aside: Path) -> None:
    for layer in _BUILT_AFTER_DOWNLOAD:
        for path in (aside / layer.name).iterdir():
            shutil.move(path, store.path(f"{layer.name}/{path.name}"))


def test_a_shard_waits_for_a_layer_the_others_have_before_it_is_read(local_demo, tmp_path):
    """A shard whose recaptions are not built yet (failed, or still running) while the others' are is left
    for a later run: read at once, its pairs had no re_caption and were skipped, and the shard, listed as
    read, never came back into the export once its recaptions were built."""
    store = local_demo
    later = DEMO_SHARDS[1]
    recaptions = Path(store.path(f"{RECAPTIONS.name}/{later}.parquet"))
    shutil.move(recaptions, tmp_path / recaptions.name)
    settings = ExportSettings("recap", caption="re_caption", shard_size=7)
    first = write_export(store, settings)
    assert first.sources_added == [DEMO_SHARDS[0]] and first.waiting == {later: [RECAPTIONS.name]}
    shutil.move(tmp_path / recaptions.name, recaptions)
    grown = write_export(store, settings)
    assert grown.sources_added == [later] and grown.waiting == {}
    recaptioned = views.connect(store).sql(
        "SELECT count(*) FROM annotated_pairs WHERE re_caption IS NOT NULL"
    )
    assert len(_export_samples(store, "recap")) == recaptioned.fetchone()[0]


def test_an_export_grows_by_new_shards_and_never_rewrites_those_it_wrote(local_demo, tmp_path):
    store = local_demo
    later, aside = DEMO_SHARDS[1], tmp_path / "aside"
    _set_aside(store, later, aside)  # as if the second shard were not built yet
    settings = ExportSettings("all", shard_size=5, shuffle_buffer=4)
    first = write_export(store, settings)
    before = _files(store, Export("all").folder)
    assert first.rebuilt and first.sources_added == [DEMO_SHARDS[0]]
    assert write_export(store, settings).shards_added == []  # nothing new: nothing written
    _put_back(store, aside)
    grown = write_export(store, settings)
    assert grown.sources_added == [later] and not grown.rebuilt
    assert grown.shards_added[0] == f"{len(first.shards_added):05d}"
    after = _files(store, Export("all").folder)
    for name in before:
        if name not in ("manifest.json", "sizes.json"):
            assert after[name] == before[name], name  # the shards written stay byte for byte
    pairs = views.connect(store).sql("SELECT count(*) FROM pairs").fetchone()[0]
    assert grown.manifest["samples"] == pairs == len(_export_samples(store, "all"))
    # other settings refuse, naming the change, until the export is rebuilt on request
    with pytest.raises(SettingsChanged, match=r"shard_size: 5 -> 8.*reshuffle: \[all\]"):
        write_export(store, ExportSettings("all", shard_size=8))
    rebuilt = write_export(store, ExportSettings("all", shard_size=8), reshuffle=True)
    assert rebuilt.rebuilt and [s["samples"] for s in rebuilt.manifest["shards"]][:-1] == [8] * (
        len(rebuilt.manifest["shards"]) - 1
    )
    assert sorted(f.name for f in store.list(Export("all").folder) if f.name.endswith(".tar")) == [
        f"{s['shard']}.tar" for s in rebuilt.manifest["shards"]
    ]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> str:
    """The demo dataset with the copies dedup must find planted across its shards; read-only."""
    return build_demo_dataset(str(tmp_path_factory.mktemp("planted") / "data"), copies=COPIES)


def test_a_shard_waits_for_dedup_to_check_it_before_it_is_read(planted, tmp_path):
    """Dedup that only records its finds (`remove: false`) and checks one shard a run: the export of
    `NOT duplicate` read the other shard before dedup had flagged its copies, and kept them for ever (15
    of the planted copies). It waits for dedup's check now, and then leaves the copies out."""
    store = DatasetStore(shutil.copytree(planted, tmp_path / "data").as_posix())
    dedup = dataclasses.replace(DEMO_DEDUP, remove=False, max_shards=1)
    settings = ExportSettings("unique", where="NOT duplicate")
    deduplicate(store, dedup)
    first = write_export(store, settings)
    assert first.sources_added == [DEMO_SHARDS[0]] and first.waiting == {DEMO_SHARDS[1]: ["duplicates"]}
    assert deduplicate(store, dedup).duplicates.num_rows > 0
    assert write_export(store, settings).sources_added == [DEMO_SHARDS[1]]
    unique = views.connect(store).sql("SELECT key FROM annotated_pairs WHERE NOT duplicate").fetchall()
    assert sorted(key for key, _ in _export_samples(store, "unique")) == sorted(key for (key,) in unique)


def test_a_shard_rebuilt_after_it_was_exported_is_read_again(local_demo):
    """A shard whose pairs are rebuilt (another threshold, a changed source file) after an export read it:
    the next run takes its old samples out of the export and reads it again; the tars that held none of
    them keep their bytes. The export kept the pairs the rebuild had dropped, for ever."""
    store = local_demo
    rebuilt = DEMO_SHARDS[1]
    settings = ExportSettings("all", shard_size=5, shuffle_buffer=0)
    write_export(store, settings)
    before = _files(store, Export("all").folder)
    similarity = views.connect(store).sql(
        f"SELECT median(similarity) FROM pairs WHERE key LIKE '{rebuilt}-%'"
    )
    config = {"ops": {"filtered_pairs": {"config": {"min_similarity": similarity.fetchone()[0]}}}}
    assert materialize_shard(
        dg.DagsterInstance.ephemeral(), store.root, rebuilt, config, PER_SHARD_ASSETS[4:], DEMO_CLIP
    ).success
    pairs = {
        row["key"]: row
        for row in views.connect(store).sql("SELECT * FROM pairs").to_arrow_table().to_pylist()
    }
    grown = write_export(store, settings)
    assert grown.sources_added == [rebuilt]
    samples = _export_samples(store, "all")
    assert sorted(key for key, _ in samples) == sorted(pairs)
    for key, members in samples:
        assert json.loads(members["json"])["similarity"] == pairs[key]["similarity"]
    manifest = read_manifest(store, Export("all"))
    assert manifest["samples"] == len(pairs) and manifest["sources"][rebuilt] == sum(
        schemas.shard_of_key(key) == rebuilt for key in pairs
    )
    assert json.loads(store.open(Export("all").sizes).read()) == {
        f"{s['shard']}.tar": s["samples"] for s in manifest["shards"]
    }
    after = _files(store, Export("all").folder)
    for name, data in before.items():
        if name.endswith(".tar") and all(
            schemas.shard_of_key(key) != rebuilt for key in _keys_of({name: data})
        ):
            assert after[name] == data, name
    assert write_export(store, settings).sources_added == []  # read once


def test_a_shard_read_again_counts_its_skipped_pairs_once(local_demo):
    """Three pairs whose captioner failed are skipped by an export of `re_caption`; the shard's pairs are
    rebuilt, recaptioned whole, and read again. The manifest still said 3 skipped on top of the rows the
    second read skipped (none), while every selected pair was in the export."""
    store = local_demo
    shard = DEMO_SHARDS[1]
    recaptions = store.read_parquet(RECAPTIONS.parquet(shard))
    failed = pa.array([i < 3 for i in range(recaptions.num_rows)])
    for column, value in (("re_caption", None), ("re_caption_error", "the captioner failed")):
        index = recaptions.schema.get_field_index(column)
        recaptions = recaptions.set_column(
            index, column, pc.if_else(failed, pa.scalar(value, pa.string()), recaptions.column(index))
        )
    store.write_parquet(RECAPTIONS.parquet(shard), recaptions)  # its footer kept: as the stage wrote it
    settings = ExportSettings("recap", caption="re_caption", shard_size=7)
    assert write_export(store, settings).manifest["skipped"] == {"no re_caption": 3}
    similarity = views.connect(store).sql(f"SELECT median(similarity) FROM pairs WHERE key LIKE '{shard}-%'")
    config = {"ops": {"filtered_pairs": {"config": {"min_similarity": similarity.fetchone()[0]}}}}
    assert materialize_shard(
        dg.DagsterInstance.ephemeral(), store.root, shard, config, PER_SHARD_ASSETS[4:], DEMO_CLIP
    ).success
    manifest = write_export(store, settings).manifest
    selected = views.connect(store).sql("SELECT count(*) FROM annotated_pairs WHERE re_caption IS NOT NULL")
    assert manifest["samples"] == selected.fetchone()[0] == sum(manifest["sources"].values())
    assert sum(manifest["skipped"].values()) == 0


def test_a_removal_after_the_export_leaves_no_removed_key_in_any_export_shard(demo_store):
    store = demo_store
    write_export(store, RECAP)
    write_export(store, ExportSettings("web", shard_size=6))
    before = {name: _files(store, Export(name).folder) for name in ("recap", "web")}
    keys = sorted(key for key, _ in _export_samples(store, "recap"))[:3]
    removals = pa.table({"key": keys, "list": ["l"] * 3, "kind": ["url"] * 3, "entry": ["a", "b", "c"]})
    result = remove_keys(store, removals, schemas.TAKEN_DOWN)
    ledger = store.read_parquet(result.ledger)
    held = dict(
        zip(ledger.column("key").to_pylist(), ledger.column("export_shards").to_pylist(), strict=True)
    )
    for key in keys:  # the ledger names each tar that held the key, in both exports
        holding = [
            f"{Export(name).folder}/{file}"
            for name in ("recap", "web")
            for file, data in before[name].items()
            if file.endswith(".tar") and key in _keys_of({file: data})
        ]
        assert len(holding) == 2 and sorted(held[key]) == sorted(holding)
    for name in ("recap", "web"):
        export = Export(name)
        assert not set(keys) & {key for key, _ in _export_samples(store, name)}
        manifest = read_manifest(store, export)
        assert manifest["removed"] == {schemas.TAKEN_DOWN: sum(key in _keys_of(before[name]) for key in keys)}
        assert manifest["samples"] == len(_export_samples(store, name))
        after = _files(store, export.folder)
        rewritten = {
            Path(tar).name for tars in held.values() for tar in tars if tar.startswith(export.folder)
        }
        for file, data in before[name].items():
            if file.endswith(".tar") and file not in rewritten:
                assert after[file] == data  # every other shard keeps its bytes
            if file.endswith(".tar") and file in rewritten:
                assert after[file] != data
    assert {tar for tars in held.values() for tar in tars} <= set(result.files)
    connection = views.connect(store)
    assert connection.sql("SELECT count(*) FROM export_samples JOIN takedowns USING (key)").fetchone()[0] == 0
    assert (
        connection.sql(f"SELECT count(*) FROM read_parquet('{store.url(TAKEDOWNS)}/*.parquet')").fetchone()[0]
        == 3
    )
    # a duplicate removal reaches exports the same way
    duplicate = sorted(key for key, _ in _export_samples(store, "web"))[0]
    remove_keys(
        store, pa.table({"key": [duplicate], "list": ["dedup"], "kind": ["exact"], "entry": ["k"]}), DUPLICATE
    )
    assert duplicate not in {key for key, _ in _export_samples(store, "web")}
    assert read_manifest(store, Export("web"))["removed"][DUPLICATE] == 1


_HOLD = """
import sys
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.storage import DatasetStore
with shard_lease(DatasetStore(sys.argv[1]), sys.argv[2], "a-download"):
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_a_removal_completed_later_leaves_no_removed_key_in_an_export_grown_meanwhile(local_demo, tmp_path):
    """A takedown left pending (its shard was being written by another run) while an export grew by
    that shard, whose pairs still held the keys: completing it takes them out of the new export tars too
    (it went by the tars its pending ledger had named, and the keys stayed in the export)."""
    store = local_demo
    later, aside = DEMO_SHARDS[1], tmp_path / "aside"
    _set_aside(store, later, aside)  # as if the second shard were not built yet
    settings = ExportSettings("all", shard_size=5, shuffle_buffer=4)
    assert write_export(store, settings).sources_added == [DEMO_SHARDS[0]]
    _put_back(store, aside)
    keys = store.read_parquet(PAIRS.parquet(later), columns=["key"]).column("key").to_pylist()[:3]
    removals = pa.table({"key": keys, "list": ["l"] * 3, "kind": ["url"] * 3, "entry": ["a", "b", "c"]})
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, store.root, later], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"holding\n"
        with pytest.raises(ShardBusy):
            remove_keys(store, removals, schemas.TAKEN_DOWN)
    finally:
        holder.communicate(b"")
    assert store.list(TAKEDOWNS_PENDING)
    assert write_export(store, settings).sources_added == [later]  # the pairs held the keys still
    assert set(keys) <= {key for key, _ in _export_samples(store, "all")}
    (finished,) = finish_interrupted(store)
    assert finished.removed == 3 and not store.list(TAKEDOWNS_PENDING)
    assert not set(keys) & {key for key, _ in _export_samples(store, "all")}
    manifest = read_manifest(store, Export("all"))
    assert manifest["removed"] == {schemas.TAKEN_DOWN: 3}
    assert manifest["samples"] == len(_export_samples(store, "all"))
    ledger = store.read_parquet(finished.ledger)
    assert all(tars for tars in ledger.column("export_shards").to_pylist())  # the ledger names them


def _keys_of(files: dict[str, bytes]) -> set[str]:
    return {
        key
        for name, data in files.items()
        if name.endswith(".tar")
        for key, _ in read_samples(io.BytesIO(data))
    }


def _kill_once_it_prints(script: str, line: str) -> None:
    """Runs `script` in a Python process of its own and SIGKILLs it once it has printed `line`."""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == line
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_a_killed_export_leaves_nothing_a_later_run_keeps(local_demo):
    """SIGKILL the writer in its third shard of a first build: no manifest claims them, and the next run
    removes them and writes the export exactly as a clean run does."""
    store = local_demo
    script = textwrap.dedent(
        f"""
        import sys, time
        from laion_assets.pipeline.exports import export
        from laion_assets.pipeline.storage import DatasetStore
        write = export._ShardSink.write
        def write_then_stall(self, sample):
            write(self, sample)
            if self.index == 2 and self._writer is not None:  # two tars done, the third begun
                print("two shards", flush=True)
                time.sleep(600)
        export._ShardSink.write = write_then_stall
        export.write_export(DatasetStore({store.root!r}), export.ExportSettings("all", shard_size=4))
        """
    )
    _kill_once_it_prints(script, "two shards")
    export = Export("all")
    assert (
        not store.exists(export.manifest)
        and len([f for f in store.list(export.folder) if f.name.endswith(".tar")]) == 2
    )
    leftovers = [name for name in os.listdir(store.path(export.folder)) if ".tmp-" in name]
    assert leftovers  # the third tar, half-written
    assert any(leftovers[0] in path for path in store.remove_abandoned())
    # the two tars no manifest lists are not samples of an export (the demo has no other): no export_samples
    assert views.EXPORT_SAMPLES_VIEW not in views.view_names(views.connect(store))
    result = write_export(store, ExportSettings("all", shard_size=4))
    in_view = "SELECT count(*) FROM export_samples WHERE export = 'all'"
    assert views.connect(store).sql(in_view).fetchone() == (result.manifest["samples"],)
    killed_then_run = _files(store, export.folder)
    shutil.rmtree(store.path(export.folder))
    write_export(store, ExportSettings("all", shard_size=4))
    clean = _files(store, export.folder)
    assert killed_then_run.keys() == clean.keys() and result.rebuilt
    assert {k: v for k, v in killed_then_run.items() if k != "manifest.json"} == {
        k: v for k, v in clean.items() if k != "manifest.json"
    }


def _removal_killed_in_its_shard_rewrites(store: DatasetStore, key: str) -> None:
    """SIGKILL a takedown of `key`, holding the removals' lease as the asset does, once it has begun to
    rewrite the dataset's shards."""
    script = textwrap.dedent(
        f"""
        import time
        import pyarrow as pa
        from laion_assets.pipeline import removal
        from laion_assets.pipeline.leases import REMOVALS, shard_lease
        from laion_assets.pipeline.storage import DatasetStore
        def stall(*args):
            print("rewriting", flush=True)
            time.sleep(600)
        removal._rewrite_shard = stall
        store = DatasetStore({store.root!r})
        removals = pa.table({{"key": [{key!r}], "list": ["l"], "kind": ["url"], "entry": ["e"]}})
        with shard_lease(store, REMOVALS, "killed"):
            removal.remove_keys(store, removals, removal.TAKEN_DOWN)
        """
    )
    _kill_once_it_prints(script, "rewriting")


def test_a_removal_killed_in_its_shard_rewrites_is_pending_and_completed_by_the_next(local_demo):
    """The removal's ledger is committed only after the shards and exports are rewritten: killed while it
    rewrites, it leaves its pending ledger and no ledger that claims the key gone, and the next removal
    (`finish_interrupted`) takes the key out of the pairs and the export."""
    store = local_demo
    write_export(store, ExportSettings("web", shard_size=6))
    key = sorted(key for key, _ in _export_samples(store, "web"))[0]
    _removal_killed_in_its_shard_rewrites(store, key)
    assert store.list(TAKEDOWNS_PENDING) and not store.list(TAKEDOWNS)
    (finished,) = finish_interrupted(store)
    connection = views.connect(store)
    assert connection.sql(f"SELECT count(*) FROM pairs WHERE key = '{key}'").fetchone()[0] == 0
    assert key not in {k for k, _ in _export_samples(store, "web")} and finished.removed == 1
    assert connection.sql("SELECT count(*) FROM takedowns").fetchone()[0] == 1


def test_an_export_written_while_a_removal_is_pending_loses_the_key_when_it_completes(local_demo):
    """A removal killed in its shard rewrites names the export tars that held its keys when it began;
    an export written before the next run completes it (its lease is a dead process's) took the key from
    the pairs not yet rewritten. Completing the removal takes the key out of that export too."""
    store = local_demo
    write_export(store, ExportSettings("web", shard_size=6))
    key = sorted(key for key, _ in _export_samples(store, "web"))[0]
    _removal_killed_in_its_shard_rewrites(store, key)
    write_export(store, ExportSettings("late", shard_size=6))
    assert key in {k for k, _ in _export_samples(store, "late")}
    assert len(finish_interrupted(store)) == 1
    for name in ("web", "late"):
        assert key not in {k for k, _ in _export_samples(store, name)}, name
        assert read_manifest(store, Export(name))["removed"] == {schemas.TAKEN_DOWN: 1}
    connection = views.connect(store)
    assert connection.sql("SELECT count(*) FROM export_samples JOIN takedowns USING (key)").fetchone()[0] == 0
    (held,) = connection.sql("SELECT export_shards FROM takedowns").fetchone()
    assert sorted(Path(tar).parent.name for tar in held) == ["late", "web"]


def test_bad_export_settings_name_the_export_and_the_file(local_demo):
    store = local_demo
    with pytest.raises(ValueError, match=r"export 'x': its query cannot run .*no_such_column"):
        write_export(store, ExportSettings("x", where="no_such_column > 1"))
    with pytest.raises(ValueError, match=r"lists/missing.txt: not a keys file"):
        write_export(store, ExportSettings("x", keys_file="lists/missing.txt"))
    with pytest.raises(
        ValueError, match=r"export 'a b': name .*; caption 'alt' is not one of caption, re_caption"
    ):
        write_export(store, ExportSettings("a b", caption="alt"))
    assert not store.exists("exports/x/manifest.json")


def test_a_where_that_fails_on_the_rows_names_the_export(local_demo):
    """A `where` DuckDB binds but cannot evaluate on the rows (a caption cast to a number) is a ValueError
    naming the export, as one it cannot bind is; no manifest claims what the run began."""
    store = local_demo
    with pytest.raises(ValueError, match=r"export 'cast': its query cannot run .*Could not convert string"):
        write_export(store, ExportSettings("cast", where="CAST(caption AS INTEGER) > 0"))
    assert not store.exists(Export("cast").manifest)


def test_a_where_is_one_expression_and_cannot_escape_its_parentheses(local_demo):
    """A `where` that closes the parentheses it is put in (`true) OR (true`) chose every pair, keys file
    or not, or broke the query after the check; it is refused, naming the export. A comment on a line of
    its own and quotes are still one expression."""
    store = local_demo
    keys = [
        key for (key,) in views.connect(store).sql("SELECT key FROM pairs ORDER BY key LIMIT 3").fetchall()
    ]
    store.write_bytes("lists/three.txt", "\n".join(keys).encode())
    for where in ("true) OR (true", "true) --", "true); SELECT 1 AS key; --"):
        with pytest.raises(ValueError, match=r"export 'three': its where is not one SQL expression"):
            write_export(store, ExportSettings("three", where=where, keys_file="lists/three.txt"))
        assert not store.exists(Export("three").manifest)
    where = "-- the listed ones\ncaption != 'it''s'"
    write_export(store, ExportSettings("three", where=where, keys_file="lists/three.txt"))
    assert sorted(key for key, _ in _export_samples(store, "three")) == keys


def test_a_keys_file_chooses_the_samples(local_demo):
    store = local_demo
    pairs = views.connect(store).sql("SELECT key FROM pairs ORDER BY key").fetchall()
    chosen = [key for (key,) in pairs[::3]]
    store.write_bytes("lists/chosen.txt", ("\n".join(chosen) + "\n").encode())
    store.write_parquet("lists/chosen.parquet", pa.table({"key": chosen[:4]}))
    write_export(store, ExportSettings("listed", keys_file="lists/chosen.txt"))
    assert sorted(key for key, _ in _export_samples(store, "listed")) == sorted(chosen)
    write_export(store, ExportSettings("listed4", keys_file="lists/chosen.parquet", where="similarity > 0"))
    assert sorted(key for key, _ in _export_samples(store, "listed4")) == sorted(chosen[:4])


def test_a_keys_file_that_changed_is_a_change_of_the_export_settings(local_demo):
    """Other keys in the same keys file make another subset, as another `where` does: the export refuses
    to grow, naming the file, until it is rebuilt on request. It kept the old keys' samples and took none
    of the new ones, without a word."""
    store = local_demo
    keys = [key for (key,) in views.connect(store).sql("SELECT key FROM pairs ORDER BY key").fetchall()]
    store.write_bytes("lists/chosen.txt", "\n".join(keys[:10]).encode())
    settings = ExportSettings("listed", keys_file="lists/chosen.txt")
    write_export(store, settings)
    assert write_export(store, settings).shards_added == []  # the same keys: nothing to do
    store.write_bytes("lists/chosen.txt", "\n".join(keys[10:30]).encode())
    with pytest.raises(SettingsChanged, match=r"keys_file lists/chosen.txt lists other keys.*reshuffle"):
        write_export(store, settings)
    write_export(store, settings, reshuffle=True)
    assert sorted(key for key, _ in _export_samples(store, "listed")) == keys[10:30]


def test_the_asset_writes_the_exports_of_the_dataset_settings_and_shows_them(local_demo):
    store = local_demo
    resources = {"store": DatasetStoreResource(root=store.root)}
    config = {"exports": [{"name": "web", "shard_size": 10}, {"name": "recap", "caption": "re_caption"}]}
    result = dg.materialize(
        [training_shards],
        resources=resources,
        run_config={"ops": {names.TRAINING_SHARDS_ASSET: {"config": config}}},
    )
    metadata = result.asset_materializations_for_node(names.TRAINING_SHARDS_ASSET)[0].metadata
    total = sum(read_manifest(store, Export(name))["samples"] for name in ("web", "recap"))
    assert metadata["dagster/row_count"].value == total
    table = metadata["exports"].value
    assert re.search(r"\| web \| caption \| \d+ \| \d+ \|", table) and "| recap | re_caption |" in table
    assert "SELECT * FROM annotated_pairs WHERE true" in table
    section = load_settings(store).section(names.TRAINING_SHARDS_ASSET)
    assert [export["name"] for export in section["exports"]] == [
        "web",
        "recap",
    ] and "reshuffle" not in section
    # a later run without config uses the dataset's settings; reshuffle is for one run, and names exports
    assert dg.materialize([training_shards], resources=resources).success
    bad = {"ops": {names.TRAINING_SHARDS_ASSET: {"config": {"reshuffle": ["nope"]}}}}
    failed = dg.materialize([training_shards], resources=resources, run_config=bad, raise_on_error=False)
    assert not failed.success and "reshuffle names exports the settings do not have: nope" in str(
        failed.get_step_failure_events()[0].event_specific_data.error
    )


def test_the_asset_and_a_removal_count_the_same_exports(local_demo):
    """An export the settings no longer name stays under exports/, and removals, the catalog and the card
    still count it: the asset's materialisation counts it too. It counted only the exports of its run's
    settings (48 samples) while a removal's observation counted every stored one (94), so the UI's row
    count of `training_shards` swung between the two."""
    store = local_demo
    resources = {"store": DatasetStoreResource(root=store.root)}
    config = {"exports": [{"name": "web", "shard_size": 10}, {"name": "recap", "caption": "re_caption"}]}
    dg.materialize(
        [training_shards],
        resources=resources,
        run_config={"ops": {names.TRAINING_SHARDS_ASSET: {"config": config}}},
    )
    settings = load_settings(store)
    write_settings(
        store, settings.with_sections({names.TRAINING_SHARDS_ASSET: {"exports": config["exports"][:1]}})
    )
    key = sorted(key for key, _ in _export_samples(store, "recap"))[0]
    removal = remove_keys(
        store, pa.table({"key": [key], "list": ["l"], "kind": ["url"], "entry": ["a"]}), schemas.TAKEN_DOWN
    )
    observed = rewritten_exports(store, removal, "a takedown")[0].metadata
    result = dg.materialize([training_shards], resources=resources)
    metadata = result.asset_materializations_for_node(names.TRAINING_SHARDS_ASSET)[0].metadata
    stored = sum(read_manifest(store, Export(name))["samples"] for name in ("web", "recap"))
    assert metadata["dagster/row_count"].value == observed["dagster/row_count"].value == stored
    assert (
        metadata["exports"].value == observed["exports"].value
        and "| recap | re_caption |" in observed["exports"].value
    )


def test_an_export_reads_with_webdataset_and_hugging_face_datasets(local_demo, tmp_path, monkeypatch):
    store = local_demo
    write_export(store, RECAP)
    manifest = read_manifest(store, Export("recap"))
    tars = [store.path(Export("recap").tar(shard["shard"])) for shard in manifest["shards"]]
    expected = {key: members["txt"].decode() for key, members in _export_samples(store, "recap")}
    read = {
        sample["__key__"]: sample["txt"].decode()
        for sample in webdataset.WebDataset(tars, shardshuffle=False)
    }
    assert read == expected
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import datasets

    # `datasets` infers the json's types from a shard's first 5 samples: a column null in those (license,
    # re_caption_error) then fails on the first sample that has a value. The parquet beside each tar has
    # the json's exact schema, which gives the features (docs/stages/exports.md shows this).
    json_schema = store.read_parquet(Export("recap").parquet("00000")).schema.remove_metadata()
    features = datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            "jpg": datasets.Image(),
            "txt": datasets.Value("string"),
            "json": datasets.Features.from_arrow_schema(json_schema),
        }
    )
    loaded = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", features=features)
    assert loaded.num_rows == manifest["samples"]
    assert {row["__key__"]: row["txt"] for row in loaded} == expected
    first = loaded[0]
    assert first["jpg"].size[0] > 0 and first["json"]["re_caption"] == first["txt"]


# open_clip's trainer supports webdataset <= 0.2.86 only (1.x groups samples differently); the project
# and its tests use webdataset 1.x. So the trainer runs with that release installed in a folder of its own
# (pip install --target, from this file), put first on its PYTHONPATH: the venv's torch, open_clip and
# pandas, and the old webdataset, for that process only.
TRAINER_REQUIREMENTS = Path(__file__).parent / "open_clip_train-requirements.txt"
TRAINER_PROBE = Path(__file__).parent / "trainer_probe"


@pytest.fixture(scope="session")
def trainer_site() -> Path:
    site = Path(sys.prefix) / "open_clip_train-site"
    stamp = site / ".requirements"
    if not stamp.exists() or stamp.read_text() != TRAINER_REQUIREMENTS.read_text():
        shutil.rmtree(site, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(site),
                "-r",
                str(TRAINER_REQUIREMENTS),
            ],
            check=True,
        )
        stamp.write_text(TRAINER_REQUIREMENTS.read_text())
    return site


def test_open_clip_train_trains_on_an_export_of_recaptions(local_demo, trainer_site, tmp_path):
    """`python -m open_clip_train.main`, unmodified, one epoch of a tiny CLIP on an export whose txt is
    `re_caption`: every sample read once, every step's loss finite. The probe only records the keys of
    the samples its data pipeline reads."""
    store = local_demo
    chosen = (
        views.connect(store)
        .sql("SELECT key FROM annotated_pairs WHERE re_caption IS NOT NULL ORDER BY key LIMIT 48")
        .fetchall()
    )
    assert len(chosen) == 48  # three full batches: with fewer, the trainer reads some samples twice
    store.write_bytes("lists/train.txt", "\n".join(key for (key,) in chosen).encode())
    write_export(
        store, ExportSettings("recap48", keys_file="lists/train.txt", caption="re_caption", shard_size=20)
    )
    export = Export("recap48")
    tiny = json.loads(
        (Path(views.__file__).parents[1] / "embeddings/model_configs/laion-assets-tiny.json").read_text()
    )
    model = tmp_path / "tiny-clip"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny, "preprocess_cfg": {}}))
    probe = tmp_path / "keys.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(trainer_site), str(TRAINER_PROBE)]),
        "TRAINER_PROBE_KEYS": str(probe),
        "HF_HUB_OFFLINE": "1",
    }
    version = subprocess.run(
        [sys.executable, "-c", "import webdataset, pandas; print(webdataset.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "0.2.86"
    shards = len(read_manifest(store, export)["shards"])
    command = [
        sys.executable, "-m", "open_clip_train.main",
        "--train-data", store.path(f"{export.folder}/{{00000..{shards - 1:05d}}}.tar"),
        "--dataset-type", "webdataset", "--model", f"local-dir:{model}",
        "--batch-size", "16", "--epochs", "1", "--workers", "0", "--precision", "fp32", "--lr", "1e-3",
        "--warmup", "1", "--seed", "0", "--log-every-n-steps", "1", "--save-frequency", "0",
        "--report-to", "", "--logs", str(tmp_path / "logs"), "--name", "recap48",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = (tmp_path / "logs" / "recap48" / "out.log").read_text()
    losses = [float(x) for x in re.findall(r" Loss: ([-\d.naif]+) ", log)]
    assert len(losses) == 3 and all(np.isfinite(losses))  # 48 samples, batches of 16: three steps
    assert "[48/48 (100%)]" in log
    seen = probe.read_text().split()
    assert sorted(seen) == sorted(key for (key,) in chosen)  # every sample, once
