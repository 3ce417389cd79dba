"""Captioning benchmark: captions/s of the CoCa captioner, batched against one image at a time.

    .venv/bin/python bench/caption.py [--images 256] [--batch-size 32]
        [--models laion-assets-demo-coca,coca_ViT-B-32] [--device cpu] [--max-tokens 30]

For each model (`demo`: the packaged laion-assets-demo-coca weights, once they are trained; any
open_clip CoCa config name at random weights, e.g. coca_ViT-B-32, since nothing is downloaded here),
captions --images images of the demo's held-out world, as the pipeline stores them, greedily, in
batches of --batch-size and then one image at a time (the peer: what a loop over `CoCa.generate`
does per image). Prints captions/s for both, their ratio, words per caption and the peak RSS of this
process. A random-weight model rarely emits end-of-text, so its captions run to --max-tokens tokens:
the worst case for the decoder.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smoke import parse_args

from laion_assets.demo import DEMO_CAPTION_CHECKPOINT, DEMO_CAPTION_MODEL
from laion_assets.demo.train import EVAL_SEED
from laion_assets.demo.views import pipeline_view
from laion_assets.demo.world import make_world
from laion_assets.pipeline.recaptions.caption import CaptionSettings, CocaCaptioner


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(captioner: CocaCaptioner, images: list) -> tuple[float, list[str]]:
    start = time.perf_counter()
    captions = captioner.caption(images)
    return time.perf_counter() - start, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default=f"{DEMO_CAPTION_MODEL},coca_ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=30)
    args = parse_args(parser, images=4, models="laion-assets-demo-coca", device="cpu")
    import torch

    items = make_world(images=args.images, seed=EVAL_SEED, failures={}).images[: args.images]
    images = [pipeline_view(item) for item in items]
    print(
        f"{len(images)} images, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs; greedy, at most {args.max_tokens} tokens"
    )
    print(
        f"{'model':<26}{'batch':>6}{'captions/s':>12}{'one at a time':>15}{'ratio':>7}{'words':>7}"
        f"{'peak MiB':>10}"
    )
    for model in args.models.split(","):
        name, pretrained = (
            (DEMO_CAPTION_MODEL, str(DEMO_CAPTION_CHECKPOINT)) if model == "demo" else (model, "none")
        )
        settings = CaptionSettings(
            model=name,
            pretrained=pretrained,
            device=args.device,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
        )
        batched = CocaCaptioner(settings)
        batched.caption(images[:2])  # warm-up
        seconds, captions = timed(batched, images)
        single = CocaCaptioner(replace(settings, batch_size=1))
        sample = images[: max(8, len(images) // 8)]  # one at a time is slow: a sample of the images
        single_seconds, _ = timed(single, sample)
        rate, single_rate = len(images) / seconds, len(sample) / single_seconds
        words = sum(len(text.split()) for text in captions) / len(captions)
        print(
            f"{name:<26}{args.batch_size:>6}{rate:>12.1f}{single_rate:>15.1f}{rate / single_rate:>6.1f}x"
            f"{words:>7.1f}{peak_rss_mib():>10,.0f}",
            flush=True,
        )
        print(f"  e.g. {captions[0]!r}")


if __name__ == "__main__":
    main()
