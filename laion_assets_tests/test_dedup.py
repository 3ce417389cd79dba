"""Dataset-level dedup on a demo world with planted copies: what it removes, against the truth."""

import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from laion_assets.demo import DEMO_CHECKPOINT
from laion_assets.demo.run import DEMO_DEDUP_CONFIG
from laion_assets.demo.score import score_duplicates
from laion_assets.demo.world import EXACT_COPIES, NEAR_COPIES, make_world
from laion_assets.names import PAIRS_FUNNEL_FOOTER
from laion_assets.pipeline import schemas
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.dedup import deduplicate as dedup
from laion_assets.pipeline.dedup.deduplicate import (
    KINDS,
    NEAR_KINDS,
    PERCEPTUAL,
    SEMANTIC,
    DedupSettings,
    deduplicate,
)
from laion_assets.pipeline.embeddings.clip import ClipEncoder, ClipSettings, ModelMismatch
from laion_assets.pipeline.removal import DUPLICATE, TAKEN_DOWN, RemovedKeys, remove_keys
from laion_assets.pipeline.search.index import write_search_index
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import (
    DEDUP_CENTROIDS,
    DEDUP_MEMBERS,
    DEDUP_STAGED,
    DUPLICATES,
    PAIRS,
    SEARCH_INDEX,
    TAKEDOWNS,
    TAKEDOWNS_PENDING,
    DatasetStore,
)
from laion_assets.service.app import create_app
from laion_assets.service.settings import ServiceSettings
from laion_assets_tests.dagster_helpers import materialize_shard
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_IMAGES, DEMO_SHARDS, build_demo_dataset
from laion_assets_tests.service_process import running
from laion_assets_tests.test_service import Client

COPIES = {**dict.fromkeys(EXACT_COPIES, 4), **dict.fromkeys(NEAR_COPIES, 3)}
# the demo's settings (docs/dedup.md): the semantic kind takes what the model places
# closest, the perceptual kind copies it places a little further; 3 buckets put two of the 4 clusters in one
DEMO_DEDUP = DedupSettings(**DEMO_DEDUP_CONFIG, clusters=4, buckets=3)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_demo_dataset(str(tmp_path_factory.mktemp("planted")), copies=COPIES)


def pairs_rows(store: DatasetStore) -> list[tuple[str, str]]:
    return catalog.connect(store).sql("SELECT key, url FROM pairs").fetchall()


def test_planted_copies_are_found_and_removed(planted, tmp_path):
    root = shutil.copytree(planted, tmp_path / "root")
    store = DatasetStore(str(root))
    before = pairs_rows(store)
    result = deduplicate(store, DEMO_DEDUP)
    assert result.shards == list(DEMO_SHARDS) and result.centroids.startswith("trained on")
    removed = store.read_parquet(DUPLICATES)
    assert removed.num_rows == result.duplicates.num_rows > 0
    rows = list(zip(*(removed.column(c).to_pylist() for c in ("key", "duplicate_of", "kind")), strict=True))
    score = score_duplicates(make_world(images=DEMO_IMAGES, failures={}, copies=COPIES), before, rows)
    figures = score.figures()
    assert score.exact_planted > 0 and score.near_planted > 0
    assert figures["exact_precision"] == figures["exact_recall"] == 1.0, score
    assert figures["near_precision"] >= 0.9 and figures["near_recall"] >= 0.9, score
    # the survivor is the smallest key of its group; semantic rows say how close they were
    assert all(kept < key for key, kept, _ in rows)
    near = removed.filter(pa.compute.is_in(removed.column("kind"), pa.array(NEAR_KINDS))).to_pylist()
    assert {r["kind"] for r in near} == set(NEAR_KINDS)  # each kind finds some the other does not
    assert all(r["cosine"] >= 1 - DEMO_DEDUP.eps for r in near if r["kind"] == SEMANTIC)
    assert all(
        r["cosine"] < 1 - DEMO_DEDUP.eps
        and r["cosine"] >= 1 - DEMO_DEDUP.perceptual_eps
        and r["phash_distance"] <= DEMO_DEDUP.max_phash_distance
        for r in near
        if r["kind"] == PERCEPTUAL
    )
    # gone from the pairs, every other pair there still
    after = pairs_rows(store)
    gone = set(removed.column("key").to_pylist())
    assert sorted(after) == sorted(row for row in before if row[0] not in gone)
    in_tars = {key for shard in DEMO_SHARDS for key, _ in read_samples(store.open(PAIRS.tar(shard)))}
    assert in_tars == {key for key, _ in after}
    funnels = [json.loads(store.parquet_metadata(PAIRS.parquet(s))[PAIRS_FUNNEL_FOOTER]) for s in DEMO_SHARDS]
    assert sum(funnel["removed"][DUPLICATE] for funnel in funnels) == removed.num_rows

    # a service filters them out before the search index is rebuilt, and the rebuilt one holds none
    assert RemovedKeys(store).current() == gone
    stale = set(store.read_parquet(SEARCH_INDEX, columns=["key"]).column("key").to_pylist())
    assert gone <= stale
    with running(create_app(ServiceSettings(root=store.root), ClipEncoder(DEMO_CLIP))) as url:
        hits = Client(url, key=None).ok("/search", {"text": "a photo", "top_k": len(stale)})["results"]
    assert {hit["key"] for hit in hits} == stale - gone
    write_search_index(store, approximate_from_rows=10**9, retrain=False)
    indexed = set(store.read_parquet(SEARCH_INDEX, columns=["key"]).column("key").to_pylist())
    assert indexed == {key for key, _ in after}

    # a second run over the same shards finds nothing new and writes nothing
    again = deduplicate(store, DEMO_DEDUP)
    assert again.shards == [] and again.duplicates.num_rows == 0
    assert store.read_parquet(DUPLICATES).equals(removed)


