"""The near-copy kinds' precision and recall against eps, on the demo world with planted copies, with
the demo model: the curve the README's settings come from.

    .venv/bin/python bench/dedup_eps.py

Builds the test suite's demo dataset (60 images, two shards, the demo model) with 6 planted copies of
each kind (`demo.world.EXACT_COPIES` and `NEAR_COPIES`), then runs `dedup.deduplicate` on a fresh copy
of it for each eps of the semantic kind alone, for each gate `perceptual_eps` of the perceptual kind
alone (hashes at most 10 bits apart), and for the demo's settings (both), and scores each run against
the planted copies (`demo.score.score_duplicates`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the test suite's demo dataset builder

from smoke import parse_args

from laion_assets.demo import DEMO_WATERMARK_MODEL
from laion_assets.demo.run import DEMO_DEDUP_CONFIG
from laion_assets.demo.score import score_duplicates
from laion_assets.demo.world import EXACT_COPIES, NEAR_COPIES, make_world
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.dedup.deduplicate import DedupSettings, deduplicate
from laion_assets.pipeline.scores.score import SETTINGS_ENV as SCORES_ENV
from laion_assets.pipeline.storage import DUPLICATES, DatasetStore
from laion_assets_tests.demo_dataset import DEMO_IMAGES, build_demo_dataset

COPIES = {**dict.fromkeys(EXACT_COPIES, 6), **dict.fromkeys(NEAR_COPIES, 6)}
EPS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
PHASH_BITS = 10


def main() -> None:
    parse_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))  # already tiny: --smoke is it
    # the demo's watermark model, as the demo scores its world: LAION's default would be downloaded
    os.environ[SCORES_ENV["watermark_model"]] = str(DEMO_WATERMARK_MODEL)
    with tempfile.TemporaryDirectory(prefix="dedup-eps-") as folder:
        work = Path(folder)
        planted = build_demo_dataset(str(work / "planted"), copies=COPIES)
        world = make_world(images=DEMO_IMAGES, failures={}, copies=COPIES)
        before = catalog.connect(DatasetStore(planted)).sql("SELECT key, url FROM pairs").fetchall()
        runs = [(f"semantic, 1 - eps = {1 - eps:g}", DedupSettings(eps=eps)) for eps in EPS]
        runs += [
            (
                f"perceptual, <= {PHASH_BITS} bits, 1 - perceptual_eps = {1 - eps:g}",
                DedupSettings(semantic=False, max_phash_distance=PHASH_BITS, perceptual_eps=eps),
            )
            for eps in EPS
        ]
        demo = DedupSettings(**DEMO_DEDUP_CONFIG)
        runs.append(
            (
                f"both (the demo): 1 - eps = {1 - demo.eps:g}; <= {demo.max_phash_distance} bits, "
                f"1 - perceptual_eps = {1 - demo.perceptual_eps:g}",
                demo,
            )
        )
        print("| near-copy kinds | removed as near copies | precision | recall |")
        print("|---|---|---|---|")
        for number, (name, settings) in enumerate(runs):
            root = work / f"run-{number}"
            shutil.copytree(planted, root)
            store = DatasetStore(str(root))
            deduplicate(store, replace(settings, clusters=4))
            table = store.read_parquet(DUPLICATES)
            columns = (table.column(c).to_pylist() for c in ("key", "duplicate_of", "kind"))
            rows = list(zip(*columns, strict=True))
            score = score_duplicates(world, before, rows)
            figures = score.figures()
            print(
                f"| {name} | {score.near_removed} | {figures['near_precision']:.2f} | "
                f"{figures['near_recall']:.2f} ({score.near_found}/{score.near_planted}) |"
            )


if __name__ == "__main__":
    main()
