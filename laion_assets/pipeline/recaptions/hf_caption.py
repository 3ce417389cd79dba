"""Hugging Face `transformers` image-to-text captioners, loaded from a local folder (BLIP-style models
that caption from the image alone; LLaVA-style chat models given an instruction).

Behind the `recap` extra (`pip install 'laion_assets[recap]'`); the default captioner (CoCa) needs none
of it. Decoding is greedy, as Recap-DataComp-1B's. Nothing is fetched from a hub: the folder is one
`save_pretrained` wrote for the model and its processor.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from laion_assets.pipeline.embeddings.clip import ModelUnavailable, file_sha256, resolve_device
from laion_assets.pipeline.recaptions.chat_caption import RECAP_PROMPT

if TYPE_CHECKING:
    from PIL import Image

# HfCaptionSettings field -> the environment variable that sets it in a deployment; with the path set,
# the recaptions asset captions with this model instead of CoCa
SETTINGS_ENV = {
    "model_path": "LAION_ASSETS_HF_CAPTION_MODEL",
    "batch_size": "LAION_ASSETS_CAPTION_BATCH_SIZE",
    "device": "LAION_ASSETS_DEVICE",
}
_EXTRA = "pip install 'laion_assets[recap]'"


@dataclass(frozen=True)
class HfCaptionSettings:
    model_path: str  # a folder with config.json, the weights and the processor
    prompt: str = RECAP_PROMPT  # sent to chat models (those whose processor has a chat template) only
    device: str = "auto"
    batch_size: int = 8
    max_new_tokens: int = 128  # Recap-DataComp-1B's


class HfCaptioner:
    """Captions images with `AutoModelForImageTextToText` and `AutoProcessor` from a local folder."""

    def __init__(self, settings: HfCaptionSettings) -> None:
        try:
            import transformers
        except ImportError as exc:
            raise ModelUnavailable(f"the transformers captioner needs transformers: {_EXTRA}") from exc
        path = Path(settings.model_path)
        if not (path / "config.json").is_file():
            raise ModelUnavailable(
                f"{path} holds no transformers model (no config.json): save one there with "
                f"save_pretrained, model and processor, and set {SETTINGS_ENV['model_path']}={path}"
            )
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        self.model = model.to(self.device).eval()
        self.chat = bool(getattr(self.processor, "chat_template", None))
        self.library = f"transformers {transformers.__version__}"

    def describe(self) -> dict[str, str]:
        """What made the captions, for the parquet footer and the materialisation metadata."""
        s = self.settings
        described = {
            "captioner": self.library,
            "model": type(self.model).__name__,
            **asdict(s),
            "prompt": s.prompt if self.chat else "",
            "decoding": "greedy",
            "weights": _weights_sha256(Path(s.model_path)),
        }
        return {name: str(value) for name, value in described.items() if name not in ("device", "batch_size")}

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in batches of `batch_size`."""
        captions = []
        for start in range(0, len(images), self.settings.batch_size):
            captions.extend(self._caption_batch(images[start : start + self.settings.batch_size]))
        return captions

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        import torch

        rgb = [image.convert("RGB") for image in images]
        if self.chat:
            content = [{"type": "image"}, {"type": "text", "text": self.settings.prompt}]
            messages = [{"role": "user", "content": content}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=rgb, text=[prompt] * len(rgb), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=rgb, return_tensors="pt")
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False, num_beams=1
            )
        if self.chat and self.model.config.is_encoder_decoder is False:
            out = out[:, inputs["input_ids"].shape[1] :]  # a decoder-only model repeats its prompt
        return [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]


def _weights_sha256(path: Path) -> str:
    """Which weights made the captions: the SHA-256 over the folder's weight files' names and SHA-256s
    (each file hashed once per process, as CLIP checkpoints are)."""
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return hashlib.sha256("\n".join(f"{f.name}:{file_sha256(f)}" for f in files).encode()).hexdigest()
