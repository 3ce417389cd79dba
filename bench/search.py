"""Search benchmark: the approximate index (pipeline/search/faiss_index.py) against exact search, at
10 M vectors.

    .venv/bin/python bench/search.py [--rows 10000000] [--dim 512] [--queries 200]

Generates `--rows` clustered unit vectors once (bench/.work/search-<rows>x<dim>/vectors.npy, float16,
the file the index re-ranks from), then trains and fills the index with the pipeline's own `train` and
`add`, memory-maps it the way the service does (`ApproximateIndex`) and times one query at a time:
p50 and p95 latency, queries/s and recall@10 against exact search over the same float16 vectors, for a
few settings of lists probed and candidates re-ranked. The peer is exact search itself (one pass over
every vector per query, `SearchIndex`).

The vectors are synthetic: 2,000 topics, 100 sub-topics each, and noise of 1.5 times the topic's norm,
so that a query's ten nearest neighbours have cosines of about 0.40-0.45 and lie close together,
a harder case than near-duplicates. It prints build time, index bytes per vector and peak memory, and
projects memory and build time to 400 M vectors.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from smoke import parse_args

from laion_assets.pipeline.search import faiss_index
from laion_assets.pipeline.search.index import SearchIndex

WORK = Path(__file__).resolve().parent / ".work"
LATENT, TOPICS, SPREAD, MEAN, NOISE = 64, 2000, 0.7, 2.4, 0.3
CHUNK = 100_000
EXACT_ROWS_HELD = 1_000_000
SETTINGS = ((32, 50), (64, 50), (64, 100), (64, 200), (128, 100))  # (lists probed, candidates per hit)


@functools.cache
def _space(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed parts: a shared mean direction, a random 64-dimensional subspace of the `dim` dimensions
    with a decaying spectrum, and topic centres in it."""
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(dim).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, LATENT)))[0].astype(np.float32).T  # LATENT x dim
    spectrum = (np.arange(1, LATENT + 1) ** -0.5).astype(np.float32)
    topics = rng.standard_normal((TOPICS, LATENT)).astype(np.float32) * spectrum
    return mean / np.linalg.norm(mean), basis, spectrum, topics


