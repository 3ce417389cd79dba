"""Trains the demo's tiny CLIP on the synthetic world and checks the LAION filter with it.

The model sees what the pipeline will feed it: the served JPEG or PNG, resized by the downloader
(`process_image` with the demo's border colour), decoded and put through open_clip's own preprocessing;
captions come in every template. Besides the standard CLIP loss, a margin term puts true captions
above the filter's threshold and captions of a different shape and colour below it, so that the
unchanged LAION threshold (0.3) separates matched from mismatched pairs. A third term makes
"a drawing or illustration" and "a logo" the two nearest of the pairs stage's NSFW-tag categories
for every image (they are drawings), so that shapes are tagged UNLIKELY rather than at random.

    python -m laion_assets.demo.train [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from laion_assets.demo import DEMO_BORDER_COLOR, DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.score import FilterScore
from laion_assets.demo.world import (
    COLOURS,
    SHAPES,
    TEMPLATES,
    Item,
    World,
    caption,
    image_bytes,
    make_world,
)
from laion_assets.pipeline.clip import MODEL_CONFIGS, ClipEncoder, ClipSettings
from laion_assets.pipeline.imaging import ImageSettings, process_image
from laion_assets.pipeline.pairs import CATEGORIES_FILE, NsfwCategories, PairsSettings

THRESHOLD = PairsSettings().min_similarity
# The demo world is make_world's default seed (0); training and evaluation use others.
TRAIN_SEED = 1
EVAL_SEED = 2
MATCHED_FLOOR = THRESHOLD + 0.2
MISMATCHED_CEILING = THRESHOLD - 0.2
REQUIRED = 0.9  # precision and recall
NEAREST_CATEGORIES = ("a drawing or illustration", "a logo")


def pipeline_view(item: Item) -> Image.Image:
    """The item's image as the embedding stage reads it from the downloaded shard."""
    settings = ImageSettings(border_color=DEMO_BORDER_COLOR)
    return Image.open(io.BytesIO(process_image(image_bytes(item), settings).data))


@dataclass(frozen=True)
class Pool:
    """Pre-processed training images with their captions in every template, tokenised."""

    pixels: torch.Tensor  # (N, 3, H, W)
    tokens: torch.Tensor  # (N, templates, context)
    colours: torch.Tensor  # (N,) colour index, to tell which pairs differ in colour
    shapes: torch.Tensor  # (N,) shape index


