"""The dataset store: one root URL (a local folder or `s3://bucket/prefix`) and the layout inside it.

The layout has its one home here: the per-shard layers (`CRAWL_METADATA.parquet(shard)`,
`IMAGES.tar(shard)`, ...) and the dataset-level files. Every asset, the DuckDB views and the card
take their paths from these names; the folder names are part of every existing store.

Every write is atomic: locally a temporary file in the same folder renamed over the target,
on S3 one PUT or multipart upload that is completed only when the writer finished cleanly.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_ROOT = "./data"
ROOT_ENV = "LAION_ASSETS_ROOT"
_TMP_MARK = ".tmp-"
_NAME_MAX = 255  # bytes in a file's name (ext4, XFS, APFS, ...)
# A temporary file whose writer is gone: its process has ended (on this host), or, from another host,
# nothing has touched it for this long. Then a later run removes it.
ABANDONED_AFTER = datetime.timedelta(hours=6)
LEASES = "_leases"  # <shard>.json: the run writing the shard now (pipeline/leases.py)
WRITERS = "_writers"  # S3: a file per live writing process, so that a later run knows whose uploads these are
# JSON {name: [fingerprint, sha256]}: the digest of each file in incoming/ that lineage.py had to read (a
# copy of the root gave it another fingerprint), so that it reads it once; lost, it is read again
SOURCE_DIGESTS = "_lineage/digests.json"
HEARTBEAT_SECONDS = 60.0
_START_SLACK = 1.0  # seconds a process may seem to start after what it wrote: the clock's steps
_READ_ATTEMPTS = 5  # reads of a file that another writer replaced each time: then the error stands
T = TypeVar("T")


def host_name() -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def temporary_name(path: str) -> str:
    """A temporary name beside `path` that tells who writes it: `.<name>.tmp-<pid>-<random>-<host>`, `name`
    cut short where the whole would be over a file system's 255 bytes (which `path` itself is not)."""
    folder, name = os.path.split(path)
    tail = f"{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}-{host_name()}"
    room = max(0, _NAME_MAX - 1 - len(tail.encode()))
    return os.path.join(folder, f".{name.encode()[:room].decode(errors='ignore')}{tail}")


def process_alive(pid: int) -> bool:
    """Whether the process `pid` of this host runs: a zombie (ended, its parent has not reaped it yet, as
    a busy code server may not for a while) does not, though signals still reach its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:  # it ended meanwhile, or there is no /proc to tell (macOS)
        return not Path("/proc/self").exists()
    return fields[0] not in ("Z", "X")  # its state


def replaced_while_read(error: BaseException | None) -> bool:
    """Whether `error`, or an error it came from, is S3's answer to a read of a version now replaced:
    s3fs's FileExpired, or PreconditionFailed on a GET that named the ETag first seen."""
    from s3fs.utils import FileExpired  # here: a local root never imports s3fs

    while error is not None:
        code = (getattr(error, "response", None) or {}).get("Error", {}).get("Code")
        if isinstance(error, FileExpired) or code == "PreconditionFailed":
            return True
        error = error.__cause__ or error.__context__
    return False


