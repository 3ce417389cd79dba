"""`laion-assets demo`: a synthetic web served on 127.0.0.1, dropped into `incoming/`, run through every
asset, and the CLIP filter scored against the captions known to be mismatched."""

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pyarrow as pa

from laion_assets import names
from laion_assets.defs.automation import unpause_the_ui_automation_badge
from laion_assets.defs.partitions import lineage_path
from laion_assets.demo import DEMO_WATERMARK_MODEL
from laion_assets.demo.score import (
    evaluate_captioner,
    score_duplicates,
    score_filter,
    score_quality,
    score_recaptions,
)
from laion_assets.demo.web import WorldWeb
from laion_assets.demo.world import (
    ENGLISH,
    EXACT_COPIES,
    MISMATCH_FRACTION,
    NEAR_COPIES,
    is_watermarked,
    make_world,
)
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.embeddings.clip import ClipSettings
from laion_assets.pipeline.exports.export import stored_exports
from laion_assets.pipeline.recaptions.caption import CaptionSettings
from laion_assets.pipeline.scores.score import ScoreSettings
from laion_assets.pipeline.storage import (
    CARD_FIGURES,
    CRAWL_METADATA,
    INCOMING,
    PAIRS,
    SETTINGS_FILE,
    DatasetStore,
    Export,
)
from laion_assets.runner import ALL_ASSETS, run_pipeline

SOURCE_PREFIX = "synthetic-web"
DEMO_SOURCE = re.compile(rf"{SOURCE_PREFIX}-\d+\.parquet")  # its URL lists, and the shards made from them
# Downloads from 127.0.0.1: the private-network guard off, failures quick.
DOWNLOAD_CONFIG = {
    "allow_private_networks": True,
    "connect_timeout": 2,
    "read_timeout": 5,
    "request_timeout": 10,
    "retry_backoff": 0.1,
}
QUERY = "SELECT status, count(*) AS n FROM images GROUP BY 1 ORDER BY n DESC"
# Two training-shards exports: every pair with its web caption, and the better-looking unique pairs with
# their recaptions (README, "Training on an export")
DEMO_EXPORTS = [
    {"name": "all", "shard_size": 100},
    {"name": "recap", "caption": "re_caption", "where": "aesthetic >= 5 AND NOT duplicate", "shard_size": 64},
]
COPY_KINDS = EXACT_COPIES + NEAR_COPIES
MIN_IMAGES = 2 * len(COPY_KINDS)  # a planted copy of each kind, each of a distinct matched image


