"""The quality_scores stage: each embedded image of a shard scored as LAION-5B and LAION-Aesthetics
scored theirs, and its caption's language identified.

- `punsafe` and `aesthetic` are heads over the stored CLIP image embedding; each head is tied to the
  CLIP model and weights it was trained on, and refuses embeddings of another (the one compatibility
  rule, `ModelIdentity`). `auto` picks the published head for the shard's CLIP, if there is one.
- `pwatermark` reads the stored image's pixels, so it runs wherever images are, whatever the CLIP.
- `language` is the caption's, with the identifier's confidence.

A score set to `none` is not computed: its column stays null, and a filter on it refuses.
torch is imported when the models are loaded, not with this module (see embeddings/clip.py).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.clip import (
    ModelIdentity,
    ModelMismatch,
    ModelUnavailable,
    resolve_device,
)
from laion_assets.pipeline.embeddings.embed import image_batches
from laion_assets.pipeline.lineage import inherited_footer
from laion_assets.pipeline.scores.language import LanguageIdentifier
from laion_assets.pipeline.scores.weights import AUTO, OFF, PUBLISHED, Checkpoint, load_checkpoint
from laion_assets.pipeline.storage import EMBEDDINGS, IMAGES, SCORES, DatasetStore, footer
from laion_assets.pipeline.tables import unit_rows

if TYPE_CHECKING:
    import torch

# ScoreSettings field -> the environment variable that sets it in a deployment
SETTINGS_ENV = {
    "punsafe_head": "LAION_ASSETS_PUNSAFE_HEAD",
    "aesthetic_head": "LAION_ASSETS_AESTHETIC_HEAD",
    "watermark_model": "LAION_ASSETS_WATERMARK_MODEL",
    "language_id": "LAION_ASSETS_LANGUAGE_ID",
    "device": "LAION_ASSETS_DEVICE",
    "batch_size": "LAION_ASSETS_SCORES_BATCH_SIZE",
}
# The fields that say which models make the scores (a change of them makes the layer stale)
MODEL_FIELDS = ("punsafe_head", "aesthetic_head", "watermark_model", "language_id")
# The score each head setting makes, and the architectures it accepts
HEAD_SCORES = {"punsafe_head": "punsafe", "aesthetic_head": "aesthetic"}
_HEAD_KINDS = {
    "punsafe_head": ("nsfw-b32", "nsfw-l14"),
    "aesthetic_head": ("aesthetic-linear", "aesthetic-mlp"),
}
# Heads shipped with the package, found by `auto` beside LAION's published ones: the demo CLIP's,
# trained by `python -m laion_assets.demo.train_scores` (their checkpoints record the CLIP they read)
PACKAGED = Path(__file__).parent / "packaged"
DEMO_PUNSAFE_HEAD = PACKAGED / "laion-assets-demo-punsafe.pt"
DEMO_AESTHETIC_HEAD = PACKAGED / "laion-assets-demo-aesthetic.pt"
PACKAGED_HEADS: dict[str, tuple[Path, ...]] = {
    "punsafe_head": (DEMO_PUNSAFE_HEAD,),
    "aesthetic_head": (DEMO_AESTHETIC_HEAD,),
}


@dataclass(frozen=True)
class ScoreSettings:
    punsafe_head: str = AUTO  # a published tag, a checkpoint path, auto, or none
    aesthetic_head: str = AUTO
    watermark_model: str = "laion-watermark-v1"  # a published tag, a checkpoint path, or none
    language_id: str = "py3langid"  # or cld3 (LAION-5B's)
    device: str = "auto"  # auto: cuda when present, else cpu
    batch_size: int = 64

    def __post_init__(self) -> None:
        """ValueError for a value no run can use (a YAML `aesthetic_head:` left empty reads as None)."""
        for name in MODEL_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(
                    f"scores {name}: expected a name or a path, got {getattr(self, name)!r} "
                    f"({SETTINGS_ENV[name]}, or `{name}` in the dataset's `scores` settings)"
                )
        if self.batch_size < 1:
            variable = SETTINGS_ENV["batch_size"]
            raise ValueError(f"scores batch_size {self.batch_size} ({variable}): images a batch, 1 or more")


@dataclass
class ScoresResult:
    table: pa.Table  # schemas.SCORES, sorted by key
    weights: dict[str, str]  # score -> the weights that made it ("none" where not computed)
    undecodable: list[str]  # keys whose stored image could not be read: no pwatermark
    seconds: float


class Scorers:
    """The score models of a run, loaded once: the watermark model and the language identifier now,
    the heads when the first shard says which CLIP its embeddings came from."""

    def __init__(self, settings: ScoreSettings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.language = LanguageIdentifier(settings.language_id)
        self.watermark: torch.nn.Module | None = None
        self.watermark_weights = OFF
        if settings.watermark_model.lower() != OFF:
            from laion_assets.pipeline.scores.watermark import build_watermark_model

            checkpoint = load_checkpoint(settings.watermark_model, "watermark_model")
            self.watermark = build_watermark_model(checkpoint.architecture, checkpoint.state_dict).to(
                self.device
            )
            self.watermark_weights = checkpoint.weights
        self._heads: dict[tuple[ModelIdentity, str], tuple[torch.nn.Module, str] | None] = {}

    def head(
        self, setting: str, clip: ModelIdentity, dim: int, shard: str
    ) -> tuple[torch.nn.Module, str] | None:
        """The head of `setting` for embeddings of `clip`, and what its weights are; None when off (or
        `auto` finds none). ModelMismatch when the head was trained on another CLIP's embeddings."""
        if (clip, setting) not in self._heads:
            self._heads[clip, setting] = self._load_head(setting, clip, dim, shard)
        return self._heads[clip, setting]

    def _load_head(
        self, setting: str, clip: ModelIdentity, dim: int, shard: str
    ) -> tuple[torch.nn.Module, str] | None:
        from laion_assets.pipeline.scores.heads import build_head

        spec = getattr(self.settings, setting)
        if spec.lower() == OFF:
            return None
        checkpoint = _auto_head(setting, clip) if spec.lower() == AUTO else load_checkpoint(spec, setting)
        if checkpoint is None:
            return None
        if checkpoint.architecture not in _HEAD_KINDS[setting]:
            raise ModelMismatch(
                f"{setting}={spec!r} is a {checkpoint.architecture} head; {setting} takes "
                f"{' or '.join(_HEAD_KINDS[setting])}"
            )
        if checkpoint.clip is None:
            raise ModelUnavailable(
                f"{setting}={spec!r} records no CLIP it was trained on, so it cannot be matched with the "
                "shard's embeddings: save it with weights.save_checkpoint(..., clip=...)"
            )
        checkpoint.clip.require(
            clip,
            f"the {setting} {spec!r} was trained on images",
            f"shard {shard}'s clip_embeddings",
            f"a head reads only the embeddings of the CLIP it was trained on: set {setting} to one "
            f"trained on {clip}, `auto` or `none`",
        )
        head = build_head(checkpoint.architecture, dim, checkpoint.state_dict).to(self.device)
        return head, checkpoint.weights

    def describe(self) -> dict[str, str]:
        """The settings as a footer records them (what shapes the scores, not the device)."""
        return {k: str(v) for k, v in asdict(self.settings).items() if k in MODEL_FIELDS}


