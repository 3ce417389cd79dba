"""The `dataset_card` asset: the Hugging Face dataset card of every stored shard."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.config import dataset_config, settings_from
from laion_assets.defs.exports import training_shards
from laion_assets.defs.metadata import reads
from laion_assets.defs.partitions import DATASET_GROUP, FOLLOWS_ANY_SHARD
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.card import CardSettings, write_card
from laion_assets.pipeline.storage import DUPLICATES, EXPORTS, SHARD_LAYERS, TAKEDOWNS

S = CardSettings  # every default below is the pipeline's own


class DatasetCardConfig(dg.Config):
    """What the card says about the dataset, and how much of it it lists."""

    pretty_name: str = S.pretty_name
    license: str = S.license  # of the metadata; the images keep their own rights. "other" unless you know
    description: str = S.description
    authors: str = S.authors  # the BibTeX author field; blank leaves it out
    grid_samples: int = S.grid_samples
    top_n: int = S.top_n  # rows in the error, host and licence lists

    def settings(self) -> CardSettings:
        return settings_from(self, CardSettings)


@dg.asset(
    name=names.DATASET_CARD_ASSET,
    deps=[training_shards],  # after every removal and export
    group_name=DATASET_GROUP,
    metadata=reads(*SHARD_LAYERS, TAKEDOWNS, DUPLICATES, EXPORTS),
    kinds={"markdown"},
    automation_condition=FOLLOWS_ANY_SHARD,
)
def dataset_card(
    context: dg.AssetExecutionContext, config: DatasetCardConfig, store: DatasetStoreResource
) -> dg.MaterializeResult:
    """README.md with YAML header, features, funnel, download outcomes, figures, samples and provenance."""
    dataset = store.get_store()
    result = write_card(dataset, dataset_config(context, config, dataset).settings())
    return dg.MaterializeResult(
        metadata={
            "card": dg.MetadataValue.md(result.ui_markdown),  # the file is the Hub's card
            "path": dg.MetadataValue.path(dataset.url(result.readme)),
            "dagster/row_count": result.pairs,
            "shards": result.shards,
        }
    )
