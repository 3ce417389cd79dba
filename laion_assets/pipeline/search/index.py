"""The search index: the image embedding of every stored pair in one parquet file, and for a large
dataset an approximate FAISS index beside it.

`write_search_index` joins each shard's pairs to its embeddings on key and writes the index file
(`storage.SEARCH_INDEX`). `SearchIndex` holds it in memory as a normalised float32 matrix
and answers a query by one matrix-vector product over every row (cosine similarity, exact).

Exact search costs 4 bytes per dimension per row in memory and one pass over that memory per query:
for D = 512, 2 GB and about 0.1 s per query per million rows on two cores. So from
`approximate_from_rows` pairs on (default 1 M) the build also makes an IVF-PQ index
(`faiss_index.py`, as clip-retrieval serves LAION-5B), and `SearchIndex.load` returns
`ApproximateSearchIndex`: 32 bytes per vector in memory, milliseconds per query, hits in exact order.
The exact file stays: it is the data the approximate index is built from, and the reference it is
measured against (bench/search.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.clip import ModelIdentity, ModelMismatch
from laion_assets.pipeline.pairs.filter import stored_pair_shards
from laion_assets.pipeline.parallel import store_map
from laion_assets.pipeline.storage import EMBEDDINGS, PAIRS, SEARCH_INDEX, DatasetStore, footer

if TYPE_CHECKING:
    from laion_assets.pipeline.search.faiss_index import ApproximateBuild, ApproximateIndex

# Up to here exact search answers in about 0.1 s on two cores (D = 512); from here on the build adds
# the approximate index (faiss_index.py, which imports FAISS only when it is needed).
APPROXIMATE_FROM_ROWS = 1_000_000


class IndexMissing(FileNotFoundError):
    """There is no search index in the store yet."""


@dataclass(frozen=True)
class IndexBuild:
    path: str  # under the root
    rows: int
    shards: int
    model: str
    pretrained: str
    weights: str
    dim: int
    missing_embeddings: int  # pairs whose key is not in their shard's embeddings (stale files)
    approximate: ApproximateBuild | None  # the FAISS index, for a dataset of approximate_from_rows or more


@dataclass(frozen=True)
class Hit:
    key: str
    url: str
    caption: str
    similarity: float


def write_search_index(
    store: DatasetStore, approximate_from_rows: int = APPROXIMATE_FROM_ROWS, retrain: bool = False
) -> IndexBuild:
    """Write the search index from every shard that has pairs, one row group per shard, and the
    approximate index when there are `approximate_from_rows` pairs or more (`retrain`: train it anew
    even where the last trained index could be reused).

    Raises ValueError if there are no pairs yet or a shard lacks its embeddings, and ModelMismatch if
    shards were embedded with different models (their embeddings cannot be compared).
    """
    shards = stored_pair_shards(store, "the search index")
    models = dict(zip(shards, store_map(lambda shard: _embedding_model(store, shard), shards), strict=True))
    by_model: dict[ModelIdentity | None, list[str]] = {}
    for shard, model in models.items():
        by_model.setdefault(model, []).append(shard)
    if len(by_model) > 1:
        listed = "; ".join(
            f"{f'{m.model}/{m.pretrained}' if m else 'not recorded'}: {', '.join(s)}"
            for m, s in by_model.items()
        )
        raise ModelMismatch(
            f"shards were embedded with different models ({listed}); re-materialise clip_embeddings "
            "with one model for all of them"
        )
    model = models[shards[0]] or ModelIdentity("", "")
    with store.open(EMBEDDINGS.parquet(shards[0])) as f:
        dim = pq.read_schema(f).field("image_embedding").type.list_size
    schema = schemas.search_index(dim).with_metadata(model.footer())
    rows = missing = 0
    with store.atomic_write(SEARCH_INDEX) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        # a few shards in flight: each holds its embeddings (10 MB for 10,000 rows at D = 512)
        for pairs, embeddings in store_map(
            lambda shard: _pairs_and_vectors(store, shard), shards, lookahead=8
        ):
            positions = pc.index_in(pairs.column("key"), value_set=embeddings.column("key"))
            found = pc.is_valid(positions)
            kept = pairs.filter(found)
            vectors = embeddings.column("image_embedding").take(positions.filter(found))
            writer.write_table(pa.Table.from_arrays([*kept.columns, vectors], schema=schema))
            rows += kept.num_rows
            missing += pairs.num_rows - kept.num_rows
    from laion_assets.pipeline.search import faiss_index

    approximate = None
    if rows >= max(approximate_from_rows, faiss_index.MIN_ROWS):
        approximate = faiss_index.build_approximate(store, model, retrain=retrain)
    else:
        faiss_index.remove_approximate(store)
    return IndexBuild(
        SEARCH_INDEX,
        rows,
        len(shards),
        model.model,
        model.pretrained,
        model.weights,
        dim,
        missing,
        approximate,
    )


def _embedding_model(store: DatasetStore, shard: str) -> ModelIdentity | None:
    path = EMBEDDINGS.parquet(shard)
    try:
        return ModelIdentity.from_footer(store.parquet_metadata(path))
    except FileNotFoundError:
        raise ValueError(
            f"shard {shard} has pairs but no {path}: materialise clip_embeddings for it"
        ) from None


def _pairs_and_vectors(store: DatasetStore, shard: str) -> tuple[pa.Table, pa.Table]:
    """A shard's pairs rows and its image embeddings: what its row group of the index is made of."""
    pairs = store.read_parquet(PAIRS.parquet(shard), columns=schemas.SEARCH_ROW_COLUMNS)
    return pairs, store.read_parquet(EMBEDDINGS.parquet(shard), columns=["key", "image_embedding"])


