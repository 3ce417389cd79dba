"""The downloaded_images stage: every crawl row fetched, decoded, resized, and recorded with a status.

On the real web a request mostly waits (hundreds of ms for the first byte, seconds for some hosts),
so throughput is set by how many are in flight. Each worker fetches on an asyncio event loop (uvloop
where installed) with up to its share of `max_in_flight` requests at once: a URL that never answers
costs a socket, not a thread. A scheduler hands out URLs from the host with the most still queued,
never more than `per_host_connections` at once on one host (the URL's: a redirect's hops count under
it, whatever their host); a retry waits out its backoff off the
books and goes to the back of its host's queue, so it never holds back fresh URLs. Bodies are decoded,
resized and encoded by the worker's main thread, one image at a time, beside the loop's thread. A
request's slot is freed once its body is in; the bodies waiting for the CPU, and those still arriving
(counted at the mean size so far), are bounded in bytes (`_WAITING_BYTES_PER_SLOT`), so memory stays
bounded when the CPU falls behind.

The worker processes are a run's (`DownloadWorkers`: `processes`, one per core by default), shared by
the shards that run at once: the next shard starts while the last one drains (`draining`), and its
rows go to the same workers, so a host's cap and `max_in_flight` hold across the two. They are forked
from a server that has this module imported already (multiprocessing's forkserver), so a worker starts
in milliseconds; a shard of `ROWS_PER_PROCESS` rows or fewer, before any has started, is fetched in the
caller's process, alone: the next shard waits for it. A run's hosts are looked up here, once for all its
shards (`_Resolver`), busiest first, and each job goes to be fetched with its host's answer as soon as
that is in, not after the shard's last lookup. Samples and records come back to this process, which
alone writes each tar. Images stream into the tar as they finish; only the small per-row records are
held until the parquet is written, sorted by key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, TypeVar

import pyarrow as pa

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.fetch import Fetched, Fetcher, FetchSettings, HostAnswer, RetryLater
from laion_assets.pipeline.download.imaging import (
    DecodeError,
    FilteredSize,
    ImageSettings,
    opencv,
    process_image,
)
from laion_assets.pipeline.lineage import HOW_NOT_WHAT, content_footer, inherited_footer
from laion_assets.pipeline.shard_tar import TarShardWriter, drop_samples, encode_sample, read_samples, reading
from laion_assets.pipeline.storage import CRAWL_METADATA, IMAGES, DatasetStore
from laion_assets.pipeline.takedowns.blocklist import Blocklist, load_active

T = TypeVar("T")
P = TypeVar("P")  # where a part of a shard's jobs goes: a worker process, or this process's fetching
ROWS_PER_PROCESS = 256  # a shard of this many rows to fetch or fewer is fetched in the step's process
_BATCH = 16  # results a worker sends back at once
# A shard is draining (the next one may start) with this many times `max_in_flight` rows left or fewer:
# the next one's first requests then wait out their latency while this one still decodes (measured on
# bench/download.py's latency web: 1x, 322 images/s; 2x, 355).
_NEXT_SHARD_WITHIN = 2
# Bodies fetched and not yet decoded may hold this many bytes per request slot (a worker's share of
# max_in_flight): past it the worker starts no request until its CPU catches up. Apart from the slots,
# so that a backlog of decoding never keeps the next URLs (and their latency) waiting. Measured on the
# latency web (100 KB photos, 512 slots a worker): at 128 KB the bound stopped the requests while the
# CPU was behind and the last URLs' latency came after the decoding (8.4-9.7 s); at 256 KB, 8.0-8.3 s,
# the same peak memory (docs/benchmarks.md). The requests in flight count at the mean body size so far:
# counting only the bodies in, those in flight when the bound was reached overshot it by 20-30 MB.
_WAITING_BYTES_PER_SLOT = 256 * 1024
# s: hosts' answers that come within this of the first of them go to the workers with it, in one message
_ANSWERS_TOGETHER = 0.02
# s: a row with less of the shard's time left is not started (uvloop's timers fire up to 1 ms early)
_TOO_LATE = 0.01


@dataclass(frozen=True)
class DownloadSettings(FetchSettings, ImageSettings):
    max_in_flight: int = 1024  # requests at once, in all: each worker process gets its share
    processes: int = 0  # worker processes for a large shard; 0: one per core; 1: all in this process
    shard_timeout: float = 3600.0  # seconds for the whole shard; rows not fetched by then fail
    retry_failed: bool = False  # refetch only the failed_to_download rows of the previous result

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_in_flight", "per_host_connections", "dns_lookups"):
            if (value := getattr(self, name)) < 1:  # 0 is no limit to no one: it starts nothing, ever
                raise ValueError(f"{name}={value}: at least 1 is needed, or no request or lookup starts")


class DownloadStopped(RuntimeError):
    """The run's downloads were stopped (`DownloadWorkers.stop`) before this shard was done."""


