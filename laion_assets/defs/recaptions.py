"""The `recaptions` asset: a new caption for each kept pair, Recap-DataComp-1B's way, beside the web's."""

import dataclasses

import dagster as dg

from laion_assets import names
from laion_assets.defs.checks import problems_found, shard_check
from laion_assets.defs.config import record_section
from laion_assets.defs.execution import GPU_POD
from laion_assets.defs.metadata import preview, shards_materialized, shards_written
from laion_assets.defs.pairs import filtered_pairs
from laion_assets.defs.partitions import leased_shards, per_shard_asset
from laion_assets.defs.resources import CaptionerResource, ClipEncoderResource, DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.recaptions.recaption import Captioner, write_recaptions
from laion_assets.pipeline.settings import CAPTIONER_FIELDS, CAPTIONER_SECTION
from laion_assets.pipeline.storage import PAIRS, RECAPTIONS, DatasetStore


@per_shard_asset(
    names.RECAPTIONS_ASSET,
    RECAPTIONS,
    kinds={"pytorch", "parquet"},
    upstream=filtered_pairs,
    pool=names.GPU_POOL,
    op_tags=GPU_POD,
)
def recaptions(
    context: dg.AssetExecutionContext,
    store: DatasetStoreResource,
    clip: ClipEncoderResource,
    captioner: CaptionerResource,
) -> dg.MaterializeResult:
    """Recap-DataComp-1B's columns for each kept pair: the new caption and both captions' CLIP scores."""
    dataset = store.get_store()
    encoder = clip.get_encoder(dataset)
    model = captioner.get_captioner(dataset)  # loaded once for every shard of the run
    record_section(dataset, CAPTIONER_SECTION, recorded_settings(model))
    with shards_written(context) as metadata:
        for shard in leased_shards(context, dataset):
            result = write_recaptions(dataset, shard, model, encoder)
            summary = result.summary()
            if summary["failed"]:
                context.log.warning(
                    f"{shard}: {summary['failed']} pairs got no caption (see re_caption_error)"
                )
            rows = result.table.num_rows
            metadata[shard] = {
                "dagster/row_count": rows,
                **summary,
                **{f"captioner/{name}": value for name, value in shown_settings(model.describe()).items()},
                "seconds": round(result.seconds, 2),
                "captions_per_second": round(rows / result.seconds, 1) if result.seconds else 0.0,
                "path": dg.MetadataValue.path(dataset.url(RECAPTIONS.parquet(shard))),
                "preview": preview(result.table, ["key", "org_caption", "re_caption", "re_clip_score"]),
            }
    return shards_materialized(metadata)


def one_row_per_kept_pair(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """`recaptions` has the contract's schema and exactly the keys of `pairs`, once each."""
    table = dataset.read_parquet(RECAPTIONS.parquet(shard))
    pairs = dataset.read_parquet(PAIRS.parquet(shard), columns=["key"]).column("key").to_pylist()
    keys = table.column("key").to_pylist()
    return problems_found(
        shard,
        {
            "schema": int(table.schema.remove_metadata() != schemas.RECAPTIONS),
            "missing_pairs": len(set(pairs) - set(keys)),
            "not_a_pair": len(set(keys) - set(pairs)),
            "repeated_keys": len(keys) - len(set(keys)),
        },
    )


one_row_per_kept_pair_check = shard_check(
    recaptions, names.ONE_ROW_PER_KEPT_PAIR_CHECK, one_row_per_kept_pair
)


def shown_settings(described: dict[str, str]) -> dict[str, str]:
    """The captioner's settings as the UI shows them: `beams` only where decoding uses them (the footer
    keeps them all)."""
    return {k: v for k, v in described.items() if k != "beams" or described.get("decoding") == "beam"}


def recorded_settings(captioner: Captioner) -> dict:
    """The captioner's settings that shape its captions, for the dataset's `captioner` section: those of
    `CAPTIONER_FIELDS` that its footer records as they are set (a transformers model with no chat
    template reads no prompt, and its footer records none), so that a shard it recaptions is current."""
    described = captioner.describe()
    settings = dataclasses.asdict(captioner.settings)
    return {k: v for k, v in settings.items() if k in CAPTIONER_FIELDS and described.get(k) == str(v)}
