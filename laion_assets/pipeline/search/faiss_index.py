"""The approximate search index for large datasets: FAISS IVF-PQ, re-ranked exactly.

From `approximate_from_rows` pairs on (`search.APPROXIMATE_FROM_ROWS`, 1 M, by default), `search_index`
also builds this beside the exact index file
(`storage.SEARCH_INDEX`), from that file, in one folder per build:

- `index.faiss`: an inverted file (IVF) over PQ codes of 4 bits per sub-vector ("fast scan"): D / 8
  bytes per vector plus an 8-byte id. It proposes `k * refine` candidates.
- `vectors.npy`: every vector, normalised, float16, in row order. The candidates are re-ranked by their
  exact cosine from it, so the order of the hits is exact and only a true neighbour that was not proposed
  is lost. The service memory-maps it: the pages of the candidates are read, not the file.
- `rows.arrow`: key, url and caption in row order (Arrow IPC, memory-mapped the same way).
- `trained.faiss`: the trained, empty index, so that the next build adds to it instead of training.

`search_index/approximate.json` names the current build and is written last, so a reader sees one
whole build or the one before; older build folders are removed after it.

Training (k-means for the coarse lists, then the PQ codebooks) is the expensive part, and a trained
index stays good while the data keep their distribution. A build reuses the trained index of the build
before it when the model and dimension are the same and the dataset has at most `RETRAIN_GROWTH` times the
rows it was trained on; otherwise (a new model, a dataset that outgrew its lists) it trains again.
Adding every vector to the trained index is done on each build: it is a pass over the vectors, with no
training, and it keeps row numbers as ids without bookkeeping for removed rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.clip import ModelIdentity
from laion_assets.pipeline.storage import (
    SEARCH_INDEX,
    SEARCH_INDEX_APPROXIMATE,
    DatasetStore,
    is_abandoned,
    temporary_name,
)

MIN_ROWS = 1_000  # the PQ codebooks need a few hundred vectors to train on; below this, search exactly
RETRAIN_GROWTH = 4  # a trained index is reused until the dataset has this many times its training rows
TRAIN_POINTS_PER_LIST = 40  # k-means wants about 39 points per centroid
NPROBE = 64  # lists searched per query
REFINE = 100  # candidates per wanted hit, re-ranked exactly
_BUILD_PREFIX = "search_index/approximate-"


@dataclass(frozen=True)
class ApproximateBuild:
    """What `approximate.json` records about one build."""

    build: str  # the build folder's name under search_index/
    factory: str  # the FAISS index_factory string
    rows: int
    dim: int
    model: dict[str, str]  # ModelIdentity.footer() of the embeddings
    trained_rows: int  # the dataset's size when the trained index was trained
    trained: bool  # whether this build trained (False: it added to the previous build's trained index)
    train_seconds: float
    add_seconds: float
    index_bytes: int  # index.faiss, the part that must sit in memory for fast queries

    def path(self, name: str) -> str:
        return f"search_index/{self.build}/{name}"


def lists_for(rows: int) -> int:
    """Coarse lists for `rows` vectors: about sqrt(rows), a power of two, with enough training points each."""
    wanted = 2 ** round(math.log2(max(rows, 1)) / 2)
    return int(max(1, min(wanted, 65536, rows // TRAIN_POINTS_PER_LIST)))


def factory_for(rows: int, dim: int) -> str:
    """IVF over 4-bit PQ codes of dim/4 sub-vectors (D/8 bytes); past 1,024 lists the lists are found by
    HNSW, so that assigning hundreds of millions of vectors does not compare each with every centroid."""
    lists = lists_for(rows)
    coarse = f"IVF{lists}_HNSW32" if lists >= 1024 else f"IVF{lists}"
    return f"{coarse},PQ{max(dim // 4, 2)}x4fs"


def read_build(store: DatasetStore) -> ApproximateBuild | None:
    if not store.exists(SEARCH_INDEX_APPROXIMATE):
        return None
    with store.open(SEARCH_INDEX_APPROXIMATE) as f:
        return ApproximateBuild(**json.load(f))


def remove_approximate(store: DatasetStore) -> None:
    """Removes every approximate build: a dataset below the threshold is searched exactly."""
    store.remove(SEARCH_INDEX_APPROXIMATE)
    _remove_builds(store, keep=None)


def build_approximate(store: DatasetStore, model: ModelIdentity, retrain: bool = False) -> ApproximateBuild:
    """Builds the approximate index from the exact index file, reusing the last trained index if it may."""
    with store.open(SEARCH_INDEX) as f:
        parquet = pq.ParquetFile(f)
        rows, dim = parquet.metadata.num_rows, parquet.schema_arrow.field("image_embedding").type.list_size
    if rows < MIN_ROWS:
        raise ValueError(f"an approximate index needs at least {MIN_ROWS} rows, the index has {rows}")
    previous = read_build(store)
    reuse = (
        not retrain
        and previous is not None
        and previous.dim == dim
        and ModelIdentity.from_footer(previous.model) == model
        and rows <= RETRAIN_GROWTH * previous.trained_rows
    )
    build = f"approximate-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    if reuse:
        with store.open(previous.path("trained.faiss")) as f:
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        factory, trained_rows = previous.factory, previous.trained_rows
    else:
        factory, trained_rows = factory_for(rows, dim), rows
        index = train(factory, training_sample(_vector_batches(store, dim), rows, lists_for(rows)))
    _write_index(index, store, f"search_index/{build}/trained.faiss")
    train_seconds = time.monotonic() - started
    started = time.monotonic()
    with store.atomic_write(f"search_index/{build}/vectors.npy") as f:
        add(index, _vector_batches(store, dim), f, rows)
    add_seconds = time.monotonic() - started
    index_bytes = _write_index(index, store, f"search_index/{build}/index.faiss")
    _write_rows(store, f"search_index/{build}/rows.arrow")
    result = ApproximateBuild(
        build=build,
        factory=factory,
        rows=rows,
        dim=dim,
        model=model.footer(),
        trained_rows=trained_rows,
        trained=not reuse,
        train_seconds=round(train_seconds, 3),
        add_seconds=round(add_seconds, 3),
        index_bytes=index_bytes,
    )
    store.write_bytes(SEARCH_INDEX_APPROXIMATE, json.dumps(asdict(result), indent=2).encode())
    _remove_builds(store, keep=build)
    return result


def train(factory: str, sample: np.ndarray):
    """An empty index of `factory`, trained on `sample` (normalised float32 vectors)."""
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    return index


def training_sample(batches: Iterable[np.ndarray], rows: int, lists: int) -> np.ndarray:
    """An evenly spread sample of `rows` vectors (given batch by batch): every n-th, enough for `lists`
    coarse lists and the PQ codebooks."""
    wanted = min(rows, max(lists * TRAIN_POINTS_PER_LIST, 16 * TRAIN_POINTS_PER_LIST))
    step = max(rows // wanted, 1)
    parts, start = [], 0
    for vectors in batches:
        parts.append(vectors[(-start) % step :: step])
        start += len(vectors)
    return np.ascontiguousarray(np.concatenate(parts)[:wanted], np.float32)


def add(index, batches: Iterable[np.ndarray], vectors_file: IO[bytes], rows: int) -> None:
    """One pass over `rows` normalised vectors: each batch is added to `index` (ids = row numbers) and
    written to `vectors_file` as one float16 .npy matrix, the exact vectors the hits are ranked by."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False}
    np.lib.format.write_array_header_1_0(vectors_file, {**header, "shape": (rows, index.d)})
    for vectors in batches:
        index.add(np.ascontiguousarray(vectors, np.float32))
        vectors_file.write(vectors.astype(np.float16).tobytes())


