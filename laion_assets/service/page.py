"""The search page at `/`: plain HTML and a script from `static/`, over /search, and the two routes it
needs besides: `GET /image/{key}`, a pair's image out of the dataset's own `pairs/<shard>.tar` (never
the original URL), and `POST /pairs`, the nsfw tag and licence of pairs from `pairs/<shard>.parquet`.

The page and its static files are public, so that the page can ask for the API key; it sends the key as
the X-API-Key header, fetching images with `fetch()` into object URLs (an <img> cannot send a header).
/image/{key} and /pairs need the key like every other route.

A shard's tar is scanned once for the offsets of its members (headers only: tarfile seeks over the
data), and each image is then one seek and one read; the offsets, and the parquet columns, are kept for
the most recently used shards and built again when their file changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import IO, Generic, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from laion_assets.pipeline import schemas
from laion_assets.pipeline.removal import RemovedKeys
from laion_assets.pipeline.storage import PAIRS, DatasetStore
from laion_assets.service import models as m
from laion_assets.service.inputs import InputError

STATIC = resources.files("laion_assets.service") / "static"
IMAGE_MAX_AGE = 24 * 3600  # a key's image changes only when its shard is rebuilt; the ETag tells then
CACHED_SHARDS = 64  # tar offsets: about 100 bytes a sample, so 64 MB for 64 shards of 10,000
RECHECK_SECONDS = 30.0  # how often a cached shard's file is looked at again for a change
MAX_KEYS = 1000
_CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

T = TypeVar("T")


class PairsRequest(BaseModel):
    keys: list[str] = Field(max_length=MAX_KEYS, description="pair keys, `<shard>-<row>`")


class PairInfo(BaseModel):
    key: str
    nsfw: str = Field(description="UNLIKELY, UNSURE, NSFW or UNTAGGED")
    license: str | None


class PairsResponse(BaseModel):
    pairs: list[PairInfo] = Field(description="the pairs of the dataset among the keys, in their order")


class ShardCache(Generic[T]):
    """`build(file)` of one file per shard, for the `size` most recently used shards, built again when
    the file's version (size and mtime, or S3's ETag) changes; looked at every RECHECK_SECONDS."""

    def __init__(
        self, store: DatasetStore, relpath: Callable[[str], str], build: Callable[[IO[bytes]], T], size: int
    ) -> None:
        self.store, self.relpath, self.build, self.size = store, relpath, build, size
        self._entries: OrderedDict[str, tuple[str, float, T]] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, shard: str) -> tuple[str, T] | None:
        """(file version, built value), or None if the shard has no such file."""
        with self._lock:
            entry = self._entries.get(shard)
            if entry is not None:
                self._entries.move_to_end(shard)
        now = time.monotonic()
        if entry is not None and now - entry[1] < RECHECK_SECONDS:
            return entry[0], entry[2]
        version = self.store.fingerprint(self.relpath(shard))
        if version is None:
            with self._lock:
                self._entries.pop(shard, None)
            return None
        if entry is not None and entry[0] == version:
            value = entry[2]
        else:
            with self.store.open(self.relpath(shard)) as f:
                value = self.build(f)
            self.builds += 1
        with self._lock:
            self._entries[shard] = (version, now, value)
            self._entries.move_to_end(shard)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return version, value

    def forget(self, shard: str) -> None:
        with self._lock:
            self._entries.pop(shard, None)


def image_offsets(f: IO[bytes]) -> dict[str, tuple[int, int, str]]:
    """key -> (data offset, size, extension) of each sample's image member in a webdataset tar."""
    offsets: dict[str, tuple[int, int, str]] = {}
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:  # reads the headers and seeks over the data
            if not info.isfile():
                continue
            key, _, extension = info.name.rsplit("/", 1)[-1].partition(".")
            if extension in _CONTENT_TYPES and key not in offsets:
                offsets[key] = (info.offset_data, info.size, extension)
        tar.members = []  # what tarfile kept of the headers is not needed
    return offsets