def _auto_head(setting: str, clip: ModelIdentity) -> Checkpoint | None:
    """The head for `clip`'s embeddings among LAION's published ones and the packaged ones (the demo's),
    or None. Of LAION's, v2 before v1 for the aesthetic score, as LAION-Aesthetics chose."""
    kinds = _HEAD_KINDS[setting]
    fitting = [
        tag
        for tag, published in PUBLISHED.items()
        if published.architecture in kinds and published.clip == clip
    ]
    if fitting:  # the kind listed last first: the v2 MLP before the v1 linear model
        return load_checkpoint(
            max(fitting, key=lambda tag: kinds.index(PUBLISHED[tag].architecture)), setting
        )
    for path in PACKAGED_HEADS[setting]:
        checkpoint = load_checkpoint(str(path), setting)
        if checkpoint.clip == clip:
            return checkpoint
    return None


def write_scores(store: DatasetStore, shard: str, scorers: Scorers, workers: int = 2) -> ScoresResult:
    """`scores/<shard>.parquet`: a row per key of the shard's embeddings. The footer records the source,
    the CLIP the heads read and the settings with the weights each score came from."""
    start = time.monotonic()
    embeddings = store.read_parquet(EMBEDDINGS.parquet(shard), columns=["key", "image_embedding"])
    clip = ModelIdentity.from_footer(footer(embeddings.schema))
    keys = embeddings.column("key").to_pylist()
    columns: dict[str, list | np.ndarray] = {}
    weights = {}
    vectors = unit_rows(embeddings.column("image_embedding"))
    for setting, score in HEAD_SCORES.items():
        loaded = scorers.head(setting, clip, vectors.shape[1], shard) if clip is not None else None
        weights[score] = loaded[1] if loaded else OFF
        columns[score] = (
            run_head(loaded[0], vectors, scorers.settings.batch_size) if loaded else [None] * len(keys)
        )
    images = store.read_parquet(IMAGES.parquet(shard), columns=["key", "caption"])
    captions = dict(zip(images.column("key").to_pylist(), images.column("caption").to_pylist(), strict=True))
    identified = [scorers.language.identify(captions.get(key)) for key in keys]
    undecodable: list[str] = []
    watermark: dict[str, float] = {}
    if scorers.watermark is not None and keys:
        with store.open(IMAGES.tar(shard)) as tar:
            watermark, undecodable = _watermark_scores(scorers, tar, set(keys), workers)
    weights["pwatermark"] = scorers.watermark_weights
    weights["language"] = scorers.settings.language_id
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "punsafe": pa.array(columns["punsafe"], pa.float32()),
            "pwatermark": pa.array([watermark.get(key) for key in keys], pa.float32()),
            "aesthetic": pa.array(columns["aesthetic"], pa.float32()),
            "language": pa.array([language for language, _ in identified], pa.string()),
            "language_confidence": pa.array([confidence for _, confidence in identified], pa.float32()),
        },
        schema=schemas.SCORES,
    ).sort_by("key")
    scores_footer = {
        **inherited_footer(embeddings),
        **(clip.footer() if clip else {}),
        names.SCORES_FOOTER: json.dumps({**scorers.describe(), "weights": weights}),
    }
    store.write_parquet(SCORES.parquet(shard), table, metadata=scores_footer)
    return ScoresResult(table, weights, undecodable, time.monotonic() - start)


