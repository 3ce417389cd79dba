"""`ClipService`: what the routes call. Inputs (URLs, base64, uploads, texts) to embeddings through a
dynamic batcher per kind, and the dataset's search index, loaded when it appears."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from laion_assets.pipeline.embeddings.clip import ClipEncoder, ModelMismatch
from laion_assets.pipeline.removal import RemovedKeys
from laion_assets.pipeline.search.index import IndexMissing, SearchIndex
from laion_assets.pipeline.storage import DatasetStore
from laion_assets.service import models as m
from laion_assets.service.batcher import DynamicBatcher
from laion_assets.service.inputs import InputError, decode_base64, fetch_image, open_image
from laion_assets.service.settings import ServiceSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_FETCH_THREADS = 16  # URL fetches wait on the network, not the CPU


class ClipService:
    """The encoder behind the routes: inputs to embeddings, and the search index."""

    def __init__(self, settings: ServiceSettings, encoder: ClipEncoder) -> None:
        self.settings, self.encoder = settings, encoder
        self.store = DatasetStore(settings.root) if settings.root else None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="clip-model")
        self._prepare = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="clip-prepare")
        self._fetch = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="clip-fetch")
        batch = encoder.settings.batch_size
        self.images = DynamicBatcher(
            self._encode_images, self._model_thread, batch, settings.batch_wait, settings.batching
        )
        self.texts = DynamicBatcher(
            self._encode_tokens, self._model_thread, batch, settings.batch_wait, settings.batching
        )
        size = encoder.model.visual.image_size  # what the model's preprocessing resizes to
        self._image_side = max(size) if isinstance(size, tuple | list) else int(size)
        self.removed = RemovedKeys(self.store) if self.store is not None else None
        self.index: SearchIndex | None = None
        self.index_problem: tuple[int, str] | None = None  # why /search cannot answer: status, reason
        self._index_lock = asyncio.Lock()

    @property
    def model(self) -> str:
        return self.encoder.settings.model

    @property
    def pretrained(self) -> str:
        return self.encoder.settings.pretrained

    async def close(self) -> None:
        await self.images.close()
        await self.texts.close()
        for pool in (self._model_thread, self._prepare, self._fetch):
            pool.shutdown(wait=False, cancel_futures=True)

    # checks

    def check_version(self, clip_version_id: str | None) -> None:
        if clip_version_id is not None and clip_version_id != self.model:
            raise InputError(400, f"clip_version_id {clip_version_id!r}: this service runs {self.model!r}")

    def check_count(self, field: str, count: int) -> None:
        """413 over max_texts for /clip/embed_text's texts (Roboflow's server takes any number, in batches),
        over max_batch for images and compare prompts (its CLIP_MAX_BATCH_SIZE)."""
        limit, name = (
            (self.settings.max_texts, "max_texts")
            if field == "text"
            else (self.settings.max_batch, "max_batch")
        )
        if count > limit:
            raise InputError(413, f"{field}: {count} items is over {name}={limit}")

    # embeddings

    async def embed(self, kind: m.Kind, items: list[tuple[str, m.Item]]) -> np.ndarray:
        """One normalised float32 row per (label, item); images or texts as `kind` says."""
        if kind == "image":
            with self.images.preparing():
                pixels = await asyncio.gather(*(self._pixels(label, image) for label, image in items))
            return await self.images(list(pixels))
        for label, text in items:
            if len(text) > self.settings.max_text_chars:
                raise InputError(
                    413,
                    f"{label}: {len(text)} characters is over max_text_chars={self.settings.max_text_chars}",
                )
        loop = asyncio.get_running_loop()
        with self.texts.preparing():
            texts = [text for _, text in items]
            tokens = await loop.run_in_executor(self._prepare, self.encoder.tokenize, texts)
        size = self.encoder.settings.batch_size  # many texts go to the model a batch at a time
        chunks = [list(tokens[start : start + size]) for start in range(0, len(tokens), size)]
        return np.concatenate(await asyncio.gather(*(self.texts(chunk) for chunk in chunks)))

    async def _pixels(self, label: str, image: m.ImageInput) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if image.type == "url":
            data = await loop.run_in_executor(
                self._fetch, fetch_image, label, image.value, self.settings.fetch_settings()
            )
            return await loop.run_in_executor(self._prepare, self._prepare_image, label, data)
        return await loop.run_in_executor(self._prepare, self._prepare_base64, label, image.value)

    def _prepare_base64(self, label: str, value: str) -> torch.Tensor:
        return self._prepare_image(label, decode_base64(label, value, self.settings.max_image_bytes))

    def _prepare_image(self, label: str, data: bytes) -> torch.Tensor:
        return self.encoder.prepare(open_image(label, data, self.settings.max_pixels, self._image_side))

    def _encode_images(self, pixels: list[torch.Tensor]) -> np.ndarray:
        import torch

        return self.encoder.encode_images(torch.stack(pixels)).cpu().numpy()

    def _encode_tokens(self, tokens: list[torch.Tensor]) -> np.ndarray:
        import torch

        return self.encoder.encode_tokens(torch.stack(tokens)).cpu().numpy()

    # search

    def load_index(self) -> None:
        """Loads the search index, or records why /search cannot answer."""
        if self.store is None:
            self.index_problem = (404, "this service was started without a dataset root")
            return
        try:
            index = SearchIndex.load(self.store)
            index.check_model(self.encoder.identity)
        except IndexMissing as exc:
            self.index_problem = (404, str(exc))
        except ModelMismatch as exc:
            self.index_problem = (409, str(exc))
            log.warning("/search is off: %s", exc)
        else:
            self.index, self.index_problem = index, None
            log.info("search index: %d rows from %s (%s)", len(index), self.store.root, index.kind)

    def removed_keys(self) -> frozenset[str]:
        """The keys taken out of the dataset (removal ledgers), which no answer may hold."""
        return self.removed.current() if self.removed is not None else frozenset()

    async def search_index(self) -> SearchIndex:
        """The loaded index. A missing one is looked for again, so one built later is found."""
        async with self._index_lock:
            if self.index is None and (self.index_problem is None or self.index_problem[0] == 404):
                await asyncio.to_thread(self.load_index)
        if self.index is None:
            raise InputError(*self.index_problem)
        return self.index
