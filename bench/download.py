"""Download benchmark: the downloaded_images stage against img2dataset, same photos, same settings.

    .venv/bin/python bench/download.py [--images 5000] [--distinct 300] [--threads 32]

Generates photo-like JPEGs (varied sizes, hundreds of KB), serves them from a separate process
on 127.0.0.1 (bench/photo_server.py: keep-alive, sendfile), and downloads one URL list twice: with img2dataset
(installed by this script into its own venv under bench/.work/) and with `laion-assets run`. Both
resize to 256 with border, encode JPEG quality 95 and write webdataset, on the same budget:
img2dataset with 2 processes x threads/2, this project with 1 process x threads. Prints wall time,
images/s, peak memory (RSS summed over the process tree) and the ratio. Linux only (/proc).
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
from PIL import Image

WORK = Path(__file__).resolve().parent / ".work"


def make_photos(folder: Path, distinct: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: a smooth colour field with fine grain, 640 to 2400 px wide, quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(distinct):
        path = folder / f"photo-{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        width = int(rng.integers(640, 2400))
        height = int(width * rng.choice([0.56, 0.67, 0.75, 1.0, 1.33]))
        field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        grain = rng.normal(0, 10, (height, width, 3))
        pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        path.write_bytes(out.getvalue())
    return paths


def serve(folder: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "photo_server.py"), str(port), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    return server


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


def ensure_peer(name: str, packages: list[str]) -> Path:
    """The command `name` of a peer tool, installed with `packages` into its own venv under bench/.work/."""
    venv = WORK / f"{name}-venv"
    binary = venv / "bin" / name
    if not binary.exists():
        print(f"installing {name} into {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *packages], check=True)
    return binary


def count_successes_img2dataset(folder: Path) -> int:
    return sum(
        pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
        for p in folder.glob("*.parquet")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--distinct", type=int, default=300, help="distinct photos behind the URLs")
    parser.add_argument("--threads", type=int, default=32, help="total download threads for each tool")
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()

    photos = make_photos(WORK / "photos", args.distinct)
    site = WORK / "site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for i in range(args.images):
        os.symlink(photos[i % len(photos)], site / f"{i}.jpg")
    sizes = [p.stat().st_size for p in photos]
    print(
        f"{args.images} URLs over {len(photos)} photos, {np.mean(sizes) / 1024:.0f} KB mean, "
        f"{min(sizes) // 1024}-{max(sizes) // 1024} KB"
    )
    urls = [f"http://127.0.0.1:{args.port}/{i}.jpg" for i in range(args.images)]
    url_list = pa.table({"url": urls, "caption": [f"photo number {i}" for i in range(args.images)]})

    img2dataset = ensure_peer("img2dataset", ["img2dataset"])
    server = serve(site, args.port)
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
                str((args.images + 1) // 2),
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
        pq.write_table(url_list, ours_root / "incoming" / "bench.parquet")
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
        ours_seconds, ours_peak, output = timed(
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
        ours_ok = (
            pq.read_table(ours_root / "images" / "bench.parquet")
            .column("status")
            .to_pylist()
            .count("success")
        )
    finally:
        server.terminate()
        server.wait()

    print(f"{'tool':<14}{'ok':>7}{'wall s':>9}{'images/s':>10}{'peak MB':>9}")
    for name, ok, seconds, peak in (
        ("img2dataset", i2d_ok, i2d_seconds, i2d_peak),
        ("laion_assets", ours_ok, ours_seconds, ours_peak),
    ):
        print(f"{name:<14}{ok:>7}{seconds:>9.1f}{ok / seconds:>10.1f}{peak / 2**20:>9.0f}")
    ratio = (ours_ok / ours_seconds) / (i2d_ok / i2d_seconds)
    print(f"ratio laion_assets / img2dataset (images/s): {ratio:.2f}x")
    print(output.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
