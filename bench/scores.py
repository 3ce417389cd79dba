"""Quality-scores benchmark: scores/s of each model of `quality_scores` on this machine, batched as the
stage runs them against one at a time (the peer: a loop over single samples), and captions/s of the two
language identifiers (the peer of py3langid, the default, is CLD3, LAION-5B's).

    .venv/bin/python bench/scores.py [--embeddings 20000] [--images 64] [--captions 20000]
        [--batch-size 64] [--device cpu]

- Heads over CLIP embeddings, in LAION's architectures at the published sizes (random weights: nothing
  is downloaded here): the NSFW detector for B/32 (512-d) and L/14 (768-d), the aesthetic linear model
  and the v2 MLP (768-d), on L2-normalised random embeddings.
- The watermark model: timm's EfficientNet-B3 (B3a's architecture) with LAION's head on 256 x 256
  pixels, and the demo's `test_efficientnet`; the input is made by the stage's own `watermark_pixels`.
- Language: the demo world's captions, spread over its seven languages.

Each model runs in a fresh process, so that its peak RSS is its own (Python, torch and the model
included).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smoke import parse_args

HEADS = (("nsfw-b32", 512), ("nsfw-l14", 768), ("aesthetic-linear", 768), ("aesthetic-mlp", 768))
WATERMARK_MODELS = ("watermark:efficientnet_b3", "watermark:test_efficientnet")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rate(count: int, work) -> float:
    """`count` items / the seconds `work()` takes, after one warm-up call."""
    work()
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def head_rates(architecture: str, dim: int, count: int, batch_size: int, device: str) -> tuple[float, float]:
    import torch

    from laion_assets.pipeline.scores.heads import build_head
    from laion_assets.pipeline.scores.score import run_head

    head = build_head(architecture, dim).to(device)
    vectors = torch.nn.functional.normalize(torch.randn(count, dim), dim=-1).numpy()
    single = vectors[: max(1, count // 20)]

    def one_at_a_time() -> None:
        with torch.inference_mode():
            for vector in single:
                head(torch.from_numpy(vector[None]).to(device))

    return rate(count, lambda: run_head(head, vectors, batch_size)), rate(len(single), one_at_a_time)


def watermark_rates(architecture: str, count: int, batch_size: int, device: str) -> tuple[float, float]:
    import torch

    from laion_assets.demo.train import EVAL_SEED
    from laion_assets.demo.views import pipeline_view
    from laion_assets.demo.world import make_world
    from laion_assets.pipeline.scores.watermark import build_watermark_model, pwatermark, watermark_pixels

    model = build_watermark_model(architecture).to(device)
    items = make_world(images=count, seed=EVAL_SEED, failures={}).images[:count]
    pixels = torch.stack([watermark_pixels(pipeline_view(item)) for item in items])
    single = pixels[: max(1, count // 8)]

    def batched() -> None:
        for batch in pixels.split(batch_size):
            pwatermark(model, batch)

    def one_at_a_time() -> None:
        for image in single:
            pwatermark(model, image[None])

    return rate(len(pixels), batched), rate(len(single), one_at_a_time)


def language_rate(identifier: str, count: int) -> tuple[float, float]:
    from laion_assets.demo.world import FOREIGN, make_world
    from laion_assets.pipeline.scores.language import LanguageIdentifier

    start = time.perf_counter()
    found = LanguageIdentifier(identifier)
    load = time.perf_counter() - start
    share = len(FOREIGN) / (len(FOREIGN) + 1)
    items = make_world(images=count, seed=2, failures={}, foreign_fraction=share).images
    captions = [item.caption for item in items]
    right = sum(found.identify(item.caption)[0] == item.language for item in items)
    return rate(len(captions), lambda: [found.identify(c) for c in captions]), right / len(items), load


def _measured(job: tuple) -> tuple:
    name, args = job
    figures = {"head": head_rates, "watermark": watermark_rates, "language": language_rate}[name](*args)
    return (*figures, peak_rss_mib())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=int, default=20_000)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--captions", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parse_args(parser, embeddings=200, images=4, captions=50, batch_size=4)
    # a fresh process per model, started before this one imports torch: Linux keeps the peak RSS across
    # fork and exec, so each child's is its own only while this process stays small
    context = multiprocessing.get_context("spawn")
    print(f"{os.cpu_count()} CPUs, device {args.device}")
    print(
        f"{'head over CLIP embeddings':<32}{'scores/s':>10}{'one at a time':>15}{'ratio':>8}{'peak MiB':>10}"
    )
    for architecture, dim in HEADS:
        job = ("head", (architecture, dim, args.embeddings, args.batch_size, args.device))
        with context.Pool(1) as pool:
            batched, single, peak = pool.apply(_measured, (job,))
        name = f"{architecture} ({dim}-d)"
        print(f"{name:<32}{batched:>10,.0f}{single:>15,.0f}{batched / single:>8.1f}{peak:>10,.0f}")
    print(
        f"{'watermark model, 256 x 256':<32}{'images/s':>10}{'one at a time':>15}{'ratio':>8}{'peak MiB':>10}"
    )
    for architecture in WATERMARK_MODELS:
        job = ("watermark", (architecture, args.images, args.batch_size, args.device))
        with context.Pool(1) as pool:
            batched, single, peak = pool.apply(_measured, (job,))
        print(f"{architecture:<32}{batched:>10,.1f}{single:>15,.1f}{batched / single:>8.1f}{peak:>10,.0f}")
    print(f"{'language of the captions':<32}{'captions/s':>10}{'right':>8}{'load s':>8}{'peak MiB':>10}")
    rates = {}
    for identifier in ("py3langid", "cld3"):
        with context.Pool(1) as pool:
            captions, right, load, peak = pool.apply(_measured, (("language", (identifier, args.captions)),))
        rates[identifier] = captions
        print(f"{identifier:<32}{captions:>10,.0f}{right:>8.3f}{load:>8.2f}{peak:>10,.0f}")
    print(f"py3langid / cld3 captions/s: {rates['py3langid'] / rates['cld3']:.2f}")


if __name__ == "__main__":
    main()
