"""Download benchmark: the downloaded_images stage against img2dataset, same photos, same settings.

    .venv/bin/python bench/download.py [--images 3000] [--shards 2] [--threads 32]
        [--corpora small,large] [--servers nginx,photo]

Generates photo-like JPEGs, small (480-640 px, about 100 KB, the web's usual image) and large
(640-2400 px, hundreds of KB), serves them from a separate process on 127.0.0.1 (nginx with
keep-alive, bench/photo_server.py with keep-alive and sendfile, or Python's http.server), and
downloads the same URLs, split into --shards files, with img2dataset (installed by this script into
its own venv under bench/.work/) and with `laion-assets run`. Both resize to 256 with border, encode
JPEG quality 95 and write webdataset, with the same threads in all: img2dataset as 2 processes x
threads/2. Prints wall time, images/s, peak memory (RSS summed over the process tree) and the
ratio. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from peers import WORK, ensure_peer
from PIL import Image
from smoke import parse_args

# corpus -> (widths, grain): large photos of 85 KB to 2.2 MB, or small web images of about 100 KB
CORPORA = {"large": ((640, 2400), (10, 10)), "small": ((480, 640), (10, 14))}


def make_photos(folder: Path, distinct: int, corpus: str = "large", seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: a smooth colour field with fine grain, quality 90, sized as `CORPORA` says."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (low, high), (grain_low, grain_high) = CORPORA[corpus]
    paths = []
    for i in range(distinct):
        path = folder / f"photo-{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        width = int(rng.integers(low, high + 1))
        height = min(high, int(width * rng.choice([0.56, 0.67, 0.75, 1.0, 1.33])))
        field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        grain = rng.normal(0, rng.uniform(grain_low, grain_high), (height, width, 3))
        pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        path.write_bytes(out.getvalue())
    return paths


NGINX_CONF = """daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_timeout 65; keepalive_requests 100000;
  client_body_temp_path {work}/nginx-tmp; proxy_temp_path {work}/nginx-tmp;
  fastcgi_temp_path {work}/nginx-tmp; uwsgi_temp_path {work}/nginx-tmp; scgi_temp_path {work}/nginx-tmp;
  types {{ image/jpeg jpg; }}
  server {{ listen 127.0.0.1:{port}; root {folder}; }} }}
