"""The service's routes, a router each: Roboflow Inference's CLIP routes, /search and /info; and the API
key that every route but the public page's needs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Request, Security
from fastapi.security import APIKeyHeader, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

from laion_assets.service import models as m
from laion_assets.service.inputs import InputError
from laion_assets.service.settings import ServiceSettings

if TYPE_CHECKING:
    from laion_assets.pipeline.search.index import Hit
    from laion_assets.service.clip_service import ClipService

API_KEY_HEADER = "X-API-Key"
_BEARER = HTTPBearer(auto_error=False)  # `Authorization: Bearer <key>`, inference-sdk's header transport


def key_check(settings: ServiceSettings) -> Callable[..., Awaitable[None]]:
    """The dependency that asks for `settings.api_key` (none when it is unset)."""

    async def require_key(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
        query: str | None = Security(APIKeyQuery(name="api_key", auto_error=False)),
        header: str | None = Security(APIKeyHeader(name=API_KEY_HEADER, auto_error=False)),
    ) -> None:
        """The key wherever Roboflow's server and its client put it, in its order: `?api_key=`, then
        `Authorization: Bearer`, then (ours) `X-API-Key`, then `api_key` in the JSON body."""
        if settings.api_key is None:
            return
        given = query or (bearer.credentials if bearer else None) or header or await _body_key(request)
        if given is None:
            raise InputError(
                401,
                f"missing api_key: send it as ?api_key=..., an Authorization: Bearer header, an "
                f"{API_KEY_HEADER} header or an api_key field of the JSON body",
            )
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise InputError(401, "wrong api_key")

    return require_key


def clip_router(service: ClipService) -> APIRouter:
    """Roboflow Inference's CLIP routes: /clip/embed_image, /clip/embed_text and /clip/compare."""
    router = APIRouter()

    async def embeddings(
        kind: m.Kind, value: m.Item | list, clip_version_id: str | None
    ) -> m.EmbeddingResponse:
        start = time.perf_counter()
        service.check_version(clip_version_id)
        items = _labelled(kind, value)
        service.check_count(kind, len(items))
        rows = await service.embed(kind, items)
        return m.EmbeddingResponse(
            embeddings=rows.tolist(), time=time.perf_counter() - start, inference_id=str(uuid.uuid4())
        )

    @router.post("/clip/embed_image", response_model=m.EmbeddingResponse, summary="CLIP image embeddings")
    async def embed_image(request: m.EmbedImageRequest) -> m.EmbeddingResponse:
        return await embeddings("image", request.image, request.clip_version_id)

    @router.post("/clip/embed_text", response_model=m.EmbeddingResponse, summary="CLIP text embeddings")
    async def embed_text(request: m.EmbedTextRequest) -> m.EmbeddingResponse:
        return await embeddings("text", request.text, request.clip_version_id)

    @router.post("/clip/compare", response_model=m.CompareResponse, summary="CLIP cosine similarity")
    async def compare(request: m.CompareRequest) -> m.CompareResponse:
        start = time.perf_counter()
        service.check_version(request.clip_version_id)
        named = isinstance(request.prompt, dict)
        prompts = (
            [(f"prompt[{name!r}]", p) for name, p in request.prompt.items()]
            if named
            else _labelled("prompt", request.prompt)
        )
        service.check_count("prompt", len(prompts))
        subject, prompt = await asyncio.gather(
            service.embed(request.subject_type, [("subject", request.subject)]),
            service.embed(request.prompt_type, prompts),
        )
        similarity = (prompt @ subject[0]).tolist()
        return m.CompareResponse(
            similarity=dict(zip(request.prompt, similarity, strict=True)) if named else similarity,
            time=time.perf_counter() - start,
            inference_id=str(uuid.uuid4()),
        )

    return router


def search_router(service: ClipService) -> APIRouter:
    """/search: the dataset's pairs nearest to a text or an image."""
    router = APIRouter()

    @router.post(
        "/search",
        response_model=m.SearchResponse,
        summary="the dataset's pairs nearest to a text or an image",
        responses={404: {"model": m.ErrorResponse}, 409: {"model": m.ErrorResponse}},
    )
    async def search(request: m.SearchRequest) -> m.SearchResponse:
        start = time.perf_counter()
        index = await service.search_index()
        if request.image is not None:
            query = await service.embed("image", [("image", request.image)])
        else:
            query = await service.embed("text", [("text", request.text)])

        def nearest() -> list[Hit]:  # the removal ledgers are listed here: S3 requests, off the event loop
            return index.search(query[0], request.top_k, service.removed_keys())

        hits = await asyncio.to_thread(nearest)
        return m.SearchResponse(
            results=[m.SearchHit(**dataclasses.asdict(hit)) for hit in hits], time=time.perf_counter() - start
        )

    return router


def info_router(service: ClipService) -> APIRouter:
    """/info: the model, the limits and the search index."""
    router = APIRouter()

    @router.get("/info", response_model=m.InfoResponse, summary="the model, the limits and the search index")
    async def info() -> m.InfoResponse:
        return m.InfoResponse(
            model=service.model,
            pretrained=service.pretrained,
            device=str(service.encoder.device),
            dim=service.encoder.dim,
            max_batch=service.settings.max_batch,
            max_texts=service.settings.max_texts,
            max_image_bytes=service.settings.max_image_bytes,
            batching=service.settings.batching,
            search_index_rows=len(service.index) if service.index is not None else None,
            search_index_kind=service.index.kind if service.index is not None else None,
            search_index_problem=service.index_problem[1] if service.index_problem else None,
            image_batches=m.BatcherStats(model_calls=service.images.model_calls, items=service.images.items),
            text_batches=m.BatcherStats(model_calls=service.texts.model_calls, items=service.texts.items),
        )

    return router


async def _body_key(request: Request) -> str | None:
    """`api_key` of a JSON body (inference-sdk's way for a self-hosted server). The body is parsed again
    only when it holds the name; the key is never logged."""
    if request.method != "POST":
        return None
    body = await request.body()  # already read and kept by FastAPI for the route's own body
    if b'"api_key"' not in body:
        return None
    try:
        value = json.loads(body).get("api_key")
    except (ValueError, AttributeError):  # not JSON, or not an object: the route answers 422
        return None
    return value if isinstance(value, str) else None


def _labelled(field: str, value: m.Item | list) -> list[tuple[str, m.Item]]:
    """(label, item) pairs; the label names the item in error messages, e.g. image[3]."""
    if isinstance(value, list):
        return [(f"{field}[{i}]", item) for i, item in enumerate(value)]
    return [(field, value)]
