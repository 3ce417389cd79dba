"""The recaptions stage: a new caption for every kept pair, Recap-DataComp-1B's way, scored by the
pipeline's own CLIP beside the web's caption.

The images are the kept samples of `pairs/<shard>.tar`; the web caption's score is the pair's stored
similarity (`embeddings`, image against caption); the new caption's is the same image embedding against
the new caption's text embedding, so both come from one model, and the encoder must be the model that
made the embeddings. A sample whose image cannot be read or captioned, or whose caption is empty, keeps
its row, with a null `re_caption` and the reason; but a shard none of whose images got a caption because
the captioner could not be reached is not written, so that a later run captions it.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.imaging import stored_image_bytes
from laion_assets.pipeline.embeddings.clip import ModelIdentity
from laion_assets.pipeline.lineage import inherited_footer
from laion_assets.pipeline.recaptions.caption import NoCaption
from laion_assets.pipeline.shard_tar import read_samples, reading
from laion_assets.pipeline.storage import EMBEDDINGS, PAIRS, RECAPTIONS, DatasetStore, footer

if TYPE_CHECKING:
    from laion_assets.pipeline.embeddings.clip import ClipEncoder

QUANTILES = (0.1, 0.5, 0.9)
_CHUNK = 256  # images decoded and captioned at once


class CaptionerUnreachable(RuntimeError):
    """No image of a shard was captioned, the captioner unreachable for each: nothing is written."""


class Captioner(Protocol):
    """CocaCaptioner, ChatCaptioner, HfCaptioner: a caption, or the reason there is none, per image."""

    settings: Any  # the captioner's settings dataclass

    def caption(self, images: list[Image.Image]) -> Sequence[str | NoCaption]: ...

    def describe(self) -> dict[str, str]: ...


@dataclass
class RecaptionResult:
    table: pa.Table
    seconds: float

    def summary(self) -> dict[str, float | int | None]:
        """Mean and quantiles of both scores over the recaptioned pairs, and the share of them whose new
        caption scores higher; None where no pair was recaptioned (a score of 0.0 would be a cosine)."""
        scored = self.table.filter(pa.compute.is_valid(self.table.column("re_caption")))
        org = np.asarray(scored.column("org_clip_score").to_pylist(), dtype=np.float64)
        new = np.asarray(scored.column("re_clip_score").to_pylist(), dtype=np.float64)
        summary: dict[str, float | int | None] = {
            "recaptioned": scored.num_rows,
            "failed": self.table.num_rows - scored.num_rows,
        }
        for name, values in (("org_clip_score", org), ("re_clip_score", new)):
            summary[f"{name}_mean"] = round(float(values.mean()), 4) if len(values) else None
            for q in QUANTILES:
                summary[f"{name}_p{round(q * 100)}"] = (
                    round(float(np.quantile(values, q)), 4) if len(values) else None
                )
        summary["share_re_above_org"] = round(float((new > org).mean()), 4) if len(new) else None
        return summary


def write_recaptions(
    store: DatasetStore, shard: str, captioner: Captioner, encoder: ClipEncoder
) -> RecaptionResult:
    """`recaptions/<shard>.parquet` from the shard's pairs; the captioner and the CLIP model in the footer."""
    start = time.monotonic()
    pairs = store.read_parquet(PAIRS.parquet(shard), columns=["key", "url", "caption", "sha256"])
    embeddings = store.read_parquet(
        EMBEDDINGS.parquet(shard), columns=["key", "image_embedding", "similarity"]
    )
    made_by = ModelIdentity.from_footer(footer(embeddings.schema))
    if made_by is not None:
        made_by.require(
            encoder.identity,
            f"shard {shard}'s embeddings were",
            "the recaptions stage",
            "score recaptions with the model that made the embeddings (the clip resource)",
        )
    keys = pairs.column("key").to_pylist()
    row = {key: i for i, key in enumerate(embeddings.column("key").to_pylist())}
    missing = [key for key in keys if key not in row]
    if missing:
        raise ValueError(f"shard {shard}: {len(missing)} pairs have no embedding, e.g. {missing[:3]}")
    order = [row[key] for key in keys]
    if order:
        vectors = np.stack(embeddings.column("image_embedding").to_numpy(zero_copy_only=False))[order]
    else:  # no pair kept (every download failed, say): an empty file, not a failed shard
        vectors = np.empty((0, encoder.dim), np.float32)
    org_scores = np.asarray(embeddings.column("similarity").to_pylist(), dtype=np.float64)[order]

    with reading(store.url(PAIRS.tar(shard)), "make the shard's filtered_pairs again"):
        new, errors = _caption_samples(store, shard, set(keys), captioner)
    if errors and not new and all(error.unreachable for error in errors.values()):
        raise CaptionerUnreachable(
            f"shard {shard}: the captioner captioned none of its {len(errors)} images "
            f"({next(iter(errors.values())).reason}); {RECAPTIONS.parquet(shard)} not written"
        )
    reasons = {key: error.reason for key, error in errors.items()}
    texts = [new.get(key) for key in keys]
    scores = np.full(len(keys), np.nan)
    have = [i for i, text in enumerate(texts) if text is not None]
    if have:
        text_vectors = encoder.encode_texts([texts[i] for i in have]).cpu().numpy()
        scores[have] = (vectors[have].astype(np.float32) * text_vectors).sum(axis=1)
    table = pa.table(
        {
            "key": keys,
            "url": pairs.column("url"),
            "org_caption": pairs.column("caption"),
            "re_caption": pa.array(texts, pa.string()),
            "org_clip_score": org_scores,
            "re_clip_score": pa.array(scores, pa.float64(), mask=np.isnan(scores)),
            "org_length": [len(text.split()) for text in pairs.column("caption").to_pylist()],
            "re_length": pa.array(
                [None if text is None else len(text.split()) for text in texts], pa.int64()
            ),
            "sha256": pairs.column("sha256"),
            "re_caption_error": pa.array(
                [None if key in new else reasons.get(key, "no image in the pairs tar") for key in keys],
                pa.string(),
            ),
        }
    )
    table = schemas.conform(table, schemas.RECAPTIONS)
    metadata = {
        **inherited_footer(pairs),
        **encoder.identity.footer(),
        names.CAPTIONER_FOOTER: json.dumps(captioner.describe(), sort_keys=True),
    }
    store.write_parquet(RECAPTIONS.parquet(shard), table, metadata=metadata)
    return RecaptionResult(table=table, seconds=time.monotonic() - start)