class SearchIndex:
    """The index in memory: its rows (key, url, caption) and their image embeddings, normalised float32.

    `vectors` (float32, one row per row of `rows`) is normalised in place: no second copy of the matrix."""

    def __init__(self, rows: pa.Table, vectors: np.ndarray, model: ModelIdentity | None) -> None:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        self.rows = rows.select(schemas.SEARCH_ROW_COLUMNS)
        self.vectors = vectors
        self.model = model

    def __len__(self) -> int:
        return self.rows.num_rows

    @property
    def kind(self) -> str:
        return "exact"

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def load(cls, store: DatasetStore, cache: Path | None = None) -> SearchIndex:
        """The approximate index when the store has one (memory-mapped; from S3 copied into `cache`
        first), else the exact one: the embeddings read batch by batch into one float32 matrix (never
        all of them as float16 too)."""
        if not store.exists(SEARCH_INDEX):
            raise IndexMissing(
                f"no search index at {store.url(SEARCH_INDEX)}: materialise the search_index asset "
                "(laion-assets run --select search_index)"
            )
        from laion_assets.pipeline.search import faiss_index

        build = faiss_index.read_build(store)
        if build is not None:
            cache = cache or Path(tempfile.gettempdir()) / "laion-assets-search-index"
            return ApproximateSearchIndex(faiss_index.ApproximateIndex.load(store, build, cache))
        with store.open(SEARCH_INDEX) as f:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
            metadata = footer(schema)
            dim = schema.field("image_embedding").type.list_size
            vectors = np.empty((parquet.metadata.num_rows, dim), np.float32)
            start = 0
            for batch in parquet.iter_batches(columns=["image_embedding"]):
                flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                vectors[start : start + batch.num_rows] = flat.reshape(batch.num_rows, dim)
                start += batch.num_rows
            rows = parquet.read(columns=schemas.SEARCH_ROW_COLUMNS)
        return cls(rows, vectors, ModelIdentity.from_footer(metadata))

    def check_model(self, used: ModelIdentity) -> None:
        """Raises ModelMismatch unless the index was embedded with the model and weights of `used`."""
        made = self.model or ModelIdentity("", "")
        made.require(
            used,
            "the search index was",
            "this service",
            f"serve with LAION_ASSETS_CLIP_MODEL={made.model} LAION_ASSETS_CLIP_PRETRAINED={made.pretrained},"
            " or re-embed with this model and rebuild",
        )

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers of the `k` rows most similar to `query` and their cosines, best first."""
        scores = self.vectors @ query.astype(np.float32, copy=False)
        k = min(k, len(scores))
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    def search(self, query: np.ndarray, k: int, exclude: Container[str] = frozenset()) -> list[Hit]:
        """The `k` rows most similar to `query` (a normalised embedding), best first, none of whose key is
        in `exclude` (removed since the index was built): it asks for more until `k` are left."""
        wanted = k
        while True:
            top, scores = self.nearest(query, wanted)
            rows = self.rows.take(top).to_pylist()
            hits = [
                Hit(similarity=float(score), **row)
                for score, row in zip(scores, rows, strict=True)
                if row["key"] not in exclude
            ]
            if len(hits) >= k or len(top) < wanted or wanted >= len(self):
                return hits[:k]
            wanted *= 2


class ApproximateSearchIndex(SearchIndex):
    """The same answers from the FAISS build: candidates from IVF-PQ, ranked by their exact cosine."""

    def __init__(self, index: ApproximateIndex) -> None:
        self.approximate = index
        self.rows = index.rows
        self.model = ModelIdentity.from_footer(index.build.model)

    @property
    def dim(self) -> int:
        return self.approximate.build.dim

    @property
    def kind(self) -> str:
        return self.approximate.build.factory

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.approximate.nearest(query, k)