def demo_copies(images: int) -> dict[str, int]:
    """Planted copies of the world's images per kind, dataset-level dedup's ground truth: 6 of each, or
    fewer where the world has too few matched images (a fifth of its images are mismatched)."""
    if images < MIN_IMAGES:
        raise ValueError(
            f"the demo needs at least {MIN_IMAGES} images (a copy of each of its kinds); got {images}"
        )
    matched = images - round(images * MISMATCH_FRACTION)
    return dict.fromkeys(COPY_KINDS, min(6, matched // (2 * len(COPY_KINDS)) or 1))


DEMO_COPIES = demo_copies(300)  # the default demo's
# Captions in the world's other languages, and watermarked images: what quality_scores finds
FOREIGN_FRACTION = 0.15
WATERMARKED_FRACTION = 0.15
# Both near-copy kinds (docs/dedup.md, from bench/dedup_eps.py): the semantic kind takes
# what the model places within eps 0.002, and the perceptual kind (hashes 10 bits apart at most, among
# images the model sees as close) copies it places a little further, e.g. cropped ones.
DEMO_DEDUP_CONFIG = {"eps": 0.002, "max_phash_distance": 10, "perceptual_eps": 0.02}


class RootInUse(ValueError):
    """The root holds a dataset that is not the demo's, which the demo would take over."""


def check_root_is_the_demos(store: DatasetStore) -> None:
    """RootInUse naming the sources and shards in `store` that the demo did not write. `demo` and `run`
    share the default root (./data, or $LAION_ASSETS_ROOT), and the demo replaces the dataset's settings
    and rebuilds every shard with its own models."""
    others = [
        f"{folder}/{f.name}"
        for folder in (INCOMING, CRAWL_METADATA.name)
        for f in store.list(folder)
        if not DEMO_SOURCE.fullmatch(f.name)
    ]
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise RootInUse(
            f"{store.root} holds a dataset that is not the demo's ({listed}): the demo would replace its "
            f"settings ({SETTINGS_FILE}) and rebuild its shards with the demo's models. Give the demo a "
            "root of its own: laion-assets demo --root demo-data"
        )


def write_sources(store: DatasetStore, rows: list[dict[str, str | None]], shards: int) -> list[str]:
    """The URL list split into `shards` parquet files in `incoming/`; returns their names."""
    names = []
    for i in range(shards):
        part = rows[i::shards]
        names.append(f"{SOURCE_PREFIX}-{i}.parquet")
        table = pa.table(
            {
                column: pa.array([row[column] for row in part], pa.string())
                for column in ("url", "caption", "license")
            }
        )
        store.write_parquet(f"{INCOMING}/{names[-1]}", table)
    return names


# The demo instance's configuration: runs and events in SQLite files in its folder (Dagster's default),
# and no telemetry, whose notice would land between the demo's results.
DEMO_INSTANCE = """# written by `laion-assets demo`: storage in this folder (Dagster's default), no telemetry,
# and no "Join the Dagster community" dialog over the UI's first page
telemetry:
  enabled: false
nux:
  enabled: false
"""


# The demo's code location, loaded under the name the CLI's runs record, so the UI re-executes them.
DEMO_WORKSPACE = f"""# written by `laion-assets demo`: the definitions, under the name its runs record
load_from:
  - python_module:
      module_name: {names.DEFINITIONS_MODULE}
      location_name: {names.CODE_LOCATION}
"""


def dagster_home(store: DatasetStore) -> Path:
    """Where the demo keeps its Dagster instance, so the UI opened afterwards shows its runs."""
    return Path(os.environ.get("DAGSTER_HOME") or (".dagster" if store.is_s3 else store.path(".dagster")))


def run_demo(
    root: str,
    clip: ClipSettings,
    captioner: CaptionSettings,
    images: int = 300,
    shards: int = 2,
    echo: Callable[[str], None] = print,
) -> int:
    store = DatasetStore(root)
    check_root_is_the_demos(store)
    world = make_world(
        images=images,
        copies=demo_copies(images),
        foreign_fraction=FOREIGN_FRACTION,
        watermarked_fraction=WATERMARKED_FRACTION,
    )
    store.remove(SETTINGS_FILE)  # a new world: its first run writes the dataset's settings anew
    home = dagster_home(store).absolute()
    home.mkdir(parents=True, exist_ok=True)
    for file, text in (("dagster.yaml", DEMO_INSTANCE), ("workspace.yaml", DEMO_WORKSPACE)):
        if not (home / file).exists():  # a folder of the user's own keeps its configuration
            (home / file).write_text(text)
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        unpause_the_ui_automation_badge(instance)
    with WorldWeb(world) as web:
        sources = write_sources(store, web.rows(), shards)
        mismatched = sum(item.mismatched for item in world.images)
        foreign = sum(item.language != ENGLISH for item in world.images)
        watermarked = sum(is_watermarked(item) for item in world.images)
        echo(
            f"synthetic web at {web.base_url}: {len(world.images)} images ({mismatched} captions "
            f"mismatched on purpose, {foreign} in other languages, {watermarked} watermarked), "
            f"{len(world.items) - len(world.images)} broken links and opt-outs; "
            f"URL lists {', '.join(sources)} in {store.url(INCOMING)}"
        )
        run_config = {
            "ops": {
                "downloaded_images": {"config": DOWNLOAD_CONFIG},
                "duplicates": {"config": DEMO_DEDUP_CONFIG},
                names.TRAINING_SHARDS_ASSET: {"config": {"exports": DEMO_EXPORTS}},
            }
        }
        scorers = ScoreSettings(watermark_model=str(DEMO_WATERMARK_MODEL), device=clip.device)
        outcomes = run_pipeline(
            root,
            ALL_ASSETS,
            run_config,
            force=True,
            echo=echo,
            clip=clip,
            captioner=captioner,
            scorers=scorers,
        )
    if any(o.error for o in outcomes):
        return 1

    connection = catalog.connect(store)
    demo_rows = f"key LIKE '{SOURCE_PREFIX}-%'"
    downloaded = connection.sql(f"SELECT key, url FROM images WHERE status = 'success' AND {demo_rows}")
    # what the CLIP filter kept: the pairs, and those dedup removed from them afterwards
    kept_sql = (
        f"SELECT key FROM pairs WHERE {demo_rows} UNION ALL SELECT key FROM duplicates WHERE {demo_rows}"
    )
    kept = {key for (key,) in connection.sql(kept_sql).fetchall()}
    score = score_filter(world, downloaded.fetchall(), kept)
    echo(f"CLIP filter against the known mismatches: {score.line()}")
    scored = connection.sql(
        "SELECT i.url, s.punsafe, s.pwatermark, s.aesthetic, s.language FROM scores s JOIN images i "
        f"USING (key) WHERE s.{demo_rows}"
    ).fetchall()
    items = [world.item_at(url) for url, *_ in scored]
    quality = score_quality(items, *([row[i] for row in scored] for i in range(1, 5)))
    echo(f"quality scores against the world's truths: {quality.line()}")
    before_dedup = connection.sql(
        f"SELECT key, url FROM pairs WHERE {demo_rows} UNION ALL "
        f"SELECT d.key, i.url FROM duplicates d JOIN images i USING (key) WHERE d.{demo_rows}"
    )
    found = connection.sql(f"SELECT key, duplicate_of, kind FROM duplicates WHERE {demo_rows}")
    dedup = score_duplicates(world, before_dedup.fetchall(), found.fetchall())
    echo(f"dataset-level dedup against the planted copies: {dedup.line()}")
    recaptioned = connection.sql(
        f"SELECT url, re_caption, org_clip_score, re_clip_score FROM recaptions WHERE {demo_rows}"
    )
    kept_score = score_recaptions(world, recaptioned.fetchall())
    echo(f"kept pairs recaptioned by {captioner.model}: {kept_score.line()}")
    every = evaluate_captioner(captioner, clip, world)
    echo(f"the same captioner on every image of this world, kept or dropped: {every.line()}")
    echo(f"dataset card figures: {store.url(CARD_FIGURES)}")
    echo(f"pairs: {store.url(PAIRS.name)}/<shard>.parquet and .tar")
    for manifest in stored_exports(store):
        echo(
            f"training shards {store.url(Export(manifest['name']).folder)}/: {manifest['samples']} samples "
            f"in {len(manifest['shards'])} tars, {manifest['bytes'] / 1e6:.1f} MB, txt = "
            f"{manifest['settings']['caption']} ({manifest['query']})"
        )
    # the venv's own executables, so that each command runs as printed in a shell that has not activated it
    bin_ = Path(sys.executable).parent
    root = root if store.is_s3 else str(Path(root).absolute())  # from any folder
    echo(f'$ {bin_ / "laion-assets"} sql --root {root} "{QUERY}"\n{connection.sql(QUERY)}')
    echo(
        "open the Dagster UI on the same data and runs:\n"
        f"  DAGSTER_HOME={home} LAION_ASSETS_ROOT={root} LAION_ASSETS_CLIP_MODEL={clip.model} "
        f"LAION_ASSETS_CLIP_PRETRAINED={clip.pretrained} LAION_ASSETS_CAPTION_MODEL={captioner.model} "
        f"LAION_ASSETS_CAPTION_PRETRAINED={captioner.pretrained} "
        f"{bin_ / 'dagster'} dev -w {home / 'workspace.yaml'}\n"
        f"  its lineage with every group open: http://127.0.0.1:3000{lineage_path()}\n"
        "search it and embed with the same model (the CLIP service, http://127.0.0.1:9001/docs):\n"
        f"  LAION_ASSETS_CLIP_MODEL={clip.model} LAION_ASSETS_CLIP_PRETRAINED={clip.pretrained} "
        f"{bin_ / 'laion-assets'} serve --root {root}"
    )
    return 0
