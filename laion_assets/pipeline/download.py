"""The downloaded_images stage: every crawl row fetched, decoded, resized, and recorded with a status.

Work is spread over a thread pool; a scheduler hands out URLs round-robin over hosts and never
runs more than `per_host_connections` requests on one host. Fetching and Pillow's decoding and
resizing release the GIL, but parsing HTTP and the Python around each image do not: one process
with 32 threads keeps about 1.5 of 2 cores busy. So a shard of more than `ROWS_PER_PROCESS` rows is
split over worker processes (`processes`, one per core by default), each with its share of the
threads and of each host's connections; they are forked from a server that has this module imported
already (multiprocessing's forkserver), so a worker starts in milliseconds. Samples and records come
back to this process, which alone writes the tar. Images stream into the tar as they finish; only the
small per-row records are held until the parquet is written, sorted by key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

import pyarrow as pa

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.blocklist import Blocklist, load_active
from laion_assets.pipeline.fetch import Fetcher, FetchSettings
from laion_assets.pipeline.imaging import DecodeError, FilteredSize, ImageSettings, process_image
from laion_assets.pipeline.lineage import inherited_footer
from laion_assets.pipeline.shard_tar import TarShardWriter, encode_sample, read_samples
from laion_assets.pipeline.storage import CRAWL_METADATA, IMAGES, DatasetStore

ROWS_PER_PROCESS = 256  # a shard gets one worker process per this many rows to fetch, up to `processes`
_BATCH = 16  # results a worker sends back at once


@dataclass(frozen=True)
class DownloadSettings(FetchSettings, ImageSettings):
    threads: int = 32  # in all: each worker process gets its share
    processes: int = 0  # worker processes for a large shard; 0: one per core; 1: all in this process
    shard_timeout: float = 3600.0  # seconds for the whole shard; rows not fetched by then fail
    retry_failed: bool = False  # refetch only the failed_to_download rows of the previous result


@dataclass(frozen=True)
class _Job:
    key: str
    url: str
    caption: str

    @property
    def host(self) -> str:
        return schemas.url_host(self.url)


@dataclass
class DownloadResult:
    table: pa.Table  # the images parquet, one row per crawl row, sorted by key
    seconds: float
    fetched: int  # rows attempted in this run
    reused: int  # rows kept from the previous result (retry_failed)

    def status_counts(self) -> dict[str, int]:
        counts = Counter(self.table.column("status").to_pylist())
        return {status: counts.get(status, 0) for status in schemas.STATUSES}

    def top_errors(self, n: int = 5) -> list[tuple[str, int]]:
        """Error classes (the text before the first colon) of unsuccessful rows, most frequent first."""
        errors = (schemas.error_class(e) for e in self.table.column("error_message").to_pylist() if e)
        return Counter(errors).most_common(n)

    def top_failing_hosts(self, n: int = 5) -> list[tuple[str, int]]:
        rows = zip(
            self.table.column("host").to_pylist(), self.table.column("status").to_pylist(), strict=True
        )
        hosts = (host for host, status in rows if status in schemas.FAILURES)
        return Counter(hosts).most_common(n)


class HostScheduler:
    """Hands out jobs round-robin over hosts, at most `per_host` running on one host at a time."""

    def __init__(self, jobs: list[_Job], per_host: int) -> None:
        self._queues: dict[str, deque[_Job]] = {}
        for job in jobs:
            self._queues.setdefault(job.host, deque()).append(job)
        self._hosts = deque(self._queues)
        self._running: Counter = Counter()
        self._per_host = per_host

    def next(self) -> _Job | None:
        for _ in range(len(self._hosts)):
            host = self._hosts[0]
            if self._running[host] < self._per_host:
                job = self._queues[host].popleft()
                if self._queues[host]:
                    self._hosts.rotate(-1)
                else:
                    self._hosts.popleft()
                self._running[host] += 1
                return job
            self._hosts.rotate(-1)
        return None

    def done(self, job: _Job) -> None:
        self._running[job.host] -= 1


def write_images(
    store: DatasetStore, shard: str, settings: DownloadSettings, progress: Callable[[str], None] | None = None
) -> DownloadResult:
    """`images/<shard>.tar` and `images/<shard>.parquet` from the shard's crawl_metadata; with
    `settings.retry_failed`, only the rows that failed to download last time are fetched again. The block
    lists the `blocklist` asset last recorded apply: a listed link or domain is not requested, a listed
    image is dropped once fetched; both rows get status `taken_down`."""
    crawl = store.read_parquet(CRAWL_METADATA.parquet(shard))
    tar_path, parquet_path = IMAGES.tar(shard), IMAGES.parquet(shard)
    with contextlib.ExitStack() as stack:
        previous = None
        if settings.retry_failed and store.exists(parquet_path) and store.exists(tar_path):
            previous = (store.read_parquet(parquet_path), stack.enter_context(store.open(tar_path)))
        tar_out = stack.enter_context(store.atomic_write(tar_path))
        result = download_shard(crawl, settings, tar_out, previous, progress, blocklist=load_active(store))
    footer = {**inherited_footer(crawl), names.SETTINGS_FOOTER: json.dumps(asdict(settings))}
    store.write_parquet(parquet_path, result.table, metadata=footer, **schemas.IMAGES_PARQUET_OPTIONS)
    return result


def download_shard(
    crawl: pa.Table,
    settings: DownloadSettings,
    tar_out: IO[bytes],
    previous: tuple[pa.Table, IO[bytes]] | None = None,
    progress: Callable[[str], None] | None = None,
    blocklist: Blocklist | None = None,
) -> DownloadResult:
    """Fetch the `url` of every `crawl` row; write successes to `tar_out`, return one record per row.

    `previous` is the last result (images table, tar stream): with `settings.retry_failed`, its
    rows that did not fail to download are kept and their samples copied, the rest fetched again.
    A row whose link or domain is on `blocklist` is not fetched; one whose bytes are on it is dropped.
    """
    start = time.monotonic()
    deadline = start + settings.shard_timeout
    jobs = [
        _Job(r["key"], r["url"], r["caption"]) for r in crawl.select(["key", "url", "caption"]).to_pylist()
    ]
    records: list[dict] = []
    with TarShardWriter(tar_out) as writer:
        if previous is not None and settings.retry_failed:
            kept = _reuse(jobs, *previous, writer)
            records.extend(kept.values())
            jobs = [job for job in jobs if job.key not in kept]
        reused = len(records)
        blocklist = blocklist or Blocklist.empty()
        listed = {job.key: match for job in jobs if (match := blocklist.match_url(job.url, job.host))}
        records.extend(
            schemas.take_down(_record(job, schemas.TAKEN_DOWN, None), f"{m.list} ({m.kind})")
            for job in jobs
            if (m := listed.get(job.key))
        )
        jobs = [job for job in jobs if job.key not in listed]
        blocked_images = blocklist.image_entries()
        started = last_report = time.monotonic()
        fetched = _fetch_in_processes(jobs, settings, deadline, blocked_images)
        for done, (record, sample) in enumerate(fetched, 1):
            if sample:
                writer.write_encoded(sample)
            records.append(record)
            if progress and time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                progress(f"{done}/{len(jobs)} rows, {done / (last_report - started):.1f} rows/s")
    table = pa.Table.from_pylist(records, schema=schemas.IMAGES).sort_by("key")
    return DownloadResult(table=table, seconds=time.monotonic() - start, fetched=len(jobs), reused=reused)


def process_count(settings: DownloadSettings, rows: int) -> int:
    """Worker processes for `rows` rows to fetch: 1 means this process does the work itself."""
    wanted = settings.processes or usable_cores()
    return max(1, min(wanted, -(-rows // ROWS_PER_PROCESS), settings.threads, settings.per_host_connections))


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, and a container's CPU limit (cgroup v2
    `cpu.max`), which a Kubernetes pod has and `os.cpu_count()` does not see."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    return cores if quota == "max" else max(1, min(cores, -(-int(quota) // int(period))))


def _fetch_in_processes(
    jobs: list[_Job], settings: DownloadSettings, deadline: float, blocked_images: dict[str, str]
) -> Iterator[tuple[dict, bytes | None]]:
    """`_fetch_all`, with the jobs dealt over worker processes when there are enough of them.

    Each worker gets every n-th job, 1/n of the threads and 1/n of each host's connections, so the
    per-host limit holds across them. A worker that dies (a crash in a decoder) costs its unfinished
    rows, each recorded as failed_to_download; the other workers' rows are kept."""
    count = process_count(settings, len(jobs))
    if count == 1:
        yield from _fetch_all(jobs, settings, deadline, blocked_images)
        return
    per_host = settings.per_host_connections // count
    share = replace(settings, threads=settings.threads // count, per_host_connections=per_host)
    context = _worker_context()
    workers = {}
    for part in (jobs[i::count] for i in range(count)):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker, args=(part, share, deadline, blocked_images, send), daemon=True
        )
        process.start()
        send.close()
        workers[receive] = (process, {job.key: job for job in part})
    try:
        while workers:
            for receive in multiprocessing.connection.wait(list(workers)):
                process, unfinished = workers[receive]
                try:
                    batch = receive.recv()
                except EOFError:  # it died before saying it had finished
                    process.join()
                    error = f"unexpected: download worker process died (exit code {process.exitcode})"
                    for job in unfinished.values():
                        yield _record(job, schemas.FAILED_TO_DOWNLOAD, error), None
                    batch = None
                if batch is None:
                    receive.close()
                    del workers[receive]
                    continue
                for record, sample in batch:
                    del unfinished[record["key"]]
                    yield record, sample
    finally:
        for process, _ in workers.values():
            process.kill()
        for process, _ in workers.values():
            process.join()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Forkserver: workers are forked from a clean process that has imported this module once, not from
    a run worker with its threads and its hundreds of MB."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def start_worker_server() -> None:
    """Starts the forkserver now, so that it imports this module while the caller does other work; the
    first shard's workers then start at once. Without it, the first shard starts it."""
    _worker_context()
    multiprocessing.forkserver.ensure_running()


