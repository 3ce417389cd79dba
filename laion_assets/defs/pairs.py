"""The `filtered_pairs` asset: a shard's images and embeddings filtered into LAION-400M form."""

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json

import dagster as dg

from laion_assets.defs.config import config_class, settings_from
from laion_assets.defs.embed import clip_embeddings
from laion_assets.defs.metadata import LAYER, preview, similarity_quantiles
from laion_assets.defs.partitions import FOLLOWS_ITS_SHARD, SHARD_BACKFILL, shards
from laion_assets.defs.resources import ClipEncoderResource, DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.pairs import NsfwCategories, PairsSettings, build_pairs, write_pairs_tar


class _PairsOutputs(dg.Config):
    write_embeddings: bool = False  # also pairs_embeddings/<shard>.parquet, LAION-400M's embeddings config


FilteredPairsConfig = config_class(PairsSettings, "FilteredPairsConfig", base=_PairsOutputs)


@dg.asset(
    partitions_def=shards,
    backfill_policy=SHARD_BACKFILL,
    automation_condition=FOLLOWS_ITS_SHARD,
    deps=[clip_embeddings],
    group_name="pairs",
    kinds={"parquet", "webdataset"},
    metadata={LAYER: "pairs"},
)
def filtered_pairs(
    context: dg.AssetExecutionContext,
    config: FilteredPairsConfig,
    store: DatasetStoreResource,
    clip: ClipEncoderResource,
) -> dg.MaterializeResult:
    """Pairs that pass the rules (CLIP similarity, caption, dedup, NSFW/minors), as parquet and webdataset."""
    dataset = store.get_store()
    shard = context.partition_key
    crawl = dataset.read_parquet(dataset.shard_file("crawl_metadata", shard, "parquet"))
    images = dataset.read_parquet(dataset.shard_file("images", shard, "parquet"))
    embeddings = dataset.read_parquet(dataset.shard_file("embeddings", shard, "parquet"))
    made_by = (embeddings.schema.metadata or {}).get(schemas.EMBEDDING_MODEL.encode(), b"").decode()
    if made_by and made_by != clip.model:
        raise ValueError(
            f"shard {shard}: embeddings were made with {made_by!r} but the clip resource is {clip.model!r}; "
            "the NSFW categories must be embedded by the same model: re-materialise clip_embeddings "
            "or set the model"
        )
    encoder = clip.get_encoder()
    categories = NsfwCategories.load(lambda names: encoder.encode_texts(names).cpu().numpy())
    settings = settings_from(config, PairsSettings)
    result = build_pairs(crawl, images, embeddings, settings, categories)

    tar_path = dataset.shard_file("pairs", shard, "tar")
    with contextlib.ExitStack() as stack:
        images_tar = stack.enter_context(dataset.open(dataset.shard_file("images", shard, "tar")))
        samples = write_pairs_tar(
            images_tar, result.table, stack.enter_context(dataset.atomic_write(tar_path))
        )
    path = dataset.shard_file("pairs", shard, "parquet")
    provenance = {
        "shard": shard,
        "source_file": crawl.column("source_file")[0].as_py() if crawl.num_rows else None,
        "run_id": context.run.run_id,
        "materialized_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": importlib.metadata.version("laion_assets"),
    }
    funnel = {"rows_in": result.rows_in, "removed": result.removed}
    dataset.write_parquet(
        path,
        result.table,
        metadata={
            schemas.PAIRS_SETTINGS: json.dumps(dataclasses.asdict(settings)),
            schemas.PAIRS_FUNNEL: json.dumps(funnel),
            schemas.PROVENANCE: json.dumps(provenance),
        },
    )
    if config.write_embeddings:
        dataset.write_parquet(dataset.shard_file("pairs_embeddings", shard, "parquet"), result.embeddings)

    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.table.num_rows,
            "rows_in": result.rows_in,
            **{f"removed/{rule}": n for rule, n in result.removed.items()},
            **{f"nsfw/{tag}": n for tag, n in result.nsfw.items()},
            "samples_in_tar": samples,
            "similarity_p10_p50_p90": similarity_quantiles(result.table),
            "path": dg.MetadataValue.path(dataset.url(path)),
            "preview": preview(result.table, ["key", "caption", "similarity", "nsfw"]),
        }
    )