def pair_columns(f: IO[bytes]) -> dict[str, tuple[str, str | None]]:
    """key -> (nsfw, license) of a pairs parquet file."""
    import pyarrow.parquet as pq

    table = pq.read_table(f, columns=["key", "nsfw", "license"])
    return dict(
        zip(
            table.column("key").to_pylist(),
            zip(table.column("nsfw").to_pylist(), table.column("license").to_pylist(), strict=True),
            strict=True,
        )
    )


class Pairs:
    """A pair's image and its parquet columns, by key; none of a removed key."""

    def __init__(
        self, store: DatasetStore, removed: RemovedKeys | None = None, cached_shards: int = CACHED_SHARDS
    ) -> None:
        self.store = store
        self.removed = removed
        self.tars = ShardCache(store, PAIRS.tar, image_offsets, cached_shards)
        self.columns = ShardCache(store, PAIRS.parquet, pair_columns, cached_shards)

    def image(self, key: str) -> tuple[bytes, str, str] | None:
        """(bytes, content type, ETag) of the pair's image, or None for a key not in the dataset."""
        shard = schemas.shard_of_key(key)
        found = self.tars.get(shard) if shard else None
        if found is None or key not in found[1] or key in self._removed():
            return None
        version, offsets = found
        offset, size, extension = offsets[key]
        with self.store.open(PAIRS.tar(shard)) as f:
            if self.store.opened_fingerprint(f) != version:  # rewritten (a removal) since it was scanned
                self.tars.forget(shard)
                return self.image(key)
            f.seek(offset)
            data = f.read(size)
        etag = hashlib.sha256(f"{version}\0{key}\0{offset}".encode()).hexdigest()[:32]
        return data, _CONTENT_TYPES[extension], f'"{etag}"'

    def info(self, keys: list[str]) -> list[PairInfo]:
        found = []
        removed = self._removed()
        for key in keys:
            if key in removed:
                continue
            shard = schemas.shard_of_key(key)
            columns = self.columns.get(shard) if shard else None
            if columns is not None and key in columns[1]:
                nsfw, license_ = columns[1][key]
                found.append(PairInfo(key=key, nsfw=nsfw, license=license_))
        return found

    def _removed(self) -> frozenset[str]:
        return self.removed.current() if self.removed is not None else frozenset()


def add_search_page(
    app: FastAPI, store: DatasetStore | None, removed: RemovedKeys | None, key_required: bool
) -> None:
    """The page at `/` and its static files, public; `GET /image/{key}` and `POST /pairs`, which take
    the app's own dependencies (the API key). Neither answers with a key of the removal ledgers."""
    pairs = Pairs(store, removed) if store is not None else None
    index_html = (STATIC / "index.html").read_text()
    # Shared caches may keep an image only when no key guards it.
    cache_control = f"{'private' if key_required else 'public'}, max-age={IMAGE_MAX_AGE}"

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(index_html, headers={"Cache-Control": "no-cache"})

    # Starlette's own route and mount: outside the API's dependencies and its schema.
    app.add_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def need_pairs() -> Pairs:
        if pairs is None:
            raise InputError(404, "this service was started without a dataset root")
        return pairs

    @app.get(
        "/image/{key}",
        summary="a pair's image, from the dataset's pairs/<shard>.tar",
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}},
            304: {"description": "not modified (If-None-Match)"},
            404: {"model": m.ErrorResponse},
        },
    )
    async def image(key: str, request: Request) -> Response:
        found = await asyncio.to_thread(need_pairs().image, key)
        if found is None:
            raise InputError(404, f"no pair {key!r} in the dataset")
        data, content_type, etag = found
        headers = {"Cache-Control": cache_control, "ETag": etag}
        if etag in request.headers.get("if-none-match", "").replace(" ", "").split(","):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=content_type, headers=headers)

    @app.post(
        "/pairs",
        response_model=PairsResponse,
        summary="the nsfw tag and licence of pairs, by key",
        responses={404: {"model": m.ErrorResponse}},
    )
    async def pair_info(request: PairsRequest) -> PairsResponse:
        return PairsResponse(pairs=await asyncio.to_thread(need_pairs().info, request.keys))
