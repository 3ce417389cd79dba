"""The `quality_scores` asset: LAION-5B's `punsafe` and `pwatermark`, LAION-Aesthetics' score and the
caption's language, for each embedded image of a shard."""

from collections import Counter

import dagster as dg

from laion_assets import names
from laion_assets.defs.checks import problems_found, shard_check
from laion_assets.defs.config import record_section
from laion_assets.defs.embeddings import clip_embeddings
from laion_assets.defs.execution import GPU_POD
from laion_assets.defs.metadata import preview, shards_materialized, shards_written
from laion_assets.defs.partitions import leased_shards, per_shard_asset
from laion_assets.defs.resources import DatasetStoreResource, ScorersResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.scores.score import score_means, write_scores
from laion_assets.pipeline.settings import SCORES_SECTION
from laion_assets.pipeline.storage import EMBEDDINGS, SCORES, DatasetStore


@per_shard_asset(
    names.QUALITY_SCORES_ASSET,
    SCORES,
    kinds={"pytorch", "parquet"},
    upstream=clip_embeddings,
    pool=names.GPU_POOL,
    op_tags=GPU_POD,
)
def quality_scores(
    context: dg.AssetExecutionContext, store: DatasetStoreResource, scorers: ScorersResource
) -> dg.MaterializeResult:
    """punsafe and aesthetic from heads over the CLIP image embedding, pwatermark from the pixels, and
    the caption's language with its confidence: a row per embedded image."""
    dataset = store.get_store()
    models = scorers.get_scorers(dataset)  # loaded once for every shard of the run
    record_section(dataset, SCORES_SECTION, models.describe())
    with shards_written(context) as metadata:
        for shard in leased_shards(context, dataset):
            result = write_scores(dataset, shard, models)
            if result.undecodable:
                unread = result.undecodable
                context.log.warning(f"{shard}: {len(unread)} stored images could not be read: {unread[:10]}")
            rows = result.table.num_rows
            metadata[shard] = {
                "dagster/row_count": rows,
                **{f"mean/{score}": value for score, value in score_means(result.table).items()},
                **{f"weights/{score}": weights for score, weights in result.weights.items()},
                "languages": dg.MetadataValue.json(
                    dict(Counter(result.table.column("language").to_pylist()).most_common())
                ),
                "undecodable_images": len(result.undecodable),
                "seconds": round(result.seconds, 2),
                "images_per_second": round(rows / result.seconds, 1) if result.seconds else 0.0,
                "path": dg.MetadataValue.path(dataset.url(SCORES.parquet(shard))),
                "preview": preview(result.table, ["key", "punsafe", "pwatermark", "aesthetic", "language"]),
            }
    return shards_materialized(metadata)


def one_row_per_embedding(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """`scores` has the contract's schema and exactly the keys of `embeddings`, once each, with every
    probability in 0-1."""
    table = dataset.read_parquet(SCORES.parquet(shard))
    embedded = dataset.read_parquet(EMBEDDINGS.parquet(shard), columns=["key"]).column("key").to_pylist()
    keys = table.column("key").to_pylist()
    outside = sum(
        not 0 <= value <= 1
        for column in ("punsafe", "pwatermark")
        for value in table.column(column).to_pylist()
        if value is not None
    )
    return problems_found(
        shard,
        {
            "schema": int(table.schema.remove_metadata() != schemas.SCORES),
            "missing_embeddings": len(set(embedded) - set(keys)),
            "not_embedded": len(set(keys) - set(embedded)),
            "repeated_keys": len(keys) - len(set(keys)),
            "probability_outside_0_1": outside,
        },
    )


one_row_per_embedding_check = shard_check(
    quality_scores, names.ONE_ROW_PER_EMBEDDING_CHECK, one_row_per_embedding
)