_STOPPED = object()  # put on a shard's results by `DownloadWorkers.stop`


@dataclass(frozen=True)
class _Job:
    key: str
    url: str
    caption: str
    shard: int = 0  # which of the worker processes' shards it is of (`DownloadWorkers`)

    @functools.cached_property  # the scheduler asks for it several times a job
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
        self._running: Counter = Counter()
        self._per_host = per_host
        self.queued = 0  # not handed out yet
        # (-queued, turn, host) of the hosts that may start a job; `_offered` holds each one's valid count
        self._heap: list[tuple[int, int, str]] = []
        self._offered: dict[str, int] = {}
        self._turns = itertools.count()
        self.add(jobs)

    def add(self, jobs: list[_Job]) -> None:
        """`jobs` at the end of their hosts' queues."""
        hosts = set()
        for job in jobs:
            self._queues.setdefault(job.host, deque()).append(job)
            hosts.add(job.host)
        self.queued += len(jobs)
        for host in hosts:
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
        self.add([job])

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
    workers: DownloadWorkers | None = None,
) -> DownloadResult:
    """`images/<shard>.tar` and `images/<shard>.parquet` from the shard's crawl_metadata; with
    `settings.retry_failed`, only the rows that failed to download last time are fetched again. The block
    lists the `blocklist` asset last recorded apply: a listed link or domain is not requested, a listed
    image is dropped once fetched; both rows get status `taken_down`. So are the rows that lists recorded
    while the shard was fetched name (`_listed_meanwhile`)."""
    crawl = store.read_parquet(CRAWL_METADATA.parquet(shard))
    tar_path, parquet_path = IMAGES.tar(shard), IMAGES.parquet(shard)
    with contextlib.ExitStack() as stack:
        previous = None
        if settings.retry_failed and _made_as_now(store, parquet_path, settings) and store.exists(tar_path):
            previous = (store.read_parquet(parquet_path), stack.enter_context(store.open(tar_path)))
        tar_out = stack.enter_context(store.tar_write(IMAGES, shard))
        blocklist = load_active(store)
        remedy = "retry_failed cannot keep its samples; download the shard again without retry_failed"
        with reading(store.url(tar_path), remedy):  # only the previous tar is read
            args = (crawl, settings, tar_out, previous, progress, blocklist, draining, workers)
            result = download_shard(*args)
    result = _listed_meanwhile(store, blocklist, result, tar_path)
    footer = {
        **inherited_footer(crawl),
        **content_footer(result.table),
        names.SETTINGS_FOOTER: json.dumps(asdict(settings)),
    }
    store.write_parquet(parquet_path, result.table, metadata=footer, **schemas.IMAGES_PARQUET_OPTIONS)
    return result


def _made_as_now(store: DatasetStore, parquet_path: str, settings: DownloadSettings) -> bool:
    """Whether the images parquet at `parquet_path` exists and records the settings of `settings` that
    shape what a shard holds (image size, mode and format, the opt-out rules, `max_bytes`...: all but
    lineage's `HOW_NOT_WHAT`): only then may `retry_failed` keep its rows beside new ones, under a footer
    that records `settings` for all of them."""
    if not store.exists(parquet_path):
        return False
    recorded = json.loads(store.parquet_metadata(parquet_path).get(names.SETTINGS_FOOTER, "{}"))
    now = json.loads(json.dumps(asdict(settings)))  # as the footer holds them (tuples as lists)
    return all(recorded.get(name) == value for name, value in now.items() if name not in HOW_NOT_WHAT)


def _listed_meanwhile(
    store: DatasetStore, used: Blocklist, result: DownloadResult, tar_path: str
) -> DownloadResult:
    """`result` with the rows that the lists recorded since `used` was loaded name taken down, and their
    samples dropped from the tar (written already): a takedown that ran meanwhile found this shard's
    rows from before, or none, and runs again only when the lists change, so it would never see these."""
    active = load_active(store)
    if active.entries.equals(used.entries):
        return result
    rows = result.table.to_pylist()
    taken = set()
    for row in rows:
        if row["status"] != schemas.TAKEN_DOWN and (
            match := active.match_row(row["url"], row["host"], row["sha256"], row["md5"])
        ):
            schemas.take_down(row, match.why)
            taken.add(row["key"])
    if not taken:
        return result
    drop_samples(store, tar_path, taken)
    return replace(result, table=pa.Table.from_pylist(rows, schema=result.table.schema))


