"""The CLIP encoder: any open_clip model with hub weights, a local checkpoint, or seeded random weights.

Weights are never replaced silently: when they cannot be had (offline, unknown tag, missing file)
the encoder refuses to start and says how to point it at a local checkpoint.

torch and open_clip are imported when an encoder is built, not with this module: loading the
Dagster definitions (every run process, every CLI call) would otherwise cost seconds and 0.5 GB.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from laion_assets import names
from laion_assets.pipeline.settings import CLIP_SECTION, MODEL_FIELDS

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from laion_assets.pipeline.settings import DatasetSettings

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "datacomp_xl_s13b_b90k"
NO_WEIGHTS = "none"
# Architectures shipped with the package (a tiny one for tests and the offline demo).
MODEL_CONFIGS = Path(__file__).parent / "model_configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# open_clip's model names that bring their own weights and ignore `pretrained`
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
# ClipSettings field -> the environment variable that sets it in a deployment
SETTINGS_ENV = {
    "model": "LAION_ASSETS_CLIP_MODEL",
    "pretrained": "LAION_ASSETS_CLIP_PRETRAINED",
    "device": "LAION_ASSETS_DEVICE",
    "batch_size": "LAION_ASSETS_CLIP_BATCH_SIZE",
}


class ModelUnavailable(RuntimeError):
    """The model or its weights cannot be loaded; the message says what to do."""


class ModelMismatch(ValueError):
    """Embeddings made by one model are compared with, or searched by, another model's."""


@dataclass(frozen=True)
class ClipSettings:
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED  # an open_clip tag, a checkpoint path, or "none" (random, seeded)
    device: str = "auto"  # auto: cuda when present, else cpu
    batch_size: int = 256
    seed: int = 0  # for random weights

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(
                f"clip batch_size {self.batch_size} ({SETTINGS_ENV['batch_size']}): images a batch, 1 or more"
            )

    @classmethod
    def from_env(cls) -> ClipSettings:
        """The defaults, overridden by the variables of `SETTINGS_ENV` that are set."""
        return cls(**values_from_env(SETTINGS_ENV))

    @classmethod
    def from_dataset(cls, stored: DatasetSettings) -> ClipSettings:
        """The model a dataset's settings record (its `clip` section), under the variables of `SETTINGS_ENV`
        that are set: the CLIP of every entry point on that dataset."""
        return stored.recorded_in(cls(), CLIP_SECTION, MODEL_FIELDS, values_from_env(SETTINGS_ENV))


def values_from_env(variables: dict[str, str]) -> dict[str, str | int]:
    """field -> value of each of `variables` (field -> environment variable) that is set; `batch_size`
    as an int."""
    values: dict[str, str | int] = {
        name: os.environ[var] for name, var in variables.items() if os.environ.get(var)
    }
    if "batch_size" in values:
        values["batch_size"] = int(values["batch_size"])
    return values


