"""The `dataset_card` asset: {root}/card/README.md, the Hugging Face dataset card of every stored shard."""

import dagster as dg

from laion_assets.defs.config import config_class, settings_from
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.partitions import FOLLOWS_ANY_SHARD
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline.card import CardSettings, write_card

# pretty_name, license, description, authors, grid_samples, top_n
DatasetCardConfig = config_class(CardSettings, "DatasetCardConfig")


@dg.asset(
    deps=PER_SHARD_ASSETS, group_name="dataset", kinds={"markdown"}, automation_condition=FOLLOWS_ANY_SHARD
)
def dataset_card(config: DatasetCardConfig, store: DatasetStoreResource) -> dg.MaterializeResult:
    """README.md with YAML header, features, funnel, download outcomes, figures, samples and provenance."""
    dataset = store.get_store()
    result = write_card(dataset, settings_from(config, CardSettings))
    return dg.MaterializeResult(
        metadata={
            "card": dg.MetadataValue.md(result.markdown),
            "path": dg.MetadataValue.path(dataset.url(result.readme)),
            "dagster/row_count": result.pairs,
            "shards": result.shards,
        }
    )
