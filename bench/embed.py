"""Embedding benchmark: the clip_embeddings stage against a plain open_clip loop on the same tar.

    .venv/bin/python bench/embed.py [--images 256] [--model ViT-B-32] [--batch-size 64] [--device auto]

Builds a webdataset tar of photo-like images as the download stage stores them (256 px, border,
JPEG 95), then embeds it with the same random weights (nothing is downloaded), each in its own
process:
- stage: `embed_shard`, decoding and preprocessing in threads ahead of the model;
- plain: PIL decode → open_clip preprocess → encode, batch by batch, nothing overlapped;
- clip-retrieval: `clip-retrieval inference` (installed by this script into its own venv under
  bench/.work/), given the weights as a checkpoint file and the images as 2 tars, one per
  preprocessing worker, as it parallelises over tars. Its throughput is taken from its own stats,
  which leave out model loading, as the other two do.
Prints images/s, peak memory (max RSS; clip-retrieval: summed over its process tree) and ratios.
With a GPU (`--device cuda`) the same command measures it there.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import make_photos, timed
from peers import WORK, ensure_peer
from smoke import parse_args

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.imaging import ImageSettings, process_image
from laion_assets.pipeline.embeddings.clip import ClipEncoder, ClipSettings
from laion_assets.pipeline.shard_tar import TarShardWriter, read_samples


def build_shard(count: int) -> tuple[Path, Path]:
    """A tar and its images parquet, as downloaded_images writes them."""
    tar_path, table_path = WORK / f"embed-{count}.tar", WORK / f"embed-{count}.parquet"
    if tar_path.exists() and table_path.exists():
        return tar_path, table_path
    photos = make_photos(WORK / "photos", min(count, 300))
    keys, captions = [], []
    with open(tar_path, "wb") as f, TarShardWriter(f) as writer:
        for i in range(count):
            key, caption = schemas.make_key("bench", i), f"a photo with colours, number {i}"
            image = process_image(photos[i % len(photos)].read_bytes(), ImageSettings())
            writer.write(key, {"jpg": image.data, "txt": caption.encode()})
            keys.append(key)
            captions.append(caption)
    pq.write_table(
        pa.table({"key": keys, "caption": captions, "status": [schemas.SUCCESS] * count}), table_path
    )
    return tar_path, table_path


def run_clip_retrieval(args: argparse.Namespace, tar_path: Path) -> dict:
    """clip-retrieval inference on the same images and weights; images/s from its stats files."""
    import torch

    weights = WORK / f"{args.model}-random-seed0.pt"
    if not weights.exists():
        encoder = ClipEncoder(ClipSettings(model=args.model, pretrained="none", device="cpu"))
        torch.save(encoder.model.state_dict(), weights)
    halves = [WORK / f"embed-{args.images}-part{i}.tar" for i in range(2)]
    with open(tar_path, "rb") as f:
        samples = list(read_samples(f))
    for i, half in enumerate(halves):
        with open(half, "wb") as out, TarShardWriter(out) as writer:
            for key, members in samples[i::2]:
                writer.write(key, members)
    output = WORK / "clip-retrieval-out"
    shutil.rmtree(output, ignore_errors=True)
    peak = timed(
        [
            # clip-anytorch still imports pkg_resources, which setuptools 81 removed
            str(ensure_peer("clip-retrieval", ["clip-retrieval", "setuptools<81"])),
            "inference",
            "--input_dataset",  # a brace pattern, as clip-retrieval takes it
            str(WORK / f"embed-{args.images}-part{{0..1}}.tar"),
            "--input_format",
            "webdataset",
            "--output_folder",
            str(output),
            "--batch_size",
            str(args.batch_size),
            "--num_prepro_workers",
            "2",
            "--clip_model",
            f"open_clip:{args.model}/{weights}",
            "--enable_metadata",
            "False",
            "--use_jit",
            "False",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).peak_rss
    stats = [json.loads(p.read_text()) for p in (output / "stats").glob("*.json")]
    count = sum(s["sample_count"] for s in stats)
    busy = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {
        "variant": "clip-retrieval",
        "images": count,
        "seconds": busy,
        "images_per_second": count / busy,
        "peak_mb": peak / 2**20,
        "device": "its own choice",
    }


def run_stage(encoder: ClipEncoder, tar_path: Path, table_path: Path, batch_size: int) -> int:
    from laion_assets.pipeline.embeddings.embed import embed_shard

    with open(tar_path, "rb") as tar:
        return embed_shard(pq.read_table(table_path), tar, encoder, batch_size).table.num_rows


def run_plain(encoder: ClipEncoder, tar_path: Path, table_path: Path, batch_size: int) -> int:
    import torch
    from PIL import Image

    done = 0
    with open(tar_path, "rb") as tar:
        samples = list(read_samples(tar))
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        pixels = torch.stack([encoder.preprocess(Image.open(io.BytesIO(m["jpg"]))) for _, m in batch])
        image = encoder.encode_images(pixels)
        text = encoder.encode_texts([m["txt"].decode() for _, m in batch])
        (image * text).sum(-1).cpu()
        done += len(batch)
    return done


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Runs one variant in this process (called in a child) and reports images/s and peak memory."""
    tar_path, table_path = build_shard(args.images)
    encoder = ClipEncoder(ClipSettings(model=args.model, pretrained="none", device=args.device))
    encoder.encode_images(_blank(encoder, min(args.batch_size, 16)))  # warm-up, not timed
    start = time.perf_counter()
    count = (run_stage if variant == "stage" else run_plain)(encoder, tar_path, table_path, args.batch_size)
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "images": count,
        "seconds": seconds,
        "images_per_second": count / seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(encoder.device),
    }


def _blank(encoder: ClipEncoder, n: int):
    import torch
    from PIL import Image

    return torch.stack([encoder.preprocess(Image.new("RGB", (256, 256)))] * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-clip-retrieval", action="store_true")
    parser.add_argument("--variant", choices=["stage", "plain"], help=argparse.SUPPRESS)
    args = parse_args(parser, images=8, model="laion-assets-demo", device="cpu", skip_clip_retrieval=True)
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    build_shard(args.images)
    results = {}
    for variant in ("plain", "stage"):
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True, text=True
        )
        if child.returncode != 0:
            raise SystemExit(child.stderr[-3000:])
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"{args.model}, random weights, batch {args.batch_size}, {args.images} images, "
        f"device {results['stage']['device']}"
    )
    print(f"{'variant':<16}{'images/s':>10}{'peak MB':>10}")
    for result in results.values():
        print(f"{result['variant']:<16}{result['images_per_second']:>10.1f}{result['peak_mb']:>10.0f}")
    if not args.skip_clip_retrieval:
        result = run_clip_retrieval(args, build_shard(args.images)[0])
        results["clip-retrieval"] = result
        print(f"{result['variant']:<16}{result['images_per_second']:>10.1f}{result['peak_mb']:>10.0f}")
    stage = results["stage"]["images_per_second"]
    for peer in ("plain", "clip-retrieval"):
        if peer in results:
            print(f"ratio stage / {peer}: {stage / results[peer]['images_per_second']:.2f}x")


if __name__ == "__main__":
    main()
