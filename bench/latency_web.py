"""A web with real latency for bench/download.py: one asyncio process serves a folder's photos under many
loopback hosts, each answer as late and as slow as a distant server's.

    python bench/latency_web.py --port 8732 --hosts 200 --folder PHOTOS [--seed 0] [--median 0.25]
        [--sigma 1.0] [--cap 4] [--rate 2e6] [--hang 0] [--fail 0.02] [--series FILE]

It listens on the same port on `--hosts` addresses from 127.0.0.2 on (`host_address`; Linux routes all of
127/8 to lo) and serves `/i/<n>.jpg` as the n-th file of the folder (sorted by name; n modulo their
number); any other path is a 404. What a URL gets is fixed by a seeded hash of its host and path (`plan`),
so every tool, and the bench's bound, meets the same web:
- the first byte after a lognormal delay: median `--median` s; `--sigma` 1.0 puts p95 at 5.2x the median
  (1.3 s for 0.25 s); never over `--cap` s;
- the body at `--rate` bytes/s per connection, in 16 KB chunks;
- a `--hang` share of URLs read the request and never answer, holding the connection until the client
  leaves;
- a `--fail` share answer 404 (half of them), 500 or 503, after their delay.
HTTP/1.1 with keep-alive (a client's `Connection: close`, or HTTP/1.0, closes after the answer). Every
100 ms it appends `<unix time> <requests in flight>` to `--series`, so the bench can tell how many requests
each tool kept going. It prints `listening` once every address is bound, which `start` (running it as a
subprocess) waits for. Uses uvloop when it is importable, else plain asyncio.

`--smoke` (for CI, bench/smoke.py) starts it on 2 hosts through `start` and checks a few answers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import ipaddress
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

from smoke import parse_args

CHUNK = 16 * 1024
SAMPLE_SECONDS = 0.1
FAILURES = (404, 404, 500, 503)  # a failing URL's status, picked by its hash
FIRST_HOST = ipaddress.IPv4Address("127.0.0.2")
IMAGE_PATH = re.compile(r"/i/(\d+)\.jpg")


@dataclass(frozen=True)
class Latency:
    """How the web answers; the defaults are the bench's usual web."""

    median: float = 0.25  # seconds to the first byte, the median URL's
    sigma: float = 1.0  # of the delay's logarithm
    cap: float = 4.0  # no delay is longer
    rate: float = 2e6  # bytes/s of a body, per connection
    hang: float = 0.0  # share of URLs that never answer
    fail: float = 0.02  # share of URLs that answer 404, 500 or 503
    seed: int = 0


@dataclass(frozen=True)
class Answer:
    delay: float  # seconds from the request to the first byte
    status: int | None  # None: never answers


def host_address(index: int) -> str:
    """The address of host `index` (from 0): 127.0.0.2, 127.0.0.3, ..., 127.0.1.0, ..."""
    return str(FIRST_HOST + index)


def plan(latency: Latency, host: str, path: str) -> Answer:
    """The answer to `path` on `host` (`address:port`, as in the URL): the same for every client and run."""
    digest = hashlib.blake2b(f"{latency.seed} {host} {path}".encode(), digest_size=32).digest()
    # four uniforms in (0, 1), 53 bits each (exact as floats, never 0 or 1)
    delay_u, hang_u, fail_u, status_u = (
        ((int.from_bytes(digest[i : i + 8], "big") >> 11) + 0.5) / 2**53 for i in range(0, 32, 8)
    )
    delay = min(latency.cap, latency.median * math.exp(latency.sigma * NormalDist().inv_cdf(delay_u)))
    if hang_u < latency.hang:
        return Answer(delay, None)
    if fail_u < latency.fail:
        return Answer(delay, FAILURES[int(status_u * len(FAILURES))])
    return Answer(delay, 200 if IMAGE_PATH.fullmatch(path) else 404)


def photo_index(path: str, photos: int) -> int:
    """Which of `photos` files an image path (`/i/<n>.jpg`, as `plan` answers 200) serves."""
    match = IMAGE_PATH.fullmatch(path)
    assert match, path
    return int(match.group(1)) % photos


def photo_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


