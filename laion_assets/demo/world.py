"""A synthetic web from a seed: coloured shapes on patterned backgrounds, published with alt text.

About a fifth of the images carry the caption of another image that differs in both shape and
colour, as if the captions had been shuffled: those are the pairs the CLIP filter should drop.
Some URLs fail the way the real web does (404, 500, HTML, truncated JPEG, an opt-out header).
Planted copies, when asked for, are what dataset-level dedup must find: the same link again, the
same bytes under another URL, or another URL showing a resized, re-encoded, cropped or watermarked
copy. Everything, image bytes included, is a function of the seed.

The world also knows the truth of each quality score (pipeline/scores): a class of images that is
"unsafe" (every ring, standing in for what LAION's NSFW detector flags), a watermark overlaid on some
images (and on every overlaid copy), an aesthetic score derived from what the image shows, and captions
in several languages, each written from templates made for this world.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from types import MappingProxyType
from urllib.parse import urlsplit

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "teal": (0, 150, 150),
    "blue": (40, 70, 215),
    "purple": (135, 50, 180),
    "pink": (245, 120, 190),
}
# Neutral, so that the shape's colour is never confused with the background's.
BACKGROUNDS: dict[str, RGB] = {
    "white": (245, 245, 245),
    "grey": (150, 150, 150),
    "beige": (225, 210, 180),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart")
PATTERNS = ("plain", "striped", "dotted", "checkered")

IMAGE = "image"
NOT_FOUND = "not_found"  # 404
SERVER_ERROR = "server_error"  # 500
NOT_AN_IMAGE = "not_an_image"  # an HTML page answered with 200
TRUNCATED = "truncated"  # the first half of a JPEG
OPTED_OUT = "opted_out"  # the image, with X-Robots-Tag: noai
FAILURE_KINDS = (NOT_FOUND, SERVER_ERROR, NOT_AN_IMAGE, TRUNCATED, OPTED_OUT)
DEFAULT_FAILURES: Mapping[str, int] = {
    NOT_FOUND: 6,
    SERVER_ERROR: 3,
    NOT_AN_IMAGE: 4,
    TRUNCATED: 4,
    OPTED_OUT: 6,
}

LICENSES = (
    None,
    "https://creativecommons.org/licenses/by/4.0/",
    "https://creativecommons.org/licenses/by-sa/4.0/",
    "https://creativecommons.org/licenses/by-nc/4.0/",
    "https://creativecommons.org/publicdomain/zero/1.0/",
)
LICENSE_WEIGHTS = (6, 2, 1, 1, 1)

# Alt text as found on real pages; {a} is the article for the colour.
TEMPLATES = (
    "{a} {colour} {shape} on a {pattern} {background} background",
    "{Colour} {shape}, {pattern} {background} background",
    "stock photo: {colour} {shape}",
    "{colour} {shape} icon",
    "Illustration of {a} {colour} {shape} on {background}",
    "{Colour} {shape} clip art, {pattern} background",
    "simple {shape} shape in {colour}",
    "{A} {colour} {shape} sticker - free download",
    "{background} {pattern} wallpaper with {a} {colour} {shape}",
    "{Colour} {shape} vector image",
)
ASPECT_RATIOS = (1.0, 1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3)
JPEG_QUALITY = 90

# Planted copies of an image, each published by another page with its own true alt text.
REPEATED = "repeated"  # the same URL and caption again: an exact (url, caption) duplicate
SAME_BYTES = "same_bytes"  # the same bytes under another URL: an exact sha256 duplicate
RESIZED = "resized"  # to 90 %
REENCODED = "reencoded"  # at JPEG quality 70
CROPPED = "cropped"  # 2 % off each side
OVERLAID = "overlaid"  # a small watermark in a corner (`watermark`)
EXACT_COPIES = (REPEATED, SAME_BYTES)
NEAR_COPIES = (RESIZED, REENCODED, CROPPED, OVERLAID)
REENCODED_QUALITY = 70
PNG_FRACTION = 0.1


# The truths of the quality scores.
UNSAFE_SHAPE = "ring"
# Appeal of the colours the image shows, 0-1; the aesthetic truth weighs them (see `aesthetic_truth`).
COLOUR_APPEAL = {
    "red": 0.55,
    "orange": 0.7,
    "yellow": 0.35,
    "green": 0.6,
    "teal": 0.95,
    "blue": 0.85,
    "purple": 0.75,
    "pink": 0.2,
}
BACKGROUND_APPEAL = {"white": 0.9, "grey": 0.4, "beige": 0.7, "black": 0.15}
WATERMARK_TEXT = "(c) stock"

# Captions in other languages, written for this world (not by a model): per language, its words for the
# COLOURS, the SHAPES (with their article), the PATTERNS and the BACKGROUNDS, in their order, and its
# templates. Colours are named as nouns ("in red"), so that no adjective has to agree with its noun.
ENGLISH = "en"
FOREIGN = {
    "fr": (
        ("rouge", "orange", "jaune", "vert", "bleu canard", "bleu", "violet", "rose"),
        (
            "un cercle",
            "un carré",
            "un triangle",
            "une étoile",
            "une croix",
            "un anneau",
            "un hexagone",
            "un cœur",
        ),
        ("uni", "rayé", "à pois", "à damier"),
        ("blanc", "gris", "beige", "noir"),
        (
            "{shape} en {colour} sur un fond {background} {pattern}",
            "Dessin : {shape} en {colour}, sur fond {background}",
            "{shape} en {colour}, image libre de droits",
            "Illustration vectorielle : {shape} en {colour} sur un fond {pattern}",
        ),
    ),
    "de": (
        ("Rot", "Orange", "Gelb", "Grün", "Türkis", "Blau", "Lila", "Rosa"),
        (
            "ein Kreis",
            "ein Quadrat",
            "ein Dreieck",
            "ein Stern",
            "ein Kreuz",
            "ein Ring",
            "ein Sechseck",
            "ein Herz",
        ),
        ("einfarbig", "gestreift", "gepunktet", "kariert"),
        ("weißem", "grauem", "beigem", "schwarzem"),
        (
            "{shape} in {colour} auf {background} Hintergrund",
            "Symbol: {shape} in {colour}, der Hintergrund ist {pattern}",
            "{shape} in {colour} als Aufkleber, kostenlos herunterladen",
            "Zeichnung: {shape} in der Farbe {colour} auf {background} Hintergrund",
        ),
    ),
    "es": (
        ("rojo", "naranja", "amarillo", "verde", "verde azulado", "azul", "morado", "rosa"),
        (
            "un círculo",
            "un cuadrado",
            "un triángulo",
            "una estrella",
            "una cruz",
            "un anillo",
            "un hexágono",
            "un corazón",
        ),
        ("liso", "a rayas", "de lunares", "a cuadros"),
        ("blanco", "gris", "beige", "negro"),
        (
            "{shape} de color {colour} sobre el fondo {background} {pattern}",
            "Ilustración de {shape} de color {colour} y el fondo {background}",
            "Imagen gratis del dibujo de {shape} en {colour}",
            "Dibujo sencillo de {shape} en {colour}, con el fondo {pattern}",
        ),
    ),
    "it": (
        ("rosso", "arancione", "giallo", "verde", "verde acqua", "blu", "viola", "rosa"),
        (
            "un cerchio",
            "un quadrato",
            "un triangolo",
            "una stella",
            "una croce",
            "un anello",
            "un esagono",
            "un cuore",
        ),
        ("in tinta unita", "a righe", "a pois", "a quadretti"),
        ("bianco", "grigio", "beige", "nero"),
        (
            "{shape} in {colour} su uno sfondo {background} {pattern}",
            "Illustrazione di {shape} di colore {colour}",
            "Disegno di {shape} in {colour}, immagine gratuita",
            "Adesivo con {shape} in {colour} su sfondo {background}",
        ),
    ),
    "pt": (
        ("vermelho", "laranja", "amarelo", "verde", "verde-azulado", "azul", "roxo", "rosa"),
        (
            "um círculo",
            "um quadrado",
            "um triângulo",
            "uma estrela",
            "uma cruz",
            "um anel",
            "um hexágono",
            "um coração",
        ),
        ("liso", "listrado", "de bolinhas", "xadrez"),
        ("branco", "cinzento", "bege", "preto"),
        (
            "{shape} em {colour} sobre um fundo {background} {pattern}",
            "Ilustração de {shape} na cor {colour}",
            "Desenho de {shape} em {colour}, imagem grátis para baixar",
            "Autocolante com {shape} em {colour} num fundo {background}",
        ),
    ),
    "nl": (
        ("rood", "oranje", "geel", "groen", "turquoise", "blauw", "paars", "roze"),
        (
            "een cirkel",
            "een vierkant",
            "een driehoek",
            "een ster",
            "een kruis",
            "een ring",
            "een zeshoek",
            "een hart",
        ),
        ("effen", "gestreepte", "gestippelde", "geruite"),
        ("witte", "grijze", "beige", "zwarte"),
        (
            "{shape} in het {colour} op een {pattern} {background} achtergrond",
            "Tekening van {shape} in het {colour}",
            "{shape} in het {colour}, gratis te downloaden",
            "Sticker met {shape} in het {colour} op een {background} achtergrond",
        ),
    ),
}
LANGUAGES = (ENGLISH, *FOREIGN)


@dataclass(frozen=True)
class Item:
    """One URL of the world: what its image shows and the caption it is published with."""

    path: str  # e.g. "images/000042.jpg"
    kind: str  # IMAGE or one of FAILURE_KINDS
    colour: str
    shape: str
    pattern: str
    background: str
    caption: str  # for a mismatched item, another item's
    mismatched: bool
    license: str | None
    seed: int  # image size, pattern, shape position, size and rotation
    copy: str | None = None  # one of EXACT_COPIES or NEAR_COPIES for a planted copy
    copy_of: str | None = None  # the path of the item it copies
    language: str = ENGLISH  # of its caption
    watermarked: bool = False  # a watermark across its image (an overlaid copy has one in a corner too)

    @property
    def source(self) -> str:
        """The path of the image this item shows: its own, or the one it is a copy of."""
        return self.copy_of or self.path

    @property
    def content_type(self) -> str:
        return "image/png" if self.path.endswith(".png") else "image/jpeg"


@dataclass(frozen=True)
class World:
    seed: int
    items: tuple[Item, ...]

    @property
    def images(self) -> list[Item]:
        """The items served as images, opted-out ones excluded."""
        return [item for item in self.items if item.kind == IMAGE]

    def rows(self, base_url: str) -> list[dict[str, str | None]]:
        """The URL list: `url`, `caption`, `license` for every item, failures included."""
        base = base_url.rstrip("/")
        return [{"url": f"{base}/{i.path}", "caption": i.caption, "license": i.license} for i in self.items]

    def item_at(self, url: str) -> Item | None:
        """The item behind a URL (or a path), whatever the host: the ground truth for a crawled row."""
        return self._by_path.get(urlsplit(url).path.lstrip("/"))

    @cached_property
    def _by_path(self) -> dict[str, Item]:
        # a repeated link is its original's
        return {item.path: item for item in sorted(self.items, key=lambda item: item.copy is None)}


def templates_of(language: str) -> tuple[str, ...]:
    return TEMPLATES if language == ENGLISH else FOREIGN[language][4]


def caption(item: Item, template: str) -> str:
    """The true description of `item`'s image in one of the templates of its language."""
    if item.language != ENGLISH:
        colours, shapes, patterns, backgrounds, _ = FOREIGN[item.language]
        text = template.format(
            colour=colours[list(COLOURS).index(item.colour)],
            shape=shapes[SHAPES.index(item.shape)],
            pattern=patterns[PATTERNS.index(item.pattern)],
            background=backgrounds[list(BACKGROUNDS).index(item.background)],
        )
        return text[0].upper() + text[1:]
    article = "an" if item.colour[0] in "aeiou" else "a"
    return template.format(
        a=article,
        A=article.capitalize(),
        colour=item.colour,
        Colour=item.colour.capitalize(),
        shape=item.shape,
        pattern=item.pattern,
        background=item.background,
    )


