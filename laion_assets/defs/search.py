"""The `search_index` asset: every pair's image embedding, what `laion-assets serve` searches."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.embed import clip_embeddings
from laion_assets.defs.pairs import filtered_pairs
from laion_assets.defs.partitions import FOLLOWS_ANY_SHARD
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.search import EXACT_SEARCH_ROWS, write_search_index


@dg.asset(
    name=names.SEARCH_INDEX_ASSET,
    deps=[filtered_pairs, clip_embeddings],
    group_name="dataset",
    kinds={"parquet"},
    automation_condition=FOLLOWS_ANY_SHARD,
)
def search_index(context: dg.AssetExecutionContext, store: DatasetStoreResource) -> dg.MaterializeResult:
    """Every pair of every shard with its image embedding, for nearest-neighbour search by text or image."""
    dataset = store.get_store()
    result = write_search_index(dataset)
    if result.missing_embeddings:
        context.log.warning(
            f"{result.missing_embeddings} pairs have no row in their shard's embeddings and are left out: "
            "re-materialise filtered_pairs for the shards whose embeddings changed"
        )
    if result.rows > EXACT_SEARCH_ROWS:
        context.log.warning(
            f"{result.rows} rows is over {EXACT_SEARCH_ROWS}: exact search gets slow and memory-hungry; "
            "see the README on an approximate index (FAISS IVF-PQ)"
        )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "shards": result.shards,
            "model": result.model,
            "pretrained": result.pretrained,
            "weights": result.weights,
            "dim": result.dim,
            "missing_embeddings": result.missing_embeddings,
            "path": dg.MetadataValue.path(dataset.url(result.path)),
        }
    )
