"""The CLIP HTTP API: Roboflow-compatible embed and compare routes over the pipeline's ClipEncoder, and
/search over the dataset's search index.

Each request's images are fetched or decoded and preprocessed in threads, its texts tokenised; the
model then sees them through a dynamic batcher, in one thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from laion_assets.pipeline.embeddings.clip import ClipEncoder, ClipSettings
from laion_assets.service import models as m
from laion_assets.service.clip_service import ClipService
from laion_assets.service.inputs import InputError
from laion_assets.service.page import add_search_page
from laion_assets.service.routes import clip_router, info_router, key_check, search_router
from laion_assets.service.settings import ServiceSettings

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


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