def is_unsafe(item: Item) -> bool:
    """The truth `punsafe` is measured against."""
    return item.shape == UNSAFE_SHAPE


def is_watermarked(item: Item) -> bool:
    """The truth `pwatermark` is measured against."""
    return item.watermarked or item.copy == OVERLAID


def aesthetic_truth(item: Item) -> float:
    """The truth `aesthetic` is measured against, on LAION's 1-10 scale: the appeal of the shape's colour
    and of the background."""
    return 1 + 9 * (0.6 * COLOUR_APPEAL[item.colour] + 0.4 * BACKGROUND_APPEAL[item.background])


MISMATCH_FRACTION = 0.2


def make_world(
    images: int = 300,
    seed: int = 0,
    mismatch_fraction: float = MISMATCH_FRACTION,
    failures: Mapping[str, int] = DEFAULT_FAILURES,
    copies: Mapping[str, int] = MappingProxyType({}),
    foreign_fraction: float = 0.0,
    watermarked_fraction: float = 0.0,
) -> World:
    """`images` image items, `mismatch_fraction` of them mismatched, plus `failures` (kind -> count),
    then `copies` (kind -> count) of distinct matched images, interleaved with them. About
    `foreign_fraction` of the items are captioned in one of the FOREIGN languages, and about
    `watermarked_fraction` of the images watermarked (drawn apart from the rest: at 0, the world is
    the one it was before either existed)."""
    unknown = set(failures) - set(FAILURE_KINDS)
    if unknown:
        raise ValueError(f"unknown failure kinds {sorted(unknown)}; known: {FAILURE_KINDS}")
    rng = random.Random(seed)
    kinds = [IMAGE] * images + [kind for kind, count in failures.items() for _ in range(count)]
    rng.shuffle(kinds)
    items = [_random_item(rng, number, kind) for number, kind in enumerate(kinds)]
    truths = random.Random(f"{seed}-truths")
    items = [_with_truths(item, truths, foreign_fraction, watermarked_fraction) for item in items]
    image_numbers = [number for number, item in enumerate(items) if item.kind == IMAGE]
    published = list(items)
    for number in rng.sample(image_numbers, round(images * mismatch_fraction)):
        item = items[number]
        donor = rng.choice([d for d in items if d.shape != item.shape and d.colour != item.colour])
        published[number] = replace(item, caption=donor.caption, language=donor.language, mismatched=True)
    return World(seed, tuple(_with_copies(published, copies, random.Random(f"{seed}-copies"))))