def download_shard(
    crawl: pa.Table,
    settings: DownloadSettings,
    tar_out: IO[bytes],
    previous: tuple[pa.Table, IO[bytes]] | None = None,
    progress: Callable[[str], None] | None = None,
    blocklist: Blocklist | None = None,
    draining: threading.Event | None = None,
    workers: DownloadWorkers | None = None,
) -> DownloadResult:
    """Fetch the `url` of every `crawl` row; write successes to `tar_out`, return one record per row.

    `previous` is the last result (images table, tar stream): with `settings.retry_failed`, its
    rows that did not fail to download are kept and their samples copied, the rest fetched again.
    A row whose link or domain is on `blocklist` is not fetched; one whose bytes are on it is dropped.
    `draining` is set once few rows are left (`_NEXT_SHARD_WITHIN`): the next shard may start.
    `workers`: the run's worker processes, which the shards running at once share; without them, the
    shard has its own.
    """
    start = time.monotonic()
    deadline = start + settings.shard_timeout
    jobs = [
        _Job(r["key"], r["url"], r["caption"]) for r in crawl.select(["key", "url", "caption"]).to_pylist()
    ]
    records: list[dict] = []
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(TarShardWriter(tar_out))
        workers = workers or stack.enter_context(DownloadWorkers(settings))
        blocklist = blocklist or Blocklist.empty()
        if previous is not None and settings.retry_failed:
            kept = _reuse(jobs, *previous, writer, blocklist)
            records.extend(kept.values())
            jobs = [job for job in jobs if job.key not in kept]
        reused = len(records)
        listed = {job.key: match for job in jobs if (match := blocklist.match_url(job.url, job.host))}
        records.extend(
            schemas.take_down(_record(job, schemas.TAKEN_DOWN, None), m.why)
            for job in jobs
            if (m := listed.get(job.key))
        )
        jobs = [job for job in jobs if job.key not in listed]
        blocked_images = blocklist.image_entries()
        started = last_report = time.monotonic()
        few_left = _NEXT_SHARD_WITHIN * settings.max_in_flight
        if draining and len(jobs) <= few_left:  # a small shard: the next one starts with it
            draining.set()
        fetched = workers.fetch(jobs, deadline, blocked_images)
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
    """Worker processes for a run whose first shard to fetch over this process has `rows` rows to fetch:
    1 means this process does the work itself (`ROWS_PER_PROCESS` rows or fewer); else `processes` (0:
    one per usable core), no more than the request slots or a host's connections. Not fewer for a
    first shard of a few hundred rows: the workers serve every later shard of the run, however large."""
    if rows <= ROWS_PER_PROCESS:
        return 1
    wanted = settings.processes or usable_cores()
    return max(1, min(wanted, settings.max_in_flight, settings.per_host_connections))


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, and a container's CPU limit (cgroup v2
    `cpu.max`), which a Kubernetes pod has and `os.cpu_count()` does not see."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    return cores if quota == "max" else max(1, min(cores, -(-int(quota) // int(period))))