def _worker(
    jobs: list[_Job],
    settings: DownloadSettings,
    deadline: float,
    blocked_images: dict[str, str],
    send: multiprocessing.connection.Connection,
) -> None:
    """A worker process: its jobs through `_fetch_all`, the results sent back in small batches, then None.
    When the step's process is gone (killed), the next send fails and the worker stops after the
    requests in flight."""
    batch = []
    try:
        for result in _fetch_all(jobs, settings, deadline, blocked_images):
            batch.append(result)
            if len(batch) >= _BATCH:
                send.send(batch)
                batch = []
        if batch:
            send.send(batch)
        send.send(None)
    except BrokenPipeError:
        return
    send.close()


def _fetch_all(
    jobs: list[_Job], settings: DownloadSettings, deadline: float, blocked_images: dict[str, str]
) -> Iterator[tuple[dict, bytes | None]]:
    """(record, its sample encoded for the tar, or None) for each job, in the order they finish;
    `blocked_images` maps the sha256 and md5 digests on block lists to the list they are on."""
    fetcher = Fetcher(settings)
    scheduler = HostScheduler(jobs, settings.per_host_connections)
    with ThreadPoolExecutor(settings.threads, thread_name_prefix="download") as pool:
        running = {}
        while True:
            while len(running) < settings.threads and (job := scheduler.next()) is not None:
                if time.monotonic() >= deadline:
                    scheduler.done(job)
                    error = f"shard deadline: not started within shard_timeout={settings.shard_timeout:g}s"
                    yield _record(job, schemas.FAILED_TO_DOWNLOAD, error), None
                    continue
                running[pool.submit(_download_one, fetcher, settings, job, deadline, blocked_images)] = job
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                scheduler.done(running.pop(future))
                yield future.result()


