"""Every bench runs in its smoke mode (`--smoke`: a tiny offline run, bench/smoke.py), so that a change of
a schema or an API that breaks a bench fails here; the figures of a smoke run mean nothing."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from laion_assets.pipeline.scores.score import SETTINGS_ENV as SCORES_ENV

BENCH = Path(__file__).resolve().parent.parent / "bench"
HELPERS = {
    "smoke.py",
    "photo_server.py",
    "peers.py",
    "memory.py",
}  # imported by the benches, not benches themselves
# every bench, found anew, so that a new one without `--smoke` fails here (argparse refuses the flag)
BENCHES = sorted(path.name for path in BENCH.glob("*.py") if path.name not in HELPERS)
# Benches that start a deployment (PostgreSQL, a code server, a daemon) spend most of their minutes waiting
# on it, so they run in a lane of their own beside the others: the suite waits for the longer lane, not
# for both. They share no port or folder with the rest (PostgreSQL and moto on free ports, their own
# temporary folders).
BESIDE = ("run_overhead.py", "scale.py")

N = r"[\d,.]+"  # a printed figure
# What each bench's smoke run must print, as regular expressions over its stdout (multiline): its figure,
# the peer's and their ratio, and peak memory, so that a bench that stops printing one fails here.
PRINTS = {
    "caption.py": [
        r"^model .*ratio .*peak MiB$",
        rf"^laion-assets-demo-coca +\d+ +{N} +{N} +{N}x +{N} +{N}$",
    ],
    "dedup.py": [
        rf"^full: .* peak RSS {N} MiB",
        rf"^peer .* peak RSS {N} MiB.* {N}x as fast as brute force$",
    ],
    "dedup_eps.py": [rf"^\| both \(the demo\).* \| \d+ \| {N} \| {N} \(\d+/\d+\) \|$"],
    "download.py": [
        rf"^small +photo +img2dataset +\d+ +{N} +{N} +{N} +{N} *$",
        rf"^small +photo +laion_assets +\d+ +{N} +{N} +{N} +{N} +{N}x$",
        rf"^ours at defaults +\d+ +{N} +{N} +{N} +{N} ",
        rf"^latency web ratio, ours at defaults vs img2dataset at defaults: {N}x$",
        rf"^by name +\d+ +{N} +{N} +{N} +{N} ",
        rf"^dns web ratio, by name vs by address: {N}x$",
    ],
    "embed.py": [r"^variant +images/s +peak MB$", rf"^stage +{N} +{N}$", rf"^ratio stage / plain: {N}x$"],
    "export.py": [rf"^ours: .* peak RSS {N} MiB$", rf"^peer: .* peak RSS {N} MiB$", rf"^ratio .*: {N}x$"],
    "latency_web.py": [rf"^127\.0\.0\.2:\d+/i/0\.jpg: \d+ in {N} s, planned \d+ in {N} s$"],
    "query.py": [
        rf"^downloads by status +{N} +{N} +{N} M +{N} +{N} M +{N}$",
        rf"^peak RSS: {N} MiB with the views",
    ],
    "resize.py": [
        rf"^img2dataset \(OpenCV, full decode\) +{N} +{N}$",
        rf"^laion_assets \(full decode\) +{N} +{N} +{N}x +{N}dB$",
    ],
    "run_overhead.py": [
        rf"shard\(s\)/run: .*\(peak RSS {N} MB with the deployment's processes\)$",
        rf"fixed cost per run -?{N} s; runs of \d+ shards take {N}x",
    ],
    "scale.py": [rf"\(peak RSS {N} MB with the servers\)$", rf"^  ratio {N}x$"],
    "scores.py": [rf"^nsfw-b32 \(512-d\) +{N} +{N} +{N} +{N}$", rf"^py3langid / cld3 captions/s: {N}$"],
    "search.py": [rf"{N}x  \(default\)$", rf"peak RSS {N} MB"],
    "serve.py": [
        rf"^/clip/embed_text +1 +{N} +{N} +{N}x",
        rf"^server peak RSS: batcher on {N} MB, off {N} MB$",
    ],
    "takedown.py": [rf"^find_matches .* peak RSS {N} MiB$", rf"^ratio .*: {N}x$"],
}


@dataclass(frozen=True)
class Smoke:
    done: subprocess.CompletedProcess
    left: list[str]  # what the run left in its temporary folder


def _smoke(name: str, *flags: str) -> Smoke:
    """`bench/<name> --smoke <flags>`, with a temporary folder (TMPDIR) of its own."""
    tmp = Path(tempfile.mkdtemp(prefix=f"smoke-{Path(name).stem}-"))
    tmp.chmod(0o1777)  # as /tmp: PostgreSQL's own user makes its folder there
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp)}
    env.pop("DAGSTER_HOME", None)
    # as a user runs a bench: without the watermark model conftest names for the tests' own processes
    env.pop(SCORES_ENV["watermark_model"], None)
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / name), "--smoke", *flags],
            cwd=BENCH.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        # torch's cache of compiled kernels is the user's, kept across runs on purpose
        left = sorted(path.name for path in tmp.iterdir() if not path.name.startswith("torchinductor_"))
        return Smoke(done, left)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def beside(request) -> Iterator[dict[str, Future[Smoke]]]:
    """The smoke runs of the deployment benches this session runs, one after the other, started with
    this module's first test."""
    chosen = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_the_bench_runs_in_its_smoke_mode"
    }
    with ThreadPoolExecutor(1) as lane:
        yield {name: lane.submit(_smoke, name) for name in BESIDE if name in chosen}


@pytest.mark.parametrize("name", BENCHES)
def test_the_bench_runs_in_its_smoke_mode(name, beside):
    smoke = beside[name].result() if name in beside else _smoke(name)
    done = smoke.done
    assert done.returncode == 0, f"bench/{name} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    missing = [pattern for pattern in PRINTS[name] if not re.search(pattern, done.stdout, re.MULTILINE)]
    assert not missing, f"bench/{name} --smoke did not print {missing}:\n{done.stdout[-3000:]}"
    assert smoke.left == [], f"bench/{name} --smoke left these in its temporary folder"


def test_every_bench_says_what_it_prints():
    assert set(PRINTS) == set(BENCHES)


def test_the_lane_beside_holds_benches_that_exist():
    assert set(BESIDE) <= set(BENCHES)


@pytest.mark.parametrize(
    ("name", "flags", "error"),
    [
        ("dedup.py", ["--peer-queries", "5000"], "Cannot take a larger sample than population"),
        ("export.py", ["--shard-size", "0"], "shard_size 0 must be at least 1"),
    ],
)
def test_a_bench_ends_with_the_error_of_its_measuring_process(name, flags, error):
    """A bench that measures in a process of its own exits with that process's error, where it used to
    wait for its result forever (the smoke's timeout ended it)."""
    smoke = _smoke(name, *flags)
    assert smoke.done.returncode != 0
    assert error in smoke.done.stderr
    assert smoke.left == []


def test_the_download_bench_refuses_a_port_something_else_answers_on():
    """A server left on the loopback web's port (by a killed run, say) ends the bench with that said,
    instead of the tools' requests going to it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        smoke = _smoke("download.py", "--web", "loopback", "--port", str(port))
    assert smoke.done.returncode != 0
    assert f"127.0.0.1:{port} is taken" in smoke.done.stderr
    assert "img2dataset " not in smoke.done.stdout  # no tool ran
