"""Dataset-level dedup benchmark: `dedup.deduplicate` over generated shards of 512-d fp16 embeddings.

    .venv/bin/python bench/dedup.py [--rows 1000000] [--shard-rows 10000] [--clusters 0]

Writes, under bench/.work/dedup-<rows> (once), shards of `--shard-rows` pairs: `pairs/` (urls, captions,
sha256), `pairs_embeddings/` (the image embeddings, fp16) and `images/` (key and phash). The vectors are
drawn around 2,000 topic centres (the web's clusters of look-alike images), and 5 % of them are near
copies of an earlier vector (cosine about 0.995); 2 % of the rows repeat an earlier row's url and caption,
2 % its image sha256, in another shard. Then, each phase in a child process of its own, for its peak RSS
(and, sampled every 0.1 s, the highest RSS while in each step of `deduplicate`):

1. the peer: FAISS's exact range search, each of 5,000 random vectors against every vector before it,
   streamed shard by shard, the cosine threshold the same; how many of its near copies the clustered
   search finds is the latter's recall, and its time per comparison gives the brute-force time for
   every vector;
2. every shard but the last at once: the exact pass (DuckDB), the semantic pass (reading the vectors,
   training, assignment, within-cluster comparison), the removal of what they found;
3. the last shard, incrementally, against the stored state.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import resource
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
from smoke import parse_args

from laion_assets.pipeline import schemas
from laion_assets.pipeline.dedup.deduplicate import SEMANTIC, DedupSettings, deduplicate
from laion_assets.pipeline.storage import DUPLICATES, IMAGES, PAIRS, PAIRS_EMBEDDINGS, DatasetStore

WORK = Path(__file__).parent / ".work"
DIM = 512
TOPICS = 2_000
COPY_SHARE, URL_SHARE, SHA_SHARE = 0.05, 0.02, 0.02
EPS = 0.01


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(root: Path, rows: int, shard_rows: int) -> None:
    """The shards, written once; a vector's near copy is drawn from the shard before it (or its own)."""
    if (root / "done").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    store = DatasetStore(str(root))
    rng = np.random.default_rng(0)
    centres = _normalised(rng.standard_normal((TOPICS, DIM)).astype(np.float32))
    previous = None
    for s in range(rows // shard_rows):
        shard = f"shard-{s:05d}"
        topic = rng.integers(0, TOPICS, shard_rows)
        vectors = _normalised(
            centres[topic] + 0.08 * rng.standard_normal((shard_rows, DIM)).astype(np.float32)
        )
        source = previous if previous is not None else vectors
        copies = rng.random(shard_rows) < COPY_SHARE
        picked = rng.integers(0, len(source), copies.sum())
        vectors[copies] = _normalised(source[picked] + 0.0045 * rng.standard_normal((copies.sum(), DIM)))
        keys = [schemas.make_key(shard, i) for i in range(shard_rows)]
        urls = [f"https://img{i % 5000}.example.com/{s}/{i}.jpg" for i in range(shard_rows)]
        captions = [f"a caption for {s}/{i}" for i in range(shard_rows)]
        sha = [hashlib.sha256(f"{s}/{i}".encode()).hexdigest() for i in range(shard_rows)]
        if s:
            for i in np.flatnonzero(rng.random(shard_rows) < URL_SHARE):
                urls[i], captions[i] = (
                    f"https://img{i % 5000}.example.com/{s - 1}/{i}.jpg",
                    f"a caption for {s - 1}/{i}",
                )
            for i in np.flatnonzero(rng.random(shard_rows) < SHA_SHARE):
                sha[i] = hashlib.sha256(f"{s - 1}/{i}".encode()).hexdigest()
        pairs = pa.table(
            {
                "key": keys,
                "caption": captions,
                "url": urls,
                "license": pa.nulls(shard_rows, pa.string()),
                "nsfw": ["UNLIKELY"] * shard_rows,
                "original_height": pa.array([480] * shard_rows, pa.int32()),
                "original_width": pa.array([640] * shard_rows, pa.int32()),
                "similarity": [0.31] * shard_rows,
                "width": pa.array([256] * shard_rows, pa.int32()),
                "height": pa.array([256] * shard_rows, pa.int32()),
                "sha256": sha,
            }
        )
        store.write_parquet(PAIRS.parquet(shard), schemas.conform(schemas.with_host(pairs), schemas.PAIRS))
        embeddings = pa.table(
            {
                "key": keys,
                "image_embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.astype(np.float16).ravel()), DIM
                ),
            }
        )
        store.write_parquet(PAIRS_EMBEDDINGS.parquet(shard), embeddings)
        store.write_parquet(
            IMAGES.parquet(shard), pa.table({"key": keys, "phash": pa.nulls(shard_rows, pa.int64())})
        )
        previous = vectors
    (root / "done").touch()


