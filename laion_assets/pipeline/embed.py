"""The clip_embeddings stage: each successful image of a shard and its caption through CLIP.

A reader streams the tar, a thread pool decodes and preprocesses ahead of the model (Pillow and
torch release the GIL), and the model sees full batches. Similarity is computed in float32 from
the normalised embeddings, which are then stored as float16.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TypeVar

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError

from laion_assets.pipeline import schemas
from laion_assets.pipeline.clip import ClipEncoder
from laion_assets.pipeline.imaging import ENCODE_FORMATS
from laion_assets.pipeline.shard_tar import read_samples

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class EmbedResult:
    table: pa.Table
    undecodable: list[str]  # keys of successful downloads whose stored image could not be read
    seconds: float


def embed_shard(
    images: pa.Table, tar: IO[bytes], encoder: ClipEncoder, batch_size: int, workers: int = 2
) -> EmbedResult:
    """Embeddings for every `success` row of `images` found in `tar`, sorted by key."""
    start = time.monotonic()
    rows = images.filter(pa.compute.equal(images.column("status"), schemas.SUCCESS)).select(
        ["key", "caption"]
    )
    captions = dict(zip(rows.column("key").to_pylist(), rows.column("caption").to_pylist(), strict=True))
    samples = ((key, members) for key, members in read_samples(tar) if key in captions)

    def prepare(sample: tuple[str, dict[str, bytes]]) -> tuple[str, torch.Tensor | None]:
        key, members = sample
        data = next((members[ext] for ext in ENCODE_FORMATS if ext in members), b"")
        try:
            with Image.open(io.BytesIO(data)) as image:
                return key, encoder.prepare(image)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return key, None

    keys: list[str] = []
    undecodable: list[str] = []
    image_parts, text_parts, similarity_parts = [], [], []
    batch: list[tuple[str, torch.Tensor]] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="preprocess") as pool:
        for key, pixels in _ordered_map(pool, prepare, samples, lookahead=2 * batch_size):
            if pixels is None:
                undecodable.append(key)
                continue
            batch.append((key, pixels))
            if len(batch) == batch_size:
                _encode(encoder, batch, captions, keys, image_parts, text_parts, similarity_parts)
                batch = []
        if batch:
            _encode(encoder, batch, captions, keys, image_parts, text_parts, similarity_parts)

    dim = encoder.dim
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image_embedding": _fixed_size(image_parts, dim),
            "text_embedding": _fixed_size(text_parts, dim),
            "similarity": pa.array(np.concatenate(similarity_parts) if keys else [], pa.float32()),
        },
        schema=schemas.embeddings(dim),
    ).sort_by("key")
    return EmbedResult(table=table, undecodable=undecodable, seconds=time.monotonic() - start)


def _encode(encoder, batch, captions, keys, image_parts, text_parts, similarity_parts) -> None:
    batch_keys = [key for key, _ in batch]
    image = encoder.encode_images(torch.stack([pixels for _, pixels in batch]))
    text = encoder.encode_texts([captions[key] for key in batch_keys])
    similarity = (image * text).sum(dim=-1)
    keys.extend(batch_keys)
    image_parts.append(image.cpu().numpy().astype(np.float16))
    text_parts.append(text.cpu().numpy().astype(np.float16))
    similarity_parts.append(similarity.cpu().numpy().astype(np.float32))


def _fixed_size(parts: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(parts).reshape(-1) if parts else np.zeros(0, np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], lookahead: int
) -> Iterator[R]:
    """`map` over a pool, in order, with at most `lookahead` items in flight (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
