"""Fault injection: a real `laion-assets run` SIGKILLed inside each step, found from the files the step
writes, then run again; the root must hold what one clean run leaves, and nothing else."""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from laion_assets.demo import DEMO_CAPTION_CHECKPOINT, DEMO_CAPTION_MODEL, DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.run import DEMO_DEDUP_CONFIG, DOWNLOAD_CONFIG, demo_copies, write_sources
from laion_assets.demo.web import WorldWeb
from laion_assets.demo.world import make_world
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import (
    CRAWL_METADATA,
    DEDUP_STAGED,
    DUPLICATES,
    EMBEDDINGS,
    IMAGES,
    INCOMING,
    LEASES,
    PAIRS,
    PAIRS_EMBEDDINGS,
    RECAPTIONS,
    SCORES,
    SEARCH_INDEX,
    TAKEDOWNS,
    TAKEDOWNS_PENDING,
    WRITERS,
    DatasetStore,
    Export,
    host_name,
)

IMAGES_IN_WORLD = 40
SHARDS = ("synthetic-web-0", "synthetic-web-1")
FIRST = SHARDS[0]
EXPORT = "all"
RUN_CONFIG = {
    "ops": {
        "downloaded_images": {"config": DOWNLOAD_CONFIG},
        "filtered_pairs": {"config": {"write_embeddings": True}},
        "duplicates": {"config": DEMO_DEDUP_CONFIG},
        "training_shards": {"config": {"exports": [{"name": EXPORT, "shard_size": 8}]}},
    }
}
ENV = {
    "LAION_ASSETS_CLIP_MODEL": DEMO_MODEL,
    "LAION_ASSETS_CLIP_PRETRAINED": str(DEMO_CHECKPOINT),
    "LAION_ASSETS_CAPTION_MODEL": DEMO_CAPTION_MODEL,
    "LAION_ASSETS_CAPTION_PRETRAINED": str(DEMO_CAPTION_CHECKPOINT),
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def slow_web() -> Iterator[WorldWeb]:
    """The demo's world with its planted copies, each answer after 0.3 s: downloads take seconds."""
    world = make_world(images=IMAGES_IN_WORLD, copies=demo_copies(IMAGES_IN_WORLD))
    with WorldWeb(world, first_byte_delay=0.3) as web:
        yield web


def _command(root: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "laion_assets.cli", "run", "--root", root, "--config", str(config)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "LAION_ASSETS_ROOT")}
    return {**env, **ENV}


def _run(store: DatasetStore, config: Path, cwd: Path) -> int:
    """`laion-assets run` to its end (in `cwd`: an S3 root's catalog file goes to the working folder)."""
    command = _command(store.root, config)
    done = subprocess.run(command, env=_env(), cwd=cwd, capture_output=True, text=True, check=False)
    print(done.stdout, done.stderr)
    return done.returncode


def _new_root(root: str, web: WorldWeb) -> DatasetStore:
    store = DatasetStore(root)
    write_sources(store, web.rows(), shards=len(SHARDS))
    return store


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump(RUN_CONFIG))
    return path


