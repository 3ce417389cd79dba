"""The `clip_embeddings` asset: CLIP image and text embeddings of a shard's downloaded images."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.checks import shard_check
from laion_assets.defs.config import model_settings, record_section
from laion_assets.defs.download import downloaded_images
from laion_assets.defs.execution import GPU_POD
from laion_assets.defs.metadata import preview, shards_materialized, shards_written, similarity_quantiles
from laion_assets.defs.partitions import leased_shards, per_shard_asset
from laion_assets.defs.resources import ClipEncoderResource, DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.embed import write_embeddings
from laion_assets.pipeline.settings import CLIP_SECTION
from laion_assets.pipeline.storage import EMBEDDINGS, IMAGES, DatasetStore


class ClipEmbeddingsConfig(dg.Config):
    """Threads that decode and preprocess images ahead of the model."""

    preprocess_workers: int = 2


@per_shard_asset(
    names.CLIP_EMBEDDINGS_ASSET,
    EMBEDDINGS,
    kinds={"pytorch", "parquet"},
    upstream=downloaded_images,
    pool=names.GPU_POOL,
    op_tags=GPU_POD,
)
def clip_embeddings(
    context: dg.AssetExecutionContext,
    config: ClipEmbeddingsConfig,
    store: DatasetStoreResource,
    clip: ClipEncoderResource,
) -> dg.MaterializeResult:
    """Normalised float16 CLIP embeddings of each downloaded image and its caption, and their cosine."""
    dataset = store.get_store()
    encoder = clip.get_encoder(dataset)  # loaded once for every shard of the run
    record_section(dataset, CLIP_SECTION, model_settings(clip))
    with shards_written(context) as metadata:
        for shard in leased_shards(context, dataset):
            result = write_embeddings(dataset, shard, encoder, clip.batch_size, config.preprocess_workers)
            if result.undecodable:
                unread = result.undecodable
                context.log.warning(f"{shard}: {len(unread)} stored images could not be read: {unread[:10]}")
            if result.missing:
                absent = result.missing
                context.log.warning(
                    f"{shard}: {len(absent)} successful images are not in its tar: {absent[:10]}"
                )
            rows = result.table.num_rows
            metadata[shard] = {
                "dagster/row_count": rows,
                "undecodable_images": len(result.undecodable),
                "images_not_in_tar": len(result.missing),
                "model": encoder.identity.model,
                "pretrained": encoder.identity.pretrained,
                "weights": encoder.identity.weights,
                "device": str(encoder.device),
                "dim": encoder.dim,
                "similarity_p10_p50_p90": similarity_quantiles(result.table),
                "seconds": round(result.seconds, 2),
                "images_per_second": round(rows / result.seconds, 1) if result.seconds else 0.0,
                "path": dg.MetadataValue.path(dataset.url(EMBEDDINGS.parquet(shard))),
                "preview": preview(result.table, ["key", "similarity"]),
            }
    return shards_materialized(metadata)


def keys_are_success_images(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """Every `embeddings` key is a `success` row of `images`, once."""
    images = dataset.read_parquet(IMAGES.parquet(shard), columns=["key", "status"])
    keys = dataset.read_parquet(EMBEDDINGS.parquet(shard), columns=["key"]).column("key").to_pylist()
    successes = {
        k
        for k, s in zip(images.column("key").to_pylist(), images.column("status").to_pylist(), strict=True)
        if s == schemas.SUCCESS
    }
    not_success = sum(key not in successes for key in keys)
    repeated = len(keys) - len(set(keys))
    passed = not_success == 0 and repeated == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"shard": shard, "not_a_success": not_success, "repeated_keys": repeated},
        description=None
        if passed
        else f"shard {shard}: {not_success} keys not a success image, {repeated} repeated",
    )


keys_are_success_images_check = shard_check(
    clip_embeddings, names.KEYS_ARE_SUCCESS_IMAGES_CHECK, keys_are_success_images
)
