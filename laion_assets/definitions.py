"""The one `Definitions` object of the project (workspace.yaml and `dagster dev` load this module)."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.automation import automation_sensor, catch_up_schedule, incoming_files_sensor
from laion_assets.defs.card import DatasetCardConfig, dataset_card
from laion_assets.defs.catalog import catalog
from laion_assets.defs.crawl import CrawlMetadataConfig
from laion_assets.defs.dedup import DuplicatesConfig, duplicates
from laion_assets.defs.download import DownloadImagesConfig
from laion_assets.defs.execution import executor_from_env
from laion_assets.defs.exports import TrainingShardsConfig, training_shards
from laion_assets.defs.jobs import PER_SHARD_ASSETS, PER_SHARD_CHECKS, shard_job
from laion_assets.defs.pairs import FilteredPairsConfig
from laion_assets.defs.pools import pool_slots_sensor
from laion_assets.defs.resources import CaptionerSettings, build_resources
from laion_assets.defs.search import search_index
from laion_assets.defs.takedowns import blocklist, blocklist_sensor, takedown_job, takedowns
from laion_assets.pipeline.embeddings.clip import ClipSettings
from laion_assets.pipeline.scores.score import ScoreSettings

# unpartitioned: `blocklist` reads the lists, the others every materialised shard, in this order
DATASET_ASSETS = [blocklist, takedowns, duplicates, training_shards, catalog, dataset_card, search_index]
dataset_job = dg.define_asset_job(
    names.DATASET_JOB,
    selection=dg.AssetSelection.assets(*DATASET_ASSETS),
    description="The dataset-level assets, over every materialised shard: `laion-assets run` and the demo "
    "run each of them as a run of this job.",
)
# The sections of the dataset's settings file (pipeline/settings.py) that assets read: the run config of
# each asset whose settings shape the dataset's content. The models are the file's `clip`, `captioner` and
# `scores`.
SETTINGS_SECTIONS: dict[str, type[dg.Config]] = {
    names.CRAWL_METADATA_ASSET: CrawlMetadataConfig,
    names.DOWNLOADED_IMAGES_ASSET: DownloadImagesConfig,
    names.FILTERED_PAIRS_ASSET: FilteredPairsConfig,
    names.DUPLICATES_ASSET: DuplicatesConfig,
    names.TRAINING_SHARDS_ASSET: TrainingShardsConfig,
    names.DATASET_CARD_ASSET: DatasetCardConfig,
}


def build_definitions(
    root: str | None = None,
    clip: ClipSettings | None = None,
    captioner: CaptionerSettings | None = None,
    scorers: ScoreSettings | None = None,
) -> dg.Definitions:
    """Everything, with the resources for `root`, `clip`, `captioner` and `scorers` (by default from the
    environment, as EnvVars)."""
    return dg.Definitions(
        assets=[*PER_SHARD_ASSETS, *DATASET_ASSETS],
        asset_checks=PER_SHARD_CHECKS,
        jobs=[shard_job, takedown_job, dataset_job],
        sensors=[incoming_files_sensor, blocklist_sensor, automation_sensor, pool_slots_sensor],
        schedules=[catch_up_schedule],
        resources=build_resources(root, clip, captioner, scorers),
        executor=executor_from_env(),
    )


defs = build_definitions()
