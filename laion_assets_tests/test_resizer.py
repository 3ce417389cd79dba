"""Images exactly as img2dataset makes them: its resizer's test cases (every mode x resize_only_if_bigger x
256 and 512 x jpg, webp and png, on images of the sizes its tests use), compared with img2dataset's own
resizer, run in its own venv (bench/peers.py): the same sizes and decisions, and within 35 dB PSNR."""

import importlib
import io
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from laion_assets.pipeline.download import imaging
from laion_assets.pipeline.download.imaging import (
    PILLOW_MAX_PIXELS,
    DecodeError,
    FilteredSize,
    ImageSettings,
    process_image,
)

BENCH = Path(__file__).resolve().parent.parent / "bench"
# the sizes of img2dataset's test images (tests/resize_test_image), portrait, landscape and near square
SIZES = [(123, 456), (208, 495), (321, 421), (389, 535), (416, 264), (456, 123), (524, 316)]
MODES = ["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"]
FORMATS = {"jpg": 95, "webp": 95, "png": 9}  # encode_quality as img2dataset's tests give it
MIN_PSNR = 35.0


def photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: a smooth colour field, grain, and a few hard-edged blocks."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    pixels = np.clip(np.asarray(field, np.float32) + rng.normal(0, 12, (height, width, 3)), 0, 255)
    pixels = pixels.astype(np.uint8)
    for _ in range(6):
        left, top = rng.integers(0, width - 10), rng.integers(0, height - 10)
        pixels[top : top + rng.integers(5, height // 2), left : left + rng.integers(5, width // 2)] = (
            rng.integers(0, 255, 3)
        )
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resize-sources")
    for seed, (width, height) in enumerate(SIZES):
        (folder / f"{width}_{height}.jpg").write_bytes(photo(width, height, seed))
    return folder


def case_name(size: int, mode: str, only_if_bigger: bool, fmt: str) -> str:
    return f"{size}-{mode}-{int(only_if_bigger)}-{fmt}"


CASES = list(itertools.product([256, 512], MODES, [False, True], FORMATS))


def from_bench(module: str):
    """A module of bench/ (scripts, not a package), imported with bench/ on the path for the import only."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def img2dataset_outputs(sources, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("img2dataset")
    cases = {
        case_name(*case): {
            "image_size": case[0],
            "resize_mode": case[1],
            "resize_only_if_bigger": case[2],
            "encode_format": case[3],
            "encode_quality": FORMATS[case[3]],
        }
        for case in CASES
    }
    found, _ = from_bench("peers").img2dataset_resize(sources, out, cases)
    return out, found


def psnr_to_img2dataset(ours: bytes, theirs: Path) -> float:
    """The PSNR of our encoded image against img2dataset's output file, both as RGB."""
    a, b = (np.asarray(Image.open(f).convert("RGB"), np.float64) for f in (io.BytesIO(ours), theirs))
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("size, mode, only_if_bigger, fmt", CASES, ids=[case_name(*c) for c in CASES])
def test_every_case_is_img2datasets_size_and_within_35_db_of_its_pixels(
    sources, img2dataset_outputs, size, mode, only_if_bigger, fmt
):
    out, found = img2dataset_outputs
    settings = ImageSettings(
        image_size=size,
        resize_mode=mode,
        resize_only_if_bigger=only_if_bigger,
        encode_format=fmt,
        encode_quality=FORMATS[fmt],
    )
    for source in sorted(sources.iterdir()):
        name = f"{case_name(size, mode, only_if_bigger, fmt)}-{source.stem}.{fmt}"
        width, height, original_width, original_height, error = found[name]
        assert error is None
        ours = process_image(source.read_bytes(), settings)
        assert (ours.width, ours.height, ours.original_width, ours.original_height) == (
            width,
            height,
            original_width,
            original_height,
        ), name
        assert Image.open(io.BytesIO(ours.data)).format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]
        assert psnr_to_img2dataset(ours.data, out / name) >= MIN_PSNR, name


