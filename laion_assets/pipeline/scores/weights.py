"""Where a score model's weights come from: a file LAION published (by its tag), or a checkpoint of
this project's own format (a path), which says what it is.

Weights are never replaced silently: when a tag's file cannot be had (offline, no network) or a path
does not exist, loading refuses and says where to put the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from laion_assets.pipeline.embeddings.clip import ModelIdentity, ModelUnavailable, file_sha256, weights_id

if TYPE_CHECKING:
    import torch

OFF = "none"  # a score that is not computed: its column stays null
AUTO = "auto"  # a head: the one published for the CLIP the shard's embeddings were made with, if any
OFFLINE_ENV = "HF_HUB_OFFLINE"  # set, as in tests and the demo: no download is attempted


@dataclass(frozen=True)
class PublishedWeights:
    """A weights file LAION published, the architecture it fits and, for a head over CLIP embeddings,
    the CLIP model and weights it was trained on."""

    url: str
    architecture: str
    clip: ModelIdentity | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1].split("?", 1)[0]


def _openai(model: str) -> ModelIdentity:
    """OpenAI's CLIP `model` as open_clip builds it: its `-quickgelu` name, for OpenAI's transformer has
    QuickGELU; open_clip 3 builds `model` itself with GELU from the same weights, and only warns."""
    return ModelIdentity(f"{model}-quickgelu", weights_id("openai", 0), "openai")


_NSFW = (
    "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/d499e9c87c68f1abf5418caef823c7b609714ca3/models"
)
_AESTHETIC_V1 = "https://github.com/LAION-AI/aesthetic-predictor/raw/main"
_AESTHETIC_V2 = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main"
PUBLISHED: dict[str, PublishedWeights] = {
    # LAION's CLIP-based NSFW detector, its Keras heads converted to PyTorch (the repository's PR #11)
    "laion-nsfw-vit-b-32": PublishedWeights(
        f"{_NSFW}/clip_ViT-B-32_openai_binary_nsfw_head.pth", "nsfw-b32", _openai("ViT-B-32")
    ),
    "laion-nsfw-vit-l-14": PublishedWeights(
        f"{_NSFW}/clip_ViT-L-14_openai_binary_nsfw_head.pth", "nsfw-l14", _openai("ViT-L-14")
    ),
    # LAION-Aesthetics v1: a linear model
    "laion-aesthetic-v1-vit-b-32": PublishedWeights(
        f"{_AESTHETIC_V1}/sa_0_4_vit_b_32_linear.pth", "aesthetic-linear", _openai("ViT-B-32")
    ),
    "laion-aesthetic-v1-vit-l-14": PublishedWeights(
        f"{_AESTHETIC_V1}/sa_0_4_vit_l_14_linear.pth", "aesthetic-linear", _openai("ViT-L-14")
    ),
    # LAION-Aesthetics v2 (the improved predictor): the MLP the 5+, 6+ and 6.5+ subsets were chosen by
    "laion-aesthetic-v2-vit-l-14": PublishedWeights(
        f"{_AESTHETIC_V2}/sac+logos+ava1-l14-linearMSE.pth", "aesthetic-mlp", _openai("ViT-L-14")
    ),
    # LAION-5B-WatermarkDetection: timm's EfficientNet-B3a with a 2-class head, on 256 px pixels
    "laion-watermark-v1": PublishedWeights(
        "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt",
        "watermark:efficientnet_b3",  # timm 1.0 names efficientnet_b3a's architecture so
    ),
}


@dataclass(frozen=True)
class Checkpoint:
    """Loaded weights: the architecture they fit, the state dict, the CLIP a head was trained on, and
    what the weights are (a tag, or a file's sha256)."""

    architecture: str
    state_dict: dict[str, Any]
    clip: ModelIdentity | None
    weights: str


def load_checkpoint(spec: str, setting: str) -> Checkpoint:
    """The weights `spec` names: a tag of PUBLISHED, or the path of a checkpoint saved by
    `save_checkpoint`. ModelUnavailable, naming `setting` (the field that chose them), when they cannot
    be had."""
    if spec in PUBLISHED:
        published = PUBLISHED[spec]
        path = _downloaded(published, setting)
        return Checkpoint(published.architecture, _load(path, spec, setting), published.clip, spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelUnavailable(
            f"{setting}={spec!r}: no such file, and not a published tag ({', '.join(PUBLISHED)})"
        )
    saved = _load(path, spec, setting)
    if not {"architecture", "state_dict"} <= saved.keys():
        raise ModelUnavailable(
            f"{setting}={spec!r}: not a checkpoint of laion_assets' format (a dict with `architecture` and "
            "`state_dict`, written by laion_assets.pipeline.scores.weights.save_checkpoint); for LAION's "
            f"published files use their tags: {', '.join(PUBLISHED)}"
        )
    clip = saved.get("clip")
    identity = ModelIdentity(clip["model"], clip["weights"], clip["pretrained"]) if clip else None
    return Checkpoint(saved["architecture"], saved["state_dict"], identity, f"sha256:{file_sha256(path)}")


def save_checkpoint(
    path: Path, architecture: str, model: torch.nn.Module, clip: ModelIdentity | None = None
) -> None:
    """`model`'s weights in float16 with what they are: the format `load_checkpoint` reads from a path."""
    import torch

    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    saved = {"architecture": architecture, "state_dict": state}
    if clip is not None:
        saved["clip"] = {"model": clip.model, "weights": clip.weights, "pretrained": clip.pretrained}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)


def _load(path: Path, spec: str, setting: str) -> dict[str, Any]:
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download, a pickle of something else: all mean the same here
        raise ModelUnavailable(f"{setting}={spec!r}: cannot read {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ModelUnavailable(
            f"{setting}={spec!r}: {path} holds a {type(loaded).__name__}, not a state dict"
        )
    return loaded


def _downloaded(published: PublishedWeights, setting: str) -> Path:
    """The published file in torch's hub cache, downloaded there first when it is not."""
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / published.file_name
    if cached.is_file():
        return cached
    advice = f"download {published.url} to {cached}, or set {setting} to a checkpoint path"
    if os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes"):
        raise ModelUnavailable(f"{setting}: {OFFLINE_ENV} is set, so nothing is downloaded: {advice}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(published.url, str(cached), progress=False)
    except Exception as exc:  # urllib's many errors all mean the file could not be had
        raise ModelUnavailable(f"{setting}: cannot download {published.url}: {exc}; {advice}") from exc
    return cached
