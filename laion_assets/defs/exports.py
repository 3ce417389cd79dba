"""The `training_shards` asset: each export of the dataset's settings (`training_shards.exports`) written or
grown in `exports/<name>/` (pipeline/exports/export.py)."""

import dataclasses

import dagster as dg
import pydantic

from laion_assets import names
from laion_assets.defs.config import dataset_config
from laion_assets.defs.dedup import duplicates
from laion_assets.defs.metadata import exports_metadata, reads
from laion_assets.defs.partitions import DATASET_GROUP, FOLLOWS_ANY_SHARD
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.defs.takedowns import REMOVALS_WAIT
from laion_assets.pipeline import markdown
from laion_assets.pipeline.exports.export import ExportSettings, write_export
from laion_assets.pipeline.leases import REMOVALS, shard_lease
from laion_assets.pipeline.storage import DUPLICATES, EMBEDDINGS, EXPORTS, PAIRS, RECAPTIONS, SCORES

E = ExportSettings  # every default below is the pipeline's own


class ExportConfig(dg.Config):
    """One export: which pairs (a SQL `where` over the catalog's annotated_pairs, a keys file, or both),
    which caption is the samples' txt, and how they are sharded."""

    name: str  # exports/<name>/: letters, digits, `_` and `-`
    where: str = E.where  # e.g. "aesthetic > 6 AND NOT duplicate"; blank: every pair
    keys_file: str = E.keys_file  # .txt (a key a line) or .parquet (`key`), under the root or absolute
    caption: str = E.caption  # `caption` (the web's alt text) or `re_caption`
    shard_size: int = E.shard_size
    shuffle_buffer: int = E.shuffle_buffer  # samples held in memory to shuffle
    seed: int = E.seed
    embeddings: bool = E.embeddings  # each sample's CLIP image embedding as .npy


class TrainingShardsConfig(dg.Config):
    """The exports to write or grow. Each grows by the shards it has not read yet; one built with other
    settings refuses until it is named in `reshuffle`."""

    exports: list[ExportConfig] = pydantic.Field(default_factory=list)
    # run only: rebuild these exports whole, shuffled anew, with these settings
    reshuffle: list[str] = pydantic.Field(default_factory=list)

    def settings(self) -> list[ExportSettings]:
        return [ExportSettings(**export.model_dump()) for export in self.exports]


@dg.asset(
    name=names.TRAINING_SHARDS_ASSET,
    deps=[duplicates],  # after every removal
    group_name=DATASET_GROUP,
    metadata=reads(PAIRS, SCORES, RECAPTIONS, EMBEDDINGS, DUPLICATES),
    kinds={"webdataset", "duckdb"},
    automation_condition=FOLLOWS_ANY_SHARD,
)
def training_shards(
    context: dg.AssetExecutionContext, config: TrainingShardsConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """Shuffled webdataset tars of a fixed number of samples for each export, with per-shard stats and a
    manifest; new dataset shards add new tars, and the tars written stay as they are but for the samples of a
    dataset shard rebuilt since, which is read again."""
    dataset = store.get_store()
    config = dataset_config(context, config, dataset)
    settings = config.settings()
    unknown = sorted(set(config.reshuffle) - {export.name for export in settings})
    if unknown:
        raise ValueError(f"reshuffle names exports the settings do not have: {', '.join(unknown)}")
    with shard_lease(dataset, REMOVALS, context.run.run_id, wait=REMOVALS_WAIT):  # not during a removal
        results = [write_export(dataset, export, export.name in config.reshuffle) for export in settings]
    for result in results:
        context.log.info(
            f"export {result.name}: {result.samples_added} samples in {len(result.shards_added)} new shards "
            f"from {len(result.sources_added)} dataset shards" + (" (rebuilt)" if result.rebuilt else "")
        )
        if result.reread:
            context.log.info(f"export {result.name}: read again, rebuilt since: {', '.join(result.reread)}")
        for shard, layers in result.waiting.items():
            context.log.warning(f"export {result.name}: shard {shard} waits for its {' and '.join(layers)}")
    added = [
        (r.name, len(r.sources_added), len(r.shards_added), r.samples_added, r.rebuilt, len(r.waiting))
        for r in results
    ]
    return dg.MaterializeResult(
        metadata={
            **exports_metadata(dataset),  # every export stored, as a removal's observation counts them
            "this_run": dg.MetadataValue.md(
                markdown.table(
                    ["export", "sources read", "shards added", "samples added", "rebuilt", "shards waiting"],
                    added,
                )
            ),
            "settings": dg.MetadataValue.json([dataclasses.asdict(export) for export in settings]),
            "path": dg.MetadataValue.path(dataset.url(EXPORTS)),
        }
    )