def test_large_pages_of_text_stay_within_35_db_of_img2datasets_pixels(tmp_path):
    """The JPEG draft decode keeps the bound on pages of text, where it strays furthest from a full decode
    (photos stay far closer): the first page is not drafted, the last is. Drafting down to twice the target
    size, the first came out 27.5 dB from img2dataset's output at 256 px; down to four times, the second
    33.6 dB."""
    page_of_text = from_bench("download").page_of_text
    sources = tmp_path / "sources"
    sources.mkdir()
    pages = {"text_1100_825": (1100, 825), "text_2060_1545": (2060, 1545), "text_3349_2511": (3349, 2511)}
    for stem, size in pages.items():
        (sources / f"{stem}.jpg").write_bytes(page_of_text(*size))
    cases = {
        f"{size}-{mode}": {"image_size": size, "resize_mode": mode, "resize_only_if_bigger": False}
        for size in (256, 512)
        for mode in ("border", "keep_ratio", "center_crop")
    }
    found, _ = from_bench("peers").img2dataset_resize(sources, tmp_path / "img2dataset", cases)
    for case, options in cases.items():
        settings = ImageSettings(image_size=options["image_size"], resize_mode=options["resize_mode"])
        for stem in pages:
            name = f"{case}-{stem}.jpg"
            ours = process_image((sources / f"{stem}.jpg").read_bytes(), settings)
            assert [ours.width, ours.height] == found[name][:2], name
            assert psnr_to_img2dataset(ours.data, tmp_path / "img2dataset" / name) >= MIN_PSNR, name


def test_skip_reencode_keeps_the_original_bytes_only_when_nothing_changes(sources):
    jpeg = (sources / "321_421.jpg").read_bytes()
    kept = ImageSettings(resize_mode="no", skip_reencode=True)
    assert process_image(jpeg, kept).data == jpeg
    small = ImageSettings(image_size=512, resize_only_if_bigger=True, skip_reencode=True)
    assert process_image(jpeg, small).data == jpeg  # not bigger than 512: left as it is
    for changed in (
        replace(kept, encode_format="webp"),  # another format
        replace(kept, resize_mode="border"),  # resized
        ImageSettings(resize_mode="no"),  # not asked for
    ):
        assert process_image(jpeg, changed).data != jpeg, changed


def test_max_image_area_filters_as_img2datasets_does(sources):
    """img2dataset's filter test: at max_image_area=60000, two of its seven images pass."""
    settings = ImageSettings(resize_mode="no", resize_only_if_bigger=True, max_image_area=60000)
    outcomes = {}
    for source in sources.iterdir():
        try:
            process_image(source.read_bytes(), settings)
            outcomes[source.stem] = None
        except FilteredSize as exc:
            outcomes[source.stem] = str(exc)
    assert sorted(k for k, v in outcomes.items() if v is None) == ["123_456", "456_123"]
    assert outcomes["524_316"] == "too large: 524x316 is over max_image_area=60000"


def test_min_size_and_aspect_ratio_filter_as_img2datasets_do(sources):
    settings = ImageSettings(resize_mode="no", min_image_size=200, max_aspect_ratio=1.5)
    errors = []
    for source in sources.iterdir():
        try:
            process_image(source.read_bytes(), settings)
            errors.append(None)
        except FilteredSize as exc:
            errors.append(str(exc).split(":")[0])
    expected = [None, None, "too small", "too small", "aspect ratio", "aspect ratio", "aspect ratio"]
    assert sorted(errors, key=str) == sorted(expected, key=str)


def test_png_encode_quality_is_the_compression_level(sources):
    jpeg = (sources / "524_316.jpg").read_bytes()
    fast, small = (
        process_image(jpeg, ImageSettings(encode_format="png", encode_quality=level)).data for level in (0, 9)
    )
    assert len(small) < len(fast) / 2  # level 0 stores, 9 compresses
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast))), np.asarray(Image.open(io.BytesIO(small))))
    with pytest.raises(ValueError, match="PNG compression level"):
        ImageSettings(encode_format="png", encode_quality=95)


def test_the_sources_jpeg_comment_is_not_copied(sources):
    with_comment = io.BytesIO()
    Image.open(sources / "389_535.jpg").save(with_comment, "JPEG", comment=b"camera serial 12345")
    for settings in (ImageSettings(), ImageSettings(resize_mode="no")):
        data = process_image(with_comment.getvalue(), settings).data
        assert b"camera serial 12345" not in data
        assert "comment" not in Image.open(io.BytesIO(data)).info


