"""Shared fixtures: a real S3 endpoint on loopback (moto's server), local and S3 dataset roots, and
Debian's chromium driven by Playwright."""

import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Iterator

import boto3
import pytest
from moto.s3.responses import S3Response
from moto.server import ThreadedMotoServer

from laion_assets.demo import DEMO_WATERMARK_MODEL
from laion_assets.pipeline.scores.score import SETTINGS_ENV as SCORES_ENV
from laion_assets.pipeline.storage import DatasetStore
from laion_assets_tests.demo_dataset import build_demo_dataset
from laion_assets_tests.web import TestWeb

# Nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# So the watermark score reads the demo's model (timm's EfficientNet code on a tiny configuration, packaged
# with the project) rather than download LAION's, in this process and in the CLI's and services' it starts.
os.environ[SCORES_ENV["watermark_model"]] = str(DEMO_WATERMARK_MODEL)
# A test process started with SIGINT ignored (a background job of a non-interactive shell, as a CI runner
# may start `make test`) would end up with SIGTERM ignored too: Dagster's in-process execution sets
# SIGTERM's handler to SIGINT's. Every process a later test starts would inherit that, its terminate()
# would do nothing and the test would wait for it (seen: bench/download.py's servers, test_ui's dagster
# dev). Python's own SIGINT handler is a handler, so the processes started get SIGTERM's default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
BROWSER_TIMEOUT_MS = 30_000  # for each step of a page test


def chromium() -> str:
    found = next((path for path in CHROMIUM if os.path.exists(path)), None) or shutil.which("chromium")
    assert found, "the browser tests need Debian's chromium package: `make test` installs it (as root)"
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's chromium through Playwright (its own browser download needs the internet)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_put_at_a_time() -> None:
    """moto checks a conditional PUT's If-None-Match or If-Match, then writes: two steps its server's
    threads can interleave, so two runs could both create the same lease. S3 makes each conditional
    write one step; handling one PUT at a time gives moto's server that guarantee too."""
    put_object, lock = S3Response.put_object, threading.Lock()

    def atomic_put_object(self: S3Response) -> object:
        with lock:
            return put_object(self)

    S3Response.put_object = atomic_put_object


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with the AWS_* variables pointing at it."""
    _one_put_at_a_time()
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_root(s3_endpoint: str) -> str:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/datasets/laion"


@pytest.fixture
def local_root(tmp_path) -> str:
    return str(tmp_path / "data")


@pytest.fixture(params=["local", "s3"])
def root(request) -> str:
    """Each test using this runs once on a local folder and once on S3."""
    return request.getfixturevalue(f"{request.param}_root")


@pytest.fixture
def store(root: str) -> DatasetStore:
    return DatasetStore(root)


@pytest.fixture
def web() -> Iterator[TestWeb]:
    """A real HTTP server on 127.0.0.1 with images and failures (see web.py)."""
    server = TestWeb().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """Two shards of a small synthetic web embedded with the demo model, and their search index; shared,
    so read-only (copy it to change it)."""
    return build_demo_dataset(str(tmp_path_factory.mktemp("demo") / "data"))
