"""Decode, orient, filter, resize and encode one downloaded image.

The output is meant to be img2dataset's: its modes, sizes, decisions and interpolations, run by OpenCV
itself, its downscale OpenCV's INTER_AREA (each output pixel the mean of the input area it covers, partial
pixels weighted by their share): Pillow has no such filter (its BOX weighs whole pixels, 31 dB PSNR from
OpenCV on img2dataset's own test photos). Pillow reads the header and EXIF, turns by EXIF and encodes; it
decodes too, except an upright colour JPEG that is shrunk, which OpenCV decodes into the array it resizes
(`_opencv_jpeg`: the same pixels, without a full-size copy). A JPEG of
twelve times the target size or more is decoded with libjpeg's DCT scaling (Pillow's `draft`: 1/2, 1/4 or
1/8) to no less than six times the target, which saves most of a camera photo's decode and stays 37 dB or
more from a full decode on photos, pages of text and noise alike. Nearer the target it strays on text:
stopping at twice the target, photos kept 44 dB but a page of text fell to 27 dB; at four times, to 32 dB
(docs/benchmarks.md). img2dataset's pixels are the contract, so a smaller image is decoded whole.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
# img2dataset's interpolation names (and its aliases), as the names of its OpenCV flags: Pillow's filters
# are others (antialiased shrinks, nearest at pixel centres, a box for an area upscale), 26-37 dB away
INTERPOLATIONS = {
    "nearest": "INTER_NEAREST",
    "linear": "INTER_LINEAR",
    "bilinear": "INTER_LINEAR",
    "cubic": "INTER_CUBIC",
    "bicubic": "INTER_CUBIC",
    "area": "INTER_AREA",  # a shrink by area is `area_resize`
    "lanczos": "INTER_LANCZOS4",
    "lanczos4": "INTER_LANCZOS4",
}
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
_MAX_SIDE = {"jpg": 65_500, "webp": 16_383}  # px: the longest side each encoder writes
_DRAFT_MARGIN = 6  # JPEG draft decoding stops at this many times the target size
_FLOAT_AREA_MAX_PIXELS = 1_000_000  # `inter_area` shrinks smaller images through float32 (12 MB at most)
# Pillow refuses to open an image over twice its MAX_IMAGE_PIXELS whatever `max_pixels` says; raising its
# limit would lift it for every use of Pillow in the process
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# Pillow's JPEG draft scale -> the name of OpenCV's read flag for the same DCT scaling
_OPENCV_READ = {
    1: "IMREAD_COLOR",
    2: "IMREAD_REDUCED_COLOR_2",
    4: "IMREAD_REDUCED_COLOR_4",
    8: "IMREAD_REDUCED_COLOR_8",
}
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees


@functools.cache
def opencv() -> ModuleType:
    """OpenCV, imported on first use and set to one thread (the downloader runs a worker process per
    core). The processes that only read these settings (a run's own, whose workers resize; the CLIP
    service's) then never map its libraries: 33 to 40 MB of RSS each."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


class DecodeError(Exception):
    """The bytes are not an image we can decode (status failed_to_decode)."""


class FilteredSize(Exception):
    """The image is decodable but outside the size rules (status filtered_size)."""

    def __init__(self, message: str, width: int, height: int):
        super().__init__(message)
        self.width, self.height = width, height


@dataclass(frozen=True)
class ImageSettings:
    image_size: int = 256
    # img2dataset's modes. YAML 1.1 (PyYAML, `dagster job launch --config`) reads a bare `no` as false,
    # which means the mode "no" here.
    resize_mode: str = "border"
    border_color: str = "white"  # the padding of `border`, as img2dataset's; a PIL colour name or #rrggbb
    resize_only_if_bigger: bool = False
    downscale_interpolation: str = "area"  # img2dataset's defaults
    upscale_interpolation: str = "lanczos"
    encode_format: str = "jpg"
    # JPEG and WebP quality, 0-100 (over 100: lossless WebP, as OpenCV writes it for img2dataset); for PNG
    # the zlib compression level, 0-9
    encode_quality: int = 95
    skip_reencode: bool = False  # an image neither resized nor turned keeps its bytes if in encode_format
    min_image_size: int = 0
    max_image_area: int = 0  # width x height; larger images are filtered_size (0: no limit)
    max_aspect_ratio: float = 0.0  # 0: no limit
    max_pixels: int = 89_478_485  # bombs are failed_to_decode; Pillow's default; 1-PILLOW_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.resize_mode is False:
            object.__setattr__(self, "resize_mode", "no")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        for name in (self.downscale_interpolation, self.upscale_interpolation):
            if name not in INTERPOLATIONS:
                raise ValueError(f"interpolation {name!r} is not one of {tuple(INTERPOLATIONS)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format {self.encode_format!r} is not one of {tuple(ENCODE_FORMATS)}")
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ValueError(
                f"encode_quality {self.encode_quality} is not a PNG compression level: for png it is 0-9"
            )
        if self.encode_format != "png" and self.encode_quality < 0:
            raise ValueError(f"encode_quality {self.encode_quality} is not a JPEG or WebP quality: 0-100")
        if not 1 <= self.max_pixels <= PILLOW_MAX_PIXELS:
            raise ValueError(
                f"max_pixels {self.max_pixels} is not 1-{PILLOW_MAX_PIXELS} (Pillow refuses an image of "
                f"more pixels than {PILLOW_MAX_PIXELS} as a decompression bomb, whatever max_pixels says)"
            )
        ImageColor.getrgb(self.border_color)  # ValueError: unknown color specifier


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    phash: int  # perceptual_hash of the image as resized, before any border


PHASH_SIDE = 32  # the hash's greyscale thumbnail, whose lowest 8x8 frequencies it keeps
_DCT = np.cos(
    np.pi * (2 * np.arange(PHASH_SIDE)[None, :] + 1) * np.arange(PHASH_SIDE)[:, None] / (2 * PHASH_SIDE)
)[:8]


def perceptual_hash(image: Image.Image) -> int:
    """A DCT perceptual hash (pHash), 63 bits in a non-negative int64: the 8x8 lowest frequencies of a
    32x32 greyscale thumbnail but the constant one, a bit set where one is above their median.
    Resizing and re-encoding change a few bits; another image, about half. The Hamming distance of
    two is DuckDB's `bit_count(xor(a, b))`."""
    thumbnail = image.resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.BOX).convert("L")
    frequencies = (_DCT @ np.asarray(thumbnail, np.float64) @ _DCT.T).ravel()[1:]
    middle = frequencies.size // 2  # an odd count: np.median's value, without its overhead
    median = np.partition(frequencies, middle)[middle]
    bits = np.append(False, frequencies > median)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """The number of bits in which two perceptual hashes differ."""
    return (a ^ b).bit_count()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The whole image in `data`, in EXIF orientation, as RGB (what `process_image` resizes)."""
    return _load_rgb(_open(data, max_pixels))


def stored_image_bytes(members: dict[str, bytes]) -> bytes:
    """The image of a stored webdataset sample ({extension: bytes}), in whichever format it was encoded;
    empty when it has none."""
    return next((members[ext] for ext in ENCODE_FORMATS if ext in members), b"")


def process_image(data: bytes, settings: ImageSettings) -> ProcessedImage:
    image = _open(data, settings.max_pixels)
    raw_width, raw_height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is not worth losing the image for
        orientation = 1
    width, height = (raw_height, raw_width) if orientation in _SWAPS_AXES else (raw_width, raw_height)
    _check_size(width, height, settings)

    target = _target_size(width, height, settings)
    _check_output(target, width, height, settings)
    source_format = _format(image)
    # the DCT scaling averages, as INTER_AREA does; OpenCV's other filters shrink the whole image unaveraged
    if target != (width, height) and source_format == "JPEG" and settings.downscale_interpolation == "area":
        request = (target[1], target[0]) if orientation in _SWAPS_AXES else target
        image.draft("RGB", (request[0] * _DRAFT_MARGIN, request[1] * _DRAFT_MARGIN))
    transparent = _has_alpha(image)
    image = _resized(image, data, orientation, target, settings)
    phash = perceptual_hash(image)
    if not _left_alone(width, height, settings):
        image = _crop_or_pad(image, settings)
    unchanged = image.size == (raw_width, raw_height) and orientation == 1 and not transparent
    if settings.skip_reencode and unchanged and source_format == ENCODE_FORMATS[settings.encode_format]:
        return ProcessedImage(data, image.width, image.height, width, height, phash)
    return ProcessedImage(_encode(image, settings), image.width, image.height, width, height, phash)


def _resized(
    image: Image.Image, data: bytes, orientation: int, target: tuple[int, int], settings: ImageSettings
) -> Image.Image:
    """The opened `image` (of `data`) decoded, turned upright, in RGB and resized to `target`."""
    turned = image.size[::-1] if orientation in _SWAPS_AXES else image.size  # as decoded (after any draft)
    down = target[0] < turned[0] or target[1] < turned[1]  # a side of 2 px may round back to 2
    filter_ = settings.downscale_interpolation if down else settings.upscale_interpolation
    if filter_ == "area" and down and (pixels := _opencv_jpeg(data, image, orientation)) is not None:
        cv2 = opencv()
        return Image.fromarray(cv2.cvtColor(inter_area(pixels, target), cv2.COLOR_BGR2RGB))
    image = _load_rgb(image, orientation)
    if target == image.size:
        return image
    if filter_ == "area" and down:
        return area_resize(image, target)
    cv2 = opencv()
    flag = getattr(cv2, INTERPOLATIONS[filter_])
    return Image.fromarray(cv2.resize(np.asarray(image), target, interpolation=flag))


def _opencv_jpeg(data: bytes, image: Image.Image, orientation: int) -> np.ndarray | None:
    """The pixels (BGR) of an upright, complete colour JPEG, decoded by OpenCV at the scale of Pillow's draft:
    the same libjpeg-turbo decode as Pillow's, without copying a full-size image out of Pillow (a sixth of
    `process_image` on a web-sized photo). None where Pillow decodes: another format or mode, a turn, no end
    marker (Pillow says a truncated file is one; OpenCV fills it in grey), or a decode OpenCV refuses."""
    if _format(image) != "JPEG" or image.mode != "RGB" or orientation != 1 or not data.endswith(b"\xff\xd9"):
        return None
    scale = image.decoderconfig[0] if image.decoderconfig else 1
    cv2 = opencv()
    read = getattr(cv2, _OPENCV_READ[scale]) | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), read)
    return pixels if pixels is not None and pixels.shape[1::-1] == image.size else None


def _format(image: Image.Image) -> str | None:
    """Pillow's name of the image's format; a JPEG with more pictures after the first (phones' depth and gain
    maps), which Pillow names MPO, is a JPEG."""
    return "JPEG" if image.format == "MPO" else image.format


def area_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An RGB image shrunk to `size` by OpenCV's INTER_AREA, img2dataset's own downscale."""
    return Image.fromarray(inter_area(np.asarray(image), size))


