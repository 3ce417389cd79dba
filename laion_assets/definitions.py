"""The one `Definitions` object of the project (workspace.yaml and `dagster dev` load this module)."""

import dagster as dg

from laion_assets.defs.automation import catch_up_schedule, incoming_files_sensor
from laion_assets.defs.catalog import catalog
from laion_assets.defs.checks import PER_SHARD_CHECKS
from laion_assets.defs.jobs import PER_SHARD_ASSETS, shard_job
from laion_assets.defs.resources import build_resources

defs = dg.Definitions(
    assets=[*PER_SHARD_ASSETS, catalog],
    asset_checks=PER_SHARD_CHECKS,
    jobs=[shard_job],
    sensors=[incoming_files_sensor],
    schedules=[catch_up_schedule],
    resources=build_resources(),
)