def test_the_opencv_decode_of_upright_jpegs_gives_pillows_bytes(sources, monkeypatch):
    """Upright colour JPEGs that are shrunk by area are decoded by OpenCV (at Pillow's draft scale): the
    output is byte for byte what Pillow's decode gives, at every draft scale (1, 2, 4 and 8)."""
    large = photo(2400, 1600, seed=7)  # border drafts it at 8 for 32, 4 for 64, 2 for 128, 1 for 512
    images = [large] + [source.read_bytes() for source in sorted(sources.iterdir())]
    scales = set()  # the draft scales OpenCV decoded at

    def opencv(data, image, orientation):
        pixels = decode(data, image, orientation)
        if pixels is not None:
            scales.add(image.decoderconfig[0] if image.decoderconfig else 1)
        return pixels

    decode = imaging._opencv_jpeg
    monkeypatch.setattr(imaging, "_opencv_jpeg", opencv)
    outputs = {}
    for size, mode, data in itertools.product([32, 64, 128, 512], MODES, images):
        outputs[size, mode, data] = process_image(data, ImageSettings(image_size=size, resize_mode=mode))
    assert scales == {1, 2, 4, 8}
    monkeypatch.setattr(imaging, "_opencv_jpeg", lambda *a: None)  # Pillow's decode everywhere
    for (size, mode, data), ours in outputs.items():
        assert process_image(data, ImageSettings(image_size=size, resize_mode=mode)) == ours, (size, mode)


