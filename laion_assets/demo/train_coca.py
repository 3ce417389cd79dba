"""Trains the demo's tiny CoCa captioner on the synthetic world and measures it on a world it never saw.

It learns to describe an image in full, "a red circle on a striped white background" (the world's
first template: colour, shape, pattern and background), from the image as the pipeline stores it
(`pipeline_view`). Its image tower starts from the demo CLIP's, trained on the same world (the two
have one architecture up to the pooling); then CoCa's captioning loss trains it all, mostly over the
world's own tokens (`caption_loss`). The pipeline scores captions with its own CLIP, not with the
captioner's contrastive head. Then, on the held-out world (`EVAL_SEED`), it reports the share of recaptions
that name the image's true colour and shape, and, for the pairs whose published caption is another
image's, the share where the recaption's CLIP score (the demo CLIP) beats the published one's.

    python -m laion_assets.demo.train_coca [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from laion_assets.demo import DEMO_CAPTION_CHECKPOINT, DEMO_CAPTION_MODEL, DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.score import RecaptionScore, evaluate_captioner
from laion_assets.demo.train import EVAL_SEED, REQUIRED, TRAIN_SEED, pipeline_view, save
from laion_assets.demo.world import TEMPLATES, World, caption, make_world
from laion_assets.pipeline.caption import CaptionSettings
from laion_assets.pipeline.clip import MODEL_CONFIGS, ClipSettings

DESCRIPTION = TEMPLATES[0]  # "{a} {colour} {shape} on a {pattern} {background} background"


def train(
    steps: int, full_steps: int, batch_size: int, pool_size: int, lr: float = 3e-3, seed: int = 0
) -> torch.nn.Module:
    """`steps` steps of the captioning loss over the world's own words, the last `full_steps` of them over
    the whole vocabulary (see `caption_loss`)."""
    torch.manual_seed(seed)
    open_clip.add_model_config(MODEL_CONFIGS)
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_CAPTION_MODEL)
    print(f"image tower: {start_from_demo_clip(model)} tensors from the demo CLIP", flush=True)
    tokenizer = open_clip.get_tokenizer(DEMO_CAPTION_MODEL)
    start = time.monotonic()
    items = make_world(images=pool_size, seed=TRAIN_SEED, mismatch_fraction=0.0, failures={}).images
    pixels = torch.stack([preprocess(pipeline_view(item)) for item in items])
    tokens = tokenizer([caption(item, DESCRIPTION) for item in items])
    tokens = tokens[:, : int((tokens != model.pad_id).sum(dim=1).max())]  # no step over padding alone
    words = torch.unique(tokens[:, 1:][tokens[:, 1:] != model.pad_id])
    print(
        f"pool: {pool_size} images, {len(words)} distinct tokens, in {time.monotonic() - start:.0f}s",
        flush=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(1, steps + 1):
        batch = torch.randint(pool_size, (batch_size,))
        vocabulary = None if step > steps - full_steps else words
        loss = caption_loss(model, pixels[batch], tokens[batch], vocabulary)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            over = "all tokens" if vocabulary is None else "the world's tokens"
            print(
                f"step {step}/{steps}: caption loss over {over} {loss.item():.3f}, "
                f"{time.monotonic() - start:.0f}s",
                flush=True,
            )
    return model.eval()


def caption_loss(
    model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, vocabulary: torch.Tensor | None
) -> torch.Tensor:
    """CoCa's captioning loss (each next token from the image and the tokens before it). Over
    `vocabulary` (token ids) only when given: a softmax over the world's few dozen tokens instead of all
    49,408 is several times faster, and steps over the whole vocabulary at the end push the unused
    tokens down, so that greedy decoding never picks them."""
    _, image_embs = model._encode_image(pixels)
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


def start_from_demo_clip(model: torch.nn.Module) -> int:
    """Copies the demo CLIP's image-tower tensors into `model`'s where names and shapes agree. Returns
    how many were copied."""
    clip, _, _ = open_clip.create_model_and_transforms(DEMO_MODEL, pretrained=str(DEMO_CHECKPOINT))
    source = {name: value for name, value in clip.state_dict().items() if name.startswith("visual.")}
    target = model.state_dict()
    copied = {
        name: value for name, value in source.items() if name in target and target[name].shape == value.shape
    }
    model.load_state_dict(copied, strict=False)
    return len(copied)


def evaluate(checkpoint: Path, world: World) -> RecaptionScore:
    """The captioner at `checkpoint` on every image of `world`, scored with the demo CLIP."""
    captioner = CaptionSettings(model=DEMO_CAPTION_MODEL, pretrained=str(checkpoint), device="cpu")
    clip = ClipSettings(model=DEMO_MODEL, pretrained=str(DEMO_CHECKPOINT), device="cpu")
    return evaluate_captioner(captioner, clip, world)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--full-steps", type=int, default=300, help="the last steps, over every token")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool", type=int, default=3000, help="training images, generated once")
    parser.add_argument("--lr", type=float, default=3e-3, help="the one-cycle schedule's peak")
    parser.add_argument("--out", type=Path, default=DEMO_CAPTION_CHECKPOINT)
    args = parser.parse_args(argv)
    start = time.monotonic()
    save(train(args.steps, args.full_steps, args.batch_size, args.pool, args.lr), args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {time.monotonic() - start:.0f}s")
    score = evaluate(args.out, make_world(seed=EVAL_SEED))
    print(score.line())
    return 0 if min(score.named_share, score.improved_share) >= REQUIRED else 1


if __name__ == "__main__":
    sys.exit(main())
