"""A real CoCa to test captioning with, without trained weights: laion-assets-demo-coca at seeded random
weights, its output projection redrawn at a scale where the next token depends on the image, so that
captions differ from image to image and decoding has something to get right."""

from dataclasses import replace

from laion_assets.demo import DEMO_CAPTION_MODEL
from laion_assets.pipeline.caption import CaptionSettings, CocaCaptioner

RANDOM_COCA = CaptionSettings(model=DEMO_CAPTION_MODEL, pretrained="none", device="cpu", max_tokens=8)


def varied_coca(**overrides) -> CocaCaptioner:
    import torch

    captioner = CocaCaptioner(replace(RANDOM_COCA, **overrides))
    projection = captioner.model.text_decoder.text_projection
    with torch.no_grad():
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(0)) * 3)
    return captioner