def test_jpegs_that_opencv_would_decode_otherwise_go_to_pillow(sources):
    """A truncated JPEG fails as Pillow says (OpenCV would fill it in grey), and a turned one is turned."""
    jpeg = (sources / "524_316.jpg").read_bytes()
    assert imaging._opencv_jpeg(jpeg, Image.open(io.BytesIO(jpeg)), orientation=1) is not None
    with pytest.raises(DecodeError, match="image file is truncated"):
        process_image(jpeg[: len(jpeg) * 2 // 3], ImageSettings())
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees clockwise to view it
    Image.open(io.BytesIO(jpeg)).save(turned, "JPEG", quality=95, exif=exif)
    assert imaging._opencv_jpeg(turned.getvalue(), Image.open(turned), orientation=6) is None
    shown = process_image(turned.getvalue(), ImageSettings(resize_mode="keep_ratio_largest"))
    assert (shown.width, shown.height, shown.original_width, shown.original_height) == (154, 256, 316, 524)


def test_the_area_shrink_is_opencvs_inter_area_byte_for_byte():
    """`inter_area` takes a float32 route for speed where the scale is not whole: its bytes are OpenCV's
    INTER_AREA on the 8-bit pixels, on noise, black-and-white text-like pixels and near-flat ones, at
    fractional, whole and mixed scales, and either side of the float route's size limit."""
    cv2 = imaging.opencv()
    rng = np.random.default_rng(3)
    sources = {
        "noise": rng.integers(0, 256, (1201, 1301, 3), dtype=np.uint8),
        "ink": np.where(rng.random((1201, 1301, 1)) < 0.5, 0, 255).astype(np.uint8).repeat(3, 2),
        "flat": rng.integers(120, 136, (1201, 1301, 3), dtype=np.uint8),
    }
    shapes = [(535, 389), (316, 524), (640, 480), (1200, 1300), (1201, 1301), (97, 3)]
    sizes = [(256, 186), (154, 256), (320, 240), (100, 650), (1301, 1201), (1, 1), (7, 1)]
    limit = imaging._FLOAT_AREA_MAX_PIXELS
    big = rng.integers(0, 256, (limit // 1500 + 1, 1500, 3), dtype=np.uint8)  # over the limit
    checked = 0
    for name, pixels in sources.items():
        for (height, width), size in itertools.product(shapes, sizes):
            if size[0] <= width and size[1] <= height:
                part = pixels[:height, :width]
                expected = cv2.resize(part, size, interpolation=cv2.INTER_AREA)
                assert np.array_equal(imaging.inter_area(part, size), expected), (name, width, height, size)
                checked += 1
    assert checked > 40
    assert np.array_equal(
        imaging.inter_area(big, (256, 250)), cv2.resize(big, (256, 250), interpolation=cv2.INTER_AREA)
    )


def blank_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("size", "settings", "message"),
    [
        # the shorter side brought to 256 first: 153,600x256 before the crop (20000x1 was 5 GB)
        (
            (600, 1),
            ImageSettings(resize_mode="center_crop", max_pixels=100_000),
            "too large resized: 153600x256",
        ),
        (
            (2, 300),
            ImageSettings(resize_mode="keep_ratio", encode_format="webp"),
            "too large for webp: 256x38400",
        ),
        ((1, 300), ImageSettings(resize_mode="keep_ratio"), "too large for jpg: 256x76800"),
    ],
)
def test_a_resize_that_memory_or_the_encoder_cannot_take_is_filtered(size, settings, message):
    # the first allocated its resize; the others ended as failed_to_download, "unexpected: OSError" or
    # "ValueError" of the encoder, and retry_failed fetched them again at every run
    with pytest.raises(FilteredSize, match=message) as raised:
        process_image(blank_png(*size), settings)
    assert (raised.value.width, raised.value.height) == size


def test_a_colour_keyed_png_and_a_narrow_image_come_out_as_img2datasets(tmp_path):
    # an RGB PNG's transparent colour (tRNS) was left black, where img2dataset's OpenCV reads it as alpha
    # and whitens it (5 dB apart); a 2x300 image kept its width, so it was upscaled by Lanczos (26 dB)
    keyed = np.zeros((300, 500, 3), np.uint8)
    keyed[:, 250:] = 200
    narrow = np.random.default_rng(0).integers(0, 256, (300, 2, 3), np.uint8)
    sources = tmp_path / "sources"
    sources.mkdir()
    Image.fromarray(keyed).save(sources / "keyed.png", transparency=(0, 0, 0))
    Image.fromarray(narrow).save(sources / "narrow.png")
    modes = {"keyed": "border", "narrow": "keep_ratio_largest"}
    cases = {
        name: {
            "image_size": 256,
            "resize_mode": mode,
            "resize_only_if_bigger": False,
            "encode_format": "png",
            "encode_quality": 9,
        }
        for name, mode in modes.items()
    }
    found, _ = from_bench("peers").img2dataset_resize(sources, tmp_path / "out", cases)
    for name, mode in modes.items():
        ours = process_image(
            (sources / f"{name}.png").read_bytes(),
            ImageSettings(resize_mode=mode, encode_format="png", encode_quality=9),
        )
        theirs = tmp_path / "out" / f"{name}-{name}.png"
        assert found[theirs.name][:2] == [ours.width, ours.height], name
        assert psnr_to_img2dataset(ours.data, theirs) >= MIN_PSNR, name


def test_a_decoders_own_error_is_a_decode_error():
    """Pillow's plugins raise more than OSError and ValueError on some broken files (NotImplementedError
    from a DDS of unknown pixel-format flags, TypeError from a TIFF whose offset is a fraction): the row is
    failed_to_decode, not failed_to_download 'unexpected', which retry_failed would fetch again each run."""
    out = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(out, "DDS")
    data = out.getvalue()[:80] + (0x2000).to_bytes(4, "little") + out.getvalue()[84:]
    with pytest.raises(
        DecodeError, match=r"^cannot decode: NotImplementedError: Unknown pixel format flags 8192"
    ):
        process_image(data, ImageSettings())


def test_webp_quality_over_100_is_lossless_as_in_img2dataset(sources, tmp_path):
    """img2dataset asks OpenCV for lossless WebP with an encode_quality over 100; Pillow refused such a
    quality ('invalid configuration') at every image, so each row of a shard ended failed_to_download
    'unexpected: ValueError', and retry_failed fetched them all again at every run."""
    options = {"image_size": 256, "resize_mode": "border", "resize_only_if_bigger": False}
    options |= {"encode_format": "webp", "encode_quality": 101}
    found, _ = from_bench("peers").img2dataset_resize(sources, tmp_path, {"lossless": options})
    settings = ImageSettings(**options)
    for source in sorted(sources.iterdir()):
        ours = process_image(source.read_bytes(), settings)
        theirs = tmp_path / f"lossless-{source.stem}.webp"
        assert found[theirs.name][:2] == [ours.width, ours.height]
        assert psnr_to_img2dataset(ours.data, theirs) == float("inf"), source.name
        lossy = process_image(source.read_bytes(), replace(settings, encode_quality=100))
        assert len(ours.data) > len(lossy.data) * 2
    with pytest.raises(ValueError, match="encode_quality -1 is not a JPEG or WebP quality"):
        ImageSettings(encode_format="webp", encode_quality=-1)


def test_max_pixels_is_honoured_up_to_pillows_own_limit_and_refused_above():
    """Pillow refuses an image over PILLOW_MAX_PIXELS whatever `max_pixels` says: a setting of 300,000,000
    failed a 20000x9000 PNG with Pillow's message of a limit the user never set. Such a setting, and 0
    (every image a bomb), are refused; up to the limit, `max_pixels` decides."""
    for value in (0, PILLOW_MAX_PIXELS + 1, 300_000_000):
        with pytest.raises(ValueError, match=f"max_pixels {value} is not 1-{PILLOW_MAX_PIXELS}"):
            ImageSettings(max_pixels=value)
    flat = io.BytesIO()
    Image.new("L", (10_000, 9_000), 128).save(flat, "PNG")  # 90 MP: over Pillow's default, under its limit
    with pytest.raises(DecodeError, match="decompression bomb: 10000x9000 pixels is over max_pixels="):
        process_image(flat.getvalue(), ImageSettings())
    resized = process_image(flat.getvalue(), ImageSettings(max_pixels=PILLOW_MAX_PIXELS))
    assert (resized.width, resized.height, resized.original_width) == (256, 256, 10_000)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_greyscale_image_keeps_its_greys(fmt):
    """Pillow opens a 16-bit greyscale PNG or TIFF as I;16, whose conversion to RGB clips every value over
    255: the image came out all white (so does img2dataset's, whose OpenCV saturates 16 bits to 8), where
    a 16-bit colour PNG, which Pillow reads by its high bytes, kept its colours."""
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (90, 120), dtype=np.uint8)
    deep = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 256 + rng.integers(0, 256, grey.shape, dtype=np.uint16)).save(
        deep, fmt
    )
    assert Image.open(deep).mode == "I;16"
    shallow = io.BytesIO()
    Image.fromarray(grey).save(shallow, "PNG")
    for settings in (ImageSettings(resize_mode="no", encode_format="png", encode_quality=1), ImageSettings()):
        assert process_image(deep.getvalue(), settings) == process_image(shallow.getvalue(), settings)


def test_a_multi_picture_jpeg_is_a_jpeg():
    """Phones write JPEGs with more pictures after the first (MPF: depth and gain maps), which Pillow names
    MPO: skip_reencode re-encoded them (img2dataset keeps them, a JPEG to imghdr), and a large one was
    decoded whole by Pillow, without the draft and the OpenCV decode a JPEG gets (three times the CPU
    on a 12 MP photo), its pixels other than the same picture's as a plain JPEG."""
    first = Image.open(io.BytesIO(photo(2400, 1600, seed=9)))
    multi, plain = io.BytesIO(), io.BytesIO()
    first.save(multi, "MPO", save_all=True, append_images=[first.resize((240, 160))], quality=90)
    first.save(plain, "JPEG", quality=90)
    assert Image.open(multi).format == "MPO"
    kept = ImageSettings(resize_mode="no", skip_reencode=True)
    assert process_image(multi.getvalue(), kept).data == multi.getvalue()
    # drafted at 1/2 and 1/4 as the plain JPEG is
    for settings in (ImageSettings(image_size=128), ImageSettings(image_size=64, resize_mode="center_crop")):
        assert process_image(multi.getvalue(), settings) == process_image(plain.getvalue(), settings)


# (downscale, upscale): each name once as either
INTERPOLATION_CASES = [
    ("nearest", "bilinear"),
    ("bilinear", "bicubic"),
    ("bicubic", "lanczos"),
    ("lanczos", "area"),
    ("area", "nearest"),
]


def test_every_interpolation_is_img2datasets(sources, tmp_path):
    """img2dataset resizes with OpenCV's own filters; Pillow's were used for all but the area shrink: its
    shrinks are antialiased where OpenCV's nearest, bilinear, bicubic and Lanczos are not, its nearest
    samples pixel centres, and its area upscale is a box: 26 to 37 dB from img2dataset's pixels. A large
    JPEG was drafted (DCT-averaged) before any shrink, where img2dataset's OpenCV shrinks the whole image:
    a page of text came out 12 to 16 dB away."""
    folder = tmp_path / "sources"
    folder.mkdir()
    for source in sources.iterdir():
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "text_3349_2511.jpg").write_bytes(from_bench("download").page_of_text(3349, 2511))
    cases = {
        f"{down}-{up}": {
            "image_size": 128,  # the page drafted at 1/2; 123x456 enlarged, the others shrunk
            "resize_mode": "keep_ratio",
            "resize_only_if_bigger": False,
            "downscale_interpolation": down,
            "upscale_interpolation": up,
        }
        for down, up in INTERPOLATION_CASES
    }
    found, _ = from_bench("peers").img2dataset_resize(folder, tmp_path, cases)
    for case, options in cases.items():
        settings = ImageSettings(**{k: v for k, v in options.items() if k != "resize_only_if_bigger"})
        for source in sorted(folder.iterdir()):
            name = f"{case}-{source.stem}.jpg"
            ours = process_image(source.read_bytes(), settings)
            assert [ours.width, ours.height] == found[name][:2], name
            assert psnr_to_img2dataset(ours.data, tmp_path / name) >= MIN_PSNR, name