class Web:
    """The connections' handler and the count of requests in flight."""

    def __init__(self, latency: Latency, photos: list[bytes]) -> None:
        self.latency = latency
        self.photos = photos
        self.in_flight = 0

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address, port = writer.get_extra_info("sockname")[:2]
        host = f"{address}:{port}"
        try:
            keep_alive = True
            while keep_alive:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                _, target, version = head[0].split(" ", 2)
                headers = dict(line.lower().partition(":")[::2] for line in head[1:] if line)
                connection = headers.get("connection", "").strip()
                keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
                self.in_flight += 1
                try:
                    answered = await self.answer(reader, writer, host, target.split("?")[0], keep_alive)
                finally:
                    self.in_flight -= 1
                keep_alive = keep_alive and answered
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # the client left, or sent what is not HTTP
        finally:
            writer.close()

    async def answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        path: str,
        keep_alive: bool,
    ) -> bool:
        """Answers one request as `plan` says; False when it did not (a hanging URL, the client gone)."""
        planned = plan(self.latency, host, path)
        if planned.status is None:
            while await reader.read(CHUNK):
                pass
            return False
        await asyncio.sleep(planned.delay)
        if planned.status == 200:
            body, kind = self.photos[photo_index(path, len(self.photos))], "image/jpeg"
        else:
            body, kind = f"{planned.status} {http.client.responses[planned.status]}\n".encode(), "text/plain"
        head = [
            f"HTTP/1.1 {planned.status} {http.client.responses[planned.status]}",
            f"Content-Type: {kind}",
            f"Content-Length: {len(body)}",
        ]
        if not keep_alive:
            head.append("Connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        loop = asyncio.get_running_loop()
        started = loop.time()
        for end in range(CHUNK, len(body) + CHUNK, CHUNK):
            await asyncio.sleep(started + min(end, len(body)) / self.latency.rate - loop.time())
            writer.write(body[end - CHUNK : end])
            await writer.drain()
        return True

    async def record(self, series: Path) -> None:
        """Appends `<unix time> <requests in flight>` to `series` every SAMPLE_SECONDS."""
        with series.open("a") as out:
            while True:
                out.write(f"{time.time():.3f} {self.in_flight}\n")
                out.flush()
                await asyncio.sleep(SAMPLE_SECONDS)


async def serve(web: Web, port: int, hosts: int, series: Path | None) -> None:
    server = await asyncio.start_server(
        web.connection, host=[host_address(i) for i in range(hosts)], port=port, backlog=4096
    )
    print("listening", flush=True)
    if series:
        await asyncio.gather(server.serve_forever(), web.record(series))
    else:
        await server.serve_forever()


def start(
    folder: Path, port: int, hosts: int, latency: Latency, series: Path | None = None
) -> subprocess.Popen:
    """This server as a subprocess, returned once it listens on every address."""
    command = [sys.executable, __file__, "--port", str(port), "--hosts", str(hosts), "--folder", str(folder)]
    for name, value in asdict(latency).items():
        command += [f"--{name}", str(value)]
    if series:
        command += ["--series", str(series)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "listening":
        process.kill()
        raise SystemExit(f"latency_web.py did not start on port {port} (exit code {process.wait()})")
    return process


def check_a_few(port: int, hosts: int) -> None:
    """--smoke: the server through `start`; on each host, each answer as `plan` says, and none sooner than
    planned (a busy machine makes an answer later, never sooner, so no upper bound is asserted)."""
    latency = Latency(median=0.05, cap=0.3, rate=1e6, fail=0.2)
    with tempfile.TemporaryDirectory() as folder:
        sizes = [40_000, 3_000]
        for i, size in enumerate(sizes):
            (Path(folder) / f"photo-{i}.jpg").write_bytes(bytes(size))
        server = start(Path(folder), port, hosts, latency)
        try:
            for index in range(hosts):
                host = f"{host_address(index)}:{port}"
                connection = http.client.HTTPConnection(host, timeout=5)  # one, kept alive
                for path in ("/i/0.jpg", "/i/1.jpg", "/i/7.jpg", "/robots.txt"):
                    planned = plan(latency, host, path)
                    began = time.perf_counter()
                    connection.request("GET", path)
                    response = connection.getresponse()
                    body = response.read()
                    took = time.perf_counter() - began
                    expected = planned.delay + len(body) / latency.rate
                    print(
                        f"{host}{path}: {response.status} in {took:.3f} s, planned {planned.status} in "
                        f"{expected:.3f} s"
                    )
                    assert response.status == planned.status, (response.status, planned)
                    assert took > expected - 0.01, (took, expected)
                    if response.status == 200:
                        assert len(body) == sizes[photo_index(path, len(sizes))]
                connection.close()
        finally:
            server.terminate()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8732)
    parser.add_argument("--hosts", type=int, default=200, help="addresses from 127.0.0.2 on")
    parser.add_argument("--folder", type=Path, help="the files served as /i/<n>.jpg")
    parser.add_argument("--series", type=Path, help="appends `<unix time> <requests in flight>` to it")
    defaults = Latency()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parse_args(parser, hosts=2)
    if args.smoke:
        check_a_few(args.port, args.hosts)
        return
    if args.folder is None:
        parser.error("--folder is required")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per host and per connection
    latency = Latency(**{name: getattr(args, name) for name in asdict(defaults)})
    web = Web(latency, [path.read_bytes() for path in photo_files(args.folder)])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(web, args.port, args.hosts, args.series))
    else:
        uvloop.run(serve(web, args.port, args.hosts, args.series))


if __name__ == "__main__":
    main()
