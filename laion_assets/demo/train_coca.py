"""Trains the demo's tiny CoCa captioner on the synthetic world and measures it on a world it never saw.

It learns to describe an image in full, "a red circle on a striped white background" (the world's
first template: colour, shape, pattern and background), from the image as the pipeline stores it
(`pipeline_view`), in two stages. First the image tower, with its attentional pooler, learns the
world's colours and shapes from linear heads over the pooled tokens the text decoder will read: a small
ViT trained from scratch learns shapes far faster from that direct signal than through the caption's
one shape token. Then, the tower fixed, CoCa's captioning loss trains the text side, mostly over the
world's own tokens (`caption_loss`). The pipeline scores captions with its own CLIP, not with
the captioner's contrastive head. Then, on the held-out world (`EVAL_SEED`), it reports the share of
recaptions that name the image's true colour and shape, and, for the pairs whose published caption is
another image's, the share where the recaption's CLIP score (the demo CLIP) beats the published one's.

    python -m laion_assets.demo.train_coca [--attribute-steps N] [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from laion_assets.demo import DEMO_CAPTION_CHECKPOINT, DEMO_CAPTION_MODEL, DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.score import RecaptionScore, evaluate_captioner
from laion_assets.demo.train import (
    EVAL_SEED,
    REQUIRED,
    TRAIN_SEED,
    AttributeHeads,
    attribute_labels,
    optimise,
    prepared_pixels,
    save,
)
from laion_assets.demo.world import (
    TEMPLATES,
    World,
    caption,
    make_world,
)
from laion_assets.pipeline.embeddings.clip import MODEL_CONFIGS, ClipSettings
from laion_assets.pipeline.recaptions.caption import CaptionSettings

DESCRIPTION = TEMPLATES[0]  # "{a} {colour} {shape} on a {pattern} {background} background"
# The image tower learns the world's colours and shapes first (`train.ATTRIBUTES`). Not pattern and
# background: learnt alongside, those two easy ones pull the tower towards texture and delay the shapes
# (trial runs of 4,000 steps: a loss of 0.65 at step 2,750 with them, 0.04 without); the captioning
# stage reads them from the tokens anyway.


@dataclass(frozen=True)
class Pool:
    """Training images, preprocessed as the captioner will see them, with their description tokenised
    and their attributes as class indices."""

    pixels: torch.Tensor  # (N, 3, H, W)
    tokens: torch.Tensor  # (N, context), cut after the longest description
    labels: torch.Tensor  # (N, len(ATTRIBUTES))


def make_pool(size: int, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable) -> Pool:
    items = make_world(images=size, seed=TRAIN_SEED, mismatch_fraction=0.0, failures={}).images
    tokens = tokenizer([caption(item, DESCRIPTION) for item in items])
    tokens = tokens[:, : int((tokens != model.pad_id).sum(dim=1).max())]  # no step over padding alone
    return Pool(pixels=prepared_pixels(items, preprocess), tokens=tokens, labels=attribute_labels(items))


def train(
    attribute_steps: int,
    steps: int,
    full_steps: int,
    batch_size: int,
    pool_size: int,
    lr: float = 3e-3,
    seed: int = 0,
) -> torch.nn.Module:
    """`attribute_steps` on the attributes (the image tower), then `steps` of the captioning loss (the
    text tower and decoder) over the world's own words, the last `full_steps` of them over the whole
    vocabulary (see `caption_loss`)."""
    torch.manual_seed(seed)
    open_clip.add_model_config(MODEL_CONFIGS)
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_CAPTION_MODEL)
    tokenizer = open_clip.get_tokenizer(DEMO_CAPTION_MODEL)
    start = time.monotonic()
    pool = make_pool(pool_size, model, preprocess, tokenizer)
    words = torch.unique(pool.tokens[:, 1:][pool.tokens[:, 1:] != model.pad_id])
    print(
        f"pool: {pool_size} images, {len(words)} distinct tokens, {time.monotonic() - start:.0f}s", flush=True
    )
    model.train()
    heads = AttributeHeads(_pooled(model, pool.pixels[:1]).shape[1])

    def attributes(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        return heads.loss(_pooled(model, pool.pixels[batch]), pool.labels[batch])

    tower = [*model.visual.parameters(), *heads.parameters()]
    optimise(tower, attributes, attribute_steps, batch_size, pool_size, lr, start, "attributes")

    # The tower stays as it is now: its pooled tokens, made once, are all the captioning steps need.
    with torch.no_grad():
        image_embs = torch.cat([model._encode_image(chunk)[1] for chunk in pool.pixels.split(256)])

    def captions(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, str]:
        vocabulary = None if step > steps - full_steps else words
        loss = caption_loss(model, image_embs[batch], pool.tokens[batch], vocabulary)
        over = "all tokens" if vocabulary is None else "the world's tokens"
        return loss, f"caption loss over {over} {loss.item():.3f}"

    text = [p for name, p in model.named_parameters() if not name.startswith("visual.")]
    optimise(text, captions, steps, batch_size, pool_size, lr, start, "captions")
    return model.eval()


def _pooled(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The image's pooled tokens, the ones the text decoder reads, as one vector per image."""
    _, tokens = model._encode_image(pixels)
    return tokens.flatten(1)