class DownloadWorkers:
    """The worker processes of a run's downloads, shared by the shards that run at once (the next one
    starts while the last one drains): `cores` processes in all, not `cores` per shard, and each keeps
    its connections and each site's robots.txt and tdmrep.json from one shard to the next. They start
    with the first shard of more than `ROWS_PER_PROCESS` rows (smaller ones are fetched in the caller's
    process), each with 1/n of `max_in_flight` and of each host's connections, and get every n-th row
    of each shard. A worker that dies (a crash in a decoder) costs its unfinished rows, each recorded
    as failed_to_download; the next shard gets a new one. Use as a context manager: leaving it stops
    them."""

    def __init__(self, settings: DownloadSettings) -> None:
        self._settings = settings
        self._workers: list[_WorkerProcess] = []
        self._count = 0
        self._routes: dict[int, _Route] = {}  # shard number -> where its results go
        self._shards = itertools.count()
        self._lock = threading.Lock()
        # held by a shard fetched in this process for its whole fetch, which has the whole caps to itself
        self._here = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()  # `stop`: no shard is to finish
        self._reader: threading.Thread | None = None
        self._resolver = _Resolver(settings)  # the hosts of all the run's shards

    def __enter__(self) -> DownloadWorkers:
        return self

    def __exit__(self, error: type[BaseException] | None, *exc: object) -> None:
        """Each worker told that no more shards come, and killed if it has not ended after 10 s (at once
        when leaving on an error: rows still in flight are not wanted)."""
        self._stopping.set()
        for worker in self._workers:
            with contextlib.suppress(OSError), worker.sending:
                worker.control.send(None)
        if self._reader and error is None:
            self._reader.join(10)
        for worker in self._workers:
            worker.process.kill()
        if self._reader:
            self._reader.join()
        for worker in self._workers:
            worker.process.join()
        self._resolver.close()

    def stop(self) -> None:
        """Ends the shards being fetched, and any that starts after: each one's `fetch` raises
        DownloadStopped, so the shard writes nothing (the run is ending on an error or an interrupt, and
        a shard whose rows it no longer waits for must not be recorded with them failed)."""
        with self._lock:
            self._stopped.set()
            for route in self._routes.values():
                route.results.put(_STOPPED)

    def fetch(
        self, jobs: list[_Job], deadline: float, blocked_images: dict[str, str]
    ) -> Iterator[tuple[dict, bytes | None]]:
        """(record, sample) of each job, in the order they finish. A job goes to be fetched once its host's
        answer is in (`_hand_out`), so a shard's first requests do not wait for the last of its lookups.
        A shard fetched in this process (before any worker has started) has its own fetcher with the whole
        `per_host_connections` and `max_in_flight`: no other shard is fetched beside it, the next one waits
        for its end, so a host's cap holds across shards here too."""
        with self._here:
            if not self._workers and process_count(self._settings, len(jobs)) == 1:
                yield from self._fetch_here(jobs, deadline, blocked_images)
                return
            with self._lock:
                if self._stopped.is_set():
                    raise DownloadStopped("the run's downloads were stopped")
                workers = self._live_workers(process_count(self._settings, len(jobs)))
                shard = next(self._shards)
                route = _Route()
                for i, worker in enumerate(workers):
                    if part := jobs[i :: len(workers)]:
                        route.unfinished[worker] = {job.key: replace(job, shard=shard) for job in part}
                self._routes[shard] = route
                waiting = len(route.unfinished)  # workers that have not finished their part
        parts = {worker: list(part.values()) for worker, part in route.unfinished.items()}
        for worker, part in parts.items():  # how many jobs of the shard will come, and its blocked images
            self._post(worker, shard, (shard, [], deadline, blocked_images, {}, len(part)))

        def post(worker: _WorkerProcess, ready: list[_Job], answers: dict[str, HostAnswer]) -> bool:
            return self._post(worker, shard, (shard, ready, deadline, None, answers, 0))

        args = (parts, post, deadline)
        threading.Thread(target=self._hand_out, args=args, name="hosts", daemon=True).start()
        try:
            while waiting:
                result = route.results.get()
                if result is None:
                    waiting -= 1
                elif result is _STOPPED:
                    raise DownloadStopped("the run's downloads were stopped")
                else:
                    yield result
        finally:
            with self._lock:
                del self._routes[shard]

    def _fetch_here(
        self, jobs: list[_Job], deadline: float, blocked_images: dict[str, str]
    ) -> Iterator[tuple[dict, bytes | None]]:
        """`fetch` in this process: its own fetcher, and the images decoded on this thread."""
        fetching = _Fetching(self._settings)

        def hand_out() -> None:
            try:
                self._hand_out(
                    {fetching: jobs},
                    lambda _, ready, answers: fetching.add(ready, deadline, answers),
                    deadline,
                )
            finally:
                fetching.close()

        threading.Thread(target=hand_out, name="hosts", daemon=True).start()
        for _, record, sample in _decoded(fetching, self._settings, lambda shard: blocked_images):
            if self._stopped.is_set():  # a small shard: it ends at its next row
                raise DownloadStopped("the run's downloads were stopped")
            yield record, sample

    def _hand_out(
        self,
        parts: dict[P, list[_Job]],
        post: Callable[[P, list[_Job], dict[str, HostAnswer]], bool | None],
        deadline: float,
    ) -> None:
        """Each of `parts` (a worker's jobs, or this process's) posted to it as their hosts' answers come
        in, with those answers: the run's resolver looks the hosts up busiest first. The jobs with no host
        to look up (a malformed URL) go first; at the shard's `deadline`, those whose hosts have no answer
        yet, without one (they fail there as not started). Stops where `post` returns False."""
        by_host: dict[str | None, dict[P, list[_Job]]] = {}
        for destination, part in parts.items():
            for job in part:
                by_host.setdefault(schemas.url_hostname(job.url), {}).setdefault(destination, []).append(job)
        for destination, ready in by_host.pop(None, {}).items():
            post(destination, ready, {})
        delivered: set[str] = set()

        def deliver(hosts: list[str], answers: dict[str, HostAnswer]) -> bool:
            """The jobs of `hosts` posted, with their answers where `answers` has them."""
            delivered.update(hosts)
            for destination in parts:
                if mine := [host for host in hosts if destination in by_host[host]]:
                    ready = [job for host in mine for job in by_host[host][destination]]
                    if post(destination, ready, {h: answers[h] for h in mine if h in answers}) is False:
                        return False
            return True

        hosts = sorted(by_host, key=lambda host: -sum(map(len, by_host[host].values())))
        try:
            self._resolver.resolve(hosts, lambda answers: deliver(list(answers), answers), deadline)
        except Exception as exc:  # a bug, or the run ending: the rows not handed out yet fail, not vanish
            error = f"unexpected: host lookups ended: {type(exc).__name__}: {exc}"
            failed = HostAnswer(math.inf, Fetched(schemas.FAILED_TO_DOWNLOAD, error=error))
            left = [host for host in hosts if host not in delivered]
            deliver(left, {host: failed for host in left})
            return
        deliver([host for host in hosts if host not in delivered], {})  # the deadline came first

    def _post(self, worker: _WorkerProcess, shard: int, message: tuple) -> bool:
        """`message` sent to `worker`, unless it is dead (if it died a moment ago, its rows fail); False
        once the shard's caller stopped listening."""
        if shard not in self._routes:
            return False
        try:
            if worker.alive:
                with worker.sending:
                    worker.control.send(message)
        except OSError:
            with self._lock:
                if route := self._routes.get(shard):
                    self._fail_unfinished(worker, [route])
        return True

    def _live_workers(self, count: int) -> list[_WorkerProcess]:
        """The worker processes alive, as many as the first shard that needed them asked for: the dead
        ones replaced. Under the lock."""
        self._count = self._count or count
        context = _worker_context()
        share = replace(
            self._settings,
            max_in_flight=self._settings.max_in_flight // self._count,
            per_host_connections=self._settings.per_host_connections // self._count,
        )
        live = [worker for worker in self._workers if worker.alive and worker.process.is_alive()]
        while len(live) < self._count:
            control_receive, control_send = context.Pipe(duplex=False)
            results_receive, results_send = context.Pipe(duplex=False)
            args = (share, control_receive, results_send)
            process = context.Process(target=_worker, args=args, daemon=True)
            process.start()
            control_receive.close()
            results_send.close()
            live.append(_WorkerProcess(process, control_send, results_receive))
            self._workers.append(live[-1])  # a dead one stays listed until the reader has seen it end
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="download-workers", daemon=True)
            self._reader.start()
        return live

    def _read(self) -> None:
        """The workers' results, each put where its shard's caller takes it."""
        while True:
            with self._lock:
                listening = {worker.results: worker for worker in self._workers if worker.alive}
            if not listening and self._stopping.is_set():
                return
            for connection in multiprocessing.connection.wait(list(listening), timeout=0.2):
                worker = listening[connection]
                try:
                    shard, batch = connection.recv()
                except (EOFError, OSError):
                    self._died(worker)
                    continue
                with self._lock:
                    route = self._routes.get(shard)  # None when its caller stopped listening
                    if route is None:
                        continue
                    if batch is None:  # the worker's part of the shard is done
                        if route.unfinished.pop(worker, None) is not None:
                            route.results.put(None)
                        continue
                    unfinished = route.unfinished.get(worker, {})
                    for record, sample in batch:
                        unfinished.pop(record["key"], None)
                        route.results.put((record, sample))

    def _died(self, worker: _WorkerProcess) -> None:
        """A worker that ended without finishing: each of its unfinished rows fails with the reason."""
        worker.results.close()
        worker.process.join()
        with self._lock:
            worker.alive = False
            self._fail_unfinished(worker, list(self._routes.values()))

    def _fail_unfinished(self, worker: _WorkerProcess, routes: list[_Route]) -> None:
        """The rows `worker` had of each of `routes`, failed. Under the lock, so that they fail once."""
        error = f"unexpected: download worker process died (exit code {worker.process.exitcode})"
        for route in routes:
            unfinished = route.unfinished.pop(worker, None)
            if unfinished is not None:
                for job in unfinished.values():
                    route.results.put((_record(job, schemas.FAILED_TO_DOWNLOAD, error), None))
                route.results.put(None)


