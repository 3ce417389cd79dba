"""The dataset store: one root URL (a local folder or `s3://bucket/prefix`) and the layout inside it.

The layout has its one home here: the per-shard layers (`CRAWL_METADATA.parquet(shard)`,
`IMAGES.tar(shard)`, ...) and the dataset-level files. Every asset, the DuckDB views and the card
take their paths from these names; the folder names are part of every existing store.

Every write is atomic: locally a temporary file in the same folder renamed over the target,
on S3 one PUT or multipart upload that is completed only when the writer finished cleanly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_ROOT = "./data"
ROOT_ENV = "LAION_ASSETS_ROOT"
_TMP_MARK = ".tmp-"


def root_from_env() -> str:
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


@dataclass(frozen=True)
class Layer:
    """A folder of per-shard files under the root: `<name>/<shard>.parquet`, and `.tar` where it has one."""

    name: str
    has_tar: bool = False

    def parquet(self, shard: str) -> str:
        return f"{self.name}/{shard}.parquet"

    def tar(self, shard: str) -> str:
        if not self.has_tar:
            raise ValueError(f"layer {self.name} has no tar files")
        return f"{self.name}/{shard}.tar"

    @property
    def parquet_glob(self) -> str:
        return f"{self.name}/*.parquet"


INCOMING = "incoming"  # source files, one per shard
CRAWL_METADATA = Layer("crawl_metadata")
IMAGES = Layer("images", has_tar=True)  # webdataset tar, and one status row per crawl row
EMBEDDINGS = Layer("embeddings")
PAIRS = Layer("pairs", has_tar=True)  # the filtered dataset, and its samples as a webdataset
PAIRS_EMBEDDINGS = Layer("pairs_embeddings")  # optional: the kept rows' embeddings
RECAPTIONS = Layer("recaptions")  # a new caption for each kept pair (Recap-DataComp-1B's columns)
# The per-shard layers in pipeline order; each one is made from the one before it.
SHARD_LAYERS = (CRAWL_METADATA, IMAGES, EMBEDDINGS, PAIRS, PAIRS_EMBEDDINGS, RECAPTIONS)

SETTINGS_FILE = "laion_assets.yaml"  # the dataset's settings (pipeline/settings.py)
# Dataset-level files, made from every shard.
SEARCH_INDEX = "search_index/index.parquet"
SEARCH_INDEX_APPROXIMATE = "search_index/approximate.json"  # names the current FAISS build folder
CARD = "card/README.md"
CARD_FIGURES = "card/figures"
CATALOG = "catalog.duckdb"  # beside a local root
HOSTS = "hosts/hosts.parquet"  # images by host, written with the catalog
BLOCKLIST = "blocklist"  # takedown lists, <name>.(txt|csv|parquet): an input, as incoming/ is
BLOCKLIST_ENTRIES = "blocklist_entries/entries.parquet"  # the lists' active entries, as hashes
TAKEDOWNS = "takedowns"  # the removal ledger, <timestamp>.parquet per removal run
TAKEDOWNS_PENDING = "takedowns/pending"  # a removal's ledger until its shards are rewritten (removal.py)
DUPLICATES = "duplicates/duplicates.parquet"  # dataset-level dedup: a row per pair removed, every run's
# What the next shards are checked against (pipeline/dedup.py): the shards done, the surviving pairs'
# hashes (a file per run), the k-means centroids, and the survivors' vectors by cluster bucket. Every
# file but shards.parquet is named after the run that wrote it.
DEDUP_SHARDS = "duplicates/state/shards.parquet"
DEDUP_HASHES = "duplicates/state/hashes"
DEDUP_CENTROIDS = "duplicates/state/centroids.parquet"
DEDUP_MEMBERS = "duplicates/state/members"  # <bucket>/<run>.parquet
DEDUP_STAGED = "duplicates/state/staged"  # a run's new vectors until they are assigned to clusters


@dataclass(frozen=True)
class StoredFile:
    """A file found by `DatasetStore.list`: its name inside the folder and what identifies its content."""

    name: str
    size: int
    fingerprint: str  # changes when the file's content is replaced (ETag on S3, size+mtime locally)


@dataclass(frozen=True)
class S3Settings:
    """What the standard AWS_* variables say about S3: the one reading of them, for s3fs and DuckDB."""

    endpoint: str | None = None  # AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (MinIO, moto, R2, ...)
    region: str | None = None
    key_id: str | None = None
    secret: str | None = None
    session_token: str | None = None

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        return cls(
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN") or None,
        )

    def s3fs_options(self) -> dict:
        """Credentials are read by botocore itself; the endpoint is passed explicitly so that it works
        with every botocore version."""
        client_kwargs = {"endpoint_url": self.endpoint} if self.endpoint else {}
        if self.region:
            client_kwargs["region_name"] = self.region
        return {"client_kwargs": client_kwargs, "use_listings_cache": False}


class DatasetStore:
    """Paths of the storage contract on a local folder or S3, with atomic writes."""

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        if not root:
            raise ValueError("the dataset root must not be empty")
        self.is_s3 = root.startswith("s3://")
        if self.is_s3:
            self.fs = fsspec.filesystem("s3", **S3Settings.from_env().s3fs_options())
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

    def fingerprint(self, relpath: str) -> str | None:
        """The file's fingerprint as `list` gives it (S3's ETag, or size and mtime); None if it is absent."""
        try:
            return _fingerprint(self.fs.info(self.path(relpath)))
        except FileNotFoundError:
            return None

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
            return footer(pq.read_schema(f))

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

    def write_parquet(
        self,
        relpath: str,
        table: pa.Table,
        metadata: dict[str, str] | None = None,
        **options: object,
    ) -> None:
        """zstd-compressed, with pyarrow's defaults; `options` are `pyarrow.parquet.write_table`'s, over
        those (a layer's own encodings, e.g. `pairs.PAIRS_PARQUET_OPTIONS`)."""
        if metadata:
            merged = {
                **(table.schema.metadata or {}),
                **{k.encode(): v.encode() for k, v in metadata.items()},
            }
            table = table.replace_schema_metadata(merged)
        with self.atomic_write(relpath) as f:
            pq.write_table(table, f, **{"compression": "zstd", **options})

    def write_parquet_batches(
        self,
        relpath: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch | pa.Table],
        metadata: dict[str, str] | None = None,
        **options: object,
    ) -> None:
        """`write_parquet` for more rows than memory holds: `batches` (of `schema`) written as they come,
        a row group or more each."""
        if metadata:
            schema = schema.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
        with (
            self.atomic_write(relpath) as f,
            pq.ParquetWriter(f, schema, **{"compression": "zstd", **options}) as writer,
        ):
            for batch in batches:
                writer.write(batch)

    def remove(self, relpath: str) -> None:
        if self.exists(relpath):
            self.fs.rm(self.path(relpath))


def footer(schema: pa.Schema) -> dict[str, str]:
    """A parquet file's key-value metadata, as `write_parquet(metadata=...)` took it."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def _fingerprint(entry: dict) -> str:
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        return f"etag:{etag.strip(chr(34))}"
    return f"{entry['size']}:{entry.get('mtime') or entry.get('LastModified') or entry.get('created')}"