def found(table: pa.Table) -> set[tuple[str, str, str]]:
    return set(zip(*(table.column(c).to_pylist() for c in ("key", "duplicate_of", "kind")), strict=True))


def hold_back(root: Path, shard: str) -> Path:
    """Move the shard's pairs out of the dataset, as if it had not been built yet."""
    later = root.parent / f"{root.name}-later"
    later.mkdir()
    for suffix in (".parquet", ".tar"):
        shutil.move(root / PAIRS.name / f"{shard}{suffix}", later)
    return later


def bring_back(later: Path, root: Path) -> None:
    for name in later.iterdir():
        shutil.move(name, root / PAIRS.name)


def test_a_new_shard_is_checked_against_the_stored_state_as_a_full_run_would(planted, tmp_path):
    whole = DatasetStore(str(shutil.copytree(planted, tmp_path / "whole")))
    at_once = found(deduplicate(whole, DEMO_DEDUP).duplicates)

    root = shutil.copytree(planted, tmp_path / "incremental")
    later = hold_back(root, DEMO_SHARDS[1])
    store = DatasetStore(str(root))
    first = deduplicate(store, DEMO_DEDUP)
    assert first.shards == [DEMO_SHARDS[0]] and first.centroids.startswith("trained on")
    bring_back(later, root)
    # the buckets, like the clusters, are fixed when the centroids are trained: another count asked
    # for later changes nothing
    second = deduplicate(store, replace(DEMO_DEDUP, buckets=2))
    assert second.shards == [DEMO_SHARDS[1]] and second.centroids.startswith("reused")
    assert store.parquet_metadata(DEDUP_CENTROIDS)["buckets"] == "3"
    # only the new shard lost pairs; together the two runs found what one run over both finds
    assert {schemas.shard_of_key(key) for key, _, _ in found(second.duplicates)} == {DEMO_SHARDS[1]}
    assert second.removal.shards == [DEMO_SHARDS[1]]
    assert found(first.duplicates) | found(second.duplicates) == at_once
    assert found(store.read_parquet(DUPLICATES)) == at_once
    # a run with no new shard (the automation's after a takedown) leaves the centroids alone, and says so
    # (the UI shows these): not "off" with 0 clusters, as if near-copy dedup were turned off
    idle = deduplicate(store, DEMO_DEDUP)
    assert idle.shards == [] and idle.centroids.startswith("not needed: no new vectors (stored: trained")
    assert (idle.clusters, idle.buckets) == (second.clusters, 3)

    # a shard rebuilt since (filtered_pairs materialised again) has its duplicates back: checked again
    for suffix in (".parquet", ".tar"):
        shutil.copy(Path(planted) / PAIRS.name / f"{DEMO_SHARDS[1]}{suffix}", root / PAIRS.name)
    rebuilt = deduplicate(store, DEMO_DEDUP)
    assert rebuilt.shards == [DEMO_SHARDS[1]] and found(rebuilt.duplicates) == found(second.duplicates)
    assert found(store.read_parquet(DUPLICATES)) == at_once
    assert sorted(pairs_rows(store)) == sorted(pairs_rows(whole))


