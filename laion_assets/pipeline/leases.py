"""One writer per shard: a lease in the store, `_leases/<shard>.json`, held while a step writes the shard;
one dataset-level removal at a time (`REMOVALS`, a name no shard can have: shard names have no dot), one
search index build at a time (`SEARCH_INDEX_BUILD`), and one run at a time adding sections to the dataset's
settings (`SETTINGS`).

A second run that reaches a shard whose lease a live writer holds gets `ShardBusy`, naming the holder,
and leaves the shard alone, so a shard's tar and its parquet always come from one run. The lease is
created exclusively and whole (a hard link locally, a conditional PUT on S3) and renewed by a thread
while held; a holder that is gone (on this host: its process ended, or its pid is now a later process's,
as in a restarted container) or silent past its expiry no longer holds it.
Taking such a lease over replaces it only if it is still the one found stale (S3: a PUT on its ETag;
locally: under an flock of the leases folder), so of two runs that found it at once, one holds it and
the other is told it is busy: removing it first, as before, could remove the lease the other had just
taken, and both would write. For the same reason a holder renews and removes its lease only while it is
its own: one whose lease was taken over while it was paused leaves it to the new holder and fails
(`LeaseLost`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator

from laion_assets.pipeline.storage import LEASES, DatasetStore, host_name, temporary_name, writer_gone

LEASE_SECONDS = 600.0  # how long a lease holds without renewal
RENEW_SECONDS = 60.0
REMOVALS = "dataset.removals"  # held by the takedowns and duplicates assets while they remove
SETTINGS = "dataset.settings"  # held while a run adds the sections the settings file lacks
# held by the search_index asset: two builds at once removed each other's FAISS build folder
SEARCH_INDEX_BUILD = "dataset.search_index"


class ShardBusy(RuntimeError):
    """Another live run is writing this shard."""


class LeaseLost(RuntimeError):
    """Another run took this run's lease over as stale while this run held it."""


def holder(store: DatasetStore, shard: str) -> dict | None:
    """The live holder of the shard's lease (host, pid, owner, expires), or None."""
    record = _read(store, shard)
    return record if record is not None and _alive(record) else None


def holders(store: DatasetStore, shards: Iterable[str]) -> dict[str, dict]:
    """The live holders of the leases of `shards` that have one (shard -> its holder): one listing of the
    leases, then a read of each lease found."""
    wanted = set(shards)
    leased = [f.name.removesuffix(".json") for f in store.list(LEASES) if f.name.endswith(".json")]
    found = {shard: holder(store, shard) for shard in leased if shard in wanted}
    return {shard: record for shard, record in found.items() if record is not None}


def describe(record: dict) -> str:
    return f"run {record.get('owner', '?')} (host {record.get('host', '?')}, pid {record.get('pid', '?')})"


