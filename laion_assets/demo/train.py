"""Trains the demo's tiny CLIP on the synthetic world and checks it on a world it never saw.

The model sees what the pipeline will feed it: the served JPEG or PNG, resized by the downloader
(`process_image` at its defaults: img2dataset's `border`, padded white), decoded and put through
open_clip's own preprocessing; captions come in every template. It trains in two stages, as the demo
CoCa does (`train_coca`). First the image tower learns the world's colours and shapes from linear
heads over its embedding: trained from scratch on the CLIP loss alone, a tower this small tells the
captions apart by colour and barely learns shapes. Then the whole model trains on the CLIP loss with
two more terms, the attribute heads staying on so that the shapes are kept. A margin puts true
captions above the filter's threshold and captions of a different shape and colour below it, so that
the unchanged LAION threshold (0.3) separates matched from mismatched pairs. A category term makes
"a drawing or illustration" and "a logo" the two nearest of the pairs stage's NSFW-tag categories
for every image (they are drawings), so that shapes are tagged UNLIKELY rather than at random.

The check, on the held-out world: the filter's precision and recall; a linear probe (a logistic
regression on the image embeddings of training-world images) naming each held-out image's shape
and colour; and search by text, "a blue square" and every other colour and shape, finding those
images first.

    python -m laion_assets.demo.train [--attribute-steps N] [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from laion_assets.demo import DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.score import FilterScore
from laion_assets.demo.views import pipeline_view
from laion_assets.demo.world import (
    COLOURS,
    SHAPES,
    TEMPLATES,
    Item,
    World,
    caption,
    make_world,
)
from laion_assets.pipeline.embeddings.clip import MODEL_CONFIGS, ClipEncoder, ClipSettings
from laion_assets.pipeline.pairs.filter import CATEGORIES_FILE, NsfwCategories, PairsSettings

THRESHOLD = PairsSettings().min_similarity
# The demo world is make_world's default seed (0); training and evaluation use others.
TRAIN_SEED = 1
EVAL_SEED = 2
MATCHED_FLOOR = THRESHOLD + 0.2
MISMATCHED_CEILING = THRESHOLD - 0.2
REQUIRED = 0.9  # precision and recall
NEAREST_CATEGORIES = ("a drawing or illustration", "a logo")


PROBE_IMAGES = 2000  # training-world images the linear probe learns from
# What the image tower learns first, and keeps learning beside the CLIP loss.
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES}


def prepared_pixels(items: Sequence[Item], preprocess: Callable) -> torch.Tensor:
    """The items' pipeline views through `preprocess`, stacked; rendered on two processes (a minute
    for 20,000 on one core)."""
    with ProcessPoolExecutor(2) as workers:
        return torch.from_numpy(
            np.stack(list(workers.map(_prepared, items, [preprocess] * len(items), chunksize=256)))
        )


def _prepared(item: Item, preprocess: Callable) -> np.ndarray:
    """As numpy: tensors would come back from the workers as shared memory, a file descriptor each."""
    return preprocess(pipeline_view(item)).numpy()


def attribute_labels(items: Sequence[Item]) -> torch.Tensor:
    """(N, len(ATTRIBUTES)) class indices."""
    return torch.tensor(
        [[values.index(getattr(item, name)) for name, values in ATTRIBUTES.items()] for item in items]
    )


@dataclass(frozen=True)
class Pool:
    """Pre-processed training images with their captions in every template, tokenised."""

    pixels: torch.Tensor  # (N, 3, H, W)
    tokens: torch.Tensor  # (N, templates, context)
    labels: torch.Tensor  # (N, len(ATTRIBUTES)): colour and shape indices


def make_pool(
    size: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> Pool:
    items = make_world(images=size, seed=TRAIN_SEED, mismatch_fraction=0.0, failures={}).images
    return Pool(
        pixels=prepared_pixels(items, preprocess),
        tokens=tokenizer([caption(item, t) for item in items for t in TEMPLATES]).view(
            len(items), len(TEMPLATES), -1
        ),
        labels=attribute_labels(items),
    )


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's image-text similarities."""
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def margin_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True pairs above MATCHED_FLOOR; pairs differing in both colour and shape below MISMATCHED_CEILING."""
    cosine = image @ text.T
    different = (labels[:, None, :] != labels[None, :, :]).all(dim=-1)
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


class AttributeHeads(torch.nn.Module):
    """A linear head per attribute over an image representation: the CLIP embedding before it is
    normalised, or the CoCa tower's pooled tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = torch.nn.Linear(width, sum(map(len, ATTRIBUTES.values())))

    def loss(self, embedding: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, str]:
        logits = self.heads(embedding).split([len(v) for v in ATTRIBUTES.values()], dim=1)
        truths = labels.unbind(dim=1)
        loss = sum(F.cross_entropy(x, y) for x, y in zip(logits, truths, strict=True))
        right = ", ".join(
            f"{name} {(x.argmax(dim=1) == y).float().mean():.2f}"
            for name, x, y in zip(ATTRIBUTES, logits, truths, strict=True)
        )
        return loss, f"attribute loss {loss.item():.3f} (right in the batch: {right})"