def draw(seed: int, rows: int, dim: int) -> np.ndarray:
    """`rows` normalised vectors: the mean direction, a topic and a spread around it in the subspace, and
    a little noise in every dimension."""
    mean, basis, spectrum, topics = _space(dim)
    rng = np.random.default_rng(seed)
    latent = topics[rng.integers(0, TOPICS, rows)]
    latent += SPREAD * spectrum * rng.standard_normal((rows, LATENT), np.float32)
    vectors = MEAN * mean + latent @ basis
    vectors += (NOISE / np.sqrt(dim)) * rng.standard_normal((rows, dim), np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def vectors_file(rows: int, dim: int) -> np.ndarray:
    folder = WORK / f"search-{rows}x{dim}"
    path = folder / "vectors.npy"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        partial = folder / "vectors.npy.partial"
        out = np.lib.format.open_memmap(partial, "w+", np.float16, (rows, dim))
        for start in range(0, rows, CHUNK):
            out[start : start + CHUNK] = draw(1 + start // CHUNK, min(CHUNK, rows - start), dim)
        out.flush()
        del out
        os.replace(partial, path)
        print(f"generated {rows:,} vectors in {time.monotonic() - started:.0f} s")
    return np.load(path, mmap_mode="r")


def batches(vectors: np.ndarray):
    for start in range(0, len(vectors), CHUNK):
        yield vectors[start : start + CHUNK].astype(np.float32)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The true `k` nearest rows of each query: every vector scored, chunk by chunk."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(vectors), CHUNK):
        scores = queries @ vectors[start : start + CHUNK].astype(np.float32).T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
        merged_rows = np.concatenate([best_rows, top + start], 1)
        order = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_rows = np.take_along_axis(merged_rows, order, 1)
    return best_rows


def exact_peer(vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """p50 seconds of exact search as the service does it (`SearchIndex`: a float32 matrix in memory),
    measured on the first million rows and scaled by the row count: its cost is one pass over every row,
    and 10 M rows of float32 would not fit beside the rest in 24 GiB."""
    held = min(len(vectors), EXACT_ROWS_HELD)
    keys = pa.array(np.arange(held).astype(str))
    exact = SearchIndex(
        pa.table({"key": keys, "url": keys, "caption": keys}), vectors[:held].astype(np.float32), None
    )
    times = []
    for query in queries[:20]:
        started = time.perf_counter()
        exact.nearest(query, k)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * len(vectors) / held


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(kind: str) -> float:
    """This process's resident memory of `kind`: RssAnon (its own) or RssFile (mapped files' pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    args = parse_args(parser, rows=2000, queries=5)
    if args.dim < LATENT:
        parser.error(
            f"--dim must be at least {LATENT}: the vectors are drawn in a {LATENT}-dimensional subspace"
        )
    k = 10
    vectors = vectors_file(args.rows, args.dim)
    queries = draw(10**6, args.queries, args.dim)
    started = time.monotonic()
    truth = exact_top(vectors, queries, k)
    print(f"exact top-{k} of {args.queries} queries (batched): {time.monotonic() - started:.0f} s")
    exact_p50 = exact_peer(vectors, queries, k)

    folder = WORK / f"search-{args.rows}x{args.dim}" / "index"
    folder.mkdir(exist_ok=True)
    factory = faiss_index.factory_for(args.rows, args.dim)
    started = time.monotonic()
    sample = faiss_index.training_sample(batches(vectors), args.rows, faiss_index.lists_for(args.rows))
    index = faiss_index.train(factory, sample)
    train_s = time.monotonic() - started
    started = time.monotonic()
    with open(os.devnull, "wb") as sink:  # the float16 matrix is already vectors.npy
        faiss_index.add(index, batches(vectors), sink, args.rows)
    add_s = time.monotonic() - started
    import faiss

    faiss.write_index(index, str(folder / "index.faiss"))
    del index
    if not (folder / "vectors.npy").exists():
        os.symlink(vectors.filename, folder / "vectors.npy")
    keys = pa.array(np.arange(args.rows).astype(str))
    with pa.OSFile(str(folder / "rows.arrow"), "wb") as f, pa.ipc.new_file(f, _rows_schema()) as writer:
        writer.write_table(pa.table({"key": keys, "url": keys, "caption": keys}))
    index_bytes = (folder / "index.faiss").stat().st_size
    build = faiss_index.ApproximateBuild(
        build="bench", factory=factory, rows=args.rows, dim=args.dim, model={}, trained_rows=args.rows,
        trained=True, train_seconds=train_s, add_seconds=add_s, index_bytes=index_bytes,
    )  # fmt: skip
    approximate = faiss_index.ApproximateIndex(folder, build)
    print(f"index {factory}: trained on {len(sample):,} vectors in {train_s:.0f} s, {args.rows:,} added in "
          f"{add_s:.0f} s; {index_bytes / args.rows:.1f} bytes per vector in memory "
          f"(+ {2 * args.dim} on disk, memory-mapped, for re-ranking)")  # fmt: skip
    print(f"exact search (peer, SearchIndex): p50 {exact_p50 * 1000:.0f} ms per query, {1 / exact_p50:.2f} "
          f"queries/s{'' if args.rows <= EXACT_ROWS_HELD else ' (timed on 1 M rows, scaled)'}")  # fmt: skip
    print("nprobe refine  recall@10  p50 ms  p95 ms  queries/s  vs exact")
    for nprobe, refine in SETTINGS:
        approximate.nprobe, approximate.refine = nprobe, refine
        times, found = [], 0
        for query, want in zip(queries, truth, strict=True):
            started = time.perf_counter()
            rows, _ = approximate.nearest(query, k)
            times.append(time.perf_counter() - started)
            found += len(set(rows.tolist()) & set(want.tolist()))
        p50, p95 = np.median(times), np.percentile(times, 95)
        default = "  (default)" if (nprobe, refine) == (faiss_index.NPROBE, faiss_index.REFINE) else ""
        print(f"{nprobe:6d} {refine:6d}  {found / truth.size:9.3f}  {p50 * 1000:6.2f}  {p95 * 1000:6.2f}  "
              f"{1 / np.mean(times):9.0f}  {exact_p50 / p50:7.0f}x{default}")  # fmt: skip
    print(
        f"memory after the queries: {rss_mb('RssAnon'):.0f} MB of its own (the index, the rows, numpy), "
        f"{rss_mb('RssFile'):.0f} MB of mapped file pages (the vectors it touched: page cache); peak RSS "
        f"{peak_rss_mb():.0f} MB, including the ground truth's pass over every vector"
    )
    project(args.rows, args.dim, index_bytes, train_s, add_s, len(sample))


def project(rows: int, dim: int, index_bytes: int, train_s: float, add_s: float, sampled: int) -> None:
    """Memory and build time at 400 M vectors from this run: memory and adding grow with the rows,
    training with lists x sample (k-means), and both lists and sample grow with sqrt(rows)."""
    target = 400_000_000
    lists_now, lists_then = faiss_index.lists_for(rows), faiss_index.lists_for(target)
    sample_then = lists_then * faiss_index.TRAIN_POINTS_PER_LIST
    train_then = train_s * (lists_then / lists_now) * (sample_then / sampled)
    add_then = add_s * target / rows
    print(f"projected to 400 M on these 2 cores: {faiss_index.factory_for(target, dim)}, "
          f"{index_bytes / rows * target / 2**30:.0f} GiB in memory, {2 * dim * target / 2**30:.0f} GiB "
          f"of vectors on disk, training about {train_then / 3600:.1f} h, adding about "
          f"{add_then / 3600:.1f} h (adding splits across machines and cores)")  # fmt: skip


def _rows_schema() -> pa.Schema:
    return pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string())])


if __name__ == "__main__":
    main()
