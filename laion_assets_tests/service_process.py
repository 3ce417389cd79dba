"""`laion-assets serve` as its own process, the way a user starts it."""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import urllib3
import uvicorn

TINY_MODEL_ENV = {"LAION_ASSETS_CLIP_MODEL": "laion-assets-tiny", "LAION_ASSETS_CLIP_PRETRAINED": "none"}


@dataclass(frozen=True)
class Served:
    url: str
    log_path: Path  # what the server printed: uvicorn's access log (stdout) and the rest (stderr)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serving(*args: str, model_env: dict[str, str] = TINY_MODEL_ENV) -> Iterator[Served]:
    """`laion-assets serve` with the model of `model_env` (the tiny one; none: the dataset's) on a free
    loopback port, as its own process, once it answers (the OpenAPI schema is public, key or not)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = os.path.join(os.path.dirname(sys.executable), "laion-assets")
    command = [script, "serve", "--port", str(port), *args]
    log_path = Path(tempfile.mkstemp(prefix="laion-assets-serve-", suffix=".log")[1])
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the server is
    server = subprocess.Popen(command, env={**os.environ, **model_env}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    http = urllib3.PoolManager(retries=False)
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                http.request("GET", f"{url}/openapi.json", timeout=10)
                break
            except urllib3.exceptions.HTTPError:  # not listening yet
                assert server.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, "laion-assets serve did not answer"
                time.sleep(0.2)
        yield Served(url, log_path)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        log_path.unlink()


@contextmanager
def running(app) -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
