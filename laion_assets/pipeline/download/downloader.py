"""The downloaded_images stage: every crawl row fetched, decoded, resized, and recorded with a status.

On the real web a request mostly waits (hundreds of ms for the first byte, seconds for some hosts),
so throughput is set by how many are in flight. Each worker fetches on an asyncio event loop (uvloop
where installed) with up to its share of `max_in_flight` requests at once: a URL that never answers
costs a socket, not a thread. A scheduler hands out URLs round-robin over hosts, never more than
`per_host_connections` at once on one host; a retry waits out its backoff off the books and goes to
the back of its host's queue, so it never holds back fresh URLs. Bodies are decoded, resized and
encoded by the worker's main thread, one image at a time, beside the loop's thread: a request's slot
is freed only once its image is done, so memory is bounded by `max_in_flight` bodies.

A shard of more than `ROWS_PER_PROCESS` rows is split over worker processes (`processes`, one per core
by default), each with its share of the requests and of each host's connections; they are forked from
a server that has this module imported already (multiprocessing's forkserver), so a worker starts in
milliseconds. Their hosts are resolved once, here, before they start, and handed to them. Samples and
records come back to this process, which alone writes the tar. Images stream into the tar as they
finish; only the small per-row records are held until the parquet is written, sorted by key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.fetch import Address, Fetched, Fetcher, FetchSettings, RetryLater
from laion_assets.pipeline.download.imaging import DecodeError, FilteredSize, ImageSettings, process_image
from laion_assets.pipeline.lineage import inherited_footer
from laion_assets.pipeline.shard_tar import TarShardWriter, encode_sample, read_samples
from laion_assets.pipeline.storage import CRAWL_METADATA, IMAGES, DatasetStore
from laion_assets.pipeline.takedowns.blocklist import Blocklist, load_active

T = TypeVar("T")
ROWS_PER_PROCESS = 256  # a shard gets one worker process per this many rows to fetch, up to `processes`
_BATCH = 16  # results a worker sends back at once
# A shard is draining (the next one may start) with this many times `max_in_flight` rows left or fewer:
# the next one's first requests then wait out their latency while this one still decodes (measured on
# bench/download.py's latency web: 1x, 322 images/s; 2x, 355).
_NEXT_SHARD_WITHIN = 2
# Bodies fetched and not yet decoded may hold this many bytes per request slot (a worker's share of
# max_in_flight): past it the worker starts no request until its CPU catches up. Apart from the slots,
# so that a backlog of decoding never keeps the next URLs (and their latency) waiting.
_WAITING_BYTES_PER_SLOT = 128 * 1024
# s: a row with less of the shard's time left is not started (uvloop's timers fire up to 1 ms early)
_TOO_LATE = 0.01


@dataclass(frozen=True)
class DownloadSettings(FetchSettings, ImageSettings):
    max_in_flight: int = 1024  # requests at once, in all: each worker process gets its share
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
    """Hands out jobs at most `per_host` running on one host at a time, from the host with the most
    queued (hosts with as many take turns): the busiest host, which sets the shard's tail under its
    cap, runs at its cap from the start instead of getting a turn in each round of all hosts."""

    def __init__(self, jobs: list[_Job], per_host: int) -> None:
        self._queues: dict[str, deque[_Job]] = {}
        for job in jobs:
            self._queues.setdefault(job.host, deque()).append(job)
        self._running: Counter = Counter()
        self._per_host = per_host
        self.queued = len(jobs)  # not handed out yet
        # (-queued, turn, host) of the hosts that may start a job; `_offered` holds each one's valid count
        self._heap: list[tuple[int, int, str]] = []
        self._offered: dict[str, int] = {}
        self._turns = itertools.count()
        for host in self._queues:
            self._offer(host)

    def next(self) -> _Job | None:
        while self._heap:
            minus_queued, _, host = heapq.heappop(self._heap)
            if self._offered.get(host) != -minus_queued:
                continue  # an entry from before the host's queue changed
            del self._offered[host]
            if self._running[host] >= self._per_host:
                continue  # offered again by `done`
            self._running[host] += 1
            self.queued -= 1
            job = self._queues[host].popleft()
            self._offer(host)
            return job
        return None

    def done(self, job: _Job) -> None:
        self._running[job.host] -= 1
        self._offer(job.host)

    def again(self, job: _Job) -> None:
        """`job` back at the end of its host's queue (a retry)."""
        self._queues.setdefault(job.host, deque()).append(job)
        self.queued += 1
        self._offer(job.host)

    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self.queued and not +self._running

    def _offer(self, host: str) -> None:
        queued = len(self._queues[host])
        if queued and self._running[host] < self._per_host and self._offered.get(host) != queued:
            self._offered[host] = queued
            heapq.heappush(self._heap, (-queued, next(self._turns), host))