def train(
    attribute_steps: int, steps: int, batch_size: int, pool_size: int, seed: int = 0
) -> torch.nn.Module:
    """`attribute_steps` on the image tower and the attribute heads, then `steps` on every loss."""
    torch.manual_seed(seed)
    open_clip.add_model_config(MODEL_CONFIGS)
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_MODEL)
    start = time.monotonic()
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    pool = make_pool(pool_size, preprocess, tokenizer)
    categories, category_targets = tag_categories()
    category_tokens = tokenizer(categories)
    print(f"pool: {pool_size} images in {time.monotonic() - start:.0f}s", flush=True)
    model.train()
    heads = AttributeHeads(model.visual(pool.pixels[:1]).shape[1])

    def attributes(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        return heads.loss(model.visual(pool.pixels[batch]), pool.labels[batch])

    tower = [*model.visual.parameters(), *heads.parameters()]
    optimise(tower, attributes, attribute_steps, batch_size, pool_size, 2e-3, start, "attributes")

    def everything(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        template = torch.randint(len(TEMPLATES), (len(batch),))
        embedding = model.visual(pool.pixels[batch])
        image = F.normalize(embedding, dim=-1)
        text = model.encode_text(pool.tokens[batch, template], normalize=True)
        scale = model.logit_scale.exp()
        contrastive = contrastive_loss(image, text, scale)
        margin = margin_loss(image, text, pool.labels[batch])
        category_logits = scale * image @ model.encode_text(category_tokens, normalize=True).T
        category = F.cross_entropy(category_logits, category_targets.expand(len(batch), -1))
        attribute, right = heads.loss(embedding, pool.labels[batch])
        return contrastive + margin + category + attribute, (
            f"contrastive {contrastive.item():.3f}, margin {margin.item():.3f}, "
            f"category {category.item():.3f}, {right}"
        )

    everything_parameters = [*model.parameters(), *heads.parameters()]
    optimise(everything_parameters, everything, steps, batch_size, pool_size, 2e-3, start, "clip")
    return model.eval()


def optimise(
    parameters: list[torch.nn.Parameter],
    loss: Callable[[int, torch.Tensor], tuple[torch.Tensor, str]],
    steps: int,
    batch_size: int,
    pool_size: int,
    lr: float,
    start: float,
    stage: str,
) -> None:
    """`steps` AdamW steps on `loss(step, batch indices)` under a one-cycle schedule peaking at `lr`."""
    if steps < 1:
        return
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(1, steps + 1):
        value, line = loss(step, torch.randint(pool_size, (batch_size,)))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps:
            print(f"{stage} step {step}/{steps}: {line}, {time.monotonic() - start:.0f}s", flush=True)


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
    encoder = _encoder(checkpoint)
    items = world.images
    images = _embeddings(encoder, items)
    texts = encoder.encode_texts([item.caption for item in items])
    similarity = (images * texts).sum(dim=-1).numpy()
    mismatched = np.array([item.mismatched for item in items])
    tags, _ = NsfwCategories.load(lambda names: encoder.encode_texts(names).numpy()).tag(images.numpy())
    return Evaluation(matched=similarity[~mismatched], mismatched=similarity[mismatched], tags=Counter(tags))


def linear_probe(checkpoint: Path, world: World, train_images: int = PROBE_IMAGES) -> dict[str, float]:
    """The share of `world`'s images whose colour and shape a linear probe names: a logistic regression
    per attribute on the image embeddings of `train_images` images of the training world."""
    encoder = _encoder(checkpoint)
    train_items = make_world(images=train_images, seed=TRAIN_SEED, mismatch_fraction=0.0, failures={}).images
    train_x, test_x = (_embeddings(encoder, items).clone() for items in (train_items, world.images))
    train_y, test_y = attribute_labels(train_items), attribute_labels(world.images)
    shares = {}
    for column, (name, values) in enumerate(ATTRIBUTES.items()):
        probe = _fitted_probe(train_x, train_y[:, column], len(values))
        with torch.no_grad():
            shares[name] = float((probe(test_x).argmax(dim=1) == test_y[:, column]).float().mean())
    return shares


def search_precision(checkpoint: Path, world: World) -> float:
    """Text-to-image search over `world`'s images, one query per colour and shape it shows ("a blue
    square"): the share of each query's images found among its first hits, as many hits as it has images
    (R-precision), over every query."""
    encoder = _encoder(checkpoint)
    items = world.images
    images = _embeddings(encoder, items)
    found = 0
    for colour, shape in sorted({(item.colour, item.shape) for item in items}):
        truth = {i for i, item in enumerate(items) if (item.colour, item.shape) == (colour, shape)}
        query = encoder.encode_texts([f"a {colour} {shape}"])[0]
        found += len(truth & set(torch.argsort(images @ query, descending=True)[: len(truth)].tolist()))
    return found / len(items)


def _fitted_probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    """A logistic regression, lightly L2-regularised, fitted by L-BFGS on the whole set."""
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def _encoder(checkpoint: Path) -> ClipEncoder:
    return ClipEncoder(ClipSettings(model=DEMO_MODEL, pretrained=str(checkpoint), device="cpu"))


def _embeddings(encoder: ClipEncoder, items: Sequence[Item]) -> torch.Tensor:
    """Inference tensors: `clone()` them to fit on."""
    return encoder.encode_images(torch.stack([encoder.prepare(pipeline_view(item)) for item in items]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attribute-steps", type=int, default=4000, help="the image tower's first stage")
    parser.add_argument("--steps", type=int, default=1500, help="steps on every loss")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pool", type=int, default=12000, help="training images, generated once")
    parser.add_argument("--out", type=Path, default=DEMO_CHECKPOINT)
    args = parser.parse_args(argv)
    start = time.monotonic()
    save(train(args.attribute_steps, args.steps, args.batch_size, args.pool), args.out)
    size = args.out.stat().st_size / 1e6
    print(f"saved {args.out} ({size:.1f} MB) after {time.monotonic() - start:.0f}s")
    held_out = make_world(seed=EVAL_SEED)
    evaluation = evaluate(args.out, held_out)
    print(evaluation.report())
    probe = linear_probe(args.out, held_out)
    print("linear probe, right on the held-out world: " + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()))
    search = search_precision(args.out, held_out)
    print(f"search by colour and shape on the held-out world, R-precision: {search:.3f}")
    figures = (evaluation.score.precision, evaluation.score.recall, *probe.values(), search)
    return 0 if min(figures) >= REQUIRED else 1


if __name__ == "__main__":
    sys.exit(main())
