"""The `duplicates` asset: dataset-level dedup of the pairs of every shard
(pipeline/dedup/deduplicate.py), its finds removed through the takedowns' removal path with the reason
`duplicate`."""

import dataclasses

import dagster as dg

from laion_assets import names
from laion_assets.defs.config import dataset_config, settings_from
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.metadata import reads, rewritten_exports, rewritten_partitions
from laion_assets.defs.partitions import DATASET_GROUP, FOLLOWS_ANY_SHARD
from laion_assets.defs.recaptions import recaptions
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.defs.takedowns import REMOVALS_WAIT, takedowns
from laion_assets.pipeline import markdown
from laion_assets.pipeline.dedup.deduplicate import KINDS, DedupSettings, deduplicate
from laion_assets.pipeline.leases import REMOVALS, shard_lease
from laion_assets.pipeline.storage import DUPLICATES, EMBEDDINGS, IMAGES, PAIRS, PAIRS_EMBEDDINGS

S = DedupSettings  # every default below is the pipeline's own


class DuplicatesConfig(dg.Config):
    """Which kinds are looked for, how near a near copy is, and whether the finds leave the dataset."""

    exact: bool = S.exact  # the same url and caption, the same image bytes
    semantic: bool = S.semantic  # near copies of an image, SemDeDup-style, from the image embeddings
    eps: float = S.eps  # a semantic match has a cosine of at least 1 - eps
    max_phash_distance: int = S.max_phash_distance  # >= 0: the perceptual kind, hashes this many bits apart
    perceptual_eps: float = S.perceptual_eps  # ... whose images have a cosine of at least 1 - perceptual_eps
    clusters: int = S.clusters  # k-means clusters; 0: the square root of the pairs when trained
    buckets: int = S.buckets  # cluster % buckets, held in memory in turn; 0: one per 250,000 pairs trained on
    train_per_cluster: int = S.train_per_cluster
    retrain: bool = S.retrain  # train the centroids anew (and assign the stored survivors again)
    regrow: float = S.regrow  # clusters 0: train again once the pairs are this many times those trained for
    seed: int = S.seed
    remove: bool = S.remove  # False: only record them; query `pairs_unique`
    max_shards: int = S.max_shards  # > 0: check at most this many new shards a run (bounds its memory)
    # run only: dedup with other rules than the dataset's (which would remove pairs from every shard)
    accept_settings_change: bool = False

    def settings(self) -> DedupSettings:
        return settings_from(self, DedupSettings)


@dg.asset(
    name=names.DUPLICATES_ASSET,
    deps=[recaptions, takedowns],  # after the shards and after the takedowns
    group_name=DATASET_GROUP,
    metadata=reads(PAIRS, PAIRS_EMBEDDINGS, EMBEDDINGS, IMAGES),
    kinds={"parquet", "faiss"},
    automation_condition=FOLLOWS_ANY_SHARD,
)
def duplicates(
    context: dg.AssetExecutionContext, config: DuplicatesConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """The pairs of the shards not checked yet that repeat one already kept, across every shard: removed
    (only the shards that hold one are rewritten) and listed in duplicates/duplicates.parquet."""
    dataset = store.get_store()
    config = dataset_config(context, config, dataset)
    settings = config.settings()
    with shard_lease(dataset, REMOVALS, context.run.run_id, wait=REMOVALS_WAIT):  # one removal at a time
        result = deduplicate(dataset, settings, accept_settings_change=config.accept_settings_change)
    why = f"duplicates run {context.run.run_id[:8]}"
    for observation in rewritten_partitions(dataset, result.removal, PER_SHARD_ASSETS, why):
        context.log_event(observation)
    for observation in rewritten_exports(dataset, result.removal, why):
        context.log_event(observation)
    context.log.info(
        f"{len(result.shards)} shards checked, {result.duplicates.num_rows} duplicates; centroids "
        f"{result.centroids}"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dataset.parquet_num_rows(DUPLICATES) if dataset.exists(DUPLICATES) else 0,
            "found_this_run": result.duplicates.num_rows,
            "by_kind": dg.MetadataValue.md(
                markdown.table(["kind", "found this run"], [(k, result.by_kind[k]) for k in KINDS])
            ),
            "shards_checked": len(result.shards),
            "shards_left": result.left,
            "shards_rewritten": len(result.removal.shards),
            "centroids": result.centroids,
            "clusters": result.clusters,
            "buckets": result.buckets,
            "eps": settings.eps,
            "settings": dg.MetadataValue.json(dataclasses.asdict(settings)),
            "path": dg.MetadataValue.path(dataset.url(DUPLICATES)),
        }
    )
