"""Download benchmark: the downloaded_images stage against img2dataset, same photos, same settings, on
two webs.

    .venv/bin/python bench/download.py [--web loopback,latency,dns] [--images 3000] [--shards 2]
        [--threads 32] [--rounds 1] [--corpora small,large] [--servers nginx,photo]
        [--web-corpus small] [--hosts 200] [--zipf 1.0] [--median 0.25] [--sigma 1.0] [--cap 4]
        [--rate 2e6] [--hang 0] [--fail 0.02] [--seed 0] [--harsh] [--names 1500] [--dns-delay 0.05]

Generates photo-like JPEGs, small (480-640 px, about 100 KB, the web's usual image) and large
(640-2400 px, hundreds of KB), and downloads the same URLs, split into --shards files, with img2dataset
(installed by this script into its own venv under bench/.work/) and with `laion-assets run`. Both resize
to 256 with border, encode JPEG quality 95 and write webdataset. Prints wall time, images/s, peak memory
of the process tree (the sum of its processes' RSS, which counts each shared page once per process, and
of their PSS, which counts it once in all) and the ratio of images/s. Linux only (/proc).

The loopback web answers at once: a separate process on 127.0.0.1 (nginx with keep-alive,
bench/photo_server.py with keep-alive and sendfile, or Python's http.server) serves each corpus of
--corpora, and both tools run with --threads in all: img2dataset as 2 processes x threads/2. With
--rounds N, img2dataset then ours N times over, and the median of the N ratios: on a shared VM one run
of either can be 10-30 % off its neighbours.

The latency web answers as the real one does (bench/latency_web.py): first bytes after a lognormal delay
(median --median s, p95 1.3 s at the defaults), bodies at --rate bytes/s, --fail of the URLs failing and
--hang never answering, each URL a distinct path on one of --hosts loopback hosts, drawn Zipf-weighted so
that a few "CDNs" hold most. On its --web-corpus photos, each tool runs at its defaults (img2dataset 1
process x 256 threads; ours with only allow_private_networks and the image settings), then tuned
(img2dataset 2 x 128; ours with `OURS_TUNED` on top, not run while it is empty). Adds the requests in
flight that the server counted while each ran (max, mean, and over time: the mean of each second), the
ratios of ours against img2dataset, and the bound that the latency and the CPU set
(`images_per_second_bound`), with each tool's share of it, and laion-assets' own floor beside it
(`politeness_floor`: its per-host cap and each site's tdmrep.json).
--harsh: 1,000 hosts, first bytes at a median of 400 ms, 2 % of the URLs never answering.

The dns web (`--web dns`, not run by default) is the loopback web's small photos under --names host
names, drawn Zipf-weighted, which a DNS server on loopback (laion_assets_tests/dns_server.py) answers
--dns-delay s after each query, as a resolver that recurses for names it has not cached. Ours runs on
it (`dns_servers`), then on the same URLs by address, with --threads requests at once either way (on
one host as on many); prints both, the lookups the server answered, and the ratio: what looking the
names up costs. img2dataset is not run there: it asks the system's resolver, which cannot be pointed at
that server.
"""

from __future__ import annotations

import argparse
import heapq
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test suite's DNS server

from latency_web import Answer, Latency, host_address, photo_files, photo_index, plan
from latency_web import start as start_latency_web
from memory import tree_memory_peaks
from peers import WORK, ensure_peer
from PIL import Image, ImageDraw
from smoke import parse_args

from laion_assets.pipeline.download.downloader import DownloadSettings
from laion_assets.pipeline.download.imaging import ImageSettings, process_image
from laion_assets.pipeline.download.tdmrep import WELL_KNOWN_PATH as TDMREP_PATH
from laion_assets_tests.deployment import free_port, listening
from laion_assets_tests.dns_server import DnsServer, Name

# "ours tuned": on top of our defaults
OURS_TUNED: dict[str, object] = {"max_in_flight": 2048, "per_host_connections": 256}
HARSH = {"hosts": 1000, "median": 0.4, "hang": 0.02}  # --harsh's latency web
IMAGE_CONFIG = {"image_size": 256, "resize_mode": "border", "encode_quality": 95}  # both tools', everywhere
LATENCY_HELP = {
    "median": "seconds to the first byte, the median URL's",
    "sigma": "of the delay's logarithm (1: p95 at 5.2x the median)",
    "cap": "seconds: no delay is longer",
    "rate": "bytes/s of a body, per connection",
    "hang": "share of URLs that never answer",
    "fail": "share of URLs that answer 404, 500 or 503",
    "seed": "of the URLs' hosts and their answers",
}

