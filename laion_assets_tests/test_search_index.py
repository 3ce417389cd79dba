import json

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from laion_assets import names
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.defs.search import search_index
from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.clip import ModelIdentity, ModelMismatch
from laion_assets.pipeline.leases import SEARCH_INDEX_BUILD, shard_lease
from laion_assets.pipeline.removal import TAKEN_DOWN, RemovedKeys, remove_keys
from laion_assets.pipeline.search.index import IndexMissing, SearchIndex, write_search_index
from laion_assets.pipeline.storage import SEARCH_INDEX, DatasetStore
from laion_assets_tests.dagster_helpers import LOCAL_WEB, TINY_CLIP, materialize_shard

SHARDS = {"a": ["/img/red.jpg", "/img/green.png", "/404.jpg"], "b": ["/img/blue.webp", "/exif.jpg"]}


def _materialize(instance: dg.DagsterInstance, root: str, web, shard: str) -> None:
    """One shard through every per-shard asset; no threshold, so random weights keep every pair."""
    lines = [{"url": web.url(p), "caption": f"{p} in {shard}"} for p in SHARDS[shard]]
    DatasetStore(root).write_bytes(
        f"incoming/{shard}.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode()
    )
    config = {
        "ops": {
            "downloaded_images": {"config": LOCAL_WEB},
            "filtered_pairs": {"config": {"min_similarity": -1.0, "drop_minors": False}},
        }
    }
    assert materialize_shard(instance, root, shard, config).success


@pytest.fixture
def two_shards(root, web) -> DatasetStore:
    instance = dg.DagsterInstance.ephemeral()
    for shard in SHARDS:
        _materialize(instance, root, web, shard)
    return DatasetStore(root)


def test_index_holds_every_pair_with_its_image_embedding(two_shards):
    store = two_shards
    result = write_search_index(store)
    assert (result.rows, result.shards, result.missing_embeddings) == (4, 2, 0)  # the 404s are not pairs
    assert (result.model, result.pretrained, result.dim) == ("laion-assets-tiny", "none", 64)

    table = store.read_parquet(SEARCH_INDEX)
    assert table.schema.remove_metadata() == schemas.search_index(64)
    assert store.parquet_metadata(SEARCH_INDEX)[names.CLIP_MODEL_FOOTER] == "laion-assets-tiny"
    for shard in SHARDS:
        pairs = store.read_parquet(f"pairs/{shard}.parquet")
        embeddings = store.read_parquet(f"embeddings/{shard}.parquet")
        rows = table.filter(pc.starts_with(table.column("key"), f"{shard}-"))
        assert (
            rows.select(["key", "url", "caption"]).to_pylist()
            == pairs.select(["key", "url", "caption"]).to_pylist()
        )
        expected = dict(
            zip(
                embeddings.column("key").to_pylist(),
                embeddings.column("image_embedding").to_pylist(),
                strict=True,
            )
        )
        for key, vector in zip(
            rows.column("key").to_pylist(), rows.column("image_embedding").to_pylist(), strict=True
        ):
            assert vector == expected[key]

    index = SearchIndex.load(store)
    assert len(index) == 4 and index.dim == 64
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, rtol=1e-6)
    # each stored embedding finds its own row first, with cosine 1
    for key, vector in zip(
        table.column("key").to_pylist(), table.column("image_embedding").to_pylist(), strict=True
    ):
        query = np.asarray(vector, np.float32)
        hits = index.search(query / np.linalg.norm(query), k=10)
        assert len(hits) == 4 and hits[0].key == key and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)

    index.check_model(ModelIdentity("laion-assets-tiny", "random:seed=0", "none"))
    with pytest.raises(
        ModelMismatch, match="embedded with laion-assets-tiny / none, this service runs ViT-B-32"
    ):
        index.check_model(ModelIdentity("ViT-B-32", "random:seed=0", "none"))


def test_shards_of_different_models_are_refused(two_shards):
    store = two_shards
    path = "embeddings/b.parquet"
    store.write_parquet(path, store.read_parquet(path), metadata={names.CLIP_MODEL_FOOTER: "ViT-B-32"})
    with pytest.raises(ValueError, match=r"different models \(laion-assets-tiny/none: a; ViT-B-32/none: b\)"):
        write_search_index(store)
    assert not store.exists(SEARCH_INDEX)


def test_no_pairs_no_index(root):
    store = DatasetStore(root)
    with pytest.raises(ValueError, match=f"no materialised shards under {store.root}"):
        write_search_index(store)
    with pytest.raises(IndexMissing, match="materialise the search_index asset"):
        SearchIndex.load(store)


def test_asset_reports_the_index(local_root, web):
    instance = dg.DagsterInstance.ephemeral()
    _materialize(instance, local_root, web, "a")
    result = dg.materialize(
        [search_index], resources={"store": DatasetStoreResource(root=local_root)}, instance=instance
    )
    assert result.success
    metadata = result.asset_materializations_for_node("search_index")[0].metadata
    assert metadata["dagster/row_count"].value == 2 and metadata["shards"].value == 1
    assert metadata["model"].value == TINY_CLIP.model
    assert metadata["path"].value == DatasetStore(local_root).url(SEARCH_INDEX)


def test_a_build_while_another_run_builds_fails_and_leaves_the_index_alone(local_root, web):
    """Two builds at once removed each other's FAISS build folder, and approximate.json could name one of
    which only rows.arrow was left: the service could not load it. One build holds the index's lease."""
    instance = dg.DagsterInstance.ephemeral()
    resources = {"store": DatasetStoreResource(root=local_root)}
    store = DatasetStore(local_root)
    _materialize(instance, local_root, web, "a")
    assert dg.materialize([search_index], resources=resources, instance=instance).success
    _materialize(instance, local_root, web, "b")
    with shard_lease(store, SEARCH_INDEX_BUILD, "another-run"):
        blocked = dg.materialize([search_index], resources=resources, instance=instance, raise_on_error=False)
    assert not blocked.success
    assert "dataset.search_index is being written by run another-run" in str(
        blocked.get_step_failure_events()[0].event_specific_data.error
    )
    assert store.read_parquet(SEARCH_INDEX).num_rows == 2  # shard a's pairs, as before
    assert dg.materialize([search_index], resources=resources, instance=instance).success
    assert store.read_parquet(SEARCH_INDEX).num_rows == 4


def test_a_removal_committed_while_a_search_lists_the_ledgers_is_never_answered(local_root):
    """RemovedKeys listed takedowns/ and then takedowns/pending/: a removal committed between the two (its
    ledger written to the first, its pending one then removed from the second) was in neither, and a search
    of the index built before it answered with the removed pair."""
    from laion_assets_tests.test_faiss_index import _write_shard

    store = DatasetStore(local_root)
    _write_shard(store, "a", 20)
    write_search_index(store)
    index, removed = SearchIndex.load(store), RemovedKeys(store)
    assert removed.current() == frozenset()
    listing = store.list

    def list_then_remove(folder: str) -> list:
        found = listing(folder)
        if store.list is list_then_remove:  # a removal runs to its end between the two listings
            del store.list
            ledger = {"key": ["a-00000003"], "list": ["urls.txt"], "kind": ["url"], "entry": ["x"]}
            remove_keys(store, pa.table(ledger), TAKEN_DOWN)
        return found

    store.list = list_then_remove
    query = index.vectors[3]
    assert "a-00000003" not in {hit.key for hit in index.search(query, 5, removed.current())}
