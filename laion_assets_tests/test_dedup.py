"""Dataset-level dedup on a demo world with planted copies: what it removes, against the truth."""

import pyarrow as pa
import pytest

from laion_assets.demo.score import score_duplicates
from laion_assets.demo.world import EXACT_COPIES, NEAR_COPIES, make_world
from laion_assets.pipeline import catalog
from laion_assets.pipeline.dedup import SEMANTIC, DedupSettings, deduplicate
from laion_assets.pipeline.storage import DUPLICATES, PAIRS, DatasetStore
from laion_assets_tests.demo_dataset import DEMO_IMAGES, DEMO_SHARDS, build_demo_dataset

COPIES = {**dict.fromkeys(EXACT_COPIES, 4), **dict.fromkeys(NEAR_COPIES, 3)}
# the demo model alone cannot tell a copy from a look-alike (README, "Dataset-level dedup"): its
# semantic matches are confirmed by the perceptual hash
DEMO_DEDUP = DedupSettings(eps=0.01, max_phash_distance=10, clusters=4)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_demo_dataset(str(tmp_path_factory.mktemp("planted")), copies=COPIES)


def pairs_rows(store: DatasetStore) -> list[tuple[str, str]]:
    return catalog.connect(store).sql("SELECT key, url FROM pairs").fetchall()


def test_planted_copies_are_found_and_removed(planted, tmp_path):
    import shutil

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
    print(score.line())
    assert score.exact_planted > 0 and score.near_planted > 0
    assert figures["exact_precision"] == figures["exact_recall"] == 1.0, score
    assert figures["near_precision"] >= 0.9 and figures["near_recall"] >= 0.9, score
    # the survivor is the smallest key of its group; semantic rows say how close they were
    assert all(kept < key for key, kept, _ in rows)
    semantic = removed.filter(pa.compute.equal(removed.column("kind"), SEMANTIC)).to_pylist()
    assert all(r["cosine"] >= 0.99 and r["phash_distance"] <= 10 for r in semantic)
    # gone from the pairs, every other pair there still
    after = pairs_rows(store)
    assert sorted(after) == sorted(
        row for row in before if row[0] not in set(removed.column("key").to_pylist())
    )
    funnel_removed = sum(
        __import__("json").loads(store.parquet_metadata(PAIRS.parquet(s))["laion_assets.funnel"])["removed"][
            "duplicate"
        ]
        for s in DEMO_SHARDS
    )
    assert funnel_removed == removed.num_rows

    # a second run over the same shards finds nothing new and writes nothing
    again = deduplicate(store, DEMO_DEDUP)
    assert again.shards == [] and again.duplicates.num_rows == 0
    assert store.read_parquet(DUPLICATES).equals(removed)