def make_pool(
    size: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> Pool:
    items = make_world(images=size, seed=TRAIN_SEED, mismatch_fraction=0.0, failures={}).images
    return Pool(
        pixels=torch.stack([preprocess(pipeline_view(item)) for item in items]),
        tokens=tokenizer([caption(item, t) for item in items for t in TEMPLATES]).view(
            len(items), len(TEMPLATES), -1
        ),
        colours=torch.tensor([list(COLOURS).index(item.colour) for item in items]),
        shapes=torch.tensor([SHAPES.index(item.shape) for item in items]),
    )


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's image-text similarities."""
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def margin_loss(
    image: torch.Tensor, text: torch.Tensor, colours: torch.Tensor, shapes: torch.Tensor
) -> torch.Tensor:
    """True pairs above MATCHED_FLOOR; pairs differing in both colour and shape below MISMATCHED_CEILING."""
    cosine = image @ text.T
    different = (colours[:, None] != colours[None, :]) & (shapes[:, None] != shapes[None, :])
    return (
        F.relu(MATCHED_FLOOR - cosine.diagonal()).mean()
        + F.relu(cosine[different] - MISMATCHED_CEILING).mean()
    )


def tag_categories() -> tuple[list[str], torch.Tensor]:
    """The NSFW-tag category prompts and a distribution split evenly over NEAREST_CATEGORIES."""
    data = json.loads(CATEGORIES_FILE.read_text())
    names = data["nsfw"] + data["neutral"]
    targets = torch.tensor([float(name in NEAREST_CATEGORIES) for name in names])
    return names, targets / targets.sum()


def train(steps: int, batch_size: int, pool_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    open_clip.add_model_config(MODEL_CONFIGS)
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_MODEL)
    start = time.monotonic()
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    pool = make_pool(pool_size, preprocess, tokenizer)
    categories, category_targets = tag_categories()
    category_tokens = tokenizer(categories)
    print(f"pool: {pool_size} images in {time.monotonic() - start:.0f}s", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        batch = torch.randint(pool_size, (batch_size,))
        template = torch.randint(len(TEMPLATES), (batch_size,))
        image, text, scale = model(pool.pixels[batch], pool.tokens[batch, template])
        contrastive = contrastive_loss(image, text, scale)
        margin = margin_loss(image, text, pool.colours[batch], pool.shapes[batch])
        category_logits = scale * image @ model.encode_text(category_tokens, normalize=True).T
        category = F.cross_entropy(category_logits, category_targets.expand(batch_size, -1))
        optimizer.zero_grad()
        (contrastive + margin + category).backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(
                f"step {step}/{steps}: contrastive {contrastive.item():.3f}, margin {margin.item():.3f}, "
                f"category {category.item():.3f}, {time.monotonic() - start:.0f}s",
                flush=True,
            )
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> None:
    """The state dict in float16 (half the size); open_clip loads it into the float32 model."""
    state = {
        name: value.half() if value.is_floating_point() else value
        for name, value in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@dataclass(frozen=True)
class Evaluation:
    """Similarities of image and published caption, split by ground truth, and the images' NSFW tags."""

    matched: np.ndarray
    mismatched: np.ndarray
    tags: Counter[str]

    @property
    def score(self) -> FilterScore:
        """The filter's outcome: a pair is kept when its similarity is at least THRESHOLD."""
        kept_matched, kept_mismatched = (int((v >= THRESHOLD).sum()) for v in (self.matched, self.mismatched))
        return FilterScore(
            kept_matched=kept_matched,
            kept_mismatched=kept_mismatched,
            dropped_matched=len(self.matched) - kept_matched,
            dropped_mismatched=len(self.mismatched) - kept_mismatched,
        )

    def report(self) -> str:
        quantiles = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
        lines = [f"at similarity >= {THRESHOLD}: {self.score.line()}"]
        for name, values in (("matched", self.matched), ("mismatched", self.mismatched)):
            spread = ", ".join(f"q{q:g}={np.quantile(values, q):.3f}" for q in quantiles)
            lines.append(f"{name} ({len(values)}): {spread}")
        lines.append("nsfw tags: " + ", ".join(f"{tag} {count}" for tag, count in self.tags.most_common()))
        return "\n".join(lines)


def evaluate(checkpoint: Path, world: World) -> Evaluation:
    """Each image item of `world` against its published caption, through the pipeline's encoder."""
    encoder = ClipEncoder(ClipSettings(model=DEMO_MODEL, pretrained=str(checkpoint), device="cpu"))
    items = world.images
    images = encoder.encode_images(torch.stack([encoder.prepare(pipeline_view(item)) for item in items]))
    texts = encoder.encode_texts([item.caption for item in items])
    similarity = (images * texts).sum(dim=-1).numpy()
    mismatched = np.array([item.mismatched for item in items])
    tags, _ = NsfwCategories.load(lambda names: encoder.encode_texts(names).numpy()).tag(images.numpy())
    return Evaluation(matched=similarity[~mismatched], mismatched=similarity[mismatched], tags=Counter(tags))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pool", type=int, default=3000, help="training images, generated once")
    parser.add_argument("--out", type=Path, default=DEMO_CHECKPOINT)
    args = parser.parse_args(argv)
    start = time.monotonic()
    save(train(args.steps, args.batch_size, args.pool), args.out)
    size = args.out.stat().st_size / 1e6
    print(f"saved {args.out} ({size:.1f} MB) after {time.monotonic() - start:.0f}s")
    evaluation = evaluate(args.out, make_world(seed=EVAL_SEED))
    print(evaluation.report())
    return 0 if min(evaluation.score.precision, evaluation.score.recall) >= REQUIRED else 1


if __name__ == "__main__":
    sys.exit(main())