def _with_truths(
    item: Item, rng: random.Random, foreign_fraction: float, watermarked_fraction: float
) -> Item:
    """`item`, captioned in a foreign language and watermarked as the draws of `rng` say."""
    foreign, watermarked = rng.random() < foreign_fraction, rng.random() < watermarked_fraction
    if foreign:
        item = replace(item, language=rng.choice(list(FOREIGN)))
        item = replace(item, caption=caption(item, rng.choice(templates_of(item.language))))
    return replace(item, watermarked=watermarked and item.kind == IMAGE)


def _with_copies(items: list[Item], copies: Mapping[str, int], rng: random.Random) -> list[Item]:
    """`items` with the planted copies put in at random places; each copies another original image."""
    unknown = set(copies) - set(EXACT_COPIES + NEAR_COPIES)
    if unknown:
        raise ValueError(f"unknown copy kinds {sorted(unknown)}; known: {EXACT_COPIES + NEAR_COPIES}")
    originals = [item for item in items if item.kind == IMAGE and not item.mismatched]
    wanted = [kind for kind, count in copies.items() for _ in range(count)]
    if len(wanted) > len(originals):
        raise ValueError(f"{len(wanted)} copies asked of {len(originals)} matched images")
    out = list(items)
    number = len(items)
    for kind, original in zip(wanted, rng.sample(originals, len(wanted)), strict=False):
        if kind == REPEATED:
            copy = replace(original, copy=kind, copy_of=original.path)
        else:
            suffix = original.path.rsplit(".", 1)[1] if kind == SAME_BYTES else "jpg"
            copy = replace(
                original,
                path=f"images/{number:06d}.{suffix}",
                caption=caption(original, rng.choice(templates_of(original.language))),
                copy=kind,
                copy_of=original.path,
            )
            number += 1
        out.insert(rng.randrange(len(out) + 1), copy)
    return out