@contextlib.contextmanager
def shard_lease(
    store: DatasetStore, shard: str, owner: str, wait: float = 0.0, poll: float = 1.0
) -> Iterator[None]:
    """Hold the shard's lease for `owner` (a run id) while the block runs; ShardBusy if a live writer
    holds it after `wait` seconds of asking again every `poll` seconds. A lease left by a writer that is
    gone is taken over."""
    deadline = time.monotonic() + wait
    while True:
        try:
            _take(store, shard, owner)
            break
        except ShardBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(poll, wait))
    path = _path(shard)
    done = threading.Event()
    taken_by: list[dict] = []  # the run that took the lease over while this one held it

    def renew() -> None:
        while not done.wait(RENEW_SECONDS) and not taken_by:
            with contextlib.suppress(Exception):  # a missed renewal only brings the expiry nearer
                _renew(store, path, owner, taken_by)

    thread = threading.Thread(target=renew, daemon=True, name=f"lease-{shard}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        found = _read_version(store, path)
        if found is not None and not _ours(found[0], owner):
            taken_by.append(found[0])
        if not taken_by:
            store.remove(path)
    if taken_by:  # its lease is left to the run that has it now
        raise LeaseLost(
            f"{shard}: this run's lease went to {describe(taken_by[0])} while this run wrote, after "
            f"{LEASE_SECONDS:g} s without renewal (a paused process?): both may have written it"
        )


def _renew(store: DatasetStore, path: str, owner: str, taken_by: list[dict]) -> None:
    """The lease's expiry moved on, if it is still this process's; else who has it goes on `taken_by`
    (renewing would take it back from a run that took it over as stale, and both would write)."""
    found = _read_version(store, path)
    if found is not None and _ours(found[0], owner):
        if _replace(store, path, found[1], _record(owner)):
            return
        found = _read_version(store, path)  # replaced between the read and the write
    if found is not None and not _ours(found[0], owner):
        taken_by.append(found[0])


def _ours(record: dict, owner: str) -> bool:
    return (record.get("owner"), record.get("host"), record.get("pid")) == (owner, host_name(), os.getpid())


def _take(store: DatasetStore, shard: str, owner: str) -> None:
    path = _path(shard)
    found = _read_version(store, path)
    if found is None:
        if not _create(store, path, _record(owner)):
            raise ShardBusy(f"{shard} is being written by {describe(_read(store, shard) or {})}")
        return
    stale, version = found
    if _alive(stale):
        raise ShardBusy(f"{shard} is being written by {describe(stale)}: left alone by this run")
    if not _replace(store, path, version, _record(owner)):  # another run took it over first
        raise ShardBusy(f"{shard} is being written by {describe(_read(store, shard) or {})}")


def _path(shard: str) -> str:
    return f"{LEASES}/{shard}.json"


def _record(owner: str) -> dict:
    return {"owner": owner, "host": host_name(), "pid": os.getpid(), "expires": time.time() + LEASE_SECONDS}


def _read(store: DatasetStore, shard: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(_path(shard)))  # whole, though its holder may be renewing it
    except (FileNotFoundError, ValueError):  # none, or one being written
        return None


def _read_version(store: DatasetStore, path: str) -> tuple[dict, str | bytes] | None:
    """The lease at `path` and what names this version of it (S3: its ETag; locally: its bytes); None if
    there is none, or one being written or replaced as it is read."""
    try:
        if store.is_s3:
            with store.open(path) as f:  # s3fs reads the version whose ETag it saw, or fails
                data, version = f.read(), f.details["ETag"]
        else:
            data = version = store.read_bytes(path)
        return json.loads(data), version
    except (OSError, ValueError):
        return None


def _alive(record: dict) -> bool:
    expires = float(record.get("expires", 0))
    written = expires - LEASE_SECONDS  # its last renewal
    return not writer_gone(record.get("host", ""), int(record.get("pid", 0)), time.time() >= expires, written)


def _create(store: DatasetStore, path: str, record: dict) -> bool:
    """Write `record` at `path` only if nothing is there; False if something is."""
    data = json.dumps(record).encode()
    if store.is_s3:
        bucket, _, key = store.path(path).partition("/")
        try:
            store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except FileExistsError:  # s3fs's name for S3's 412 PreconditionFailed: another writer's is there
            return False
        return True
    target = store.path(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # written whole under a temporary name, then linked to the lease's name only if that is free: a lease
    # created empty and then written (O_EXCL) stayed cut where its writer was killed or the disk was full,
    # unreadable, so no later run could take it over; a temporary file left is removed as abandoned
    tmp = temporary_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.link(tmp, target)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return True


def _replace(store: DatasetStore, path: str, version: str | bytes, record: dict) -> bool:
    """Write `record` at `path` only if the lease there is still `version`; False if it is not."""
    data = json.dumps(record).encode()
    if store.is_s3:
        bucket, _, key = store.path(path).partition("/")
        try:
            store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
        except FileNotFoundError:  # removed meanwhile
            return False
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # s3fs's name for S3's 412 PreconditionFailed: replaced meanwhile
                return False
            raise
        return True
    folder = os.open(os.path.dirname(store.path(path)), os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # one taker at a time; the lock ends with its process
        try:
            if store.read_bytes(path) != version:
                return False
        except FileNotFoundError:
            return False
        store.write_bytes(path, data)  # a rename over the stale lease: the path is never without one
        return True
    finally:
        os.close(folder)