def process_started(pid: int) -> float | None:
    """When the process `pid` of this host started (epoch seconds, to 10 ms), where /proc tells; else
    None."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    ticks = int(fields[19])  # its start, in clock ticks since boot
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name (its state first); None where there is
    none to read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def writer_gone(host: str, pid: int, stale: bool, written: float) -> bool:
    """Whether the process `pid` of `host` that wrote something at `written` (epoch seconds) is gone: on
    this host, whether it has ended, or its pid now names a process that started after `written` (a
    pid used again, as a restarted container's first processes are); on another, `stale` (silent too
    long, by the caller's rule)."""
    if host != host_name():
        return stale
    if not process_alive(pid):
        return True
    started = process_started(pid)
    return started is not None and started > written + _START_SLACK


def is_abandoned(name: str, modified: float, now: float | None = None) -> bool:
    """Whether the temporary file `name` (see `temporary_name`), last modified at `modified` (epoch
    seconds), was left by a writer that is gone. Older names (a bare random tail, `<name>.tmp-<pid>`)
    count by age alone. Only a hidden name is one: `laion.tmp-v2.csv` is somebody's file."""
    if not name.startswith(".") or _TMP_MARK not in name:
        return False
    stale = (now or time.time()) - modified > ABANDONED_AFTER.total_seconds()
    pid, _, rest = name.rsplit(_TMP_MARK, 1)[1].partition("-")
    host = rest.partition("-")[2]
    if host.startswith(f"{host_name()}."):  # DuckDB adds `.wal` after the name
        host = host_name()
    return writer_gone(host, int(pid), stale, modified) if pid.isdigit() else stale


def remove_abandoned_beside(path: str) -> None:
    """Remove the temporary files of `path` (see `temporary_name`) that writers now gone left beside it:
    for a local file outside a root (the catalog's, a query's --output), which `remove_abandoned` misses."""
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.scandir(folder):
        if entry.name.startswith(f".{name}") and is_abandoned(entry.name, entry.stat().st_mtime):
            with contextlib.suppress(FileNotFoundError):  # another run removed it first
                os.remove(entry.path)


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
SCORES = Layer("scores")  # punsafe, pwatermark, aesthetic and language of each embedded image
PAIRS = Layer("pairs", has_tar=True)  # the filtered dataset, and its samples as a webdataset
PAIRS_EMBEDDINGS = Layer("pairs_embeddings")  # optional: the kept rows' embeddings
RECAPTIONS = Layer("recaptions")  # a new caption for each kept pair (Recap-DataComp-1B's columns)
# The per-shard layers in pipeline order; each one is made from the one before it.
SHARD_LAYERS = (CRAWL_METADATA, IMAGES, EMBEDDINGS, SCORES, PAIRS, PAIRS_EMBEDDINGS, RECAPTIONS)


@dataclass(frozen=True)
class Export:
    """A training-shards export, `exports/<name>/`: `<nnnnn>.tar` shards of a fixed number of samples, each
    with `<nnnnn>.parquet` (its samples' rows) and `<nnnnn>_stats.json`, `sizes.json` (the samples of each
    tar), and `manifest.json`, written last, which says which shards, sources and settings make the export."""

    name: str

    @property
    def folder(self) -> str:
        return f"{EXPORTS}/{self.name}"

    @property
    def manifest(self) -> str:
        return f"{self.folder}/manifest.json"

    @property
    def sizes(self) -> str:
        """`sizes.json`, {tar name: samples}: where open_clip's trainer finds the number of samples."""
        return f"{self.folder}/sizes.json"

    def tar(self, shard: str) -> str:
        return f"{self.folder}/{shard}.tar"

    def parquet(self, shard: str) -> str:
        return f"{self.folder}/{shard}.parquet"

    def stats(self, shard: str) -> str:
        return f"{self.folder}/{shard}_stats.json"


EXPORTS = "exports"  # training shards of named subsets, a folder per export (`Export`)
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
# What the next shards are checked against (pipeline/dedup/deduplicate.py): the shards done, the
# surviving pairs' hashes (a file per run), the k-means centroids, and the survivors' vectors by cluster
# bucket. Every file but shards.parquet is named after the run that wrote it.
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
    # changes when the file's content is replaced (ETag on S3, size+mtime locally), and when it is copied
    fingerprint: str


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

    def no_dataset_here(self) -> str | None:
        """Why the root cannot hold a dataset (nothing is stored there, or it is a file), else None: a
        mistyped root is refused by the commands that would otherwise begin a dataset there."""
        if self.fs.isfile(self._base):
            return f"no dataset at {self.root}: it is a file"
        if not self.fs.isdir(self._base):
            return f"no dataset at {self.root}: nothing is stored there (--root, else $LAION_ASSETS_ROOT)"
        return None

    def list(self, folder: str) -> list[StoredFile]:
        """Files directly in `folder`, sorted by name; hidden (in-flight ones among them) and `_`-prefixed
        ones left out."""
        if not self.fs.isdir(self.path(folder)):
            return []
        found = []
        for entry in self.fs.ls(self.path(folder), detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "file" or name.startswith((".", "_")):
                continue
            found.append(StoredFile(name=name, size=int(entry["size"]), fingerprint=_fingerprint(entry)))
        return sorted(found, key=lambda f: f.name)

    def shards(self, layer: Layer) -> list[str]:
        """The shards with a `<layer>/<shard>.parquet`, sorted."""
        return [f.name.removesuffix(".parquet") for f in self.list(layer.name) if f.name.endswith(".parquet")]

    def list_folders(self, folder: str) -> list[str]:
        """The names of the folders directly in `folder`, sorted; hidden and `_`-prefixed ones left out."""
        if not self.fs.isdir(self.path(folder)):
            return []
        names = (
            entry["name"].rstrip("/").rsplit("/", 1)[-1]
            for entry in self.fs.ls(self.path(folder), detail=True)
            if entry["type"] == "directory"
        )
        return sorted(name for name in names if not name.startswith((".", "_")))

    def fingerprint(self, relpath: str) -> str | None:
        """The file's fingerprint as `list` gives it (S3's ETag, or size and mtime); None if it is absent."""
        try:
            return _fingerprint(self.fs.info(self.path(relpath)))
        except FileNotFoundError:
            return None

    def opened_fingerprint(self, f: IO[bytes]) -> str:
        """The fingerprint of the version of a file that `open` gave `f` (no request: S3's ETag is in its
        details), though the path may hold another by now."""
        if self.is_s3:
            return _fingerprint(f.details)
        stat = os.fstat(f.fileno())
        return _fingerprint({"size": stat.st_size, "mtime": stat.st_mtime})

    def open(self, relpath: str, mode: str = "rb") -> IO[bytes]:
        if "r" not in mode:
            raise ValueError(
                "open() is for reading; write with atomic_write() so readers never see half a file"
            )
        return self.fs.open(self.path(relpath), mode)

    def read_bytes(self, relpath: str) -> bytes:
        """The whole file in one read: on S3 one GET of one version, where `open()` reads ranges of the
        version it saw first and fails if another writer replaced the file meanwhile."""
        return self.fs.cat_file(self.path(relpath))

    def read_parquet(self, relpath: str, columns: list[str] | None = None) -> pa.Table:
        return self._read_one_version(relpath, lambda f: pq.read_table(f, columns=columns))

    def parquet_num_rows(self, relpath: str) -> int:
        """Row count from the parquet footer, without reading the data."""
        return self._read_one_version(relpath, lambda f: pq.ParquetFile(f).metadata.num_rows)

    def parquet_metadata(self, relpath: str) -> dict[str, str]:
        """The file's key-value metadata (what `write_parquet(metadata=...)` stored), from the footer only."""
        return self._read_one_version(relpath, lambda f: footer(pq.read_schema(f)))

    def _read_one_version(self, relpath: str, read: Callable[[IO[bytes]], T]) -> T:
        """`read(file)` of `relpath`, read again where another writer replaced the file meanwhile: on S3 a
        read of ranges fails when they would come from two versions (s3fs asks for the ETag it saw)."""
        attempt = 1
        while True:
            try:
                with self.open(relpath) as f:
                    return read(f)
            except OSError as exc:
                if attempt == _READ_ATTEMPTS or not (self.is_s3 and replaced_while_read(exc)):
                    raise
            attempt += 1

    # writing

    @contextmanager
    def atomic_write(self, relpath: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at `relpath` whole when the block exits cleanly, else not at all."""
        target = self.path(relpath)
        if self.is_s3:
            with _writer(self).uploading(target):
                f = self.fs.open(target, "wb")
                try:
                    yield f
                except BaseException:
                    f.discard()  # aborts the multipart upload: nothing becomes visible
                    f.closed = True  # so that garbage collection does not try to upload the rest
                    raise
                f.close()
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = temporary_name(target)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @contextmanager
    def tar_write(self, layer: Layer, shard: str) -> Iterator[IO[bytes]]:
        """The shard's tar of `layer`, as `atomic_write` writes it; its parquet, which says the pair is
        whole, is removed just before the new tar replaces the old one, and the caller writes the new one
        after. A run killed between the two then leaves the shard without a parquet (to be made again),
        not a new tar beside an old parquet that still counts as current."""
        with self.atomic_write(layer.tar(shard)) as f:
            yield f
            self.remove(layer.parquet(shard))

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

    # what killed writers left

    def remove_abandoned(self) -> list[str]:
        """Remove what writers that are gone left behind: their temporary files (locally) and their
        incomplete multipart uploads (on S3, where the live writers of `_writers/` tell which are not
        theirs). Returns what was removed, as paths under the root (`<upload of key>` on S3); nothing
        where the root does not exist yet."""
        try:
            return self._abort_abandoned_uploads() if self.is_s3 else self._remove_abandoned_files()
        except FileNotFoundError:  # no bucket (or folder) yet: nothing was left there
            return []

    def _remove_abandoned_files(self) -> list[str]:
        removed = []
        for folder, folders, files in os.walk(self._base):
            folders[:] = [f for f in folders if not f.startswith(".")]  # e.g. the demo's .dagster
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if is_abandoned(name, os.stat(path).st_mtime):
                        os.remove(path)
                        removed.append(os.path.relpath(path, self._base))
                except FileNotFoundError:  # finished or removed meanwhile
                    continue
        return sorted(removed)

    def _abort_abandoned_uploads(self) -> list[str]:
        """Abort the uploads under the root of the keys that writers now gone name in `_writers/` and no
        live writer names, then remove those writers' entries. Writers of this host whose process has
        ended, and others silent for ABANDONED_AFTER, are gone. An upload no writer names is another
        tool's (`aws s3 cp` into incoming/) and is left alone. The uploads are listed first: a writer
        names a key before it begins uploading it."""
        bucket, _, prefix = self._base.partition("/")
        uploads = self._incomplete_uploads(bucket, f"{prefix}/" if prefix else "")
        live, gone = self._writers_keys()
        abandoned = set().union(*gone.values()) - live
        aborted = []
        for upload in uploads:
            if f"{bucket}/{upload['Key']}" not in abandoned:
                continue
            with contextlib.suppress(FileNotFoundError):  # completed meanwhile
                self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
            aborted.append(f"<upload of {upload['Key'][len(prefix) + 1 if prefix else 0 :]}>")
        for entry, keys in gone.items():
            if not keys & live:  # else its upload of a key a live writer writes too waits for a later run
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(entry)
        return sorted(aborted)

    def _incomplete_uploads(self, bucket: str, prefix: str) -> list[dict]:
        """Every incomplete multipart upload under `prefix`, past the 1,000 of one listing."""
        uploads: list[dict] = []
        marker: dict[str, str] = {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
            uploads.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                return uploads
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def _writers_keys(self) -> tuple[set[str], dict[str, set[str]]]:
        """The keys the live writers of `_writers/` are uploading, and each gone writer's entry with the
        keys it was uploading."""
        now = time.time()
        live: set[str] = set()
        gone: dict[str, set[str]] = {}
        for entry in self.list(WRITERS):
            path = self.path(f"{WRITERS}/{entry.name}")
            try:
                writer = json.loads(self.fs.cat(path))
            except FileNotFoundError:  # it left meanwhile
                continue
            silent = now - writer["heartbeat"] >= ABANDONED_AFTER.total_seconds()
            if writer_gone(writer["host"], writer["pid"], silent, writer["heartbeat"]):
                gone[path] = set(writer["writing"])
            else:
                live.update(writer["writing"])
        return live, gone


def footer(schema: pa.Schema) -> dict[str, str]:
    """A parquet file's key-value metadata, as `write_parquet(metadata=...)` took it."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def _fingerprint(entry: dict) -> str:
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        return f"etag:{etag.strip(chr(34))}"
    return f"{entry['size']}:{entry.get('mtime') or entry.get('LastModified') or entry.get('created')}"


class _Writer:
    """This process's entry in `{root}/_writers/` on S3: who it is and the keys it is uploading, kept
    fresh by a heartbeat thread and removed at exit. A later run aborts only the uploads of keys that
    writers now gone named (S3's own upload dates cannot tell: some servers, moto among them, make them
    up; nor can S3 tell whose an upload is)."""

    def __init__(self, store: DatasetStore) -> None:
        self.store = store
        self.entry = store.path(f"{WRITERS}/{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        self.writing: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.beating = threading.Lock()  # one beat at a time: see `beat`
        threading.Thread(target=self._keep_beating, daemon=True, name="laion-assets-writer").start()
        atexit.register(self._leave)

    @contextmanager
    def uploading(self, key: str) -> Iterator[None]:
        """Named in the entry (written before the upload begins) for as long as the block runs."""
        with self.lock:
            self.writing[key] += 1
        self.beat()
        try:
            yield
        finally:
            with self.lock:
                self.writing[key] -= 1
                self.writing += Counter()  # drops the keys no longer written

    def beat(self) -> None:
        """The entry written with the keys uploaded now. Beats run one at a time, so that a beat of threads
        uploading at once (or the heartbeat's) never lands after a later one, naming fewer keys than are
        being uploaded: a run killed then would leave the others' uploads for no later run to abort."""
        with self.beating:
            with self.lock:
                record = {"host": host_name(), "pid": os.getpid(), "writing": list(self.writing)}
            record["heartbeat"] = time.time()
            self.store.fs.pipe(self.entry, json.dumps(record).encode())

    def _keep_beating(self) -> None:
        """Beats only while an upload runs: an idle writer's entry may go stale, as it names nothing, and a
        process that wrote to many roots (a test session, a long-lived code server) does not keep
        rewriting an entry in each."""
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            with self.lock:
                idle = not self.writing
            if not idle:
                with contextlib.suppress(Exception):  # a missed beat only makes the writer look older
                    self.beat()

    def _leave(self) -> None:
        """At exit, through botocore's own (blocking) client: by the time atexit runs, Python has shut down
        the executor that s3fs's event loop needs."""
        import botocore.session

        settings = S3Settings.from_env()
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region
        )
        bucket, _, key = self.entry.partition("/")
        with contextlib.suppress(Exception):  # gone already, or S3 unreachable: a later run removes it
            client.delete_object(Bucket=bucket, Key=key)


_writers: dict[str, _Writer] = {}  # root -> this process's writer there
_writers_lock = threading.Lock()


def _writer(store: DatasetStore) -> _Writer:
    with _writers_lock:
        if store.root not in _writers:
            _writers[store.root] = _Writer(store)
        return _writers[store.root]