@dataclass(eq=False)
class _WorkerProcess:
    process: multiprocessing.process.BaseProcess
    control: multiprocessing.connection.Connection  # its shards' jobs, then None
    results: multiprocessing.connection.Connection  # (shard, a batch of results, or None when done)
    alive: bool = True
    sending: threading.Lock = field(default_factory=threading.Lock)  # one sender at a time on `control`


@dataclass
class _Route:
    """A shard's results as they come back, then a None for each worker done with its part."""

    results: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    unfinished: dict[_WorkerProcess, dict[str, _Job]] = field(default_factory=dict)


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
    settings: DownloadSettings,
    control: multiprocessing.connection.Connection,
    send: multiprocessing.connection.Connection,
) -> None:
    """A worker process: the jobs `control` sends, (shard, jobs, deadline, the shard's blocked images in
    its first message, their hosts' answers, and in its first message how many jobs of the shard will
    come), fetched on one event loop (`_Fetching`) and decoded here; each shard's results sent back in
    small batches, then (shard, None) after the last. `control` sends None once no shard will come. When
    the step's process is gone (killed), `control` ends and the next send fails: the worker stops."""
    fetching = _Fetching(settings)
    blocked: dict[int, dict[str, str]] = {}
    left: Counter = Counter()  # jobs of each shard not sent back yet
    lock = threading.Lock()

    def receive() -> None:
        with contextlib.suppress(EOFError, OSError):
            while (message := control.recv()) is not None:
                shard, jobs, deadline, blocked_images, addresses, coming = message
                if blocked_images is not None:
                    blocked[shard] = blocked_images
                with lock:
                    left[shard] += coming
                fetching.add(jobs, deadline, addresses)
        fetching.close()

    threading.Thread(target=receive, name="control", daemon=True).start()
    batches: dict[int, list] = {}
    try:
        for job, record, sample in _decoded(fetching, settings, lambda shard: blocked[shard]):
            batch = batches.setdefault(job.shard, [])
            batch.append((record, sample))
            with lock:
                left[job.shard] -= 1
                finished = not left[job.shard]
            if finished or len(batch) >= _BATCH:
                send.send((job.shard, batch))
                batches[job.shard] = []
            if finished:
                send.send((job.shard, None))
                with lock:  # the worker serves the whole run: a shard's block list copy goes with it
                    del left[job.shard], blocked[job.shard], batches[job.shard]
    except BrokenPipeError:
        return
    send.close()