def _caption_samples(
    store: DatasetStore, shard: str, keys: set[str], captioner: Captioner
) -> tuple[dict[str, str], dict[str, NoCaption]]:
    """The new caption of each of `keys` found in `pairs/<shard>.tar`, and why the others have none.
    Images are decoded and captioned `_CHUNK` at a time: a shard's 10,000 decoded at once would hold
    about 2 GB of pixels."""
    captions: dict[str, str] = {}
    errors: dict[str, NoCaption] = {}
    chunk: list[tuple[str, Image.Image]] = []

    def caption_chunk() -> None:
        results = captioner.caption([image for _, image in chunk])
        for (key, _), result in zip(chunk, results, strict=True):
            if isinstance(result, NoCaption):
                errors[key] = result
            elif not result.strip():  # end-of-text first: no words to train on
                errors[key] = NoCaption("empty caption")
            else:
                captions[key] = result
        chunk.clear()

    with store.open(PAIRS.tar(shard)) as tar:
        for key, members in read_samples(tar):
            if key not in keys:
                continue
            try:
                with Image.open(io.BytesIO(stored_image_bytes(members))) as image:
                    chunk.append((key, image.convert("RGB")))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                errors[key] = NoCaption(f"cannot decode: {exc}")
            if len(chunk) >= _CHUNK:
                caption_chunk()
    if chunk:
        caption_chunk()
    return captions, errors