def run_head(head: torch.nn.Module, vectors: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    device = next(head.parameters()).device
    out = []
    with torch.inference_mode():
        for begin in range(0, len(vectors), batch_size):
            out.append(
                head(torch.from_numpy(vectors[begin : begin + batch_size]).to(device)).float().cpu().numpy()
            )
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _watermark_scores(
    scorers: Scorers, tar: io.BufferedIOBase, keys: set[str], workers: int
) -> tuple[dict[str, float], list[str]]:
    """pwatermark of each image of `keys` in the tar; the keys whose image could not be read."""
    import torch

    from laion_assets.pipeline.scores.watermark import pwatermark, watermark_pixels

    scores: dict[str, float] = {}
    undecodable: list[str] = []
    size = scorers.settings.batch_size
    for batch in image_batches(tar, keys, watermark_pixels, size, workers, undecodable):
        found = pwatermark(scorers.watermark, torch.stack([pixels for _, pixels in batch]))
        scores.update(zip([key for key, _ in batch], found.tolist(), strict=True))
    return scores, undecodable


def score_means(table: pa.Table) -> dict[str, float | None]:
    """The mean of each score over a shard's rows (None where not computed), for the asset's metadata."""
    means = {}
    for column in ("punsafe", "pwatermark", "aesthetic"):
        values = table.column(column)
        means[column] = round(pc.mean(values).as_py(), 4) if values.null_count < len(values) else None
    return means