class _Resolver:
    """The host lookups of a run, on an event loop of their own, by one Fetcher: its answers (each kept
    for its TTL) and its c-ares channel serve every shard of the run, so a host is looked up once a run
    while its answer holds, even by two shards at once (`Fetcher.resolve` joins a lookup in flight)."""

    def __init__(self, settings: FetchSettings) -> None:
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._fetcher: Fetcher | None = None
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._lock = threading.Lock()

    def resolve(
        self, hosts: list[str], deliver: Callable[[dict[str, HostAnswer]], bool], deadline: float
    ) -> None:
        """Each of `hosts`' answer (its vetted address, or why it is refused, and until when it holds),
        looked up `dns_lookups` at a time in `hosts`' order and handed to `deliver` as they come, those
        that come within `_ANSWERS_TOGETHER` of each other at once, until `deliver` returns False or
        `deadline` (time.monotonic) passes: no lookup starts after it, and the answers not in by then
        are not handed on."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_run_async, args=(self._serve(),), name="dns", daemon=True
                )
                self._thread.start()
        self._serving.wait()
        if self._fetcher is None:
            raise RuntimeError("the run's host lookups have ended")
        asyncio.run_coroutine_threadsafe(self._resolve(hosts, deliver, deadline), self._loop).result()

    def close(self) -> None:
        if self._thread is not None:
            self._serving.wait()
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with Fetcher(self._settings) as self._fetcher:
                self._serving.set()
                await self._stop.wait()
        finally:
            self._fetcher = None  # `resolve` then refuses, where it would wait on a loop that is gone
            self._serving.set()

    async def _resolve(
        self, hosts: list[str], deliver: Callable[[dict[str, HostAnswer]], bool], deadline: float
    ) -> None:
        answered: list[str] = []
        # a lookup starts once one before it is done, not all at once: those cancelled at the deadline were
        # never started, and take no slot of the run's lookups from the next shard's
        slots = asyncio.Semaphore(self._settings.dns_lookups)

        async def look_up(host: str) -> None:
            if self._fetcher.kept(host):
                await self._fetcher.resolve(host)
            else:
                async with slots:
                    await self._fetcher.resolve(host)
            answered.append(host)

        pending = {asyncio.ensure_future(look_up(host)) for host in hosts}
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # the deadline
                    return
                if pending:
                    _, pending = await asyncio.wait(pending, timeout=_ANSWERS_TOGETHER)
                batch, answered[:] = self._fetcher.answers(answered), []
                if not deliver(batch):
                    return
        finally:
            for task in pending:
                task.cancel()


def _run_async(coroutine: Coroutine[None, None, T]) -> T:
    """`coroutine` run to its end on a new event loop: uvloop's where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _decoded(
    fetching: _Fetching, settings: DownloadSettings, blocked_images: Callable[[int], dict[str, str]]
) -> Iterator[tuple[_Job, dict, bytes | None]]:
    """(job, record, sample) of each job `fetching` is given, as they finish: the fetching runs on an
    event loop in a thread of its own, the images are decoded here, in the caller's thread."""
    thread = threading.Thread(target=fetching.run, name="fetch-loop", daemon=True)
    thread.start()
    opencv()  # imported while the first requests are out: the forkserver, which never resizes, leaves it out
    while (item := fetching.results.get()) is not None:
        job, outcome = item
        try:
            record, sample = _finish(job, outcome, settings, blocked_images(job.shard))
        finally:
            fetching.decoded(job, outcome)
        yield job, record, sample
    thread.join()
    error = f"unexpected: download loop stopped: {fetching.error}"
    for job in fetching.unfinished():  # only after a bug: every row still gets its record
        yield job, _record(job, schemas.FAILED_TO_DOWNLOAD, error), None