def _batches(store: DatasetStore, columns: list[str]) -> Iterator[pa.RecordBatch]:
    with store.open(SEARCH_INDEX) as f:
        yield from pq.ParquetFile(f).iter_batches(columns=columns, batch_size=65536)


def _vector_batches(store: DatasetStore, dim: int) -> Iterator[np.ndarray]:
    """The index file's image embeddings, normalised float32, a batch at a time."""
    for batch in _batches(store, ["image_embedding"]):
        vectors = batch.column(0).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        vectors = vectors.reshape(batch.num_rows, dim)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        yield vectors


def _write_rows(store: DatasetStore, relpath: str) -> None:
    with store.atomic_write(relpath) as f:
        writer = None
        for batch in _batches(store, schemas.SEARCH_ROW_COLUMNS):
            writer = writer or pa.ipc.new_file(f, batch.schema)
            writer.write_batch(batch)
        if writer:
            writer.close()


def _write_index(index, store: DatasetStore, relpath: str) -> int:
    """Writes `index` to the store as it is serialised (no local copy, which a killed run would leave);
    returns its bytes."""
    written = 0

    def write(chunk: bytes) -> None:
        nonlocal written
        f.write(chunk)
        written += len(chunk)

    with store.atomic_write(relpath) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    return written


def _copy_from_store(store: DatasetStore, relpath: str, local: Path) -> None:
    with store.open(relpath) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def _remove_builds(store: DatasetStore, keep: str | None) -> None:
    folder = store.path("search_index")
    if not store.fs.isdir(folder):
        return
    for entry in store.fs.ls(folder, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if f"search_index/{name}".startswith(_BUILD_PREFIX) and name != keep:
            store.fs.rm(entry, recursive=True)


class ApproximateIndex:
    """A build, memory-mapped: FAISS proposes candidates, their float16 vectors re-rank them exactly."""

    def __init__(self, folder: Path, build: ApproximateBuild) -> None:
        self.build = build
        self.faiss = faiss.read_index(str(folder / "index.faiss"), faiss.IO_FLAG_MMAP)
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        self.rows = pa.ipc.open_file(pa.memory_map(str(folder / "rows.arrow"))).read_all()
        self.nprobe, self.refine = NPROBE, REFINE

    @classmethod
    def load(cls, store: DatasetStore, build: ApproximateBuild, cache: Path) -> ApproximateIndex:
        """The build's files mapped where they are on a local root, or copied once from S3 into a folder of
        `cache` for the root, which then keeps only this build: earlier builds' copies (a process that maps
        one keeps its pages) and the half-made copies of killed processes go."""
        if not store.is_s3:
            return cls(Path(store.path(f"search_index/{build.build}")), build)
        cache = cache / hashlib.sha256(store.root.encode()).hexdigest()[:16]
        folder = cache / build.build
        if not (folder / "rows.arrow").exists():
            partial = Path(temporary_name(str(folder)))
            partial.mkdir(parents=True)
            for name in ("index.faiss", "vectors.npy", "rows.arrow"):
                _copy_from_store(store, build.path(name), partial / name)
            os.replace(partial, folder)
        for entry in cache.iterdir():
            in_flight = entry.name.startswith(".") and not is_abandoned(entry.name, entry.stat().st_mtime)
            if entry != folder and not in_flight:
                shutil.rmtree(entry, ignore_errors=True)
        return cls(folder, build)

    def candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        """Row numbers of up to `k * refine` proposed neighbours of `query` (normalised, float32)."""
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        _, ids = self.faiss.search(query.reshape(1, -1), k * self.refine, params=params)
        return ids[0][ids[0] >= 0]

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best row numbers and their exact cosines, best first."""
        query = np.ascontiguousarray(query, np.float32)
        found = np.sort(self.candidates(query, k))  # sorted: the memory-mapped pages are read in order
        scores = self.vectors[found].astype(np.float32) @ query
        best = np.argsort(-scores, kind="stable")[:k]
        return found[best], scores[best]
