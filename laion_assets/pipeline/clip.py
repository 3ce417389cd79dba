"""The CLIP encoder: any open_clip model with hub weights, a local checkpoint, or seeded random weights.

Weights are never replaced silently: when they cannot be had (offline, unknown tag, missing file)
the encoder refuses to start and says how to point it at a local checkpoint.

torch and open_clip are imported when an encoder is built, not with this module: loading the
Dagster definitions (every run process, every CLI call) would otherwise cost seconds and 0.5 GB.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "datacomp_xl_s13b_b90k"
NO_WEIGHTS = "none"
# Architectures shipped with the package (a tiny one for tests and the offline demo).
MODEL_CONFIGS = Path(__file__).parent / "model_configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class ModelUnavailable(RuntimeError):
    """The model or its weights cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ClipSettings:
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED  # an open_clip tag, a checkpoint path, or "none" (random, seeded)
    device: str = "auto"  # auto: cuda when present, else cpu
    batch_size: int = 256
    seed: int = 0  # for random weights

    @classmethod
    def from_env(cls) -> ClipSettings:
        """Defaults overridden by LAION_ASSETS_CLIP_MODEL, _CLIP_PRETRAINED, _DEVICE and _CLIP_BATCH_SIZE."""
        env = os.environ
        return cls(
            model=env.get("LAION_ASSETS_CLIP_MODEL") or DEFAULT_MODEL,
            pretrained=env.get("LAION_ASSETS_CLIP_PRETRAINED") or DEFAULT_PRETRAINED,
            device=env.get("LAION_ASSETS_DEVICE") or "auto",
            batch_size=int(env.get("LAION_ASSETS_CLIP_BATCH_SIZE") or 256),
        )


def _is_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


class ClipEncoder:
    """An open_clip model with its own preprocessing and tokenizer, returning L2-normalised float32."""

    def __init__(self, settings: ClipSettings) -> None:
        import open_clip
        import torch

        open_clip.add_model_config(MODEL_CONFIGS)
        self.settings = settings
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device
        )
        pretrained = None if settings.pretrained.lower() == NO_WEIGHTS else settings.pretrained
        if pretrained and _is_path(pretrained) and not Path(pretrained).is_file():
            raise ModelUnavailable(f"checkpoint file {pretrained} does not exist")
        if pretrained is None:
            torch.manual_seed(settings.seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                settings.model, pretrained=pretrained, device=self.device
            )
        except Exception as exc:  # open_clip and huggingface_hub raise many kinds; all mean the same here
            raise ModelUnavailable(
                f"cannot load open_clip model {settings.model!r} with pretrained={settings.pretrained!r}: "
                f"{exc}. Known names: open_clip.list_pretrained(). Without internet, copy the checkpoint "
                "file (e.g. open_clip_pytorch_model.bin from the model's Hugging Face repository) to this "
                "machine and set LAION_ASSETS_CLIP_PRETRAINED=/path/to/it, or `pretrained` in the clip "
                "resource config"
            ) from exc
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(settings.model)
        self.dim = int(open_clip.get_model_config(settings.model)["embed_dim"])

    def _autocast(self):
        """fp16 (bf16 where supported) autocast on a GPU, plain fp32 on the CPU."""
        import torch

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """The model's tokens of `texts` (truncated to its context length), on the CPU."""
        return self.tokenizer(texts)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """open_clip's own preprocessing of one PIL image."""
        return self.preprocess(image)
