"""The dataset store: one root URL (a local folder or `s3://bucket/prefix`) and the layout inside it.

Layout (DESIGN.md, "Storage contract"):

    {root}/incoming/<source file>         one file = one shard
    {root}/crawl_metadata/<shard>.parquet
    {root}/images/<shard>.tar | .parquet
    {root}/embeddings/<shard>.parquet
    {root}/pairs/<shard>.parquet | .tar
    {root}/card/README.md
    {root}/search_index/index.parquet

Every write is atomic: locally a temporary file in the same folder renamed over the target,
on S3 one PUT or multipart upload that is completed only when the writer finished cleanly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_ROOT = "./data"
ROOT_ENV = "LAION_ASSETS_ROOT"
INCOMING = "incoming"
_TMP_MARK = ".tmp-"


def root_from_env() -> str:
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


@dataclass(frozen=True)
class StoredFile:
    """A file found by `DatasetStore.list`: its name inside the folder and what identifies its content."""

    name: str
    size: int
    fingerprint: str  # changes when the file's content is replaced (ETag on S3, size+mtime locally)


def s3_options_from_env() -> dict:
    """s3fs options from the standard AWS_* variables.

    Credentials and region are read by botocore itself; the endpoint is passed explicitly so that
    `AWS_ENDPOINT_URL` (MinIO, moto, R2, ...) works with every botocore version.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    return {"client_kwargs": client_kwargs, "use_listings_cache": False}


class DatasetStore:
    """Paths of the storage contract on a local folder or S3, with atomic writes."""

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        if not root:
            raise ValueError("the dataset root must not be empty")
        self.is_s3 = root.startswith("s3://")
        if self.is_s3:
            self.fs = fsspec.filesystem("s3", **s3_options_from_env())
            self._base = root[len("s3://") :].rstrip("/")
            self.root = f"s3://{self._base}"
        elif "://" in root and not root.startswith("file://"):
            raise ValueError(f"unsupported dataset root {root!r}: use a local folder or s3://bucket/prefix")
        else:
            self.fs = fsspec.filesystem("file")
            self._base = os.path.abspath(root.removeprefix("file://"))
            self.root = self._base

    def __repr__(self) -> str:
        return f"DatasetStore({self.root!r})"

    # paths

    def path(self, relpath: str) -> str:
        """The filesystem path of `relpath` (bucket/key on S3, absolute path locally)."""
        return f"{self._base}/{relpath.lstrip('/')}" if relpath else self._base

    def url(self, relpath: str) -> str:
        """The full URL of `relpath`, as DuckDB and users see it."""
        return f"s3://{self.path(relpath)}" if self.is_s3 else self.path(relpath)

    @staticmethod
    def shard_file(layer: str, shard: str, extension: str) -> str:
        return f"{layer}/{shard}.{extension}"

    # reading

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    def list(self, folder: str) -> list[StoredFile]:
        """Files directly in `folder`, sorted by name; hidden, `_`-prefixed and in-flight ones left out."""
        if not self.fs.isdir(self.path(folder)):
            return []
        found = []
        for entry in self.fs.ls(self.path(folder), detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "file" or name.startswith((".", "_")) or _TMP_MARK in name:
                continue
            found.append(StoredFile(name=name, size=int(entry["size"]), fingerprint=_fingerprint(entry)))
        return sorted(found, key=lambda f: f.name)

    def open(self, relpath: str, mode: str = "rb") -> IO[bytes]:
        if "r" not in mode:
            raise ValueError(
                "open() is for reading; write with atomic_write() so readers never see half a file"
            )
        return self.fs.open(self.path(relpath), mode)

    def read_parquet(self, relpath: str, columns: list[str] | None = None) -> pa.Table:
        with self.open(relpath) as f:
            return pq.read_table(f, columns=columns)

    def parquet_num_rows(self, relpath: str) -> int:
        """Row count from the parquet footer, without reading the data."""
        with self.open(relpath) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def parquet_metadata(self, relpath: str) -> dict[str, str]:
        """The file's key-value metadata (what `write_parquet(metadata=...)` stored), from the footer only."""
        with self.open(relpath) as f:
            metadata = pq.read_schema(f).metadata or {}
        return {k.decode(): v.decode() for k, v in metadata.items()}

    # writing

    @contextmanager
    def atomic_write(self, relpath: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at `relpath` whole when the block exits cleanly, else not at all."""
        target = self.path(relpath)
        if self.is_s3:
            f = self.fs.open(target, "wb")
            try:
                yield f
            except BaseException:
                f.discard()  # aborts the multipart upload: nothing becomes visible
                f.closed = True  # so that garbage collection does not try to upload the rest
                raise
            f.close()
            return
        folder, name = os.path.split(target)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        with self.atomic_write(relpath) as f:
            f.write(data)

    def write_parquet(self, relpath: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        if metadata:
            merged = {
                **(table.schema.metadata or {}),
                **{k.encode(): v.encode() for k, v in metadata.items()},
            }
            table = table.replace_schema_metadata(merged)
        with self.atomic_write(relpath) as f:
            pq.write_table(table, f, compression="zstd")

    def remove(self, relpath: str) -> None:
        if self.exists(relpath):
            self.fs.rm(self.path(relpath))


def _fingerprint(entry: dict) -> str:
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        return f"etag:{etag.strip(chr(34))}"
    return f"{entry['size']}:{entry.get('mtime') or entry.get('LastModified') or entry.get('created')}"
