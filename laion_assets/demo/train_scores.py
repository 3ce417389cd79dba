"""Trains the demo's quality_scores models on the synthetic world and checks them on a world they never
saw, through the pipeline's own scoring code.

- `punsafe`: LAION's NSFW head for B/32 (`nsfw-b32`: a Normalization layer fitted to the training
  embeddings, two dense layers, a sigmoid), over the demo CLIP's image embeddings, on binary
  cross-entropy against the world's unsafe class.
- `aesthetic`: LAION-Aesthetics v2's MLP (`aesthetic-mlp`) over the same embeddings, on the squared error
  against the world's aesthetic truth.
- `pwatermark`: LAION's watermark model (a timm EfficientNet with LAION's head) on timm's tiny
  `test_efficientnet`, on the pixels the pipeline stores, half of them watermarked.

The check, on the held-out world: precision and recall of `punsafe >= 0.5` and `pwatermark >= 0.8`
(the thresholds LAION-Aesthetics kept below), the aesthetic score's Spearman correlation with the
truth, and the language identifier's accuracy on the world's captions, spread over its languages.

    python -m laion_assets.demo.train_scores [--images N] [--watermark-images N] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from laion_assets.demo import DEMO_CHECKPOINT, DEMO_WATERMARK_MODEL
from laion_assets.demo.score import QualityScore, score_quality
from laion_assets.demo.train import EVAL_SEED, TRAIN_SEED, _embeddings, _encoder, optimise, prepared_pixels
from laion_assets.demo.world import (
    FOREIGN,
    OVERLAID,
    Item,
    aesthetic_truth,
    is_unsafe,
    is_watermarked,
    make_world,
)
from laion_assets.pipeline.scores.heads import build_head
from laion_assets.pipeline.scores.language import LanguageIdentifier
from laion_assets.pipeline.scores.score import DEMO_AESTHETIC_HEAD, DEMO_PUNSAFE_HEAD
from laion_assets.pipeline.scores.watermark import build_watermark_model, pwatermark, watermark_pixels
from laion_assets.pipeline.scores.weights import load_checkpoint, save_checkpoint

WATERMARK_BACKBONE = "watermark:test_efficientnet"
FOREIGN_FRACTION = len(FOREIGN) / (len(FOREIGN) + 1)  # every language as often as English


def world(images: int, seed: int, watermarked: float) -> list[Item]:
    """`images` images in every language, `watermarked` of them watermarked across, and as many again
    overlaid copies (a small watermark in a corner) as watermarked ones."""
    return make_world(
        images=images,
        seed=seed,
        mismatch_fraction=0.0,
        failures={},
        copies={OVERLAID: round(images * watermarked)},
        foreign_fraction=FOREIGN_FRACTION,
        watermarked_fraction=watermarked,
    ).images


def train_heads(items: Sequence[Item], steps: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The punsafe and aesthetic heads, fitted on the demo CLIP's embeddings of `items`."""
    embeddings = _embeddings(_encoder(DEMO_CHECKPOINT), items).clone()
    unsafe = torch.tensor([is_unsafe(item) for item in items], dtype=torch.float32)
    truth = torch.tensor([aesthetic_truth(item) for item in items], dtype=torch.float32)
    start = time.monotonic()
    punsafe = build_head("nsfw-b32", embeddings.shape[1]).train()
    punsafe.norm.mean.copy_(embeddings.mean(dim=0))  # as Keras' Normalization adapts to its data
    punsafe.norm.variance.copy_(embeddings.var(dim=0))

    def unsafe_loss(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        loss = F.binary_cross_entropy(punsafe(embeddings[batch]), unsafe[batch])
        return loss, f"loss {loss.item():.4f}"

    optimise(list(punsafe.parameters()), unsafe_loss, steps, 256, len(items), 3e-3, start, "punsafe")
    aesthetic = build_head("aesthetic-mlp", embeddings.shape[1]).train()

    def aesthetic_loss(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        loss = F.mse_loss(aesthetic(embeddings[batch]), truth[batch])
        return loss, f"loss {loss.item():.4f}"

    optimise(
        list(aesthetic.parameters()), aesthetic_loss, 2 * steps, 256, len(items), 2e-3, start, "aesthetic"
    )
    return punsafe.eval(), aesthetic.eval()


def train_watermark(items: Sequence[Item], steps: int) -> torch.nn.Module:
    inputs = prepared_pixels(items, watermark_pixels)
    labels = torch.tensor([0 if is_watermarked(item) else 1 for item in items])  # output 0: watermark
    torch.manual_seed(0)
    model = build_watermark_model(WATERMARK_BACKBONE).train()

    def loss(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        logits = model(inputs[batch])
        value = F.cross_entropy(logits, labels[batch])
        return (
            value,
            f"loss {value.item():.4f}, right {(logits.argmax(1) == labels[batch]).float().mean():.2f}",
        )

    optimise(list(model.parameters()), loss, steps, 32, len(items), 3e-3, time.monotonic(), "watermark")
    return model.eval()


def evaluate(items: Sequence[Item], models: Sequence[Path], language_id: str = "py3langid") -> QualityScore:
    """The saved models (punsafe head, aesthetic head, watermark model) on `items`, loaded as the pipeline
    loads them."""
    embeddings = _embeddings(_encoder(DEMO_CHECKPOINT), items).clone()
    punsafe_path, aesthetic_path, watermark_path = models
    with torch.inference_mode():
        punsafe, aesthetic = (
            build_head(
                (c := load_checkpoint(str(path), "head")).architecture, embeddings.shape[1], c.state_dict
            )(embeddings).numpy()
            for path in (punsafe_path, aesthetic_path)
        )
        saved = load_checkpoint(str(watermark_path), "watermark_model")
        model = build_watermark_model(saved.architecture, saved.state_dict)
        watermark = torch.cat(
            [pwatermark(model, batch) for batch in prepared_pixels(items, watermark_pixels).split(64)]
        ).numpy()
    identifier = LanguageIdentifier(language_id)
    languages = [identifier.identify(item.caption)[0] for item in items]
    return score_quality(items, punsafe, watermark, aesthetic, languages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="training images for the heads")
    parser.add_argument("--watermark-images", type=int, default=1200, help="training images, watermark")
    parser.add_argument("--steps", type=int, default=2000, help="steps of each head")
    parser.add_argument("--watermark-steps", type=int, default=600)
    parser.add_argument("--held-out", type=int, default=700, help="images of the held-out world")
    parser.add_argument("--out-dir", type=Path, help="where to save the three models (default: the package)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.monotonic()
    punsafe, aesthetic = train_heads(world(args.images, TRAIN_SEED, watermarked=0.3), args.steps)
    clip = _encoder(DEMO_CHECKPOINT).identity
    punsafe_path, aesthetic_path, watermark_path = (
        args.out_dir / path.name if args.out_dir else path
        for path in (DEMO_PUNSAFE_HEAD, DEMO_AESTHETIC_HEAD, DEMO_WATERMARK_MODEL)
    )
    save_checkpoint(punsafe_path, "nsfw-b32", punsafe, clip)
    save_checkpoint(aesthetic_path, "aesthetic-mlp", aesthetic, clip)
    watermark = train_watermark(
        world(args.watermark_images, TRAIN_SEED + 100, watermarked=0.5), args.watermark_steps
    )
    save_checkpoint(watermark_path, WATERMARK_BACKBONE, watermark)
    print(f"trained and saved in {time.monotonic() - start:.0f}s")
    held_out = world(args.held_out, EVAL_SEED, watermarked=0.3)
    evaluation = evaluate(held_out, (punsafe_path, aesthetic_path, watermark_path))
    print("on the held-out world:\n  " + "\n  ".join(evaluation.lines()))
    return 0 if evaluation.holds() else 1


if __name__ == "__main__":
    sys.exit(main())
