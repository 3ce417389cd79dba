"""Resize benchmark: the downloader's resizer against img2dataset's own, on the same photos.

    .venv/bin/python bench/resize.py [--photos 200] [--corpus large] [--size 256] [--mode border]

Both decode, resize and encode JPEG quality 95 each photo (bench/download.py's photo-like JPEGs), in
one process: img2dataset's Resizer in its own venv (bench/peers.py), ours (`process_image`) here, also
with the JPEG draft decode going down to twice the target size (the margin used before, which puts a
page of text 27 dB from img2dataset's pixels) and without any draft, to show what the draft saves and
what its margin costs. Prints ms per image, the ratio, peak memory, and each variant's PSNR against
img2dataset's output (the bound its tests hold is 35 dB). `--corpus camera` holds 4,000 px photos, the
only ones here large enough to be drafted at the current margin; `--corpus text`, pages of text of 1,000 to
3,600 px, on which the draft strays furthest from a full decode.
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
    variants = {  # name: the draft margin it runs with
        f"laion_assets (draft to {imaging._DRAFT_MARGIN}x target)": imaging._DRAFT_MARGIN,
        "laion_assets (draft to 2x target)": 2,
        "laion_assets (full decode)": 10**6,  # a draft this large never scales
    }
    measured = {}
    for name, margin in variants.items():
        with mock.patch.object(imaging, "_DRAFT_MARGIN", margin):
            measured[name] = ours(photos, settings)
    ours_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    references = [np.asarray(Image.open(out / f"bench-{path.stem}.jpg").convert("RGB")) for path in paths]
    n = len(photos)
    mean_kb = np.mean([len(p) for p in photos]) / 1024
    print(f"{n} photos ({args.corpus}, {mean_kb:.0f} KB mean) to {args.size} px {args.mode}, JPEG q95")
    print(f"{'resizer':<34}{'ms/image':>10}{'peak MB':>9}{'ratio':>8}{'min PSNR':>10}")
    print(f"{'img2dataset (OpenCV, full decode)':<34}{1000 * theirs_seconds / n:>10.2f}{theirs_peak:>9.0f}")
    for name, (seconds, outputs) in measured.items():
        scores = []
        for path, data, reference in zip(paths, outputs, references, strict=True):
            decoded = Image.open(io.BytesIO(data))
            assert found[f"bench-{path.stem}.jpg"][:2] == list(decoded.size)
            scores.append(psnr(np.asarray(decoded.convert("RGB")), reference))
        ratio = f"{theirs_seconds / seconds:.2f}x"
        print(f"{name:<34}{1000 * seconds / n:>10.2f}{ours_peak:>9.0f}{ratio:>8}{min(scores):>8.1f}dB")
    print("PSNR bound against img2dataset: 35 dB (99.0: the same pixels)")


if __name__ == "__main__":
    main()
