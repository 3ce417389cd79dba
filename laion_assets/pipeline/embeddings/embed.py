"""The clip_embeddings stage: each successful image of a shard and its caption through CLIP.

A reader streams the tar, a thread pool decodes and preprocesses ahead of the model (Pillow and
torch release the GIL), and the model sees full batches. Similarity is computed in float32 from
the normalised embeddings, which are then stored as float16.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from laion_assets.pipeline import schemas

if TYPE_CHECKING:
    import torch

    from laion_assets.pipeline.embeddings.clip import ClipEncoder
from laion_assets.pipeline.download.imaging import stored_image_bytes
from laion_assets.pipeline.lineage import inherited_footer
from laion_assets.pipeline.parallel import ordered_map
from laion_assets.pipeline.shard_tar import read_samples, reading
from laion_assets.pipeline.storage import EMBEDDINGS, IMAGES, DatasetStore

T = TypeVar("T")


@dataclass
class EmbedResult:
    table: pa.Table
    undecodable: list[str]  # keys of successful downloads whose stored image could not be read
    missing: list[str]  # keys of successful downloads that the tar holds no sample of
    seconds: float


def write_embeddings(
    store: DatasetStore, shard: str, encoder: ClipEncoder, batch_size: int, workers: int = 2
) -> EmbedResult:
    """`embeddings/<shard>.parquet` from the shard's images; the model and its weights in the footer."""
    images = store.read_parquet(IMAGES.parquet(shard))
    damaged = reading(store.url(IMAGES.tar(shard)), "download the shard's images again")
    with damaged, store.open(IMAGES.tar(shard)) as tar:
        result = embed_shard(images, tar, encoder, batch_size, workers)
    footer = {**inherited_footer(images), **encoder.identity.footer()}
    store.write_parquet(EMBEDDINGS.parquet(shard), result.table, metadata=footer)
    return result


def embed_shard(
    images: pa.Table, tar: IO[bytes], encoder: ClipEncoder, batch_size: int, workers: int = 2
) -> EmbedResult:
    """Embeddings for every `success` row of `images` found in `tar`, sorted by key."""
    start = time.monotonic()
    rows = images.filter(pa.compute.equal(images.column("status"), schemas.SUCCESS)).select(
        ["key", "caption"]
    )
    captions = dict(zip(rows.column("key").to_pylist(), rows.column("caption").to_pylist(), strict=True))
    undecodable: list[str] = []
    out = _Embeddings(encoder.dim)
    for batch in image_batches(tar, set(captions), encoder.prepare, batch_size, workers, undecodable):
        out.add(encoder, batch, captions)
    missing = sorted(captions.keys() - set(out.keys) - set(undecodable))
    return EmbedResult(out.table(), undecodable, missing, seconds=time.monotonic() - start)


def image_batches(
    tar: IO[bytes],
    keys: set[str],
    to_input: Callable[[Image.Image], T],
    batch_size: int,
    workers: int,
    undecodable: list[str],
) -> Iterator[list[tuple[str, T]]]:
    """Batches of (key, `to_input(image)`) for the stored image of each sample of `keys` in `tar`, decoded
    and prepared on `workers` threads ahead of the model (Pillow and torch release the GIL), in the tar's
    order; the keys whose image cannot be read are appended to `undecodable`."""

    def prepare(sample: tuple[str, dict[str, bytes]]) -> tuple[str, T | None]:
        key, members = sample
        try:
            with Image.open(io.BytesIO(stored_image_bytes(members))) as image:
                return key, to_input(image)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return key, None

    samples = ((key, members) for key, members in read_samples(tar) if key in keys)
    batch: list[tuple[str, T]] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="preprocess") as pool:
        for key, prepared in ordered_map(pool, prepare, samples, lookahead=2 * batch_size):
            if prepared is None:
                undecodable.append(key)
                continue
            batch.append((key, prepared))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


class _Embeddings:
    """Batches of embeddings as they come from the model, and the sorted table they make."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.keys: list[str] = []
        self.images: list[np.ndarray] = []
        self.texts: list[np.ndarray] = []
        self.similarities: list[np.ndarray] = []

    def add(
        self, encoder: ClipEncoder, batch: list[tuple[str, torch.Tensor]], captions: dict[str, str]
    ) -> None:
        import torch  # imported with the encoder, not with this module (see clip.py)

        keys = [key for key, _ in batch]
        image = encoder.encode_images(torch.stack([pixels for _, pixels in batch]))
        text = encoder.encode_texts([captions[key] for key in keys])
        self.keys.extend(keys)
        self.similarities.append((image * text).sum(dim=-1).cpu().numpy().astype(np.float32))
        self.images.append(image.cpu().numpy().astype(np.float16))
        self.texts.append(text.cpu().numpy().astype(np.float16))

    def table(self) -> pa.Table:
        similarity = np.concatenate(self.similarities) if self.keys else np.zeros(0, np.float32)
        return pa.table(
            {
                "key": pa.array(self.keys, pa.string()),
                "image_embedding": _fixed_size(self.images, self.dim),
                "text_embedding": _fixed_size(self.texts, self.dim),
                "similarity": pa.array(similarity, pa.float32()),
            },
            schema=schemas.embeddings(self.dim),
        ).sort_by("key")


def _fixed_size(parts: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(parts).reshape(-1) if parts else np.zeros(0, np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)
