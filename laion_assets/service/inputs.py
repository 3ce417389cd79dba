"""Image inputs to bytes and pixels: base64 decoding and URL fetching, both size-capped.

URLs go through the downloader's Fetcher: the same private-network guard, opt-out headers, timeouts and
retries. One Fetcher per URL (`fetch_one`): a shared one would cache every host's address check for the
life of the service, without bound.
"""

from __future__ import annotations

import base64
import binascii
import re

from PIL import Image

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.fetch import FetchSettings, fetch_one
from laion_assets.pipeline.download.imaging import DecodeError, decode_image

_DATA_URL = re.compile(r"data:[\w.+/-]*(;[\w=.+-]*)*;base64,", re.IGNORECASE)
_REFUSED = {schemas.BLOCKED: 403, schemas.OPTED_OUT: 403}  # other failures are the request's: 400


class InputError(Exception):
    """A request the service cannot answer, with the HTTP status and the reason to send back."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_base64(label: str, value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image (whitespace and a data: URL prefix allowed); 413 over `max_bytes`."""
    prefix = _DATA_URL.match(value)
    text = "".join(value[prefix.end() if prefix else 0 :].split())
    if len(text) > 4 * -(-max_bytes // 3):  # the base64 length of max_bytes, rounded up
        raise InputError(413, f"{label}: the image is over max_image_bytes={max_bytes}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(400, f"{label}: not valid base64: {exc}") from exc
    if len(data) > max_bytes:
        raise InputError(413, f"{label}: the image is over max_image_bytes={max_bytes}")
    return data


def fetch_image(label: str, url: str, settings: FetchSettings) -> bytes:
    """The body at `url`, fetched as the downloader fetches; 403 for private or opted-out, else 400/413."""
    fetched = fetch_one(url, settings)
    if fetched.status == schemas.SUCCESS:
        return fetched.body
    status = _REFUSED.get(fetched.status, 413 if fetched.error.startswith("too large") else 400)
    raise InputError(status, f"{label}: cannot fetch {url[:200]}: {fetched.error}")


def open_image(label: str, data: bytes, max_pixels: int, side: int) -> Image.Image:
    """The decoded image; 400 for bytes that are not one (any error of the decoder is a `DecodeError`).

    400 too, as a decompression bomb, for an image the model's resize (its shorter side to `side`) would
    make over `max_pixels`: 25,000x1 pixels, a PNG of 160 bytes, is 5,600,000x224 (5 GB) for ViT-B-32
    before its crop."""
    try:
        image = decode_image(data, max_pixels)
    except DecodeError as exc:
        raise InputError(400, f"{label}: {exc}") from exc
    width, height = image.size
    resized = (side, side * height // width) if width <= height else (side * width // height, side)
    if resized[0] * resized[1] > max_pixels:
        raise InputError(
            400,
            f"{label}: decompression bomb: {width}x{height} is {resized[0]}x{resized[1]} resized for the "
            f"model, over max_pixels={max_pixels}",
        )
    return image
