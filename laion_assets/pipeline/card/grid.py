"""The sample grid: the images of some pairs, read from their shards' pairs tars, with their captions."""

from __future__ import annotations

import io
import math
import textwrap

from PIL import Image, ImageDraw, ImageFont

from laion_assets.pipeline import schemas
from laion_assets.pipeline.markdown import shorten
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import PAIRS, DatasetStore

GRID_CELL, GRID_COLUMNS, CAPTION_LINES, CAPTION_CHARS = 192, 4, 3, 30


def sample_grid(store: DatasetStore, samples: list[tuple[str, str]]) -> bytes:
    """A PNG montage of the samples' images from `pairs/<shard>.tar`, each with its caption under it."""
    images = _sample_images(store, [key for key, _ in samples])
    shown = [(key, caption) for key, caption in samples if key in images]
    caption_height = CAPTION_LINES * 14 + 8
    rows = max(1, math.ceil(len(shown) / GRID_COLUMNS))
    grid = Image.new("RGB", (GRID_COLUMNS * GRID_CELL, rows * (GRID_CELL + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    if not shown:
        draw.text((8, 8), "no pairs yet", fill="black", font=font)
    for i, (key, caption) in enumerate(shown):
        left, top = (i % GRID_COLUMNS) * GRID_CELL, (i // GRID_COLUMNS) * (GRID_CELL + caption_height)
        with Image.open(io.BytesIO(images[key])) as opened:
            thumb = opened.convert("RGB")
        thumb.thumbnail((GRID_CELL - 8, GRID_CELL - 8))
        grid.paste(thumb, (left + (GRID_CELL - thumb.width) // 2, top + (GRID_CELL - thumb.height) // 2))
        lines = textwrap.wrap(caption, CAPTION_CHARS) or [""]
        if len(lines) > CAPTION_LINES:
            lines = [
                *lines[: CAPTION_LINES - 1],
                shorten(" ".join(lines[CAPTION_LINES - 1 :]), CAPTION_CHARS),
            ]
        draw.multiline_text((left + 4, top + GRID_CELL), "\n".join(lines), fill="black", font=font, spacing=2)
    out = io.BytesIO()
    grid.save(out, "PNG")
    return out.getvalue()


def _sample_images(store: DatasetStore, keys: list[str]) -> dict[str, bytes]:
    """The image bytes of `keys`, read from their shards' pairs tars (a key is `<shard>-<row>`)."""
    wanted: dict[str, set[str]] = {}
    for key in keys:
        wanted.setdefault(schemas.shard_of_key(key), set()).add(key)
    found: dict[str, bytes] = {}
    for shard, shard_keys in sorted(wanted.items()):
        with store.open(PAIRS.tar(shard)) as f:
            for key, members in read_samples(f):
                if key in shard_keys:
                    found[key] = next(data for ext, data in members.items() if ext not in ("txt", "json"))
                    if shard_keys <= found.keys():
                        break
    return found
