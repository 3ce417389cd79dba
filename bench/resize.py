"""Resize benchmark: the downloader's resizer against img2dataset's own, on the same photos.

    .venv/bin/python bench/resize.py [--photos 200] [--corpus large] [--size 256] [--mode border]

Both decode, resize and encode JPEG quality 95 each photo (bench/download.py's photo-like JPEGs), in
one process: img2dataset's Resizer in its own venv (bench/peers.py), ours (`process_image`) here, also
without the JPEG draft decode, to show what the draft saves. Prints ms per image, the ratio, peak
memory, and the PSNR of ours against img2dataset's output (the bound its tests hold is 35 dB).
"""

from __future__ import annotations

import argparse
import io
import resource
import time
from unittest import mock

import numpy as np
from download import CORPORA, make_photos
from peers import WORK, img2dataset_resize
from PIL import Image
from smoke import parse_args

from laion_assets.pipeline.download import imaging
from laion_assets.pipeline.download.imaging import ImageSettings, process_image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))


def ours(photos: list[bytes], settings: ImageSettings) -> tuple[float, list[bytes]]:
    start = time.perf_counter()
    outputs = [process_image(data, settings).data for data in photos]
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--corpus", default="large", choices=sorted(CORPORA))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mode", default="border")
    args = parse_args(parser, photos=6, corpus="small")
    folder = WORK / f"photos-{args.corpus}"
    paths = make_photos(folder, args.photos, args.corpus)
    photos = [path.read_bytes() for path in paths]
    settings = ImageSettings(image_size=args.size, resize_mode=args.mode)
    case = {"image_size": args.size, "resize_mode": args.mode, "resize_only_if_bigger": False}
    out = WORK / "resize-img2dataset"
    sources = WORK / f"resize-sources-{args.corpus}-{args.photos}"
    sources.mkdir(parents=True, exist_ok=True)
    for path in paths:
        link = sources / path.name
        if not link.exists():
            link.symlink_to(path)
    found, theirs_seconds = img2dataset_resize(sources, out, {"bench": case})
    theirs_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    ours_seconds, outputs = ours(photos, settings)
    with mock.patch.object(imaging, "_DRAFT_MARGIN", 10**6):  # a draft this large never scales
        full_seconds, _ = ours(photos, settings)
    ours_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scores = []
    for path, data in zip(paths, outputs, strict=True):
        reference = np.asarray(Image.open(out / f"bench-{path.stem}.jpg").convert("RGB"))
        scores.append(psnr(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), reference))
        assert found[f"bench-{path.stem}.jpg"][:2] == list(Image.open(io.BytesIO(data)).size)
    n = len(photos)
    mean_kb = np.mean([len(p) for p in photos]) / 1024
    print(f"{n} photos ({args.corpus}, {mean_kb:.0f} KB mean) to {args.size} px {args.mode}, JPEG q95")
    print(f"{'resizer':<34}{'ms/image':>10}{'peak MB':>9}{'ratio':>8}")
    rows = (
        ("img2dataset (OpenCV, full decode)", theirs_seconds, theirs_peak),
        ("laion_assets (draft to 2x target)", ours_seconds, ours_peak),
        ("laion_assets (full decode)", full_seconds, ours_peak),
    )
    for name, seconds, peak in rows:
        ratio = f"{theirs_seconds / seconds:.2f}x" if seconds != theirs_seconds else ""
        print(f"{name:<34}{1000 * seconds / n:>10.2f}{peak:>9.0f}{ratio:>8}")
    print(f"PSNR against img2dataset: min {min(scores):.1f} dB, median {np.median(scores):.1f} dB (bound 35)")


if __name__ == "__main__":
    main()