class _Fetching:
    """The requests of one worker on an event loop: at most `max_in_flight` at once and
    `per_host_connections` per host, while the bodies waiting to be decoded (and arriving) hold at most
    `_WAITING_BYTES_PER_SLOT` per slot; a retry waits out its backoff holding neither, then goes to the
    back of its host's queue. Jobs come in with `add` (from any thread) until `close`; each outcome is
    put on `results`, then None once the jobs are done and no more will come."""

    def __init__(self, settings: DownloadSettings) -> None:
        self.results: queue.SimpleQueue[tuple[_Job, Fetched] | None] = queue.SimpleQueue()
        self.error: str | None = None
        self._settings = settings
        self._scheduler = HostScheduler([], settings.per_host_connections)
        self._unfinished: dict[str, _Job] = {}  # by key: added, and not yet decoded
        self._incoming: queue.SimpleQueue[tuple[list[_Job], float, dict[str, HostAnswer]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False  # no more jobs will come
        self._deadlines: dict[int, float] = {}  # of each shard
        self._attempts: Counter = Counter()  # job key -> attempts made
        self._retrying = 0  # jobs waiting out a backoff
        # bodies on `results` or being decoded: bytes put there by the loop, less those the consumer is
        # done with (each counter has one writer); the consumer wakes the loop only when it waits for them
        self._body_bytes = 0
        self._decoded_bytes = 0
        self._outcomes = 0  # those counted in _body_bytes, bodies or not: their mean is a request's bytes
        self._in_flight = 0  # requests started and not yet answered
        self._waiting_for_cpu = False
        self._most_waiting_bytes = settings.max_in_flight * _WAITING_BYTES_PER_SLOT
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._changed: asyncio.Event | None = None
        self._fetcher: Fetcher | None = None

    def add(self, jobs: list[_Job], deadline: float, addresses: dict[str, HostAnswer]) -> None:
        """More jobs, of one shard, to be fetched by `deadline` (time.monotonic); `addresses` are their
        hosts' answers, as the run's `_Resolver` gives them."""
        self._unfinished.update((job.key, job) for job in jobs)
        self._incoming.put((jobs, deadline, addresses))
        self._wake()

    def close(self) -> None:
        """No more jobs: the loop ends once those it has are done."""
        self._incoming.put(None)
        self._wake()

    def unfinished(self) -> list[_Job]:
        return list(self._unfinished.values())

    def run(self) -> None:
        try:
            _run_async(self._dispatch())
        except BaseException as exc:  # a bug: the consumer records the rows left
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.results.put(None)

    def decoded(self, job: _Job, outcome: Fetched) -> None:
        """From the consumer's thread: an outcome is done with."""
        self._unfinished.pop(job.key, None)
        self._decoded_bytes += len(outcome.body or b"")
        if self._waiting_for_cpu:  # read after the count changed: the loop cannot miss it
            self._wake()

    def _wake(self) -> None:
        loop = self._loop  # None until the loop runs, which then takes what came in
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended
                loop.call_soon_threadsafe(self._changed.set)

    def _take_incoming(self) -> None:
        while True:
            try:
                incoming = self._incoming.get_nowait()
            except queue.Empty:
                return
            if incoming is None:
                self._closed = True
                continue
            jobs, deadline, addresses = incoming
            self._fetcher.remember(addresses)
            for job in jobs:
                self._deadlines[job.shard] = deadline
            self._scheduler.add(jobs)

    async def _dispatch(self) -> None:
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(self._settings.max_in_flight)
        tasks = set()
        async with Fetcher(self._settings) as self._fetcher:
            self._loop = asyncio.get_running_loop()
            while True:
                await self._slots.acquire()
                while self._cpu_behind():  # until the CPU catches up
                    self._waiting_for_cpu = True  # set before the count is read again
                    self._changed.clear()
                    if self._cpu_behind():
                        await self._changed.wait()
                self._waiting_for_cpu = False
                self._take_incoming()
                job = self._scheduler.next()
                if job is None:
                    self._slots.release()
                    if self._closed and self._scheduler.idle() and not self._retrying:
                        return
                    # every host with work is at its cap, only retries wait, or no job has come yet: until
                    # that changes (`add` and `close` wake the loop through a callback on it)
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                if time.monotonic() >= self._deadlines[job.shard] - _TOO_LATE:
                    self._scheduler.done(job)
                    self._slots.release()
                    what = "retried" if self._attempts[job.key] else "started"
                    timeout = self._settings.shard_timeout
                    error = f"shard deadline: not {what} within shard_timeout={timeout:g}s"
                    self.results.put((job, Fetched(schemas.FAILED_TO_DOWNLOAD, error=error)))
                    continue
                self._in_flight += 1
                task = asyncio.ensure_future(self._fetch(job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    def _cpu_behind(self) -> bool:
        """The bodies waiting for the CPU hold more than the bound, with those still arriving counted at
        the mean size so far: all of them come in after the bound is reached."""
        arriving = self._in_flight * self._body_bytes // self._outcomes if self._outcomes else 0
        return self._body_bytes - self._decoded_bytes + arriving > self._most_waiting_bytes

    async def _fetch(self, job: _Job) -> None:
        deadline = self._deadlines[job.shard]
        try:
            outcome = await self._fetcher.attempt(job.url, deadline, self._attempts[job.key])
        except Exception as exc:  # a bug or an exotic library error must cost one row, not the shard
            outcome = Fetched(schemas.FAILED_TO_DOWNLOAD, error=f"unexpected: {type(exc).__name__}: {exc}")
        self._in_flight -= 1
        self._scheduler.done(job)
        self._slots.release()
        if isinstance(outcome, RetryLater):
            self._attempts[job.key] += 1
            self._retrying += 1
            self._loop.call_later(outcome.wait, self._again, job)
        else:
            self._body_bytes += len(outcome.body or b"")
            self._outcomes += 1
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


def _reuse(
    jobs: list[_Job], table: pa.Table, tar: IO[bytes], writer: TarShardWriter, blocklist: Blocklist
) -> dict[str, dict]:
    """Previous records to keep (same key, url and caption, or taken down; not failed_to_download; a key
    the crawl still has: one row per crawl row); copies their samples, but for the rows the block list
    names now: those are taken down, as a fresh download's would be, and their samples left out of the new
    tar. A row whose caption the crawl changed is fetched again: its record and its sample's `.txt` and
    `.json` would keep the old one."""
    crawled = {job.key: (job.url, job.caption) for job in jobs}
    candidates = {
        row["key"]: {"host": schemas.url_host(row["url"] or ""), **row}  # a file from before `host` lacks it
        for row in table.to_pylist()
        if row["status"] != schemas.FAILED_TO_DOWNLOAD
        and row["key"] in crawled
        and (crawled[row["key"]] == (row["url"], row["caption"]) or row["status"] == schemas.TAKEN_DOWN)
    }
    for row in candidates.values():
        if row["status"] != schemas.TAKEN_DOWN and (
            match := blocklist.match_row(row["url"], row["host"], row.get("sha256"), row.get("md5"))
        ):
            schemas.take_down(row, match.why)
    copied = set()
    for key, members in read_samples(tar):
        if key in candidates and candidates[key]["status"] == schemas.SUCCESS:
            writer.write(key, members)
            copied.add(key)
    # a success whose sample is missing from the old tar is fetched again
    return {k: row for k, row in candidates.items() if row["status"] != schemas.SUCCESS or k in copied}