def _is_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model and weights made a set of embeddings. Two sets can be compared, and an index searched
    with a model, only when their identities are equal: same model name and same `weights`."""

    model: str
    weights: str  # see weights_id
    pretrained: str = field(default="", compare=False)  # as it was given, for messages

    @classmethod
    def of(cls, settings: ClipSettings) -> ModelIdentity:
        weights = weights_id(settings.pretrained, settings.seed, settings.model)
        return cls(settings.model, weights, settings.pretrained)

    @classmethod
    def from_footer(cls, footer: dict[str, str]) -> ModelIdentity | None:
        """What a parquet footer written with `footer()` says; None if it names no model. Files written
        before the weights were recorded are read as if made with seed 0."""
        model = footer.get(names.CLIP_MODEL_FOOTER)
        if not model:
            return None
        pretrained = footer.get(names.CLIP_PRETRAINED_FOOTER, "")
        return cls(model, footer.get(names.CLIP_WEIGHTS_FOOTER) or weights_id(pretrained, 0), pretrained)

    def footer(self) -> dict[str, str]:
        return {
            names.CLIP_MODEL_FOOTER: self.model,
            names.CLIP_PRETRAINED_FOOTER: self.pretrained,
            names.CLIP_WEIGHTS_FOOTER: self.weights,
        }

    def __str__(self) -> str:
        return f"{self.model} / {self.pretrained or self.weights}"

    def require(self, used: ModelIdentity, subject: str, user: str, advice: str) -> None:
        """ModelMismatch unless `used` (what `user` runs) is this identity, the one `subject` (e.g. "the
        search index was") was embedded with."""
        if used == self:
            return
        made, runs = str(self), str(used)
        if made == runs:  # same names, other weights (a checkpoint file replaced, another seed)
            made, runs = f"{made} (weights {self.weights})", f"{runs} (weights {used.weights})"
        raise ModelMismatch(f"{subject} embedded with {made}, {user} runs {runs}: {advice}")


def weights_id(pretrained: str, seed: int, model: str = "") -> str:
    """What the weights are: an open_clip tag as it is, a checkpoint file by the SHA-256 of its content
    (two copies of one file are the same weights), random weights by their seed. A `local-dir:` model's
    are its folder's files, by their content, and a `hf-hub:` model's its repository's: open_clip loads
    those and ignores `pretrained`."""
    if model.startswith(LOCAL_DIR):
        folder = Path(model.removeprefix(LOCAL_DIR)).expanduser()
        return f"sha256:{folder_sha256(folder)}" if folder.is_dir() else f"missing:{folder.absolute()}"
    if model.startswith(HF_HUB):
        return model
    if pretrained.lower() == NO_WEIGHTS:
        return f"random:seed={seed}"
    if _is_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            return f"missing:{path.absolute()}"
        return f"sha256:{file_sha256(path)}"
    return pretrained


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, hashed once per process while its size and mtime stay."""
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def folder_sha256(folder: Path) -> str:
    """The SHA-256 of the names and contents of a model folder's config and checkpoint files."""
    suffixes = (*_CHECKPOINT_SUFFIXES, ".json")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in suffixes)
    return hashlib.sha256("".join(f"{f.name}\0{file_sha256(f)}\n" for f in files).encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached by size and mtime: a checkpoint is hashed once per process, not once per shard."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


TOKENIZER_CACHE_WORDS = 50_000  # open_clip keeps every word it has split; a service sees endless new ones


class BoundedCache(dict):
    """A dict that keeps its first entries (`fixed`) and at most `limit` others, dropping the oldest:
    open_clip's tokenizer caches the BPE of every word it meets, which grows for ever in a service."""

    def __init__(self, fixed: dict, limit: int) -> None:
        super().__init__(fixed)
        self._fixed, self._limit = frozenset(fixed), len(fixed) + limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if len(self) > self._limit:
            del self[next(k for k in self if k not in self._fixed)]


def resolve_device(device: str) -> torch.device:
    """`auto`: cuda when present, else cpu."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


class OpenClipModel(Protocol):
    """What names an open_clip model and its weights: ClipSettings, CaptionSettings."""

    model: str
    pretrained: str
    seed: int
    device: str


def load_open_clip(settings: OpenClipModel, variable: str, resource: str) -> tuple[torch.nn.Module, Callable]:
    """The open_clip model (CLIP or CoCa) of `settings` in eval mode on its device, and its
    preprocessing: `pretrained` an open_clip tag, a checkpoint path, or "none" for random weights from
    `seed`. ModelUnavailable, saying how to point `variable` (or `resource`'s config) at a local
    checkpoint, when the weights cannot be had."""
    import open_clip
    import torch

    model, pretrained, seed = settings.model, settings.pretrained, settings.seed
    device = resolve_device(settings.device)

    open_clip.add_model_config(MODEL_CONFIGS)
    weights = None if pretrained.lower() == NO_WEIGHTS else pretrained
    if weights and _is_path(weights) and not Path(weights).is_file():
        raise ModelUnavailable(f"checkpoint file {weights} does not exist")
    if weights and (mismatch := _activation_mismatch(model, weights)):
        raise ModelUnavailable(mismatch)
    if weights is None:
        torch.manual_seed(seed)
    try:
        loaded, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=weights, device=device
        )
    except Exception as exc:  # open_clip and huggingface_hub raise many kinds; all mean the same here
        raise ModelUnavailable(
            f"cannot load open_clip model {model!r} with pretrained={pretrained!r}: {exc}. Known names: "
            "open_clip.list_pretrained(). Without internet, copy the checkpoint file (e.g. "
            "open_clip_pytorch_model.bin from the model's Hugging Face repository) to this machine and set "
            f"{variable}=/path/to/it, or `pretrained` in the {resource} resource config"
        ) from exc
    return loaded.eval(), preprocess


def _activation_mismatch(model: str, pretrained: str) -> str | None:
    """Why open_clip would run the `pretrained` tag's weights with another activation than they were
    trained with, or None. OpenAI's, LAION-400M's, MetaCLIP's and DFN's CLIPs use QuickGELU; open_clip 3
    builds a config without it (`ViT-B-32`, `ViT-L-14`) from their weights with GELU, only warning, and
    the embeddings are off. (A tag that does not say QuickGELU says nothing: open_clip omits it for some.)"""
    import open_clip

    config, trained = open_clip.get_model_config(model), open_clip.get_pretrained_cfg(model, pretrained)
    if config is None or not trained.get("quick_gelu") or config.get("quick_gelu"):
        return None
    return (
        f"open_clip's weights {pretrained!r} were trained with QuickGELU, and its model {model!r} would "
        f"run them with GELU: the embeddings would be off; use model '{model}-quickgelu' (open_clip has "
        f"one for each such tag) with pretrained={pretrained!r}"
    )


class ClipEncoder:
    """An open_clip model with its own preprocessing and tokenizer, returning L2-normalised float32."""

    def __init__(self, settings: ClipSettings) -> None:
        import open_clip

        self.settings = settings
        self.device = resolve_device(settings.device)
        model, preprocess = load_open_clip(settings, SETTINGS_ENV["pretrained"], "clip")
        self.identity = ModelIdentity.of(settings)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(settings.model)
        if isinstance(getattr(self.tokenizer, "cache", None), dict):  # open_clip's BPE tokenizer
            self.tokenizer.cache = BoundedCache(self.tokenizer.cache, TOKENIZER_CACHE_WORDS)
        # the bounded cache drops words, unguarded: one thread at a time (pure Python, so no loss)
        self._tokenizing = threading.Lock()
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
        """The model's tokens of `texts` (truncated to its context length), on the CPU; thread-safe."""
        with self._tokenizing:
            return self.tokenizer(texts)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """open_clip's own preprocessing of one PIL image."""
        return self.preprocess(image)