@pytest.fixture(scope="module")
def clean(slow_web, config, tmp_path_factory) -> DatasetStore:
    """One clean run."""
    store = _new_root(str(tmp_path_factory.mktemp("clean") / "data"), slow_web)
    done = subprocess.run(
        _command(store.root, config), env=_env(), capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return store


def _exists(root: Path, relpath: str) -> bool:
    return (root / relpath).exists()


def _s3_moment(store: DatasetStore, step: str) -> bool:
    """On S3: the first shard's lease taken before its images (the crawl or download step), or a
    removal's pending ledger (dedup's)."""
    if step == "download":
        return store.exists(f"{LEASES}/{FIRST}.json") and not store.exists(IMAGES.parquet(FIRST))
    return bool(store.list(TAKEDOWNS_PENDING))


def _temporary_in(root: Path, folder: str) -> bool:
    path = root / folder
    return path.is_dir() and any(".tmp-" in entry.name for entry in os.scandir(path))


def _leased(root: Path) -> bool:
    return _exists(root, f"{LEASES}/{FIRST}.json")


# Where to kill: a test of the root true only while the step is under way.
MOMENTS: dict[str, Callable[[Path], bool]] = {
    "download": lambda root: _temporary_in(root, IMAGES.name),
    "embeddings": lambda root: (
        _leased(root)
        and _exists(root, IMAGES.parquet(FIRST))
        and not _exists(root, EMBEDDINGS.parquet(FIRST))
    ),
    "pairs": lambda root: (
        _leased(root) and _exists(root, EMBEDDINGS.parquet(FIRST)) and not _exists(root, PAIRS.parquet(FIRST))
    ),
    "recaptions": lambda root: (
        _leased(root) and _exists(root, PAIRS.parquet(FIRST)) and not _exists(root, RECAPTIONS.parquet(FIRST))
    ),
    "duplicates": lambda root: _exists(root, TAKEDOWNS_PENDING) and any(os.scandir(root / TAKEDOWNS_PENDING)),
    "catalog": lambda root: any(".catalog.duckdb.tmp-" in e.name for e in os.scandir(root)),
    "card": lambda root: _temporary_in(root, "card") or _temporary_in(root, "card/figures"),
    "search_index": lambda root: _temporary_in(root, "search_index"),
}


def _killed_at(command: list[str], cwd: Path, moment: Callable[[], bool]) -> bool:
    """Run `command`, SIGKILL it the moment `moment()` holds; False if it ended first."""
    process = subprocess.Popen(
        command, env=_env(), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if moment():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
        except FileNotFoundError:  # a folder that appeared and went between two looks
            pass
        time.sleep(0.0005)
    process.wait()
    return False


def _samples(store: DatasetStore, path: str) -> dict[str, dict[str, bytes]]:
    with store.open(path) as f:
        return dict(read_samples(f))


def _rows(store: DatasetStore, path: str) -> list[dict]:
    return store.read_parquet(path).to_pylist() if store.exists(path) else []


def _export_shards(store: DatasetStore) -> tuple[list[str], bytes, list[str]]:
    """The export's files, its sizes.json and its keys, each shard's tar holding its parquet's keys. Which
    shard holds a key is left out: the shuffle takes each source's samples in its pairs tar's order, the
    order its downloads ended in."""
    export = Export(EXPORT)
    keys = []
    for shard in json.loads(store.read_bytes(export.manifest))["shards"]:
        in_tar = list(_samples(store, export.tar(shard["shard"])))
        in_parquet = store.read_parquet(export.parquet(shard["shard"]), columns=["key"]).column("key")
        assert in_tar == in_parquet.to_pylist() and len(in_tar) == shard["samples"], shard
        keys += in_tar
    return [f.name for f in store.list(export.folder)], store.read_bytes(export.sizes), sorted(keys)


def assert_as_one_clean_run(store: DatasetStore, clean: DatasetStore) -> None:
    """Every layer holds the clean run's rows, no temporary file, lease, writer or pending ledger is
    left, each removal is in the ledgers once, the export holds the clean run's samples, and the catalog and
    search index agree with the pairs."""
    assert [path for path in store.fs.find(store.path("")) if ".tmp-" in path] == []
    if store.is_s3:
        bucket, _, prefix = store.path("").partition("/")
        assert not store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads")
    assert not store.list(LEASES) and not store.list(TAKEDOWNS_PENDING) and not store.list(DEDUP_STAGED)
    this_test = f"{host_name()}-{os.getpid()}-"  # the writer of the sources, alive
    assert [entry.name for entry in store.list(WRITERS) if not entry.name.startswith(this_test)] == []
    for shard in SHARDS:
        for layer in (CRAWL_METADATA, IMAGES, EMBEDDINGS, PAIRS, PAIRS_EMBEDDINGS, RECAPTIONS):
            assert _rows(store, layer.parquet(shard)) == _rows(clean, layer.parquet(shard)), (layer, shard)
        # the scores of the same rows: the images are scored in the order their downloads ended, and the
        # watermark model's convolutions over a batch in another order may end in other last bits
        scores = [s.read_parquet(SCORES.parquet(shard), columns=["key", "language"]) for s in (store, clean)]
        assert scores[0] == scores[1], shard
        for layer in (IMAGES, PAIRS):  # the same samples, byte for byte (downloads end in any order)
            assert _samples(store, layer.tar(shard)) == _samples(clean, layer.tar(shard)), (layer, shard)
    found = "SELECT key, kind, duplicate_of FROM duplicates ORDER BY key"
    connection, clean_connection = catalog.connect(store), catalog.connect(clean)
    assert connection.sql(found).fetchall() == clean_connection.sql(found).fetchall()
    ledger = "SELECT reason, count(*), count(DISTINCT key) FROM takedowns GROUP BY 1 ORDER BY 1"
    assert connection.sql(ledger).fetchall() == clean_connection.sql(ledger).fetchall()
    assert all(n == distinct for _, n, distinct in connection.sql(ledger).fetchall())
    assert _export_shards(store) == _export_shards(clean)
    pairs = {key for (key,) in connection.sql("SELECT key FROM pairs").fetchall()}
    index = set(store.read_parquet(SEARCH_INDEX, columns=["key"]).column("key").to_pylist())
    assert index == pairs and store.exists(DUPLICATES) and store.list(TAKEDOWNS)


@pytest.mark.parametrize(
    ("kind", "step"), [*(("local", step) for step in MOMENTS), ("s3", "download"), ("s3", "duplicates")]
)
def test_a_run_killed_inside_a_step_then_run_again_leaves_what_one_clean_run_leaves(
    kind, step, slow_web, config, clean, tmp_path, request
):
    for attempt in range(3):  # a short step can end between two looks; try it on a new root
        if kind == "s3":
            store = _new_root(request.getfixturevalue("s3_root") + f"/{attempt}", slow_web)
            moment = functools.partial(_s3_moment, store, step)
        else:
            store = _new_root(str(tmp_path / f"data-{attempt}"), slow_web)
            moment = functools.partial(MOMENTS[step], Path(store.root))
        if _killed_at(_command(store.root, config), tmp_path, moment):
            break
    else:
        pytest.fail(f"the run ended 3 times before it could be killed in {step}")
    assert store.list(INCOMING)
    assert _run(store, config, tmp_path) == 0
    assert_as_one_clean_run(store, clean)


# A run that SIGKILLs itself at one write of the store, in its own process: "before" the write of the
# first path matching the pattern begins, "inside" it (written whole, not yet renamed or completed), or
# "after" it is committed, before whatever the run writes next.
_KILLED_AT_WRITE = textwrap.dedent(
    """
    import contextlib, fnmatch, os, runpy, signal, sys
    from laion_assets.pipeline.storage import DatasetStore
    when, pattern = sys.argv.pop(1), sys.argv.pop(1)
    atomic_write = DatasetStore.atomic_write

    @contextlib.contextmanager
    def killed_at(self, relpath):
        hit = fnmatch.fnmatchcase(relpath, pattern)
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        with atomic_write(self, relpath) as f:
            yield f
            if hit and when == "inside":
                os.kill(os.getpid(), signal.SIGKILL)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    DatasetStore.atomic_write = killed_at
    runpy.run_module("laion_assets.cli", run_name="__main__", alter_sys=True)
    """
)
# Kill points between two writes that must agree.
KILL_POINTS = {
    "pairs_embeddings, after the pairs": ("before", PAIRS_EMBEDDINGS.parquet(FIRST)),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_at_a_write_then_run_again_leaves_what_one_clean_run_leaves(
    point, slow_web, config, clean, tmp_path
):
    when, pattern = KILL_POINTS[point]
    store = _new_root(str(tmp_path / "data"), slow_web)
    command = [sys.executable, "-c", _KILLED_AT_WRITE, when, pattern, *_command(store.root, config)[3:]]
    killed = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr  # it reached the write
    assert _run(store, config, tmp_path) == 0
    assert_as_one_clean_run(store, clean)
