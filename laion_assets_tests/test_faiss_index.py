"""The approximate search index: built past the threshold, searched with exact order, reused on rebuild."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.clip import ModelIdentity
from laion_assets.pipeline.search.faiss_index import read_build
from laion_assets.pipeline.search.index import ApproximateSearchIndex, SearchIndex, write_search_index
from laion_assets.pipeline.storage import EMBEDDINGS, PAIRS, SEARCH_INDEX_APPROXIMATE, DatasetStore

DIM = 64
FILES = ("index.faiss", "rows.arrow", "trained.faiss", "vectors.npy")
MODEL = ModelIdentity("laion-assets-tiny", "random:seed=0", "none")
CENTRES = np.random.default_rng(0).standard_normal((40, DIM)).astype(np.float32)


def _vectors(seed: int, rows: int) -> np.ndarray:
    """Clustered unit vectors: 40 centres and noise, like embeddings of related images."""
    rng = np.random.default_rng(seed)
    vectors = CENTRES[rng.integers(0, len(CENTRES), rows)] + rng.standard_normal((rows, DIM), np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _write_shard(store: DatasetStore, shard: str, rows: int, model: ModelIdentity = MODEL) -> None:
    """A shard's pairs (the columns the index reads) and its embeddings, in the contract's schemas."""
    keys = [f"{shard}-{i:08d}" for i in range(rows)]
    store.write_parquet(
        PAIRS.parquet(shard),
        pa.table(
            {
                "key": keys,
                "url": [f"http://x/{k}.jpg" for k in keys],
                "caption": [f"caption {k}" for k in keys],
            }
        ),
    )
    vectors = _vectors(sum(map(ord, shard)), rows).astype(np.float16)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)
    embeddings = pa.Table.from_arrays(
        [pa.array(keys), column, column, pa.array(np.zeros(rows, np.float32))], schema=schemas.embeddings(DIM)
    )
    store.write_parquet(EMBEDDINGS.parquet(shard), embeddings, metadata=model.footer())


def _recall(index: SearchIndex, exact: SearchIndex, queries: np.ndarray, k: int = 10) -> float:
    found = 0
    for query in queries:
        got = [h.key for h in index.search(query, k)]
        want = {h.key for h in exact.search(query, k)}
        found += len(want.intersection(got))
    return found / (k * len(queries))


def _exact(store: DatasetStore) -> SearchIndex:
    """The exact index over the same file, as the reference."""
    table = store.read_parquet("search_index/index.parquet")
    vectors = table.column("image_embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return SearchIndex(table, vectors.astype(np.float32).reshape(-1, DIM), None)


def test_a_large_dataset_is_searched_approximately_with_exact_order_and_rebuilt_without_training(store):
    for shard in ("a", "b", "c"):
        _write_shard(store, shard, 1500)
    built = write_search_index(store, approximate_from_rows=4000)
    assert built.rows == 4500 and built.approximate is not None and built.approximate.trained
    assert built.approximate.factory == "IVF64,PQ16x4fs" and built.approximate.trained_rows == 4500

    index = SearchIndex.load(store)
    assert isinstance(index, ApproximateSearchIndex) and len(index) == 4500 and index.dim == DIM
    assert index.model == MODEL
    exact = _exact(store)
    queries = _vectors(99, 50)
    assert _recall(index, exact, queries) >= 0.95
    # the hits carry their exact cosine, best first, and each stored vector finds its own row
    hits = index.search(queries[0], 10)
    by_key = {h.key: h.similarity for h in exact.search(queries[0], len(exact))}
    for hit in hits:  # the approximate side keeps its normalised vectors as float16: 3 digits
        assert hit.similarity == pytest.approx(by_key[hit.key], abs=1e-3)
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    row = exact.rows.slice(1234, 1).to_pylist()[0]
    assert index.search(exact.vectors[1234], 1)[0].key == row["key"]

    # a new shard: the vectors are added to the trained index, nothing is trained
    _write_shard(store, "d", 1500)
    again = write_search_index(store, approximate_from_rows=4000)
    assert again.approximate is not None and not again.approximate.trained
    assert again.approximate.trained_rows == 4500 and again.approximate.rows == 6000
    assert again.approximate.build != built.approximate.build
    assert not store.exists(f"search_index/{built.approximate.build}")  # the old build is gone
    reloaded = SearchIndex.load(store)
    assert len(reloaded) == 6000 and _recall(reloaded, _exact(store), queries) >= 0.95

    # asked to, it trains anew; below the threshold the approximate index goes and search is exact
    assert write_search_index(store, approximate_from_rows=4000, retrain=True).approximate.trained
    assert write_search_index(store, approximate_from_rows=10_000).approximate is None
    assert not store.exists(SEARCH_INDEX_APPROXIMATE) and read_build(store) is None
    assert not [f for f in store.fs.ls(store.path("search_index")) if "approximate-" in f]
    assert type(SearchIndex.load(store)) is SearchIndex


def test_a_dataset_that_outgrew_its_lists_or_changed_model_is_trained_again(local_root):
    store = DatasetStore(local_root)
    _write_shard(store, "a", 1200)
    assert write_search_index(store, approximate_from_rows=1000).approximate.trained
    for shard in ("b", "c", "d"):
        _write_shard(store, shard, 1200)
    assert not write_search_index(store, approximate_from_rows=1000).approximate.trained  # 4 times: reused
    _write_shard(store, "e", 1200)
    grown = write_search_index(store, approximate_from_rows=1000).approximate
    assert grown.trained and grown.trained_rows == 6000  # more than 4 times its training rows: retrained

    other = ModelIdentity("ViT-B-32", "random:seed=0", "none")
    for shard in ("a", "b", "c", "d", "e"):
        _write_shard(store, shard, 1200, model=other)
    changed = write_search_index(store, approximate_from_rows=1000).approximate
    assert changed.trained and ModelIdentity.from_footer(changed.model) == other


def test_the_service_answers_search_from_the_approximate_index(local_root):
    from laion_assets.pipeline.embeddings.clip import ClipEncoder
    from laion_assets.service.app import ServiceSettings, create_app
    from laion_assets_tests.dagster_helpers import TINY_CLIP
    from laion_assets_tests.service_process import running
    from laion_assets_tests.test_service import Client

    encoder = ClipEncoder(TINY_CLIP)
    store = DatasetStore(local_root)
    for shard in ("a", "b"):
        _write_shard(store, shard, 700, model=encoder.identity)
    build = write_search_index(store, approximate_from_rows=1000).approximate
    exact = _exact(store)
    query = encoder.encode_texts(["a red circle"]).numpy()[0]
    with running(create_app(ServiceSettings(root=local_root), encoder)) as url:
        client = Client(url, key=None)
        info = client.ok("/info", method="GET")
        assert (info["search_index_rows"], info["search_index_kind"]) == (1400, build.factory)
        results = client.ok("/search", {"text": "a red circle", "top_k": 10})["results"]
    # every list is probed at this size, so the candidates hold the exact top ten, in exact order
    assert [r["key"] for r in results] == [h.key for h in exact.search(query, 10)]
    assert all(r["url"] == f"http://x/{r['key']}.jpg" for r in results)


def test_a_build_killed_while_adding_leaves_nothing_a_rerun_does_not_remove(local_root, tmp_path):
    """The FAISS build went through a local temporary folder (trained.faiss, index.faiss: D / 8 + 8 bytes a
    row) that a SIGKILL left in the system's temp folder for good; the index files now go to the store."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store = DatasetStore(local_root)
    for shard in ("a", "b", "c"):
        _write_shard(store, shard, 1500)
    temp = tmp_path / "temp"
    temp.mkdir()
    build = (
        "import sys; from laion_assets.pipeline.search.index import write_search_index; "
        "from laion_assets.pipeline.storage import DatasetStore; "
        "write_search_index(DatasetStore(sys.argv[1]), approximate_from_rows=4000)"
    )
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", build, local_root], env=env)
    folder = Path(store.path("search_index"))
    while not list(folder.glob("approximate-*")):  # trained: its vectors are being added
        assert process.poll() is None, "the build ended before it was killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(temp.iterdir())

    store.remove_abandoned()
    built = write_search_index(store, approximate_from_rows=4000).approximate
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert names == sorted(
        ["approximate.json", "index.parquet", built.build, *(f"{built.build}/{n}" for n in FILES)]
    )
    assert len(SearchIndex.load(store)) == 4500


