"""Running the real assets on an ephemeral Dagster instance."""

import dagster as dg

from laion_assets import names
from laion_assets.defs.jobs import PER_SHARD_ASSETS, PER_SHARD_CHECKS
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import build_resources
from laion_assets.pipeline.embeddings.clip import ClipSettings
from laion_assets.pipeline.recaptions.caption import CaptionSettings
from laion_assets_tests.captioners import RANDOM_COCA

# A real open_clip model on a tiny architecture, random weights with a fixed seed: nothing to download.
TINY_CLIP = ClipSettings(model="laion-assets-tiny", pretrained="none", device="cpu", batch_size=4)

# Run config for downloads from the test web on 127.0.0.1: the guard off, retries quick. Its servers never
# stall on purpose, so the timeouts only have to outlast a busy machine (CI's demo dataset once came out
# short of rows, one-second timeouts the likeliest cause; build_demo_dataset now says so if it happens).
LOCAL_WEB = {
    "allow_private_networks": True,
    "connect_timeout": 10,
    "read_timeout": 10,
    "request_timeout": 30,
    "retry_backoff": 0.05,
}


def local_web_config(**crawl_config) -> dict:
    ops = {"downloaded_images": {"config": LOCAL_WEB}}
    if crawl_config:
        ops["crawl_metadata"] = {"config": crawl_config}
    return {"ops": ops}


def materialize_shard(
    instance: dg.DagsterInstance,
    root: str,
    shard: str,
    run_config: dict | None = None,
    selection=None,
    clip: ClipSettings = TINY_CLIP,
    captioner: CaptionSettings = RANDOM_COCA,
) -> dg.ExecuteInProcessResult:
    if shard not in instance.get_dynamic_partitions(shards.name):
        instance.add_dynamic_partitions(shards.name, [shard])
    return dg.materialize(
        [*PER_SHARD_ASSETS, *PER_SHARD_CHECKS],
        selection=selection,
        partition_key=shard,
        instance=instance,
        resources=build_resources(root, clip, captioner),
        run_config=run_config,
        raise_on_error=False,
    )


def shard_pipeline() -> dg.JobDefinition:
    """The project's shard job as a code location loads it now (resources from the environment), for
    `dg.reconstructable`: what the UI's Re-execute of a run launches."""
    from laion_assets.definitions import build_definitions

    return build_definitions().resolve_job_def(names.SHARD_JOB)
