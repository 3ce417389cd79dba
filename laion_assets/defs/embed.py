"""The `clip_embeddings` asset: CLIP image and text embeddings of a shard's downloaded images."""

import dagster as dg

from laion_assets.defs.download import downloaded_images
from laion_assets.defs.metadata import LAYER, preview, similarity_quantiles
from laion_assets.defs.partitions import FOLLOWS_ITS_SHARD, SHARD_BACKFILL, shards
from laion_assets.defs.resources import ClipEncoderResource, DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.embed import embed_shard


class ClipEmbeddingsConfig(dg.Config):
    """Threads that decode and preprocess images ahead of the model."""

    preprocess_workers: int = 2


@dg.asset(
    partitions_def=shards,
    backfill_policy=SHARD_BACKFILL,
    automation_condition=FOLLOWS_ITS_SHARD,
    deps=[downloaded_images],
    group_name="embeddings",
    kinds={"pytorch", "parquet"},
    metadata={LAYER: "embeddings"},
    pool="gpu",
)
def clip_embeddings(
    context: dg.AssetExecutionContext,
    config: ClipEmbeddingsConfig,
    store: DatasetStoreResource,
    clip: ClipEncoderResource,
) -> dg.MaterializeResult:
    """Normalised float16 CLIP embeddings of each downloaded image and its caption, and their cosine."""
    dataset = store.get_store()
    shard = context.partition_key
    encoder = clip.get_encoder()
    images = dataset.read_parquet(dataset.shard_file("images", shard, "parquet"))
    with dataset.open(dataset.shard_file("images", shard, "tar")) as tar:
        result = embed_shard(images, tar, encoder, clip.batch_size, config.preprocess_workers)
    path = dataset.shard_file("embeddings", shard, "parquet")
    dataset.write_parquet(
        path,
        result.table,
        metadata={schemas.EMBEDDING_MODEL: clip.model, schemas.EMBEDDING_PRETRAINED: clip.pretrained},
    )
    if result.undecodable:
        context.log.warning(
            f"{len(result.undecodable)} stored images could not be read: {result.undecodable[:10]}"
        )
    rows = result.table.num_rows
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "undecodable_images": len(result.undecodable),
            "model": clip.model,
            "pretrained": clip.pretrained,
            "device": str(encoder.device),
            "dim": encoder.dim,
            "similarity_p10_p50_p90": similarity_quantiles(result.table),
            "seconds": round(result.seconds, 2),
            "images_per_second": round(rows / result.seconds, 1) if result.seconds else 0.0,
            "path": dg.MetadataValue.path(dataset.url(path)),
            "preview": preview(result.table, ["key", "similarity"]),
        }
    )
