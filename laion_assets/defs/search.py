"""The `search_index` asset: every pair's image embedding, what `laion-assets serve` searches."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.dedup import duplicates
from laion_assets.defs.metadata import reads
from laion_assets.defs.partitions import DATASET_GROUP, FOLLOWS_ANY_SHARD
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.leases import SEARCH_INDEX_BUILD, shard_lease
from laion_assets.pipeline.search.index import APPROXIMATE_FROM_ROWS, write_search_index
from laion_assets.pipeline.storage import EMBEDDINGS, PAIRS


class SearchIndexConfig(dg.Config):
    """When the FAISS index is built and whether it is trained anew (see pipeline/search/faiss_index.py)."""

    approximate_from_rows: int = APPROXIMATE_FROM_ROWS  # from this many pairs on, also build FAISS IVF-PQ
    retrain: bool = False  # train anew even where the last trained index could be reused


@dg.asset(
    name=names.SEARCH_INDEX_ASSET,
    deps=[duplicates],  # after every removal
    metadata=reads(PAIRS, EMBEDDINGS),
    group_name=DATASET_GROUP,
    kinds={"parquet"},
    automation_condition=FOLLOWS_ANY_SHARD,
)
def search_index(
    context: dg.AssetExecutionContext, config: SearchIndexConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """Every pair of every shard with its image embedding, for nearest-neighbour search by text or image;
    for a large dataset, an approximate FAISS index of them too. A run that finds another live run
    building it fails at once (ShardBusy, naming that run) and leaves the index alone."""
    dataset = store.get_store()
    with shard_lease(dataset, SEARCH_INDEX_BUILD, context.run.run_id):
        result = write_search_index(dataset, config.approximate_from_rows, config.retrain)
    if result.missing_embeddings:
        context.log.warning(
            f"{result.missing_embeddings} pairs have no row in their shard's embeddings and are left out: "
            "re-materialise filtered_pairs for the shards whose embeddings changed"
        )
    approximate = result.approximate
    searched_by = {"search": "exact" if approximate is None else f"FAISS {approximate.factory}"}
    if approximate is not None:
        searched_by.update(
            {
                "faiss_trained": "trained now" if approximate.trained else "reused the last trained index",
                "faiss_trained_rows": approximate.trained_rows,
                "faiss_index_bytes": approximate.index_bytes,
                "faiss_train_seconds": approximate.train_seconds,
                "faiss_add_seconds": approximate.add_seconds,
            }
        )
    return dg.MaterializeResult(
        metadata={
            **searched_by,
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
