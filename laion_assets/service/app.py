"""The CLIP HTTP API: Roboflow-compatible embed and compare routes over the pipeline's ClipEncoder, and
/search over the dataset's search index.

Each request's images are fetched or decoded and preprocessed in threads, its texts tokenised; the
model then sees them through a dynamic batcher, in one thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from laion_assets.pipeline.embeddings.clip import ClipEncoder, ClipSettings, ModelMismatch
from laion_assets.pipeline.removal import RemovedKeys
from laion_assets.pipeline.search.index import IndexMissing, SearchIndex
from laion_assets.pipeline.storage import DatasetStore
from laion_assets.service import models as m
from laion_assets.service.batcher import DynamicBatcher
from laion_assets.service.inputs import InputError, decode_base64, fetch_image, open_image
from laion_assets.service.page import add_search_page
from laion_assets.service.routes import clip_router, info_router, key_check, search_router
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
        if count > self.settings.max_batch:
            raise InputError(413, f"{field}: {count} items is over max_batch={self.settings.max_batch}")

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
        return await self.texts(list(tokens))

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
        return self.encoder.prepare(open_image(label, data, self.settings.max_pixels))

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


def create_app(settings: ServiceSettings, encoder: ClipEncoder) -> FastAPI:
    """The FastAPI app over `encoder` (loaded by the caller, so tests and the CLI choose the model)."""
    service = ClipService(settings, encoder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.load_index)
        yield
        await service.close()

    app = FastAPI(
        title="laion_assets CLIP service",
        description=(
            "Embed images and texts and compare them with the CLIP model that filtered the dataset "
            "(Roboflow Inference's CLIP routes), and search the dataset's pairs by text or image."
        ),
        version="1",
        lifespan=lifespan,
        dependencies=[Depends(key_check(settings))],
        responses={status: {"model": m.ErrorResponse} for status in (400, 401, 403, 413, 422)},
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    _add_error_handlers(app)
    for router in (clip_router(service), search_router(service), info_router(service)):
        app.include_router(router)
    add_search_page(
        app, service.store, service.removed, key_required=settings.api_key is not None
    )  # `/`, /image, /pairs
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON `{"detail": reason}`: 4xx for what the request got wrong, 500 only for a bug."""

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        reasons = [_validation_reason(error) for error in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        return JSONResponse({"detail": "; ".join(reasons) + more}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def _validation_reason(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = error["msg"].removeprefix("Value error, ")  # what our validators raise says it all
    return f"{where}: {message}" if where else message


class BodyLimit:
    """Answers 413 to a request body over `limit` bytes before anything parses it (chunked ones too)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": f"request body is over {self.limit} bytes"}, status_code=413)
        await response(scope, receive, send)


def serve(settings: ServiceSettings, clip: ClipSettings) -> None:
    """Load the model and answer on settings.host:settings.port until interrupted (WeakApiKey first, if
    the key is too short)."""
    settings.check_api_key()
    app = create_app(settings, ClipEncoder(clip))
    logging.getLogger("uvicorn.access").addFilter(_hide_query_keys)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


_QUERY_KEY = re.compile(r"(api_key=)[^&\s]*")


def _hide_query_keys(record: logging.LogRecord) -> bool:
    """uvicorn's access log line with `?api_key=` blanked: a key sent in the query (inference-sdk's v0
    mode) must not land in the logs. Keys in headers and bodies are never logged at all."""
    if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
        record.args = (*record.args[:2], _QUERY_KEY.sub(r"\1***", record.args[2]), *record.args[3:])
    return True
