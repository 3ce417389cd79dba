"""The demo dataset the search tests run on: two shards of a small synthetic web embedded with the demo
model, and their search index."""

from collections.abc import Callable, Mapping
from types import MappingProxyType

import dagster as dg

from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.defs.search import search_index
from laion_assets.demo import DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.run import write_sources
from laion_assets.demo.web import WorldWeb
from laion_assets.demo.world import make_world
from laion_assets.pipeline.embeddings.clip import ClipSettings
from laion_assets.pipeline.schemas import SUCCESS
from laion_assets.pipeline.storage import IMAGES, DatasetStore
from laion_assets_tests.dagster_helpers import LOCAL_WEB, materialize_shard

DEMO_CLIP = ClipSettings(model=DEMO_MODEL, pretrained=str(DEMO_CHECKPOINT), device="cpu", batch_size=64)
DEMO_IMAGES = 60
DEMO_SHARDS = ("synthetic-web-0", "synthetic-web-1")


def build_demo_dataset(
    root: str,
    edit_rows: Callable[[list[dict]], list[dict]] = lambda rows: rows,
    pairs_embeddings: bool = False,
    copies: Mapping[str, int] = MappingProxyType({}),
) -> str:
    """The pipeline run over `make_world(images=DEMO_IMAGES)` into `root`, search index included; the URL
    list made by `edit_rows` from the world's (with its planted `copies`), pairs_embeddings written when
    asked."""
    instance = dg.DagsterInstance.ephemeral()
    with WorldWeb(make_world(images=DEMO_IMAGES, failures={}, copies=copies)) as web:
        write_sources(DatasetStore(root), edit_rows(web.rows()), shards=len(DEMO_SHARDS))
        for shard in DEMO_SHARDS:
            config = {"ops": {"downloaded_images": {"config": LOCAL_WEB}}}
            if pairs_embeddings:
                config["ops"]["filtered_pairs"] = {"config": {"write_embeddings": True}}
            assert materialize_shard(instance, root, shard, config, clip=DEMO_CLIP).success
            _assert_all_downloaded(DatasetStore(root), shard)
    resources = {"store": DatasetStoreResource(root=root)}
    assert dg.materialize([search_index], resources=resources, instance=instance).success
    return root


def _assert_all_downloaded(store: DatasetStore, shard: str) -> None:
    """The world has no failures, so every row must be an image: a row that failed (a timeout on a loaded
    machine) would change which pairs the search and export tests see, far from its cause."""
    images = store.read_parquet(IMAGES.parquet(shard), columns=["key", "status", "error_message"])
    failed = [row for row in images.to_pylist() if row["status"] != SUCCESS]
    assert not failed, f"{shard}: {len(failed)} of {images.num_rows} rows not downloaded: {failed[:5]}"
