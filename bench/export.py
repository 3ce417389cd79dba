"""Training-shards benchmark: `write_export` reshards generated pairs shards into shuffled tars of a fixed
size, against webdataset's own shuffle and ShardWriter over the same samples.

    .venv/bin/python bench/export.py [--samples 1000000] [--source-shards 100] [--shard-size 10000]
                                     [--buffer 20000] [--image-bytes 1024]

Writes, under bench/.work/export-<samples>x<image-bytes> (once), `<source-shards>` pairs shards (parquet of
`schemas.PAIRS` and a tar of `<image-bytes>` jpg, txt and json per sample). Then, each in a process of
its own so that its peak RSS is its own:
- ours: the `training_shards` export of every pair (`write_export`: DuckDB selects each source shard's
  rows from the catalog's `annotated_pairs`, the samples go through a shuffle buffer of `<buffer>`, tars
  of `<shard-size>`, a parquet and stats per tar, the manifest);
- the peer: `webdataset.WebDataset(sources).shuffle(<buffer>)` into `webdataset.ShardWriter(maxcount=
  <shard-size>)`, which copies the samples as they are (no selection, no json rewritten, no parquet).
Checks that both wrote every sample once; prints samples/s, MB/s, the ratio, each one's peak RSS, and
ours projected to 400 M samples.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import webdataset
from smoke import parse_args

from laion_assets.pipeline import schemas
from laion_assets.pipeline.exports.export import ExportSettings, read_manifest, write_export
from laion_assets.pipeline.shard_tar import TarShardWriter, read_samples
from laion_assets.pipeline.storage import PAIRS, DatasetStore, Export

WORK = Path(__file__).parent / ".work"
LAION_400M = 400_000_000


def generate(store: DatasetStore, samples: int, sources: int, image_bytes: int) -> None:
    rng = np.random.default_rng(0)
    per = -(-samples // sources)
    for s in range(sources):
        shard = f"source-{s:05d}"
        rows = min(per, samples - s * per)
        keys = [schemas.make_key(shard, i) for i in range(rows)]
        captions = [f"a photo of thing {i} in shard {s}" for i in range(rows)]
        table = pa.table(
            {
                "key": keys,
                "caption": captions,
                "url": [f"https://img{i % 977}.example.com/{s}/{i}.jpg" for i in range(rows)],
                "license": pa.nulls(rows, pa.string()),
                "nsfw": ["UNLIKELY"] * rows,
                "original_height": [480] * rows,
                "original_width": [640] * rows,
                "similarity": rng.uniform(0.3, 0.4, rows),
                "width": [256] * rows,
                "height": [192] * rows,
                "sha256": [f"{s:032x}{i:032x}" for i in range(rows)],
                "host": [f"img{i % 977}.example.com" for i in range(rows)],
            }
        )
        store.write_parquet(PAIRS.parquet(shard), schemas.conform(table, schemas.PAIRS))
        with store.atomic_write(PAIRS.tar(shard)) as out, TarShardWriter(out) as writer:
            for key, caption, row in zip(keys, captions, table.to_pylist(), strict=True):
                image = rng.bytes(image_bytes)
                writer.write(key, {"jpg": image, "txt": caption.encode(), "json": json.dumps(row).encode()})


def ours(root: str, shard_size: int, buffer: int) -> int:
    result = write_export(
        DatasetStore(root), ExportSettings("bench", shard_size=shard_size, shuffle_buffer=buffer)
    )
    return result.samples_added


def peer(root: str, shard_size: int, buffer: int) -> int:
    store = DatasetStore(root)
    sources = sorted(str(p) for p in Path(store.path(PAIRS.name)).glob("*.tar"))
    out = Path(store.path("exports/peer"))
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    dataset = webdataset.WebDataset(sources, shardshuffle=len(sources), seed=0).shuffle(buffer)
    with webdataset.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample in dataset:
            sink.write({k: v for k, v in sample.items() if k != "__url__"})
            written += 1
    return written


def _child(name: str, root: str, shard_size: int, buffer: int) -> tuple[int, float, float]:
    start = time.perf_counter()
    samples = {"ours": ours, "peer": peer}[name](root, shard_size, buffer)
    return samples, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(name: str, root: str, shard_size: int, buffer: int) -> tuple[int, float, float]:
    """(samples, seconds, peak RSS in MiB) of `name` in a process of its own; what it raised, or that it
    died, raised here."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, name, root, shard_size, buffer).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--source-shards", type=int, default=100)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--buffer", type=int, default=20_000)
    parser.add_argument("--image-bytes", type=int, default=1024)
    args = parse_args(parser, samples=2_000, source_shards=4, shard_size=300, buffer=500)
    work = WORK / f"export-{args.samples}x{args.image_bytes}x{args.source_shards}"
    store = DatasetStore(str(work))
    if not store.exists(PAIRS.tar(f"source-{args.source_shards - 1:05d}")):
        print(f"generating {args.samples:,} samples in {args.source_shards} shards under {work}")
        shutil.rmtree(work, ignore_errors=True)
        generate(store, args.samples, args.source_shards, args.image_bytes)
    shutil.rmtree(store.path("exports"), ignore_errors=True)
    source_bytes = sum(p.stat().st_size for p in Path(store.path(PAIRS.name)).glob("*.tar"))
    figures = {}
    for name in ("ours", "peer"):
        samples, seconds, peak = timed(name, str(work), args.shard_size, args.buffer)
        assert samples == args.samples, f"{name} wrote {samples} samples of {args.samples}"
        figures[name] = (seconds, peak)
        print(
            f"{name}: {samples:,} samples in {seconds:.1f} s: {samples / seconds:,.0f} samples/s, "
            f"{source_bytes / seconds / 1e6:.0f} MB/s, peak RSS {peak:,.0f} MiB"
        )
    manifest = read_manifest(store, Export("bench"))
    keys = [
        key
        for shard in manifest["shards"]
        for key, _ in read_samples(store.open(Export("bench").tar(shard["shard"])))
    ]
    assert len(keys) == len(set(keys)) == args.samples and manifest["samples"] == args.samples
    sizes = [shard["samples"] for shard in manifest["shards"]]
    assert sizes[:-1] == [args.shard_size] * (len(sizes) - 1)
    ratio = figures["peer"][0] / figures["ours"][0]
    rate = args.samples / figures["ours"][0]
    print(f"ratio (ours / webdataset ShardWriter, samples/s): {ratio:.2f}x")
    print(
        f"400 M samples at this rate: {LAION_400M / rate / 3600:,.1f} hours on one process; the shuffle "
        f"buffer ({args.buffer:,} samples) bounds the memory, not the export's size"
    )


if __name__ == "__main__":
    main()