"""


def serve(folder: Path, port: int, server: str) -> subprocess.Popen:
    """A static server of `folder` on 127.0.0.1:`port`: photo_server.py, Python's http.server or nginx."""
    if server == "nginx":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise SystemExit("--servers nginx needs nginx (Debian: apt-get install nginx-light)")
        (WORK / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        conf = WORK / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=WORK, port=port, folder=folder))
        command = [nginx, "-c", str(conf), "-p", str(WORK)]
    elif server == "http.server":
        command = [sys.executable, "-m", "http.server", str(port), "-b", "127.0.0.1", "-d", str(folder)]
    else:
        command = [sys.executable, str(Path(__file__).parent / "photo_server.py"), str(port), str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    if process.poll() is not None:
        raise SystemExit(f"{server} did not start on port {port}")
    return process


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def timed(command: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak tree RSS and output of a command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.2):
            peak = max(peak, tree_rss_bytes(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{output[-3000:]}")
    return seconds, peak, output


def count_successes_img2dataset(folder: Path) -> int:
    return sum(
        pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
        for p in folder.glob("*.parquet")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--distinct", type=int, default=300, help="distinct photos behind the URLs")
    parser.add_argument("--threads", type=int, default=32, help="total download threads for each tool")
    parser.add_argument("--shards", type=int, default=2, help="URL files (shards) the URLs are split into")
    parser.add_argument("--corpora", default="small,large", help=f"comma-separated, of {', '.join(CORPORA)}")
    parser.add_argument(
        "--servers", default="nginx,photo", help="comma-separated, of nginx, photo, http.server"
    )
    parser.add_argument("--port", type=int, default=8731)
    args = parse_args(parser, images=40, distinct=8, corpora="small", servers="photo")
    img2dataset = ensure_peer("img2dataset", ["img2dataset"])
    print(
        f"machine: {os.cpu_count()} cores; {args.images} URLs, {args.shards} shards, {args.threads} threads"
    )
    columns = ("ok", "wall s", "images/s", "peak MB", "ratio")
    print(f"{'corpus':<7}{'server':<13}{'tool':<14}" + "".join(f"{c:>9}" for c in columns))
    for corpus in args.corpora.split(","):
        for server in args.servers.split(","):
            compare(corpus, server, img2dataset, args)


def compare(corpus: str, server_name: str, img2dataset: Path, args) -> None:
    """img2dataset and `laion-assets run` on the same URLs of `corpus`, served by `server_name`."""
    photos = make_photos(WORK / f"photos-{corpus}", args.distinct, corpus)
    site = WORK / "site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for i in range(args.images):
        os.symlink(photos[i % len(photos)], site / f"{i}.jpg")
    sizes = [p.stat().st_size for p in photos]
    label = f"{corpus} ({np.mean(sizes) / 1024:.0f} KB mean, {min(sizes) // 1024}-{max(sizes) // 1024} KB)"
    urls = [f"http://127.0.0.1:{args.port}/{i}.jpg" for i in range(args.images)]
    url_list = pa.table({"url": urls, "caption": [f"photo number {i}" for i in range(args.images)]})
    per_shard = -(-args.images // args.shards)
    server = serve(site, args.port, server_name)
    try:
        i2d_out = WORK / "img2dataset-out"
        shutil.rmtree(i2d_out, ignore_errors=True)
        pq.write_table(url_list, WORK / "urls.parquet")
        i2d_seconds, i2d_peak, _ = timed(
            [
                str(img2dataset),
                "--url_list",
                str(WORK / "urls.parquet"),
                "--input_format",
                "parquet",
                "--url_col",
                "url",
                "--caption_col",
                "caption",
                "--output_format",
                "webdataset",
                "--output_folder",
                str(i2d_out),
                "--processes_count",
                "2",
                "--thread_count",
                str(args.threads // 2),
                "--image_size",
                "256",
                "--resize_mode",
                "border",
                "--encode_quality",
                "95",
                "--number_sample_per_shard",
                str(per_shard),
                "--timeout",
                "10",
                "--retries",
                "0",
                "--enable_wandb",
                "False",
            ]
        )
        i2d_ok = count_successes_img2dataset(i2d_out)

        ours_root = WORK / "laion-assets-root"
        shutil.rmtree(ours_root, ignore_errors=True)
        (ours_root / "incoming").mkdir(parents=True)
        for shard in range(args.shards):
            rows = url_list.slice(shard * per_shard, per_shard)
            pq.write_table(rows, ours_root / "incoming" / f"bench-{shard}.parquet")
        config = WORK / "run.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "ops": {
                        "downloaded_images": {
                            "config": {
                                "threads": args.threads,
                                "per_host_connections": args.threads,
                                "allow_private_networks": True,
                                "image_size": 256,
                                "resize_mode": "border",
                                "encode_quality": 95,
                                "read_timeout": 10,
                                "retries": 0,
                            }
                        }
                    }
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
        ours_seconds, ours_peak, _ = timed(
            [
                str(Path(sys.executable).parent / "laion-assets"),
                "run",
                "--root",
                str(ours_root),
                "--select",
                "crawl_metadata,downloaded_images",
                "--config",
                str(config),
            ],
            env=env,
        )
        ours_ok = sum(
            pq.read_table(path, columns=["status"]).column("status").to_pylist().count("success")
            for path in (ours_root / "images").glob("*.parquet")
        )
    finally:
        server.terminate()
        server.wait()
    print(label)
    ratio = (ours_ok / ours_seconds) / (i2d_ok / i2d_seconds)
    for name, ok, seconds, peak, shown in (
        ("img2dataset", i2d_ok, i2d_seconds, i2d_peak, ""),
        ("laion_assets", ours_ok, ours_seconds, ours_peak, f"{ratio:.2f}x"),
    ):
        print(
            f"{corpus:<7}{server_name:<13}{name:<14}{ok:>9}{seconds:>9.1f}{ok / seconds:>9.1f}"
            f"{peak / 2**20:>9.0f}{shown:>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()