def inter_area(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """8-bit pixels shrunk to `size` (width, height, neither larger than theirs) by OpenCV's INTER_AREA,
    byte for byte. Where the scale is not a whole number in both axes, OpenCV sums in float32 in a scalar
    loop whatever the input; given float32 pixels that loop runs 25-30 % faster up to a megapixel (less
    above, slower over 2.5 MP here, as the copy outgrows the caches), and the rounding back to 8 bits is
    the same `cvRound`. Up to `_FLOAT_AREA_MAX_PIXELS`, so that the float copy stays small beside a
    worker's memory (docs/benchmarks.md). Whole-number scales keep OpenCV's integer fast path, which
    rounds its own way."""
    cv2 = opencv()
    height, width = pixels.shape[:2]
    if (width % size[0] == 0 and height % size[1] == 0) or width * height > _FLOAT_AREA_MAX_PIXELS:
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return cv2.convertScaleAbs(cv2.resize(pixels.astype(np.float32), size, interpolation=cv2.INTER_AREA))


def _encode(image: Image.Image, settings: ImageSettings) -> bytes:
    """The pixels alone in `encode_format`: the source's comments, EXIF and ICC profile are not copied
    (Pillow would write its JPEG comment again), as OpenCV does not in img2dataset."""
    image.info = {}
    fmt = ENCODE_FORMATS[settings.encode_format]
    if fmt == "PNG":
        options = {"compress_level": settings.encode_quality}
    elif fmt == "WEBP" and settings.encode_quality > 100:
        options = {"lossless": True}
    else:
        options = {"quality": settings.encode_quality}
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image in `data`, its pixels not decoded yet; DecodeError if it is none or a decompression bomb."""
    if not data:
        raise DecodeError("empty body")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image: no known image format in the bytes") from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # a plugin's own, on a broken file: NotImplementedError from DDS, among others
        raise DecodeError(_cannot_decode(exc)) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(f"decompression bomb: {width}x{height} pixels is over max_pixels={max_pixels}")
    return image


def _load_rgb(image: Image.Image, orientation: int | None = None) -> Image.Image:
    """Decode the pixels, turn them as the EXIF orientation says, and convert to RGB. With the
    orientation known and 1 (upright), the turn, a copy of every pixel, is skipped."""
    try:
        image.load()
        return _to_rgb(image if orientation == 1 else ImageOps.exif_transpose(image))
    except Exception as exc:  # a plugin's own, on a broken file: TypeError from TIFF, among others
        raise DecodeError(_cannot_decode(exc)) from exc


def _cannot_decode(exc: Exception) -> str:
    """Why the bytes could not be decoded: the decoder's message, with its error class where that is not the
    usual OSError or ValueError."""
    usual = isinstance(exc, (OSError, ValueError, SyntaxError, Image.DecompressionBombError))
    return f"cannot decode: {exc}" if usual else f"cannot decode: {type(exc).__name__}: {exc}"


def _check_size(width: int, height: int, settings: ImageSettings) -> None:
    if min(width, height) < settings.min_image_size:
        raise FilteredSize(
            f"too small: {width}x{height} is under min_image_size={settings.min_image_size}", width, height
        )
    if settings.max_image_area and width * height > settings.max_image_area:
        message = f"too large: {width}x{height} is over max_image_area={settings.max_image_area}"
        raise FilteredSize(message, width, height)
    ratio = max(width, height) / max(1, min(width, height))
    if settings.max_aspect_ratio and ratio > settings.max_aspect_ratio:
        message = f"aspect ratio: {ratio:.2f} is over max_aspect_ratio={settings.max_aspect_ratio:g}"
        raise FilteredSize(message, width, height)


def _check_output(target: tuple[int, int], width: int, height: int, settings: ImageSettings) -> None:
    """FilteredSize for a resize that memory or the encoder cannot take: an extreme aspect ratio whose
    shorter side brought to `image_size` makes more than `max_pixels` (20000x1 in center_crop was
    5,120,000x256 before its crop, 5 GB), or an image over its format's longest side (65,500 px in
    JPEG, 16,383 in WebP), which the encoder refused with an error of its own."""
    if target[0] * target[1] > settings.max_pixels:
        message = f"too large resized: {target[0]}x{target[1]} is over max_pixels={settings.max_pixels}"
        raise FilteredSize(message, width, height)
    final = _crop_or_pad_size(target, settings) if not _left_alone(width, height, settings) else target
    limit = _MAX_SIDE.get(settings.encode_format)
    if limit and max(final) > limit:
        message = f"too large for {settings.encode_format}: {final[0]}x{final[1]}, over its {limit} px a side"
        raise FilteredSize(message, width, height)


def _target_size(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """The size to resize to before any crop or border."""
    mode, size = settings.resize_mode, settings.image_size
    if mode == "no":
        return width, height
    if _left_alone(width, height, settings):
        return width, height
    scale = size / _resized_side(width, height, mode)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resized_side(width: int, height: int, mode: str) -> int:
    """The side a mode brings to `image_size`: the shorter for keep_ratio and center_crop, else the longer."""
    return min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)


def _left_alone(width: int, height: int, settings: ImageSettings) -> bool:
    """With `resize_only_if_bigger`, an image whose resized side is not over `image_size` keeps its size
    in every mode: neither resized nor cropped nor padded, as img2dataset leaves it."""
    side = _resized_side(width, height, settings.resize_mode)
    return settings.resize_only_if_bigger and side <= settings.image_size


def _crop_or_pad_size(size: tuple[int, int], settings: ImageSettings) -> tuple[int, int]:
    """The size `_crop_or_pad` makes of an image of `size`."""
    side = settings.image_size
    if settings.resize_mode == "center_crop":
        return min(side, size[0]), min(side, size[1])
    if settings.resize_mode == "border":
        return max(side, size[0]), max(side, size[1])
    return size


def _crop_or_pad(image: Image.Image, settings: ImageSettings) -> Image.Image:
    w, h = _crop_or_pad_size(image.size, settings)
    if settings.resize_mode == "center_crop":
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return image.crop((left, top, left + w, top + h))
    if settings.resize_mode == "border" and image.size != (w, h):
        canvas = Image.new("RGB", (w, h), settings.border_color)
        canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
        return canvas
    return image


def _has_alpha(image: Image.Image) -> bool:
    """Transparency: an alpha channel, or a palette's or an RGB PNG's transparent colour (`tRNS`),
    which OpenCV reads as alpha for img2dataset."""
    keyed = image.mode in ("P", "RGB") and "transparency" in image.info
    return image.mode in ("RGBA", "LA", "PA") or keyed


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white, as a browser would show them on a white page. 16-bit greys
    keep their high bytes, as Pillow reads 16-bit colour (its own conversion clips them to white)."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")