def _one_shard_checked(planted: Path, tmp_path: Path) -> tuple[Path, Path, DatasetStore, list[str]]:
    """A copy of the planted dataset whose first shard is held back and whose second dedup has checked:
    its root, where the first shard waits, its store, and the second shard's pair keys."""
    root = shutil.copytree(planted, tmp_path / "dataset")
    later = hold_back(root, DEMO_SHARDS[0])
    store = DatasetStore(str(root))
    assert deduplicate(store, DEMO_DEDUP).shards == [DEMO_SHARDS[1]]
    kept = sorted(
        store.read_parquet(PAIRS.parquet(DEMO_SHARDS[1]), columns=["key"]).column("key").to_pylist()
    )
    return root, later, store, kept


def _only_the_new_shard_is_checked(root: Path, later: Path, store: DatasetStore, kept: list[str]) -> None:
    """The first shard back and dedup again: only it is checked, and the second keeps what it kept but its
    last key, taken down."""
    bring_back(later, root)
    second = deduplicate(store, DEMO_DEDUP)
    assert second.shards == [DEMO_SHARDS[0]]
    assert {schemas.shard_of_key(key) for key in second.duplicates.column("key").to_pylist()} == {
        DEMO_SHARDS[0]
    }
    now = store.read_parquet(PAIRS.parquet(DEMO_SHARDS[1]), columns=["key"]).column("key").to_pylist()
    assert sorted(now) == kept[:-1]


def test_a_takedown_does_not_make_the_next_run_remove_pairs_an_earlier_run_kept(planted, tmp_path):
    """A pair kept by an earlier run is never removed for a newer copy (docs/dedup.md). A takedown
    rewrites the pairs file of a checked shard; dedup took that file for a rebuilt one, forgot what it had
    kept there and checked it again as new, and the next run, over a shard added since, removed pairs
    of it that the first run had kept (the smallest key wins among new pairs). A removal's rewrite now
    stays checked."""
    root, later, store, kept = _one_shard_checked(planted, tmp_path)
    taken = pa.table({"key": [kept[-1]], "list": ["list.txt"], "kind": ["url"], "entry": ["e"]})
    remove_keys(store, taken, TAKEN_DOWN)
    _only_the_new_shard_is_checked(root, later, store, kept)


# A takedown of one key of `shard` that SIGKILLs its own process once the shard's pairs file is rewritten,
# before anything after it (the other layers, dedup's record of what it checked, the ledger).
_TAKEDOWN_KILLED_AFTER_PAIRS = """
import contextlib, os, signal, sys
import pyarrow as pa
from laion_assets.pipeline.removal import TAKEN_DOWN, remove_keys
from laion_assets.pipeline.storage import PAIRS, DatasetStore
root, shard, key = sys.argv[1:]
atomic_write = DatasetStore.atomic_write

@contextlib.contextmanager
def killed_after_pairs(self, relpath):
    with atomic_write(self, relpath) as f:
        yield f
    if relpath == PAIRS.parquet(shard):
        os.kill(os.getpid(), signal.SIGKILL)

DatasetStore.atomic_write = killed_after_pairs
taken = pa.table({"key": [key], "list": ["l"], "kind": ["url"], "entry": ["e"]})
remove_keys(DatasetStore(root), taken, TAKEN_DOWN)
"""


def test_a_takedown_killed_after_a_checked_shards_pairs_keeps_them_checked(planted, tmp_path):
    """The takedown of the test above SIGKILLed right after it rewrote the checked shard's pairs: the next
    dedup run completes it first, and then checks only the new shard and keeps what the first run kept, as
    after an uninterrupted takedown. The completion found the pairs rewritten already and carried nothing
    over, so dedup took the shard for a rebuilt one and checked it again as new."""
    root, later, store, kept = _one_shard_checked(planted, tmp_path)
    ledgers = store.list(TAKEDOWNS)  # dedup's
    script = [sys.executable, "-c", _TAKEDOWN_KILLED_AFTER_PAIRS, store.root, DEMO_SHARDS[1], kept[-1]]
    assert subprocess.run(script, check=False).returncode == -signal.SIGKILL
    (pending,) = store.list(TAKEDOWNS_PENDING)
    assert store.list(TAKEDOWNS) == ledgers  # no ledger claims the takedown yet
    _only_the_new_shard_is_checked(root, later, store, kept)
    assert not store.list(TAKEDOWNS_PENDING) and pending.name in {f.name for f in store.list(TAKEDOWNS)}