def test_an_s3_index_cache_keeps_only_the_current_build(s3_root, tmp_path):
    """A service on an S3 root copies each build into its cache folder: the copies of earlier builds (a
    whole vectors.npy each) and one a SIGKILLed service left half-made stayed there for good."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    store = DatasetStore(s3_root)
    cache = tmp_path / "cache"
    for shard in ("a", "b"):
        _write_shard(store, shard, 700)
    first = write_search_index(store, approximate_from_rows=1000).approximate
    assert len(SearchIndex.load(store, cache)) == 1400
    _write_shard(store, "c", 700)
    second = write_search_index(store, approximate_from_rows=1000).approximate
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from laion_assets.pipeline.search import faiss_index
        from laion_assets.pipeline.search.index import SearchIndex
        from laion_assets.pipeline.storage import DatasetStore
        copy = faiss_index._copy_from_store
        def copy_then_stall(store, relpath, local):
            copy(store, relpath, local)
            print("copied", flush=True)
            time.sleep(600)
        faiss_index._copy_from_store = copy_then_stall
        SearchIndex.load(DatasetStore({s3_root!r}), Path({str(cache)!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    loader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert loader.stdout.readline().strip() == "copied"
    finally:
        loader.send_signal(signal.SIGKILL)
        loader.wait()
    copies = [path for path in cache.rglob("*") if path.is_dir()]
    assert any(path.name.startswith(f".{second.build}") for path in copies)  # the killed one's, half-made

    assert len(SearchIndex.load(store, cache)) == 2100
    builds = [path.name for path in cache.rglob("approximate-*") if path.is_dir()]
    assert builds == [second.build] and first.build != second.build
    assert not [path for path in cache.rglob(".*")]
