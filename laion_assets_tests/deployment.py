"""A production-shaped Dagster deployment on this machine, as separate processes: a real PostgreSQL
server from the machine's binaries, a gRPC code server, `dagster-webserver` and `dagster-daemon`, all
on `deploy/dagster.yaml`."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import urllib3
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
PG_USER = "dagster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """The first truthy value of `condition()`, polled until `timeout` seconds; AssertionError after."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)


def postgres_bin() -> Path:
    """The folder of initdb and pg_ctl; AssertionError saying how to get them when there are none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or (
        [shutil.which("initdb")] if shutil.which("initdb") else []
    )
    assert found, (
        "the deployment test needs PostgreSQL's initdb and pg_ctl: `make test` installs Debian's "
        "postgresql package when it can (apt-get install postgresql), or install it yourself"
    )
    return Path(found[-1]).parent


class Postgres:
    """A PostgreSQL server of our own in `folder`, on a free port of 127.0.0.1, trusting local logins.

    PostgreSQL refuses to run as root; as root, the server runs as the `postgres` user."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        # its own folder outside pytest's (which only root may enter), owned by the server's user
        self.folder = Path(tempfile.mkdtemp(prefix="laion-assets-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.log = self.folder / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self._as_user, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command[0]} failed: {done.stdout}{done.stderr}"

    def start(self) -> Postgres:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c max_connections=200"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads its storage from."""
        return {
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_PORT": str(self.port),
            "DAGSTER_POSTGRES_USER": PG_USER,
            "DAGSTER_POSTGRES_PASSWORD": "",
            "DAGSTER_POSTGRES_DB": "postgres",
        }


def dagster_home(folder: Path, max_concurrent_runs: int) -> Path:
    """DAGSTER_HOME with deploy/dagster.yaml as it ships, but for the run limit (a small machine's)."""
    home = folder / "dagster_home"
    home.mkdir(parents=True)
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    instance["concurrency"]["runs"]["max_concurrent_runs"] = max_concurrent_runs
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance, sort_keys=False))
    return home


class Deployment:
    """The code server, the webserver and the daemon, each its own process, logs under `folder`."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.code_port, self.web_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.workspace = folder / "workspace.yaml"
        grpc = {"host": "127.0.0.1", "port": self.code_port, "location_name": "laion_assets"}
        self.workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": grpc}]}))
        self._stack = ExitStack()
        self.http = urllib3.PoolManager(retries=False)

    def _start(self, name: str, *command: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - closed with the stack
        self._stack.callback(log.close)
        process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder
        )

        def stop() -> None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

        self._stack.callback(stop)
        return process

    def start(self) -> Deployment:
        """The three servers, each up; a server that does not come up stops those already started."""
        try:
            code_server = self._start(
                "code_server",
                str(BIN / "dagster"),
                "code-server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.code_port),
                "--module-name",
                "laion_assets.definitions",
                "--location-name",
                "laion_assets",
            )
            self._wait_up("code_server", code_server, lambda: listening(self.code_port))
            webserver = self._start(
                "webserver",
                str(BIN / "dagster-webserver"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.web_port),
                "--workspace",
                str(self.workspace),
            )
            self._start("daemon", str(BIN / "dagster-daemon"), "run", "--workspace", str(self.workspace))
            self._wait_up("webserver", webserver, self._webserver_up)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_up(self, name: str, process: subprocess.Popen, condition: Callable[[], object]) -> None:
        """Waits for `condition`; AssertionError with the log's tail as soon as `process` exits instead."""

        def up() -> object:
            exited = process.poll()
            assert exited is None, f"the {name} exited with {exited}: {self.log(name)[-2000:]}"
            return condition()

        wait_for(up, 120, f"the {name}")

    def stop(self) -> None:
        self._stack.close()

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def _webserver_up(self) -> bool:
        try:
            return self.http.request("GET", f"{self.url}/server_info", timeout=5).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        response = self.http.request(
            "POST",
            f"{self.url}/graphql",
            body=body,
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        assert response.status == 200, response.data[:2000]
        answer = response.json()
        assert "errors" not in answer, answer["errors"]
        return answer["data"]