def test_recorded_only_the_duplicates_stay_and_pairs_unique_leaves_them_out(planted, tmp_path):
    store = DatasetStore(str(shutil.copytree(planted, tmp_path / "root")))
    before = sorted(pairs_rows(store))
    files = {
        Path(store.path(PAIRS.parquet(s))): Path(store.path(PAIRS.parquet(s))).read_bytes()
        for s in DEMO_SHARDS
    }
    result = deduplicate(store, replace(DEMO_DEDUP, remove=False))
    assert result.duplicates.num_rows > 0 and result.removal.removed == 0
    assert all(path.read_bytes() == data for path, data in files.items())  # bytes unchanged
    connection = catalog.connect(store)
    assert sorted(pairs_rows(store)) == before
    unique = connection.sql("SELECT key FROM pairs_unique").fetchall()
    assert {key for (key,) in unique} == {key for key, _ in before} - set(
        result.duplicates.column("key").to_pylist()
    )
    assert connection.sql("SELECT count(*) FROM duplicates").fetchone()[0] == result.duplicates.num_rows


def test_the_card_says_what_dedup_removed(planted, tmp_path):
    from laion_assets.pipeline.card import CardSettings, write_card

    store = DatasetStore(str(shutil.copytree(planted, tmp_path / "root")))
    result = deduplicate(store, DEMO_DEDUP)
    card = write_card(store, CardSettings()).markdown
    section = card.split("## Duplicates", 1)[1].split("\n## ", 1)[0]
    for kind in KINDS:
        assert f"| {kind} | {result.by_kind[kind]} |" in section
    assert f"Semantic: a cosine of at least 1 - eps = {1 - DEMO_DEDUP.eps:g}" in section
    assert (
        f"at most {DEMO_DEDUP.max_phash_distance} bits apart, between images with a cosine of at least "
        f"1 - perceptual_eps = {1 - DEMO_DEDUP.perceptual_eps:g}" in section
    )
    near = sum(result.by_kind[kind] for kind in NEAR_KINDS)
    assert section.count("<img ") == 2 * min(4, near) > 0


def test_the_card_shows_no_near_copy_taken_down_since(planted, tmp_path):
    """A takedown after dedup of the pair a near copy repeats leaves its images row without url and
    caption: the card's examples joined it and failed on the missing url (AttributeError), so no card
    could be made until the duplicates were found again. A taken-down image is not shown at all."""
    from laion_assets.pipeline.card import CardSettings, write_card

    store = DatasetStore(str(shutil.copytree(planted, tmp_path / "root")))
    result = deduplicate(store, DEMO_DEDUP)
    taken = next(r["duplicate_of"] for r in result.duplicates.to_pylist() if r["kind"] in NEAR_KINDS)
    (url,) = catalog.connect(store).sql("SELECT url FROM images WHERE key = ?", params=[taken]).fetchone()
    remove_keys(store, pa.table({"key": [taken], "list": ["l"], "kind": ["url"], "entry": ["e"]}), TAKEN_DOWN)
    section = write_card(store, CardSettings()).markdown.split("## Duplicates", 1)[1].split("\n## ", 1)[0]
    assert url not in section


def test_centroids_sized_for_a_small_first_run_are_trained_again_once_the_pairs_have_grown(planted, tmp_path):
    settings = replace(DEMO_DEDUP, clusters=0, buckets=0, regrow=1.5)
    root = shutil.copytree(planted, tmp_path / "root")
    later = hold_back(root, DEMO_SHARDS[1])
    store = DatasetStore(str(root))
    first = deduplicate(store, settings)
    assert first.centroids.endswith("(first run)")
    sized_for = int(store.parquet_metadata(DEDUP_CENTROIDS)["sized_for"])
    assert first.clusters == round(math.sqrt(sized_for))
    bring_back(later, root)
    second = deduplicate(store, settings)
    survivors = {key for key, _ in pairs_rows(store)}
    assert second.centroids.endswith(
        f"(the pairs grew from {sized_for} to {len(survivors) + sum(second.by_kind[k] for k in NEAR_KINDS)})"
    )
    assert second.clusters > first.clusters
    # every survivor of both runs is in the bucket of its new cluster, once
    members = [
        (path.parent.name, row["key"], row["cluster"])
        for path in sorted(Path(store.path(DEDUP_MEMBERS)).glob("*/*.parquet"))
        for row in pq.read_table(path, columns=["key", "cluster"]).to_pylist()
    ]
    assert sorted(key for _, key, _ in members) == sorted(survivors)
    assert all(
        int(bucket) == cluster % second.buckets and cluster < second.clusters
        for bucket, _, cluster in members
    )