def caption_loss(
    model: torch.nn.Module, image_embs: torch.Tensor, tokens: torch.Tensor, vocabulary: torch.Tensor | None
) -> torch.Tensor:
    """CoCa's captioning loss (each next token from the image's pooled tokens and the tokens before it). Over
    `vocabulary` (token ids) only when given: a softmax over the world's few dozen tokens instead of all
    49,408 is several times faster, and steps over the whole vocabulary at the end push the unused
    tokens down, so that greedy decoding never picks them."""
    _, token_embs = model._encode_text(tokens)
    decoder, labels = model.text_decoder, tokens[:, 1:]
    if vocabulary is None:
        logits = decoder(image_embs, token_embs[:, :-1])
        return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=model.pad_id)
    projection = decoder.text_projection
    decoder.text_projection = None  # the decoder returns its hidden states
    try:
        hidden = decoder(image_embs, token_embs[:, :-1])
    finally:
        decoder.text_projection = projection
    position = torch.full((int(projection.shape[1]),), -100, dtype=torch.long)
    position[vocabulary] = torch.arange(len(vocabulary))
    logits = hidden @ projection[:, vocabulary]
    return F.cross_entropy(logits.permute(0, 2, 1), position[labels], ignore_index=-100)


def evaluate(checkpoint: Path, world: World) -> RecaptionScore:
    """The captioner at `checkpoint` on every image of `world`, scored with the demo CLIP."""
    captioner = CaptionSettings(model=DEMO_CAPTION_MODEL, pretrained=str(checkpoint), device="cpu")
    clip = ClipSettings(model=DEMO_MODEL, pretrained=str(DEMO_CHECKPOINT), device="cpu")
    return evaluate_captioner(captioner, clip, world)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attribute-steps", type=int, default=4000, help="the image tower's first stage")
    parser.add_argument("--steps", type=int, default=3000, help="captioning steps")
    parser.add_argument("--full-steps", type=int, default=300, help="the last steps, over every token")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool", type=int, default=20000, help="training images, generated once")
    parser.add_argument("--lr", type=float, default=3e-3, help="the one-cycle schedule's peak")
    parser.add_argument("--out", type=Path, default=DEMO_CAPTION_CHECKPOINT)
    args = parser.parse_args(argv)
    start = time.monotonic()
    model = train(args.attribute_steps, args.steps, args.full_steps, args.batch_size, args.pool, args.lr)
    save(model, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {time.monotonic() - start:.0f}s")
    score = evaluate(args.out, make_world(seed=EVAL_SEED))
    print(score.line())
    return 0 if min(score.named_share, score.improved_share) >= REQUIRED else 1


if __name__ == "__main__":
    sys.exit(main())
