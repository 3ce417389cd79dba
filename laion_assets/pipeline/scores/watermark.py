"""LAION-5B-WatermarkDetection's model: a timm EfficientNet whose classifier is replaced by a small MLP
with two outputs, read on the image squashed to 256 x 256 (no crop) and normalised as ImageNet was.
After a softmax, output 0 is the probability of a watermark: `pwatermark`.

The published weights fit timm's EfficientNet-B3a; the demo's fit timm's `test_efficientnet`, the same
model code on a tiny configuration (`watermark:<timm model>` names the backbone).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from laion_assets.pipeline.embeddings.clip import ModelUnavailable

ARCHITECTURE_PREFIX = "watermark:"
INPUT_SIZE = (256, 256)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
WATERMARK_OUTPUT = 0  # the other output is "clean"
# On a CPU the model runs fastest on 8 images at a time: larger batches are cache-bound (bench/scores.py)
CPU_BATCH = 8


def build_watermark_model(architecture: str, state_dict: dict | None = None) -> nn.Module:
    """The timm backbone `architecture` names (`watermark:<timm model>`) with LAION's head, weights
    loaded, in eval mode."""
    import timm

    backbone = architecture.removeprefix(ARCHITECTURE_PREFIX)
    if not architecture.startswith(ARCHITECTURE_PREFIX) or backbone not in timm.list_models():
        raise ModelUnavailable(
            f"not a watermark model: {architecture!r}; expected watermark:<timm model name>"
        )
    model = timm.create_model(backbone, pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(model.num_features, 625),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    if state_dict is not None:
        try:
            model.load_state_dict(
                {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
            )
        except RuntimeError as exc:
            raise ModelUnavailable(f"weights do not fit a {architecture} model: {exc}") from exc
    return model.eval().to(memory_format=torch.channels_last)  # faster convolutions, on CPU and GPU


def watermark_pixels(image: Image.Image) -> torch.Tensor:
    """The model's input for one image: RGB, squashed to INPUT_SIZE (bilinear), ImageNet-normalised."""
    resized = image.convert("RGB").resize(INPUT_SIZE, Image.Resampling.BILINEAR)
    pixels = (np.asarray(resized, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def pwatermark(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The probability of a watermark for each image of a batch (N, 3, 256, 256), on the CPU."""
    device = next(model.parameters()).device
    chunks = pixels.split(CPU_BATCH) if device.type == "cpu" else (pixels,)
    with torch.inference_mode():
        logits = [model(chunk.to(device, memory_format=torch.channels_last)).float() for chunk in chunks]
        return torch.softmax(torch.cat(logits), dim=1)[:, WATERMARK_OUTPUT].cpu()