def member_keys(store: DatasetStore) -> list[str]:
    return sorted(
        key
        for path in Path(store.path(DEDUP_MEMBERS)).glob("*/*.parquet")
        for key in pq.read_table(path, columns=["key"]).column("key").to_pylist()
    )


@pytest.mark.parametrize(
    ("step", "stop_at", "after"),
    [("_dedup_bucket", 2, False), ("remove_keys", 1, True)],
    ids=["between-buckets", "after-removal"],
)
def test_a_run_that_stopped_part_way_leaves_nothing_the_next_run_trusts(
    planted, tmp_path, monkeypatch, step, stop_at, after
):
    """The process dies (here: a step raises) after part of the state is written but before the shards
    are recorded as done; the next run gives what one clean run gives."""
    whole = DatasetStore(str(shutil.copytree(planted, tmp_path / "whole")))
    at_once = found(deduplicate(whole, DEMO_DEDUP).duplicates)
    store = DatasetStore(str(shutil.copytree(planted, tmp_path / "root")))
    real = getattr(dedup, step)
    calls = []

    def stops(*args, **kwargs):
        calls.append(step)
        if len(calls) < stop_at:
            return real(*args, **kwargs)
        if after:
            real(*args, **kwargs)
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(dedup, step, stops)
    with pytest.raises(RuntimeError, match="went away"):
        deduplicate(store, DEMO_DEDUP)
    monkeypatch.undo()
    again = deduplicate(store, DEMO_DEDUP)
    assert again.shards == list(DEMO_SHARDS)
    recorded = store.read_parquet(DUPLICATES)
    assert found(recorded) == at_once and recorded.num_rows == len(at_once)
    assert sorted(pairs_rows(store)) == sorted(pairs_rows(whole))
    assert member_keys(store) == sorted(key for key, _ in pairs_rows(store))
    assert not list(Path(store.path(DEDUP_STAGED)).glob("*"))


@pytest.mark.parametrize("moment", ["before-the-removal", "after-the-removal"])
def test_a_shard_rebuilt_while_a_run_checks_it_is_checked_again(planted, tmp_path, monkeypatch, moment):
    """filtered_pairs writes the shard again (its duplicates back) while a dedup run is between reading
    it and recording it as checked: the rebuilt file is not the one checked, so the next run checks it."""
    whole = DatasetStore(str(shutil.copytree(planted, tmp_path / "whole")))
    deduplicate(whole, DEMO_DEDUP)
    root = shutil.copytree(planted, tmp_path / "root")
    store = DatasetStore(str(root))
    rebuilt = DEMO_SHARDS[1]
    deduplicate(store, DEMO_DEDUP)
    real = dedup.remove_keys

    def rebuild() -> None:  # filtered_pairs writes the shard again, its duplicates back
        store.write_parquet(
            PAIRS.parquet(rebuilt), pq.read_table(Path(planted) / PAIRS.name / f"{rebuilt}.parquet")
        )

    rebuild()  # the next run checks it

    def rebuilt_meanwhile(*args, **kwargs):
        if moment == "before-the-removal":
            rebuild()
        result = real(*args, **kwargs)
        if moment == "after-the-removal":
            rebuild()
        return result

    monkeypatch.setattr(dedup, "remove_keys", rebuilt_meanwhile)
    assert deduplicate(store, DEMO_DEDUP).shards == [rebuilt]
    monkeypatch.undo()
    assert deduplicate(store, DEMO_DEDUP).shards == [rebuilt]
    assert sorted(pairs_rows(store)) == sorted(pairs_rows(whole))