def _random_item(rng: random.Random, number: int, kind: str) -> Item:
    suffix = "png" if kind == IMAGE and rng.random() < PNG_FRACTION else "jpg"
    item = Item(
        path=f"images/{number:06d}.{suffix}",
        kind=kind,
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        pattern=rng.choice(PATTERNS),
        background=rng.choice(list(BACKGROUNDS)),
        caption="",
        mismatched=False,
        license=rng.choices(LICENSES, LICENSE_WEIGHTS)[0],
        seed=rng.getrandbits(32),
    )
    return replace(item, caption=caption(item, rng.choice(TEMPLATES)))


def render(item: Item) -> Image.Image:
    """The item's image: its shape, in its colour, somewhere on its patterned background; for a near
    copy, the original's image changed as its kind says."""
    if item.copy in NEAR_COPIES:
        return _changed(render(replace(item, copy=None, copy_of=None)), item.copy, item.seed)
    rng = random.Random(item.seed)
    width = rng.randrange(160, 481)
    height = round(width / rng.choice(ASPECT_RATIOS))
    background = BACKGROUNDS[item.background]
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    _draw_pattern(draw, (width, height), item.pattern, _pattern_ink(background), rng)
    radius = rng.uniform(0.45, 0.8) * min(width, height) / 2
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    _draw_shape(draw, item.shape, centre, radius, rng.uniform(-45, 45), COLOURS[item.colour])
    return watermark(image, item.seed) if item.watermarked else image