def _download_one(
    fetcher: Fetcher, settings: DownloadSettings, job: _Job, deadline: float, blocked_images: dict[str, str]
) -> tuple[dict, bytes | None]:
    """One row: never raises, whatever the URL or the bytes do."""
    try:
        fetched = fetcher.fetch(job.url, deadline)
        record = _record(job, fetched.status, fetched.error, http_status=fetched.http_status)
        if fetched.status != schemas.SUCCESS:
            return record, None
        record.update(
            sha256=hashlib.sha256(fetched.body).hexdigest(),
            md5=hashlib.md5(fetched.body).hexdigest(),
            num_bytes=len(fetched.body),
        )
        listed = blocked_images.get(record["sha256"]) or blocked_images.get(record["md5"])
        if listed:
            return schemas.take_down(record, listed), None
        image = process_image(fetched.body, settings)
    except DecodeError as exc:
        record.update(status=schemas.FAILED_TO_DECODE, error_message=str(exc))
        return record, None
    except FilteredSize as exc:
        record.update(status=schemas.FILTERED_SIZE, error_message=str(exc))
        record.update(original_width=exc.width, original_height=exc.height)
        return record, None
    except Exception as exc:  # a bug or an exotic library error must cost one row, not the shard
        return _record(job, schemas.FAILED_TO_DOWNLOAD, f"unexpected: {type(exc).__name__}: {exc}"), None
    record.update(
        width=image.width,
        height=image.height,
        original_width=image.original_width,
        original_height=image.original_height,
        phash=image.phash,
    )
    members = {
        settings.encode_format: image.data,
        "txt": job.caption.encode(),
        "json": json.dumps(record, ensure_ascii=False).encode(),
    }
    return record, encode_sample(job.key, members)  # in this worker thread, not in the writer's


def _record(job: _Job, status: str, error: str | None, http_status: int | None = None) -> dict:
    return {
        "key": job.key,
        "url": job.url,
        "caption": job.caption,
        "status": status,
        "error_message": error,
        "http_status": http_status,
        "host": job.host,
    }


def _reuse(jobs: list[_Job], table: pa.Table, tar: IO[bytes], writer: TarShardWriter) -> dict[str, dict]:
    """Previous records to keep (same key and url, or taken down; not failed_to_download); copies their
    samples."""
    urls = {job.key: job.url for job in jobs}
    candidates = {
        row["key"]: {"host": schemas.url_host(row["url"] or ""), **row}  # a file from before `host` lacks it
        for row in table.to_pylist()
        if row["status"] != schemas.FAILED_TO_DOWNLOAD
        and (urls.get(row["key"]) == row["url"] or row["status"] == schemas.TAKEN_DOWN)
    }
    copied = set()
    for key, members in read_samples(tar):
        if key in candidates and candidates[key]["status"] == schemas.SUCCESS:
            writer.write(key, members)
            copied.add(key)
    # a success whose sample is missing from the old tar is fetched again
    return {k: row for k, row in candidates.items() if row["status"] != schemas.SUCCESS or k in copied}