@pytest.mark.parametrize(
    ("step", "stop_at"), [("_reassign", 1), ("_write_members", 2)], ids=["trained", "reassigning"]
)
def test_a_run_that_stopped_while_training_again_leaves_nothing_the_next_run_trusts(
    planted, tmp_path, monkeypatch, step, stop_at
):
    """The pairs have grown, so the second run trains the centroids again and assigns the survivors to
    them; it dies once the new centroids are written, or after the first survivors' file is reassigned.
    The next run gives what the second would have given."""
    settings = replace(DEMO_DEDUP, clusters=0, regrow=1.5)

    def first_run(name: str) -> DatasetStore:
        root = shutil.copytree(planted, tmp_path / name)
        later = hold_back(root, DEMO_SHARDS[1])
        store = DatasetStore(str(root))
        deduplicate(store, settings)
        bring_back(later, root)
        return store

    clean = first_run("clean")
    assert "grew" in deduplicate(clean, settings).centroids
    store = first_run("root")
    real = getattr(dedup, step)
    calls = []

    def stops(*args, **kwargs):
        calls.append(step)
        if len(calls) >= stop_at:
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(dedup, step, stops)
    with pytest.raises(RuntimeError, match="went away"):
        deduplicate(store, settings)
    monkeypatch.undo()
    again = deduplicate(store, settings)
    assert again.shards == [DEMO_SHARDS[1]] and again.centroids.startswith("trained on")
    assert found(store.read_parquet(DUPLICATES)) == found(clean.read_parquet(DUPLICATES))
    assert sorted(pairs_rows(store)) == sorted(pairs_rows(clean))
    assert member_keys(store) == member_keys(clean) == sorted(key for key, _ in pairs_rows(store))
    # and a later run keeps finding the copies of the survivors of both
    assert deduplicate(store, settings).shards == []


def test_max_shards_checks_the_new_shards_over_several_runs_as_one_run_would(planted, tmp_path):
    whole = DatasetStore(str(shutil.copytree(planted, tmp_path / "whole")))
    at_once = found(deduplicate(whole, DEMO_DEDUP).duplicates)
    store = DatasetStore(str(shutil.copytree(planted, tmp_path / "root")))
    runs = [deduplicate(store, replace(DEMO_DEDUP, max_shards=1)) for _ in range(3)]
    assert [(run.shards, run.left) for run in runs] == [([DEMO_SHARDS[0]], 1), ([DEMO_SHARDS[1]], 0), ([], 0)]
    assert found(store.read_parquet(DUPLICATES)) == at_once
    assert sorted(pairs_rows(store)) == sorted(pairs_rows(whole))


def another_space(tmp_path: Path) -> ClipSettings:
    """The demo model with the outputs of both its projections permuted: as good a model (each image's
    cosine with its caption unchanged), whose embeddings lie in another space than the demo model's."""
    weights = torch.load(DEMO_CHECKPOINT, map_location="cpu")
    order = torch.randperm(weights["text_projection"].shape[1], generator=torch.Generator().manual_seed(1))
    for name in ("visual.proj", "text_projection"):
        weights[name] = weights[name][:, order]
    torch.save(weights, tmp_path / "permuted.pt")
    return replace(DEMO_CLIP, pretrained=str(tmp_path / "permuted.pt"))


def test_embeddings_of_another_model_are_never_compared_with_the_survivors(planted, tmp_path):
    """A shard embedded with another model than the state's survivors (the dataset's CLIP changed, the
    other shards not yet embedded again): its cosines with them mean nothing. The run refused nothing and
    missed every near copy across the two shards; it now refuses before writing anything, and once every
    shard is embedded with the new model, checks them all with centroids trained on it."""
    root = shutil.copytree(planted, tmp_path / "root")
    later = hold_back(root, DEMO_SHARDS[1])
    store = DatasetStore(str(root))
    assert deduplicate(store, DEMO_DEDUP).shards == [DEMO_SHARDS[0]]
    bring_back(later, root)
    other, instance = another_space(tmp_path), dg.DagsterInstance.ephemeral()
    embedded = ["clip_embeddings", "quality_scores", "filtered_pairs"]
    assert materialize_shard(instance, str(root), DEMO_SHARDS[1], selection=embedded, clip=other).success
    recorded, pairs = store.read_parquet(DUPLICATES), pairs_rows(store)
    with pytest.raises(
        ModelMismatch, match=rf"permuted\.pt: {DEMO_SHARDS[1]}; the shards checked before with "
    ):
        deduplicate(store, DEMO_DEDUP)
    assert store.read_parquet(DUPLICATES).equals(recorded) and sorted(pairs_rows(store)) == sorted(pairs)

    assert materialize_shard(instance, str(root), DEMO_SHARDS[0], selection=embedded, clip=other).success
    fresh = shutil.copytree(root, tmp_path / "fresh")
    shutil.rmtree(fresh / DUPLICATES.split("/")[0])
    at_once = deduplicate(DatasetStore(str(fresh)), DEMO_DEDUP)
    again = deduplicate(store, DEMO_DEDUP)
    assert again.shards == list(DEMO_SHARDS) and again.centroids.startswith("trained on")
    assert found(store.read_parquet(DUPLICATES)) == found(at_once.duplicates)
    assert {kind for _, _, kind in found(at_once.duplicates)} >= set(NEAR_KINDS)