# corpus -> (widths, grain): large photos of 85 KB to 2.2 MB, small web images of about 100 KB, camera
# originals of about 2.5 MB (the only photos the resizer decodes at a reduced DCT scale for 256 px), or
# pages of text (`page_of_text`, no grain), on which that decode strays furthest from a full one
CORPORA = {
    "large": ((640, 2400), (10, 10)),
    "small": ((480, 640), (10, 14)),
    "camera": ((3200, 4000), (6, 8)),
    "text": ((1000, 3600), (0, 0)),
}


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
        if corpus == "text":
            path.write_bytes(page_of_text(width, height))
            continue
        field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        grain = rng.normal(0, rng.uniform(grain_low, grain_high), (height, width, 3))
        pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        path.write_bytes(out.getvalue())
    return paths


def page_of_text(width: int, height: int) -> bytes:
    """A page of small black text on white, as a JPEG of quality 90."""
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    line = "The quick brown fox jumps over the lazy dog 0123456789 " * (width // 300 + 1)
    for top in range(0, height, 12):
        draw.text((2, top), line, fill="black")
    out = io.BytesIO()
    page.save(out, "JPEG", quality=90)
    return out.getvalue()


NGINX_CONF = """daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_timeout 65; keepalive_requests 100000;
  client_body_temp_path {work}/nginx-tmp; proxy_temp_path {work}/nginx-tmp;
  fastcgi_temp_path {work}/nginx-tmp; uwsgi_temp_path {work}/nginx-tmp; scgi_temp_path {work}/nginx-tmp;
  types {{ image/jpeg jpg; }}
  server {{ listen 127.0.0.1:{port}; root {folder}; }} }}
"""


def serve(folder: Path, port: int, server: str) -> subprocess.Popen:
    """A static server of `folder` on 127.0.0.1:`port` (photo_server.py, Python's http.server or nginx),
    returned once it accepts connections. A port something else already answers on ends the bench: the
    tools' requests would go there (to a server a killed run left, say), not to the server named."""
    if listening(port):
        raise SystemExit(
            f"127.0.0.1:{port} is taken, by a server an earlier run left? Stop it, or give --port another"
        )
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
    deadline = time.monotonic() + 60
    while not listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{server} did not start on port {port}")
        time.sleep(0.1)
    return process


@dataclass(frozen=True)
class Timed:
    seconds: float
    peak_rss: int  # bytes, summed over the process tree
    peak_pss: int
    output: str
    returncode: int
    started: float  # unix time
    finished: float


def timed(command: list[str], env: dict | None = None, check: bool = True) -> Timed:
    """A command run with its wall seconds and the peaks of its tree's RSS and PSS; with `check`, a failure
    ends the bench."""
    started, start = time.time(), time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    with tree_memory_peaks(process.pid) as peaks:
        output, _ = process.communicate()
        seconds = time.perf_counter() - start
    peak_rss, peak_pss = peaks
    if check and process.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{output[-3000:]}")
    return Timed(seconds, peak_rss, peak_pss, output, process.returncode, started, time.time())


def count_successes(parquets: Iterable[Path]) -> int:
    """Rows with status success in img2dataset's or our parquet files."""
    return sum(
        pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success") for p in parquets
    )


def url_table(urls: list[str]) -> pa.Table:
    return pa.table({"url": urls, "caption": [f"photo number {i}" for i in range(len(urls))]})


def run_img2dataset(binary: Path, url_list: pa.Table, shards: int, tuning: list[str]) -> tuple[Timed, int]:
    """img2dataset over `url_list` in `shards` shards, at its defaults but for the resizing (256, border,
    quality 95, as ours), webdataset and `tuning`; its run and its successes."""
    out = WORK / "img2dataset-out"
    shutil.rmtree(out, ignore_errors=True)
    pq.write_table(url_list, WORK / "urls.parquet")
    command = [
        str(binary),
        *("--url_list", str(WORK / "urls.parquet"), "--input_format", "parquet"),
        *("--url_col", "url", "--caption_col", "caption"),
        *("--output_format", "webdataset", "--output_folder", str(out)),
        *("--image_size", "256", "--resize_mode", "border", "--encode_quality", "95"),
        *("--number_sample_per_shard", str(-(-len(url_list) // shards))),
        *("--timeout", "10", "--retries", "0", "--enable_wandb", "False"),
        *tuning,
    ]
    with tempfile.TemporaryDirectory() as tmp:  # wandb, which img2dataset imports, leaves folders there
        run = timed(command, env={**os.environ, "TMPDIR": tmp})
    return run, count_successes(out.glob("*.parquet"))


def run_ours(url_list: pa.Table, shards: int, fields: dict, check: bool = True) -> tuple[Timed, int]:
    """`laion-assets run` of crawl_metadata and downloaded_images over `url_list`, one incoming file per
    shard, with `fields` as downloaded_images' config; its run and its successes."""
    root = WORK / "laion-assets-root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "incoming").mkdir(parents=True)
    per_shard = -(-len(url_list) // shards)
    for shard in range(shards):
        pq.write_table(
            url_list.slice(shard * per_shard, per_shard), root / "incoming" / f"bench-{shard}.parquet"
        )
    config = WORK / "run.yaml"
    config.write_text(yaml.safe_dump({"ops": {"downloaded_images": {"config": fields}}}))
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    command = [str(Path(sys.executable).parent / "laion-assets"), "run", "--root", str(root)]
    command += ["--select", "crawl_metadata,downloaded_images", "--config", str(config)]
    run = timed(command, env=env, check=check)
    return run, count_successes((root / "images").glob("*.parquet")) if run.returncode == 0 else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--web", default="loopback,latency", help="comma-separated, of loopback, latency, dns"
    )
    parser.add_argument("--images", type=int, default=3000, help="URLs in each web's list")
    parser.add_argument("--distinct", type=int, default=300, help="distinct photos behind the URLs")
    parser.add_argument("--shards", type=int, default=2, help="URL files (shards) the URLs are split into")
    parser.add_argument("--port", type=int, default=8731, help="the loopback web's; the latency web's is +1")
    loopback = parser.add_argument_group("loopback web")
    loopback.add_argument("--threads", type=int, default=32, help="total download threads for each tool")
    loopback.add_argument(
        "--rounds", type=int, default=1, help="img2dataset then ours, this many times: the median ratio"
    )
    loopback.add_argument(
        "--corpora", default="small,large", help=f"comma-separated, of {', '.join(CORPORA)}"
    )
    loopback.add_argument(
        "--servers", default="nginx,photo", help="comma-separated, of nginx, photo, http.server"
    )
    latency = parser.add_argument_group("latency web (bench/latency_web.py)")
    latency.add_argument("--web-corpus", default="small", choices=CORPORA, help="its photos")
    latency.add_argument("--hosts", type=int, default=200)
    latency.add_argument("--zipf", type=float, default=1.0, help="a host's share of URLs is rank**-zipf")
    for name, value in asdict(Latency()).items():
        latency.add_argument(f"--{name}", type=type(value), default=value, help=LATENCY_HELP[name])
    latency.add_argument("--harsh", action="store_true", help=", ".join(f"{k}={v}" for k, v in HARSH.items()))
    dns = parser.add_argument_group("dns web: ours by name and by address (--zipf, --seed too)")
    dns.add_argument("--names", type=int, default=1500, help="host names the URLs are drawn over")
    dns.add_argument("--dns-delay", type=float, default=0.05, help="seconds to each DNS answer")
    args = parse_args(
        parser,
        web="loopback,latency,dns",
        images=40,
        distinct=8,
        corpora="small",
        servers="photo",
        hosts=4,
        median=0.02,
        cap=0.2,
        names=8,
        port=free_port(),  # not 8731: a CI run beside another, or after a killed one, finds it taken
    )
    if args.harsh:  # its values, except where an argument was given
        for name, value in HARSH.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    img2dataset = ensure_peer("img2dataset", ["img2dataset"])
    print(f"machine: {os.cpu_count()} cores; {args.images} URLs, {args.shards} shards")
    webs = args.web.split(",")
    if "loopback" in webs:
        print(f"loopback web, 127.0.0.1, {args.threads} threads for each tool")
        columns = ("ok", "wall s", "images/s", "RSS MB", "PSS MB", "ratio")
        print(f"{'corpus':<7}{'server':<13}{'tool':<14}" + "".join(f"{c:>9}" for c in columns))
        for corpus in args.corpora.split(","):
            for server in args.servers.split(","):
                compare(corpus, server, img2dataset, args)
    if "latency" in webs:
        compare_on_latency_web(img2dataset, args)
    if "dns" in webs:
        compare_names_and_addresses(args)


def make_site(photos: list[Path], images: int) -> Path:
    """The loopback web's folder: `<i>.jpg` for each of `images` URLs, the photos in turn."""
    site = WORK / "site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for i in range(images):
        os.symlink(photos[i % len(photos)], site / f"{i}.jpg")
    return site


def compare(corpus: str, server_name: str, img2dataset: Path, args: argparse.Namespace) -> None:
    """img2dataset and `laion-assets run` on the same URLs of `corpus`, served by `server_name`, in turn
    for --rounds rounds: a row each per round, then the median of the rounds' ratios."""
    photos = make_photos(WORK / f"photos-{corpus}", args.distinct, corpus)
    site = make_site(photos, args.images)
    sizes = [p.stat().st_size for p in photos]
    label = f"{corpus} ({np.mean(sizes) / 1024:.0f} KB mean, {min(sizes) // 1024}-{max(sizes) // 1024} KB)"
    url_list = url_table([f"http://127.0.0.1:{args.port}/{i}.jpg" for i in range(args.images)])
    threads = ["--processes_count", "2", "--thread_count", str(args.threads // 2)]
    fields = {
        "max_in_flight": args.threads,
        "per_host_connections": args.threads,
        "allow_private_networks": True,
        **IMAGE_CONFIG,
        "read_timeout": 10,
        "retries": 0,
    }
    server = serve(site, args.port, server_name)
    rounds = []
    try:
        for _ in range(args.rounds):
            i2d = run_img2dataset(img2dataset, url_list, args.shards, threads)
            rounds.append((i2d, run_ours(url_list, args.shards, fields)))
    finally:
        server.terminate()
        server.wait()
    print(label)
    ratios = []
    for (i2d, i2d_ok), (ours, ours_ok) in rounds:
        require_images("img2dataset", i2d_ok, args)
        require_images("laion-assets", ours_ok, args)
        ratios.append((ours_ok / ours.seconds) / (i2d_ok / i2d.seconds))
        for name, ok, run, shown in (
            ("img2dataset", i2d_ok, i2d, ""),
            ("laion_assets", ours_ok, ours, f"{ratios[-1]:.2f}x"),
        ):
            print(
                f"{corpus:<7}{server_name:<13}{name:<14}{ok:>9}{run.seconds:>9.1f}{ok / run.seconds:>9.1f}"
                f"{run.peak_rss / 2**20:>9.0f}{run.peak_pss / 2**20:>9.0f}{shown:>9}",
                flush=True,
            )
    if len(ratios) > 1:
        print(
            f"{corpus} photos, {server_name}: ratio, median of {len(ratios)} rounds: "
            f"{np.median(ratios):.2f}x (from {min(ratios):.2f}x to {max(ratios):.2f}x)"
        )


def compare_on_latency_web(img2dataset: Path, args: argparse.Namespace) -> None:
    """Each tool at its defaults, then tuned, on the same URLs of the latency web; their requests in flight,
    the ratios, and how far each is from the bound that the latency and the CPU set."""
    web_name = "harsh latency web" if args.harsh else "latency web"
    latency = Latency(**{name: getattr(args, name) for name in asdict(Latency())})
    site = WORK / "latency-site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for photo in make_photos(WORK / f"photos-{args.web_corpus}", args.distinct, args.web_corpus):
        os.symlink(photo, site / photo.name)
    photos = photo_files(site)
    port = args.port + 1
    urls = latency_urls(args.images, args.hosts, args.zipf, port, args.seed)
    url_list = url_table(urls)
    sizes = [p.stat().st_size for p in photos]
    busiest = Counter(urlsplit(url).netloc for url in urls).most_common(1)[0]
    print(
        f"{web_name}: {len(urls)} URLs over {args.hosts} hosts (Zipf {args.zipf:g}; the busiest, "
        f"{busiest[0]}, has {busiest[1]}), {args.web_corpus} photos ({np.mean(sizes) / 1024:.0f} KB mean); "
        f"first byte median {latency.median:g} s, sigma {latency.sigma:g}, cap {latency.cap:g} s; "
        f"{latency.rate / 1e6:g} MB/s; {latency.hang:.0%} hanging, {latency.fail:.0%} failing"
    )
    series = WORK / "latency-in-flight.txt"
    series.unlink(missing_ok=True)
    server = start_latency_web(site, port, args.hosts, latency, series)
    ours_base = {"allow_private_networks": True, **IMAGE_CONFIG}
    ours_tuned = {**ours_base, **OURS_TUNED}
    i2d_tuned = ["--processes_count", "2", "--thread_count", "128"]
    # ours may fail while its downloader is being changed: the others' figures still count
    tools: list[tuple[str, Callable[[], tuple[Timed, int]]]] = [
        ("img2dataset at defaults", lambda: run_img2dataset(img2dataset, url_list, args.shards, [])),
        ("img2dataset tuned", lambda: run_img2dataset(img2dataset, url_list, args.shards, i2d_tuned)),
        ("ours at defaults", lambda: run_ours(url_list, args.shards, ours_base, check=False)),
        ("ours tuned", lambda: run_ours(url_list, args.shards, ours_tuned, check=False)),
    ]
    if args.smoke:  # at defaults only
        tools = [tool for tool in tools if tool[0].endswith("at defaults")]
    elif not OURS_TUNED:
        tools = [tool for tool in tools if tool[0] != "ours tuned"]
        print("ours tuned: not run, OURS_TUNED is empty (it would be ours at defaults)")
    # requests in flight as the server counted them; its CPU seconds, to show it is not the bottleneck
    columns = ("ok", "wall s", "images/s", "peak RSS MB", "peak PSS MB", "flight max", "flight mean")
    columns += ("first req s", "last req s", "web CPU s")
    print(f"{'tool':<25}" + "".join(f"{c:>12}" for c in columns), flush=True)
    images_per_second: dict[str, float] = {}
    over_time: dict[str, list[float]] = {}
    try:
        for name, run_tool in tools:
            server_cpu = cpu_seconds(server.pid)
            run, ok = run_tool()
            require_images(name, ok, args)
            server_cpu = cpu_seconds(server.pid) - server_cpu
            if run.returncode != 0:
                print(f"{name:<25}FAILED (exit code {run.returncode}):\n{run.output[-3000:]}", flush=True)
                continue
            flight = in_flight(series, run.started, run.finished)
            images_per_second[name] = ok / run.seconds
            over_time[name] = flight.by_second
            print(
                f"{name:<25}{ok:>12}{run.seconds:>12.1f}{ok / run.seconds:>12.1f}"
                f"{run.peak_rss / 2**20:>12.0f}{run.peak_pss / 2**20:>12.0f}"
                f"{flight.most:>12}{flight.mean:>12.1f}{flight.first:>12.1f}"
                f"{flight.last:>12.1f}{server_cpu:>12.1f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait()
    print("requests in flight over time, the mean of each second from the start:")
    for name, by_second in over_time.items():
        print(f"  {name:<25}" + " ".join(f"{count:.0f}" for count in by_second))
    for ours in ("ours at defaults", "ours tuned"):
        for theirs in ("img2dataset at defaults", "img2dataset tuned"):
            if images_per_second.get(ours) is not None and images_per_second.get(theirs):
                ratio = images_per_second[ours] / images_per_second[theirs]
                print(f"{web_name} ratio, {ours} vs {theirs}: {ratio:.2f}x")
    bound = images_per_second_bound(web_name, urls, latency, photos)
    print(
        f"{web_name}, x of the bound: "
        + ", ".join(f"{name} {rate / bound:.2f}x" for name, rate in images_per_second.items())
    )


def latency_urls(count: int, hosts: int, zipf: float, port: int, seed: int) -> list[str]:
    """`count` URLs, each a distinct path, on hosts drawn with weights rank**-zipf: a few CDNs hold most."""
    drawn = zipf_hosts(count, hosts, zipf, seed)
    return [f"http://{host_address(host)}:{port}/i/{n}.jpg" for n, host in enumerate(drawn)]


def zipf_hosts(count: int, hosts: int, zipf: float, seed: int) -> np.ndarray:
    """The host (0 to `hosts` - 1) of each of `count` URLs, drawn with weights rank**-zipf."""
    weights = np.arange(1, hosts + 1, dtype=float) ** -zipf
    return np.random.default_rng(seed).choice(hosts, size=count, p=weights / weights.sum())


def compare_names_and_addresses(args: argparse.Namespace) -> None:
    """Ours on loopback URLs of --names host names, which a DNS server on loopback answers each query for
    --dns-delay s after it comes, then on the same URLs by address (127.0.0.1, no lookup): what looking
    the names up costs. img2dataset cannot be pointed at that server (it asks the system's resolver)."""
    site = make_site(make_photos(WORK / "photos-small", args.distinct, "small"), args.images)
    drawn = zipf_hosts(args.images, args.names, args.zipf, args.seed)
    named = [f"http://h{host}.names.test:{args.port}/{n}.jpg" for n, host in enumerate(drawn)]
    addressed = [f"http://127.0.0.1:{args.port}/{n}.jpg" for n in range(args.images)]
    names = {urlsplit(url).hostname: Name(["127.0.0.1"]) for url in named}
    # one host or many: the same requests at once, as many as the loopback web's photo server takes
    fields = {
        "allow_private_networks": True,
        **IMAGE_CONFIG,
        "max_in_flight": args.threads,
        "per_host_connections": args.threads,
    }
    print(
        f"dns web: {args.images} URLs over {len(names)} host names (Zipf {args.zipf:g} over {args.names}), "
        f"each query answered after {args.dns_delay * 1000:g} ms, small photos on 127.0.0.1"
    )
    columns = ("ok", "wall s", "images/s", "peak RSS MB", "peak PSS MB", "lookups", "most a name")
    print(f"{'ours':<20}" + "".join(f"{c:>12}" for c in columns), flush=True)
    server = serve(site, args.port, "photo")
    try:
        with DnsServer(names, delay=args.dns_delay) as dns:
            by_name, ok = run_ours(url_table(named), args.shards, {**fields, "dns_servers": [dns.server]})
        by_address, ok_by_address = run_ours(url_table(addressed), args.shards, fields)
    finally:
        server.terminate()
        server.wait()
    require_images("ours by name", ok, args)
    require_images("ours by address", ok_by_address, args)
    for label, run, successes, lookups in (
        ("by name", by_name, ok, dns.lookups),
        ("by address", by_address, ok_by_address, {}),
    ):
        print(
            f"{label:<20}{successes:>12}{run.seconds:>12.1f}{successes / run.seconds:>12.1f}"
            f"{run.peak_rss / 2**20:>12.0f}{run.peak_pss / 2**20:>12.0f}"
            f"{sum(lookups.values()):>12}{max(lookups.values(), default=0):>12}",
            flush=True,
        )
    ratio = (ok / by_name.seconds) / (ok_by_address / by_address.seconds)
    print(f"dns web ratio, by name vs by address: {ratio:.2f}x")


def require_images(tool: str, ok: int, args: argparse.Namespace) -> None:
    """Ends a smoke run in which `tool` got no image: the smoke's webs answer nearly every URL, so none
    means the tool or the bench is broken, whatever the exit code said (a smoke passed so while every
    request of ours went to the wrong address)."""
    if args.smoke and ok == 0:
        raise SystemExit(f"{tool} got no image of the smoke run's URLs: broken")


@dataclass(frozen=True)
class InFlight:
    most: int
    mean: float
    first: float  # seconds from the start to the first request the web saw
    last: float  # seconds from the start to the last moment it had one in flight
    by_second: list[float]  # the mean of each whole second from the start


def in_flight(series: Path, started: float, finished: float) -> InFlight:
    """The latency web's requests in flight between two unix times, sampled every 100 ms."""
    samples = [
        (float(at), int(count))
        for line in series.read_text().splitlines()
        for at, count in [line.split()]
        if started <= float(at) <= finished
    ]
    busy = [at for at, count in samples if count]
    if not busy:
        return InFlight(0, 0.0, 0.0, 0.0, [])
    counts = [count for _, count in samples]
    seconds: dict[int, list[int]] = {}
    for at, count in samples:
        seconds.setdefault(int(at - started), []).append(count)
    by_second = [float(np.mean(seconds.get(second, [0]))) for second in range(max(seconds) + 1)]
    return InFlight(max(counts), float(np.mean(counts)), busy[0] - started, busy[-1] - started, by_second)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def images_per_second_bound(web_name: str, urls: list[str], latency: Latency, photos: list[Path]) -> float:
    """Prints the bound that the latency and the CPU set on the images/s of `urls`, and returns it.

    CPU: the images that can succeed x `process_image`'s seconds for each (measured here, one core) / the
    usable cores. Latency: the slowest URL (its delay and its body at the web's rate), or the busiest host's
    answers one after another over laion-assets' per-host connections, whichever is longer. URLs that
    never answer are left out: a tool decides how long it waits for them.
    """
    settings = ImageSettings(**IMAGE_CONFIG)
    process_image(photos[0].read_bytes(), settings)  # imports and first-call costs out of the timing
    photo_seconds = []
    for photo in photos:
        data = photo.read_bytes()
        start = time.perf_counter()
        process_image(data, settings)
        photo_seconds.append(time.perf_counter() - start)
    per_host = DownloadSettings().per_host_connections
    cores = len(os.sched_getaffinity(0))
    images, cpu, slowest = 0, 0.0, 0.0
    host_seconds: Counter = Counter()
    for url in urls:
        parts = urlsplit(url)
        answer = plan(latency, parts.netloc, parts.path)
        if answer.status is None:
            continue
        seconds = answer_seconds(answer, parts.path, latency, photos)
        if answer.status == 200:
            images += 1
            cpu += photo_seconds[photo_index(parts.path, len(photos))] / cores
        slowest = max(slowest, seconds)
        host_seconds[parts.netloc] += seconds
    host, answers = host_seconds.most_common(1)[0]
    latency_bound = max(slowest, answers / per_host)
    bound = max(cpu, latency_bound)
    print(
        f"{web_name} bound, CPU: {images} images x {cpu * cores / images * 1000:.1f} ms of process_image "
        f"(256, border, quality 95) / {cores} cores = {cpu:.1f} s"
    )
    print(
        f"{web_name} bound, latency: slowest URL {slowest:.2f} s; busiest host {host}, {answers:.1f} s of "
        f"answers / {per_host} connections (laion-assets' per_host_connections) = {answers / per_host:.1f} s"
    )
    set_by = "CPU" if cpu >= latency_bound else "latency"
    uncapped = max(cpu, slowest)
    print(
        f"{web_name} bound: {bound:.1f} s, {images / bound:.1f} images/s (set by {set_by}); without a"
        f" per-host cap, as img2dataset has none: {uncapped:.1f} s, {images / uncapped:.1f} images/s"
    )
    floor, host = politeness_floor(urls, latency, photos)
    print(
        f"{web_name}, laion-assets' floor (each host's URLs through its per_host_connections, after its"
        f" tdmrep.json or tdmrep_wait; read_timeout on a URL that never answers): {floor:.1f} s, set by"
        f" {host}, beside the bound's {bound:.1f} s"
    )
    return images / bound


def answer_seconds(answer: Answer, path: str, latency: Latency, photos: list[Path]) -> float:
    """Seconds from the request to the end of an answered URL's body: its first byte's delay, then its
    photo (a 200's) at the web's rate."""
    if answer.status != 200:
        return answer.delay
    return answer.delay + photos[photo_index(path, len(photos))].stat().st_size / latency.rate


def politeness_floor(urls: list[str], latency: Latency, photos: list[Path]) -> tuple[float, str]:
    """The wait no request slot or core can shorten for laion-assets at its defaults, which the bound
    leaves out, and the host that sets it. Each host's URLs go, in their order, through its
    `per_host_connections` (a request holds one from its start to its body's end, or `read_timeout` for
    a URL that never answers); a site's first requests wait for its `/.well-known/tdmrep.json` up to
    `tdmrep_wait`, and their outcomes until it answers (or `read_timeout`). Of the hosts, the longest."""
    defaults = DownloadSettings()
    by_host: dict[str, list[str]] = {}
    for url in urls:
        parts = urlsplit(url)
        by_host.setdefault(parts.netloc, []).append(parts.path)

    def seconds(host: str, path: str) -> float:
        answer = plan(latency, host, path)
        if answer.status is None:
            return defaults.read_timeout
        return answer_seconds(answer, path, latency, photos)

    floor, slowest_host = 0.0, ""
    for host, paths in by_host.items():
        site_file = seconds(host, TDMREP_PATH)
        first_start = min(site_file, defaults.tdmrep_wait)
        # when each connection is next free: a heap (all equal, so already one)
        free_at = [first_start] * min(defaults.per_host_connections, len(paths))
        done = site_file  # no outcome before the site file's
        for path in paths:
            end = heapq.heappop(free_at) + seconds(host, path)
            heapq.heappush(free_at, end)
            done = max(done, end)
        if done > floor:
            floor, slowest_host = done, host
    return floor, slowest_host


if __name__ == "__main__":
    main()
