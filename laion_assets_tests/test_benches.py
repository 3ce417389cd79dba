"""Every bench runs in its smoke mode (`--smoke`: a tiny offline run, bench/smoke.py), so that a change of
a schema or an API that breaks a bench fails here; the figures of a smoke run mean nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
HELPERS = {"smoke.py", "photo_server.py", "peers.py"}  # imported by the benches, not benches themselves
# every bench, found anew, so that a new one without `--smoke` fails here (argparse refuses the flag)
BENCHES = sorted(path.name for path in BENCH.glob("*.py") if path.name not in HELPERS)


@pytest.mark.parametrize("name", BENCHES)
def test_the_bench_runs_in_its_smoke_mode(name, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DAGSTER_HOME", None)
    done = subprocess.run(
        [sys.executable, str(BENCH / name), "--smoke"],
        cwd=BENCH.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"bench/{name} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"bench/{name} --smoke printed nothing"