def _measured(target, *args):
    return target(*args), peak_rss_mib()


def _in_child(target, *args):
    """`target(*args)`'s result and the child's peak RSS, in MiB; what it raised, or that it died, raised
    here."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(_measured, target, *args).result()


# The function of `pipeline/dedup/deduplicate.py` a sample of the stack is in (the innermost one
# listed): its step.
STEPS = {
    "_load_new_pairs": "exact",
    "_exact": "exact",
    "_write_hashes": "exact",
    "_stage": "reading",
    "_centroids": "training",
    "_semantic": "assignment",
    "_dedup_bucket": "comparison",
    "_append_duplicates": "removal",
    "remove_keys": "removal",
}


def _rss_mib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def _sample_rss(peaks: dict[str, int], stop: threading.Event) -> None:
    """The highest RSS seen while the main thread is in each step, sampled every 0.1 s."""
    main = threading.main_thread().ident
    while not stop.wait(0.1):
        frame = sys._current_frames().get(main)
        step = None
        while frame is not None and step is None:
            step = STEPS.get(frame.f_code.co_name)
            frame = frame.f_back
        if step:
            peaks[step] = max(peaks.get(step, 0), _rss_mib())


def _dedup(root: str, settings: DedupSettings) -> dict:
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(peaks, stop), daemon=True)
    sampler.start()
    start = time.monotonic()
    result = deduplicate(DatasetStore(root), settings)
    seconds = time.monotonic() - start
    stop.set()
    sampler.join()
    return {
        "seconds": seconds,
        "peaks": peaks,
        "phases": result.seconds,
        "by_kind": result.by_kind,
        "clusters": result.clusters,
        "buckets": result.buckets,
        "shards": len(result.shards),
    }


def _peer(root: str, queries: int) -> dict:
    """Exact range search for `queries` vectors drawn from every shard, each against every vector before
    it, streamed one shard at a time from the last to the first (a query joins at its own shard), so that
    memory holds one shard and the queries."""
    store = DatasetStore(root)
    shards = sorted(f.name.removesuffix(".parquet") for f in store.list(PAIRS_EMBEDDINGS.name))
    sizes = [store.parquet_num_rows(PAIRS_EMBEDDINGS.parquet(shard)) for shard in shards]
    offsets = np.cumsum([0, *sizes])
    total = int(offsets[-1])
    chosen = np.sort(np.random.default_rng(1).choice(total, queries, replace=False))
    active = np.zeros((0, DIM), np.float32)
    rows = np.zeros(0, np.int64)  # the active queries' row numbers
    copied = np.zeros(0, bool)  # a near copy found before it
    keys: list[str] = []
    seconds, comparisons = 0.0, 0
    for s in reversed(range(len(shards))):
        table = store.read_parquet(PAIRS_EMBEDDINGS.parquet(shards[s]))
        flat = table.column("image_embedding").combine_chunks().flatten().to_numpy().astype(np.float32)
        vectors = _normalised(flat.reshape(-1, DIM))
        mine = chosen[(chosen >= offsets[s]) & (chosen < offsets[s + 1])]
        active = np.concatenate([active, vectors[mine - offsets[s]]])
        rows, copied = np.concatenate([rows, mine]), np.concatenate([copied, np.zeros(len(mine), bool)])
        keys.extend(table.column("key").take(pa.array(mine - offsets[s])).to_pylist())
        start = time.monotonic()
        index = faiss.IndexFlatIP(DIM)
        index.add(vectors)
        lims, _, found = index.range_search(active, 1 - EPS)
        seconds += time.monotonic() - start
        comparisons += len(active) * len(vectors)
        for i in range(len(active)):
            copied[i] |= bool((found[lims[i] : lims[i + 1]] + offsets[s] < rows[i]).any())
    return {
        "queries": queries,
        "seconds": seconds,
        "all_rows_seconds": seconds * total * total / comparisons,
        "should": sorted(key for key, copy in zip(keys, copied, strict=True) if copy),
    }


def _recall(root: str, should: list[str]) -> tuple[int, int]:
    """(found, near copies): of the peer's near copies not removed as exact duplicates, those removed
    as semantic ones."""
    table = DatasetStore(root).read_parquet(DUPLICATES)
    semantic = pa.compute.equal(table.column("kind"), SEMANTIC)
    removed = set(table.filter(semantic).column("key").to_pylist())
    exact = set(table.filter(pa.compute.invert(semantic)).column("key").to_pylist())
    near = set(should) - exact
    return len(near & removed), len(near)


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {phase: round(value, 1) for phase, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--clusters", type=int, default=0)
    parser.add_argument("--buckets", type=int, default=0)
    parser.add_argument("--peer-queries", type=int, default=5_000)
    args = parse_args(parser, rows=4000, shard_rows=1000, peer_queries=10)
    data = WORK / f"dedup-{args.rows}"
    start = time.monotonic()
    generate(data, args.rows, args.shard_rows)
    print(f"data: {data} ({time.monotonic() - start:.0f} s)")
    root = WORK / f"dedup-{args.rows}-run"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(data, root, ignore=shutil.ignore_patterns("done"))
    last = sorted((root / PAIRS.name).glob("*.parquet"))[-1].stem
    later = root.parent / f"{root.name}-later"
    shutil.rmtree(later, ignore_errors=True)
    later.mkdir()
    for layer in (PAIRS, PAIRS_EMBEDDINGS, IMAGES):
        (later / layer.name).mkdir()
        shutil.move(root / layer.name / f"{last}.parquet", later / layer.name)
    settings = DedupSettings(eps=EPS, clusters=args.clusters, buckets=args.buckets)
    peer, peer_rss = _in_child(_peer, str(root), args.peer_queries)
    full, full_rss = _in_child(_dedup, str(root), settings)
    rows = args.rows - args.shard_rows
    print(
        f"full: {rows:,} rows in {full['seconds']:.1f} s ({rows / full['seconds']:,.0f} rows/s), "
        f"peak RSS {full_rss:,.0f} MiB; phases {_rounded(full['phases'])}; "
        f"peak RSS by step {full['peaks']}; {full['clusters']} clusters in {full['buckets']} buckets; "
        f"found {full['by_kind']}"
    )
    found, near = _recall(str(root), peer["should"])
    print(
        f"peer (exact range search, FAISS flat): {peer['queries']:,} queries in {peer['seconds']:.1f} s, "
        f"{peer['all_rows_seconds']:,.0f} s for every row, peak RSS {peer_rss:,.0f} MiB; the clustered "
        f"semantic pass found {found} of the {near} near copies among them "
        f"(recall {found / max(1, near):.3f}); "
        f"the semantic pass {peer['all_rows_seconds'] / full['phases']['semantic']:.1f}x as fast as "
        "brute force"
    )
    for layer in (PAIRS, PAIRS_EMBEDDINGS, IMAGES):
        shutil.move(later / layer.name / f"{last}.parquet", root / layer.name)
    incremental, incremental_rss = _in_child(_dedup, str(root), settings)
    print(
        f"incremental: one shard of {args.shard_rows:,} rows in {incremental['seconds']:.1f} s, peak RSS "
        f"{incremental_rss:,.0f} MiB; phases {_rounded(incremental['phases'])}; "
        f"peak RSS by step {incremental['peaks']}; "
        f"found {incremental['by_kind']}"
    )


if __name__ == "__main__":
    main()
