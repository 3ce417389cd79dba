"""Service benchmark: `laion-assets serve` with the dynamic batcher on and off, on loopback.

    .venv/bin/python bench/serve.py [--model ViT-B-32] [--requests 128] [--concurrency 1,16] [--device auto]

Starts `laion-assets serve` in its own process, once with the batcher and once with `--no-batching`
(one model call per request, as a plain CLIP service answers), with the model's random weights
(nothing downloaded), and drives `/clip/embed_text` and `/clip/embed_image` with `--requests`
requests each from 1 and from 16 client threads over keep-alive connections: one caption or one image
per request (a 256 px photo-like JPEG as the downloader stores it, in base64), after a few unmeasured
warm-up requests. Prints requests/s, p50 and p99 latency, the ratio batcher on / off, and the server's
peak RSS in each mode (it is one process).

Then times exact search (`SearchIndex.search`) over `--index-rows` random normalised embeddings, the
figure behind APPROXIMATE_FROM_ROWS (search.py).

    .venv/bin/python bench/serve.py --soak 20000 [--model laion-assets-tiny]

instead sends that many mixed requests from 8 threads to one server: texts of words never seen
before (what grows a tokenizer's cache), images, compares, and bad requests (bad base64, too many
prompts, a wrong field), and prints the server's RSS every tenth of the way, the answers by status,
and fails if any was a 5xx. Memory that levels off is the point, so a small model is enough.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import WORK, make_photos
from smoke import parse_args

from laion_assets.pipeline.download.imaging import ImageSettings, process_image
from laion_assets.pipeline.search.index import SearchIndex

WARM_UP = 4
WIDTHS = (8, 10, 11, 7, 16, 16)  # after the route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, batching: bool, root: str) -> tuple[subprocess.Popen, str, dict]:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LAION_ASSETS_CLIP_MODEL": args.model,
        "LAION_ASSETS_CLIP_PRETRAINED": "none",
        "LAION_ASSETS_DEVICE": args.device,
    }
    env.pop("LAION_ASSETS_API_KEY", None)
    command = [sys.executable, "-m", "laion_assets.cli", "serve", "--port", str(port), "--root", root]
    server = subprocess.Popen(
        [*command, *([] if batching else ["--no-batching"])],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    http = urllib3.PoolManager(retries=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"laion-assets serve exited: {server.stderr.read().decode()[-3000:]}")
        try:
            info = json.loads(http.request("GET", f"{url}/info", timeout=2).data)
            return server, url, info
        except (urllib3.exceptions.HTTPError, json.JSONDecodeError):
            time.sleep(0.5)
    server.kill()
    raise SystemExit("laion-assets serve did not answer within 300 s")


def drive(url: str, path: str, bodies: list[bytes], concurrency: int) -> dict:
    """Sends every body once from `concurrency` threads; requests/s and latency percentiles."""
    http = urllib3.PoolManager(maxsize=concurrency, retries=False)

    def send(body: bytes) -> float:
        start = time.perf_counter()
        response = http.request("POST", url + path, body=body, headers={"Content-Type": "application/json"})
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}: {response.data[:300]!r}")
        return time.perf_counter() - start

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, bodies[:WARM_UP]))
        start = time.perf_counter()
        latencies = list(pool.map(send, bodies))
        seconds = time.perf_counter() - start
    return {
        "requests_per_second": len(bodies) / seconds,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def request_bodies(count: int) -> dict[str, list[bytes]]:
    photos = make_photos(WORK / "photos", min(count, 32))
    images = [base64.b64encode(process_image(p.read_bytes(), ImageSettings()).data).decode() for p in photos]
    return {
        "/clip/embed_text": [
            json.dumps({"text": f"a photo of a colourful abstract pattern, number {i}"}).encode()
            for i in range(count)
        ],
        "/clip/embed_image": [
            json.dumps({"image": {"type": "base64", "value": images[i % len(images)]}}).encode()
            for i in range(count)
        ],
    }


def time_search(rows: int, dim: int = 512, queries: int = 20) -> float:
    """p50 seconds of one exact top-10 search over `rows` random embeddings."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    keys = pa.array([str(i) for i in range(rows)])
    index = SearchIndex(pa.table({"key": keys, "url": keys, "caption": keys}), vectors, None)
    times = []
    for query in index.vectors[:queries]:
        start = time.perf_counter()
        index.search(query, 10)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50))