def write_images(
    store: DatasetStore,
    shard: str,
    settings: DownloadSettings,
    progress: Callable[[str], None] | None = None,
    draining: threading.Event | None = None,
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
        blocklist = load_active(store)
        result = download_shard(crawl, settings, tar_out, previous, progress, blocklist, draining)
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
    draining: threading.Event | None = None,
) -> DownloadResult:
    """Fetch the `url` of every `crawl` row; write successes to `tar_out`, return one record per row.

    `previous` is the last result (images table, tar stream): with `settings.retry_failed`, its
    rows that did not fail to download are kept and their samples copied, the rest fetched again.
    A row whose link or domain is on `blocklist` is not fetched; one whose bytes are on it is dropped.
    `draining` is set once few rows are left (`_NEXT_SHARD_WITHIN`): the next shard may start.
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
        few_left = _NEXT_SHARD_WITHIN * settings.max_in_flight
        if draining and len(jobs) <= few_left:  # a small shard: the next one starts with it
            draining.set()
        fetched = _fetch_in_processes(jobs, settings, deadline, blocked_images)
        for done, (record, sample) in enumerate(fetched, 1):
            if sample:
                writer.write_encoded(sample)
            records.append(record)
            if draining and len(jobs) - done <= few_left:
                draining.set()
            if progress and time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                progress(f"{done}/{len(jobs)} rows, {done / (last_report - started):.1f} rows/s")
    table = pa.Table.from_pylist(records, schema=schemas.IMAGES).sort_by("key")
    return DownloadResult(table=table, seconds=time.monotonic() - start, fetched=len(jobs), reused=reused)


def process_count(settings: DownloadSettings, rows: int) -> int:
    """Worker processes for `rows` rows to fetch: 1 means this process does the work itself."""
    wanted = settings.processes or usable_cores()
    limits = (-(-rows // ROWS_PER_PROCESS), settings.max_in_flight, settings.per_host_connections)
    return max(1, min(wanted, *limits))


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
    addresses = resolve_hosts({name for job in jobs if (name := urlsplit(job.url).hostname)}, settings)
    per_host = settings.per_host_connections // count
    share = replace(settings, max_in_flight=settings.max_in_flight // count, per_host_connections=per_host)
    context = _worker_context()
    workers = {}
    for part in (jobs[i::count] for i in range(count)):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker, args=(part, share, deadline, blocked_images, send, addresses), daemon=True
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
    addresses: dict[str, Address],
) -> None:
    """A worker process: its jobs through `_fetch_all`, the results sent back in small batches, then None.
    When the step's process is gone (killed), the next send fails and the worker stops after the
    requests in flight."""
    batch = []
    try:
        for result in _fetch_all(jobs, settings, deadline, blocked_images, addresses):
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


def resolve_hosts(hosts: set[str], settings: FetchSettings) -> dict[str, Address]:
    """Each host name's answer (its vetted address, or why it is refused), `dns_lookups` at a time."""

    async def resolved() -> dict[str, Address]:
        async with Fetcher(settings) as fetcher:
            answers = await asyncio.gather(*(fetcher.resolve(host) for host in hosts))
        return dict(zip(hosts, answers, strict=True))

    return _run_async(resolved())


def _run_async(coroutine: Coroutine[None, None, T]) -> T:
    """`coroutine` run to its end on a new event loop: uvloop's where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _fetch_all(
    jobs: list[_Job],
    settings: DownloadSettings,
    deadline: float,
    blocked_images: dict[str, str],
    addresses: dict[str, Address] | None = None,
) -> Iterator[tuple[dict, bytes | None]]:
    """(record, its sample encoded for the tar, or None) for each job, in the order they finish;
    `blocked_images` maps the sha256 and md5 digests on block lists to the list they are on.

    The fetching runs on an event loop in a thread of its own (`_Fetching`); the images are decoded here,
    in the caller's thread."""
    fetching = _Fetching(jobs, settings, deadline, addresses)
    unfinished = {job.key: job for job in jobs}
    thread = threading.Thread(target=fetching.run, name="fetch-loop", daemon=True)
    thread.start()
    while (item := fetching.results.get()) is not None:
        job, outcome = item
        try:
            yield _finish(job, outcome, settings, blocked_images)
        finally:
            del unfinished[job.key]
            fetching.decoded(outcome)
    thread.join()
    error = f"unexpected: download loop stopped: {fetching.error}"
    for job in unfinished.values():  # only after a bug: every row still gets its record
        yield _record(job, schemas.FAILED_TO_DOWNLOAD, error), None