def image_bytes(item: Item) -> bytes:
    """The rendered image encoded as its URL says (JPEG or PNG)."""
    out = io.BytesIO()
    if item.content_type == "image/png":
        render(item).save(out, "PNG")
    else:
        quality = REENCODED_QUALITY if item.copy == REENCODED else JPEG_QUALITY
        render(item).save(out, "JPEG", quality=quality)
    return out.getvalue()


def watermark(image: Image.Image, seed: int, corner: bool = False) -> Image.Image:
    """`image` with WATERMARK_TEXT, half-transparent white outlined in black, as stock photo sites mark
    theirs: large somewhere across it (where, from `seed`), or small in its bottom right `corner`."""
    rng = random.Random(f"{seed}-watermark")
    width, height = image.size
    scale = 0.06 if corner else rng.uniform(0.1, 0.14)
    font = ImageFont.load_default(size=max(10, round(width * scale)))
    left, top, right, bottom = font.getbbox(WATERMARK_TEXT)
    if corner:
        x, y = width - (right - left) - 4, height - (bottom - top) - 4
    else:
        x = rng.uniform(0, max(0, width - (right - left)))
        y = rng.uniform(0, max(0, height - (bottom - top)))
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).text(
        (x - left, y - top),
        WATERMARK_TEXT,
        font=font,
        fill=(255, 255, 255, 150),
        stroke_width=max(1, font.size // 14),
        stroke_fill=(0, 0, 0, 150),
    )
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _changed(image: Image.Image, kind: str, seed: int) -> Image.Image:
    width, height = image.size
    if kind == RESIZED:
        return image.resize((round(width * 0.9), round(height * 0.9)), Image.Resampling.LANCZOS)
    if kind == CROPPED:
        dx, dy = round(width * 0.02), round(height * 0.02)
        return image.crop((dx, dy, width - dx, height - dy))
    if kind == OVERLAID:
        return watermark(image, seed, corner=True)
    return image  # REENCODED: the same pixels, encoded at another quality


def _pattern_ink(background: RGB) -> RGB:
    """A shade of the background: darker on light ones, lighter on dark ones."""
    step = -50 if sum(background) > 300 else 60
    return tuple(channel + step for channel in background)


def _draw_pattern(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], pattern: str, ink: RGB, rng: random.Random
) -> None:
    width, height = size
    period = rng.randrange(12, 29)
    half = period // 2
    if pattern == "striped":
        vertical = rng.random() < 0.5
        for offset in range(0, width if vertical else height, period):
            box = (offset, 0, offset + half, height) if vertical else (0, offset, width, offset + half)
            draw.rectangle(box, fill=ink)
    elif pattern == "dotted":
        dot = max(2, period // 5)
        for x in range(half, width, period):
            for y in range(half, height, period):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=ink)
    elif pattern == "checkered":
        for x in range(0, width, period):
            for y in range(0, height, period):
                if (x // period + y // period) % 2:
                    draw.rectangle((x, y, x + period - 1, y + period - 1), fill=ink)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, angle: float, fill: RGB
) -> None:
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(radius * 0.35)))
    else:
        turn = math.radians(angle)
        cos, sin = math.cos(turn), math.sin(turn)
        points = [
            (x + radius * (u * cos - v * sin), y + radius * (u * sin + v * cos)) for u, v in _OUTLINES[shape]
        ]
        draw.polygon(points, fill=fill)


def _regular(corners: int, start: float, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
    """Points around the unit circle, cycling through `radii` (two radii make a star)."""
    count = corners * len(radii)
    return [
        (
            radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / count),
            radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / count),
        )
        for i in range(count)
    ]


def _heart(steps: int = 48) -> list[tuple[float, float]]:
    """The classic parametric heart, scaled into the unit square, point up."""
    points = []
    for i in range(steps):
        t = 2 * math.pi * i / steps
        u = 16 * math.sin(t) ** 3
        v = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((u / 17, -(v + 2.5) / 17))
    return points


_ARM = 0.32  # half the width of a cross's arm, as a fraction of its radius
# Unit outlines (y down) of the polygon shapes, centred on the origin.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),
    "hexagon": _regular(6, 0.0),
    "star": _regular(5, -math.pi / 2, radii=(1.0, 0.45)),
    "cross": [
        (_ARM, -1),
        (_ARM, -_ARM),
        (1, -_ARM),
        (1, _ARM),
        (_ARM, _ARM),
        (_ARM, 1),
        (-_ARM, 1),
        (-_ARM, _ARM),
        (-1, _ARM),
        (-1, -_ARM),
        (-_ARM, -_ARM),
        (-_ARM, -1),
    ],
    "heart": _heart(),
}