def soak(args: argparse.Namespace) -> None:
    """`args.soak` mixed requests; the server's RSS as they go, and the answers by status."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    image = request_bodies(1)["/clip/embed_image"][0]

    def body(i: int) -> tuple[str, bytes]:
        words = " ".join("".join(rng.choice(letters, 7)) for _ in range(6))  # new words each time
        kind = i % 10
        if kind < 6:
            return "/clip/embed_text", json.dumps({"text": f"{words} number {i}"}).encode()
        if kind < 8:
            return "/clip/embed_image", image
        if kind == 8:
            return "/clip/compare", json.dumps(
                {"subject": words, "subject_type": "text", "prompt": [words[:9]]}
            ).encode()
        bad = [
            {"image": {"type": "base64", "value": "%%%"}},
            {"subject": "a", "subject_type": "text", "prompt": ["b"] * 9},
            {"txt": "a"},
        ]
        return ("/clip/embed_image", "/clip/compare", "/clip/embed_text")[i % 3], json.dumps(
            bad[i % 3]
        ).encode()

    bodies = [body(i) for i in range(args.soak)]
    statuses: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as root:
        server, url, info = start_server(args, True, root)
        http = urllib3.PoolManager(maxsize=8, retries=False)

        def send(item: tuple[str, bytes]) -> int:
            response = http.request(
                "POST", url + item[0], body=item[1], headers={"Content-Type": "application/json"}
            )
            return response.status

        try:
            print(f"{args.model} on {info['device']}, {args.soak} requests, 8 client threads; server RSS:")
            step = max(args.soak // 10, 1)
            with ThreadPoolExecutor(8) as pool:
                for start in range(0, args.soak, step):
                    for status in pool.map(send, bodies[start : start + step]):
                        statuses[status] = statuses.get(status, 0) + 1
                    print(f"  after {start + step:>6} requests: {rss_mb(server.pid):6.0f} MB", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    print("answers by status:", dict(sorted(statuses.items())))
    errors = sum(n for status, n in statuses.items() if status >= 500)
    if errors:
        raise SystemExit(f"{errors} answers were 5xx")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak so far (VmHWM)."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith(f"{field}:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def line(*cells: object) -> str:
    """One row of the summary table: the route left-aligned, the figures right-aligned."""
    return f"{cells[0]:<18}" + "".join(f"{c:>{w}}" for c, w in zip(cells[1:], WIDTHS, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=128, help="measured requests per route and setting")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client thread counts")
    parser.add_argument("--index-rows", type=int, default=1_000_000, help="0: skip the search timing")
    parser.add_argument("--soak", type=int, default=0, help="send this many mixed requests and watch memory")
    args = parse_args(
        parser, model="laion-assets-demo", device="cpu", requests=4, concurrency="1", index_rows=2000
    )
    if args.soak:
        soak(args)
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies = request_bodies(args.requests + WARM_UP)
    results: dict[tuple[str, int, bool], dict] = {}
    peak_mb: dict[bool, float] = {}  # the server's peak RSS, batcher on and off
    with tempfile.TemporaryDirectory() as root:
        for batching in (True, False):
            server, url, info = start_server(args, batching, root)
            try:
                for path, route_bodies in bodies.items():
                    for concurrency in levels:
                        result = drive(url, path, route_bodies, concurrency)
                        results[(path, concurrency, batching)] = result
                        print(
                            f"{path:<18} c={concurrency:<3} batcher {'on ' if batching else 'off'} "
                            f"{result['requests_per_second']:>8.1f} req/s  p50 {result['p50_ms']:>8.1f} ms  "
                            f"p99 {result['p99_ms']:>8.1f} ms",
                            flush=True,
                        )
                peak_mb[batching] = rss_mb(server.pid, "VmHWM")
            finally:
                server.terminate()
                server.wait(30)
    print(f"\n{args.model}, random weights, device {info['device']}, {args.requests} requests per row")
    print(line("route", "clients", "on req/s", "off req/s", "ratio", "on p50/p99 ms", "off p50/p99 ms"))
    for path in bodies:
        for concurrency in levels:
            on, off = results[(path, concurrency, True)], results[(path, concurrency, False)]
            print(
                line(
                    path,
                    concurrency,
                    f"{on['requests_per_second']:.1f}",
                    f"{off['requests_per_second']:.1f}",
                    f"{on['requests_per_second'] / off['requests_per_second']:.2f}x",
                    f"{on['p50_ms']:.0f} / {on['p99_ms']:.0f}",
                    f"{off['p50_ms']:.0f} / {off['p99_ms']:.0f}",
                )
            )
    print(f"server peak RSS: batcher on {peak_mb[True]:,.0f} MB, off {peak_mb[False]:,.0f} MB")
    if args.index_rows:
        p50 = time_search(args.index_rows)
        print(f"\nexact search, top 10 of {args.index_rows:,} rows x 512: p50 {1000 * p50:.0f} ms")


if __name__ == "__main__":
    main()