class _Fetching:
    """The requests of one worker on an event loop: at most `max_in_flight` at once and
    `per_host_connections` per host, while the bodies waiting to be decoded hold at most
    `_WAITING_BYTES_PER_SLOT` per slot; a retry waits out its backoff holding neither, then goes to the
    back of its host's queue. Each outcome is put on `results`, then None."""

    def __init__(
        self,
        jobs: list[_Job],
        settings: DownloadSettings,
        deadline: float,
        addresses: dict[str, Address] | None,
    ) -> None:
        self.results: queue.SimpleQueue[tuple[_Job, Fetched] | None] = queue.SimpleQueue()
        self.error: str | None = None
        self._settings, self._deadline, self._addresses = settings, deadline, addresses
        self._scheduler = HostScheduler(jobs, settings.per_host_connections)
        self._attempts: Counter = Counter()  # job key -> attempts made
        self._retrying = 0  # jobs waiting out a backoff
        self._waiting_bytes = 0  # of the bodies on `results` or being decoded
        self._most_waiting_bytes = settings.max_in_flight * _WAITING_BYTES_PER_SLOT
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._changed: asyncio.Event | None = None

    def run(self) -> None:
        try:
            _run_async(self._dispatch())
        except BaseException as exc:  # a bug: the consumer records the rows left
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.results.put(None)

    def decoded(self, outcome: Fetched) -> None:
        """From the consumer's thread: an outcome is done with."""
        with contextlib.suppress(RuntimeError):  # the loop has ended
            self._loop.call_soon_threadsafe(self._release_body, len(outcome.body or b""))

    def _release_body(self, size: int) -> None:
        self._waiting_bytes -= size
        self._changed.set()

    async def _dispatch(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self._settings.max_in_flight)
        self._changed = asyncio.Event()
        tasks = set()
        async with Fetcher(self._settings, self._addresses) as fetcher:
            while True:
                await self._slots.acquire()
                while self._waiting_bytes > self._most_waiting_bytes:  # until the CPU catches up
                    self._changed.clear()
                    await self._changed.wait()
                job = self._scheduler.next()
                if job is None:
                    self._slots.release()
                    if self._scheduler.idle() and not self._retrying:
                        return
                    # every host with work is at its cap, or only retries wait: until that changes
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                if time.monotonic() >= self._deadline - _TOO_LATE:
                    self._scheduler.done(job)
                    self._slots.release()
                    what = "retried" if self._attempts[job.key] else "started"
                    timeout = self._settings.shard_timeout
                    error = f"shard deadline: not {what} within shard_timeout={timeout:g}s"
                    self.results.put((job, Fetched(schemas.FAILED_TO_DOWNLOAD, error=error)))
                    continue
                task = asyncio.ensure_future(self._fetch(fetcher, job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _fetch(self, fetcher: Fetcher, job: _Job) -> None:
        try:
            outcome = await fetcher.attempt(job.url, self._deadline, self._attempts[job.key])
        except Exception as exc:  # a bug or an exotic library error must cost one row, not the shard
            outcome = Fetched(schemas.FAILED_TO_DOWNLOAD, error=f"unexpected: {type(exc).__name__}: {exc}")
        self._scheduler.done(job)
        self._slots.release()
        if isinstance(outcome, RetryLater):
            self._attempts[job.key] += 1
            self._retrying += 1
            self._loop.call_later(outcome.wait, self._again, job)
        else:
            self._waiting_bytes += len(outcome.body or b"")
            self.results.put((job, outcome))
        self._changed.set()

    def _again(self, job: _Job) -> None:
        self._retrying -= 1
        self._scheduler.again(job)
        self._changed.set()


def _finish(
    job: _Job, fetched: Fetched, settings: DownloadSettings, blocked_images: dict[str, str]
) -> tuple[dict, bytes | None]:
    """One row's record and sample from what was fetched: never raises, whatever the bytes do."""
    record = _record(job, fetched.status, fetched.error, http_status=fetched.http_status)
    if fetched.status != schemas.SUCCESS:
        return record, None
    try:
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
    return record, encode_sample(job.key, members)


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
