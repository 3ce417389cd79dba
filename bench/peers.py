"""The peer tools the benches and tests measure against, each installed into its own venv under
bench/.work/ (never into the project's), and img2dataset's own resizer run there over a folder."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work"

# Run by img2dataset's venv: argv = source folder, output folder, cases as JSON. Resizes every image of
# the folder for each case with img2dataset.resizer.Resizer, writes `<case>-<image stem>.<format>`, and
# prints {name: [width, height, original_width, original_height, error]} and the seconds spent.
_RESIZE = """
import io, json, sys, time
from pathlib import Path
from img2dataset.resizer import Resizer
source, out, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
images = {path.stem: path.read_bytes() for path in sorted(source.iterdir())}
found, seconds = {}, 0.0
for case, options in cases.items():
    resizer = Resizer(**options)
    for stem, data in images.items():
        start = time.perf_counter()
        encoded, *sizes, error = resizer(io.BytesIO(data))
        seconds += time.perf_counter() - start
        name = f"{case}-{stem}.{options.get('encode_format', 'jpg')}"
        if encoded is not None:
            (out / name).write_bytes(encoded)
        found[name] = [*sizes, error]
print(json.dumps({"images": found, "seconds": seconds}))
"""


def ensure_peer(name: str, packages: list[str]) -> Path:
    """The command `name` of a peer tool, installed with `packages` into its own venv under bench/.work/."""
    venv = WORK / f"{name}-venv"
    binary = venv / "bin" / name
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / f"{name}-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes that need it at once (pytest -n) install it once
        if not binary.exists():
            print(f"installing {name} into {venv}", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *packages], check=True)
    return binary


def img2dataset_resize(source: Path, out: Path, cases: dict[str, dict]) -> tuple[dict[str, list], float]:
    """img2dataset's Resizer(**options) over every image in `source`, for each case: the outputs in `out`
    as `<case>-<stem>.<format>`, {that name: [width, height, original width, original height, error]},
    and the seconds its resizer spent."""
    python = ensure_peer("img2dataset", ["img2dataset"]).parent / "python"
    done = subprocess.run(
        [str(python), "-c", _RESIZE, str(source), str(out), json.dumps(cases)],
        capture_output=True,
        text=True,
        check=False,
        env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"},
    )
    if done.returncode:
        raise RuntimeError(f"img2dataset's resizer failed:\n{done.stderr[-3000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["images"], answer["seconds"]
