"""Real captioners to test with, without trained weights.

A CoCa: laion-assets-demo-coca at seeded random weights, its output projection redrawn at a scale where
the next token depends on the image, so that captions differ from image to image and decoding has
something to get right. A transformers BLIP: the real model class on a tiny config with seeded random
weights, saved with its processor the way `save_pretrained` saves a downloaded one."""

from dataclasses import replace
from pathlib import Path

from laion_assets.demo import DEMO_CAPTION_MODEL
from laion_assets.pipeline.recaptions.caption import CaptionSettings, CocaCaptioner

RANDOM_COCA = CaptionSettings(model=DEMO_CAPTION_MODEL, pretrained="none", device="cpu", max_tokens=8)


def varied_coca(**overrides) -> CocaCaptioner:
    import torch

    captioner = CocaCaptioner(replace(RANDOM_COCA, **overrides))
    projection = captioner.model.text_decoder.text_projection
    with torch.no_grad():
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(0)) * 3)
    return captioner


BLIP_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
BLIP_WORDS = (*BLIP_SPECIAL, "a", "red", "blue", "circle", "square", "on")


def save_tiny_blip(path: Path, seed: int = 0) -> Path:
    """A BlipForConditionalGeneration of two 32-wide layers and its processor (32-pixel images, a
    word-level vocabulary of BLIP_WORDS), in the folder `path`."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = {word: i for i, word in enumerate(BLIP_WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={**layer, "image_size": 32, "patch_size": 8},
        text_config={
            **layer,
            "vocab_size": len(vocab),
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
            "eos_token_id": vocab["[SEP]"],
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path
