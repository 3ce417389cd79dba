"""The filtered_pairs rules: crawl rows, download outcomes and embeddings joined on key, then
filtered and tagged as LAION-400M did (defaults), or DataComp-style where configured.

Rules, in the order of the funnel:
0. `taken_down`: the image row is `taken_down` (on a block list, see removal.py).
1. `not_downloaded`: the image is not a `success` in `images`.
2. `short_caption`: caption under `min_caption_length` characters.
3. `datacomp_basic` (off by default): caption of 2 words or fewer, or under 6 characters, shorter side
   under 200, aspect ratio over 3 (DataComp's `basic`, its English test being the `language` rule).
4. `duplicate_url_caption`, `duplicate_sha256`: the first row (by key) of each kept.
5. `low_similarity` / `no_embedding`: CLIP cosine under `min_similarity`, or, with `top_fraction`,
   outside the top fraction by similarity; rows without an embedding cannot pass.
6. The quality scores (`scores/<shard>.parquet`), each off by default: `language` (the caption's is not
   one of `languages`), `punsafe` (not below `max_punsafe`), `pwatermark` (not below `max_pwatermark`),
   `aesthetic` (under `min_aesthetic`); a row without the score cannot pass.
7. `image_based`: DataComp's image-based filter, where `image_based_reference` names reference
   embeddings: kept when the image's nearest cluster centroid is one that is nearest to a reference.
8. `minors`: tagged NSFW or UNSURE while the caption or the two nearest categories name a minor.
9. `duplicate`: removed after the build by dataset-level dedup (removal.py), never by `build_pairs`.
10. `taken_down_after_build`: removed after the build by a takedown (removal.py): pairs that passed every
   rule above, so counted after them, never by `build_pairs` (a rebuild counts them under `taken_down`).

A `preset` names a set of these settings that reproduces a known dataset's rules (PRESETS); a field
set to other than its default overrides the preset's value for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.clip import ModelIdentity
from laion_assets.pipeline.lineage import identity_of, inherited_footer
from laion_assets.pipeline.shard_tar import TarShardWriter, read_samples
from laion_assets.pipeline.storage import (
    CRAWL_METADATA,
    EMBEDDINGS,
    IMAGES,
    PAIRS,
    PAIRS_EMBEDDINGS,
    SCORES,
    DatasetStore,
    footer,
)
from laion_assets.pipeline.tables import keep_first

if TYPE_CHECKING:
    from laion_assets.pipeline.embeddings.clip import ClipEncoder

CATEGORIES_FILE = Path(__file__).parent / "data" / "nsfw_categories.json"
FUNNEL = (
    "taken_down",
    "not_downloaded",
    "short_caption",
    "datacomp_basic",
    "duplicate_url_caption",
    "duplicate_sha256",
    "no_embedding",
    "low_similarity",
    "language",
    "punsafe",
    "pwatermark",
    "aesthetic",
    "image_based",
    "minors",
    "duplicate",
    "taken_down_after_build",
)


IMAGES_PER_CLUSTER = 128  # DataComp's small pool: 12.8 M images in 100,000 k-means clusters

# Named settings that reproduce a known dataset's rules: LAION-400M (the defaults); the LAION-Aesthetics
# v2 subsets (from LAION-5B, kept below pwatermark 0.8 and punsafe 0.5); DataComp's baselines
# (`baselines/apply_filter.py`): `basic` (no CLIP score rule), `clip_score` (the top 30 %, per shard
# here) and `laion2b` (B/32 similarity of at least 0.28 and English; DataComp identified it with CLD3:
# set the scores' `language_id: cld3` to reproduce it exactly). `image_based` needs reference
# embeddings of the user's: it is the `image_based_reference` setting.
PRESETS: dict[str, dict[str, object]] = {
    "laion400m": {},
    "laion-aesthetics-5": {"max_punsafe": 0.5, "max_pwatermark": 0.8, "min_aesthetic": 5.0},
    "laion-aesthetics-6": {"max_punsafe": 0.5, "max_pwatermark": 0.8, "min_aesthetic": 6.0},
    "laion-aesthetics-6.5": {"max_punsafe": 0.5, "max_pwatermark": 0.8, "min_aesthetic": 6.5},
    "datacomp-basic": {"min_similarity": -1.0, "datacomp_basic_filter": True, "languages": ("en",)},
    "datacomp-clip-score": {"top_fraction": 0.3},
    "datacomp-laion2b": {"min_similarity": 0.28, "languages": ("en",)},
}


# The settings of the rules that read the quality scores or the image-based references (and the preset)
SCORE_FILTERS = (
    "preset",
    "languages",
    "max_punsafe",
    "max_pwatermark",
    "min_aesthetic",
    "image_based_reference",
    "image_based_centroids",
)


_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Z][a-z]{3})?")  # what the language IDs of `scores` write


@dataclass(frozen=True)
class PairsSettings:
    min_similarity: float = 0.3  # LAION-400M's threshold for ViT-B/32
    top_fraction: float = 0.0  # > 0: keep this fraction with the highest similarity instead (DataComp)
    min_caption_length: int = 5
    datacomp_basic_filter: bool = False
    deduplicate: bool = True
    drop_minors: bool = True
    languages: tuple[str, ...] = ()  # keep captions in these (ISO 639-1 codes); empty: any language
    max_punsafe: float | None = None  # keep punsafe below this (LAION-Aesthetics: 0.5)
    max_pwatermark: float | None = None  # keep pwatermark below this (LAION-Aesthetics: 0.8)
    min_aesthetic: float | None = None  # keep an aesthetic score at least this (LAION-Aesthetics: 5, 6, 6.5)
    image_based_reference: str = ""  # .npy of reference image embeddings (DataComp: ImageNet-1k's)
    image_based_centroids: str = ""  # .npy of cluster centroids; empty: k-means of the shard's images
    preset: str = ""  # one of PRESETS

    def __post_init__(self) -> None:
        """ValueError for a value no run can use, before a run records it in the dataset's settings."""
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if not 0 <= self.top_fraction <= 1:
            raise ValueError(f"top_fraction {self.top_fraction}: a fraction of the pairs, 0 to 1 (0: off)")
        for code in self.languages:  # matched as written: `EN` kept no caption, with no word why
            if not isinstance(code, str) or not _LANGUAGE_CODE.fullmatch(code):
                raise ValueError(
                    f"languages: {code!r} is not a language code as the scores write them (ISO 639-1, lower "
                    "case, as `en`; cld3's romanised ones as `ja-Latn`)"
                )

    @classmethod
    def from_footer(cls, recorded: dict) -> PairsSettings:
        """The settings a pairs file's footer records (`names.PAIRS_SETTINGS_FOOTER`, whose JSON holds the
        tuples as lists)."""
        return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in recorded.items()})

    def resolved(self) -> PairsSettings:
        """The settings the rules apply: the preset's values, under the fields set to other than their
        defaults."""
        if not self.preset:
            return self
        defaults = PairsSettings()
        chosen = {
            name: value
            for name, value in PRESETS[self.preset].items()
            if getattr(self, name) == getattr(defaults, name)
        }
        return dataclasses.replace(self, **chosen, preset="")

    def score_rules(self) -> tuple[str, ...]:
        """The active rules that read the quality scores, each named as the score column it reads."""
        active = {
            "language": bool(self.languages),
            "punsafe": self.max_punsafe is not None,
            "pwatermark": self.max_pwatermark is not None,
            "aesthetic": self.min_aesthetic is not None,
        }
        return tuple(rule for rule, on in active.items() if on)


@dataclass(frozen=True)
class NsfwCategories:
    """Category prompts with their text embeddings; `is_nsfw[i]` says whether category i is NSFW."""

    names: list[str]
    is_nsfw: np.ndarray
    embeddings: np.ndarray  # (categories, D), L2-normalised
    minors: tuple[str, ...]

    @classmethod
    def load(
        cls, embed_texts: Callable[[list[str]], np.ndarray], path: Path = CATEGORIES_FILE
    ) -> NsfwCategories:
        data = json.loads(path.read_text())
        names = data["nsfw"] + data["neutral"]
        is_nsfw = np.array([True] * len(data["nsfw"]) + [False] * len(data["neutral"]))
        return cls(names, is_nsfw, np.asarray(embed_texts(names), np.float32), tuple(data["minors"]))

    def tag(self, image_embeddings: np.ndarray) -> tuple[list[str], list[tuple[str, str]]]:
        """LAION's rule: both of the two nearest categories NSFW → NSFW, one → UNSURE, none → UNLIKELY."""
        if len(image_embeddings) == 0:
            return [], []
        nearest = np.argsort(-(image_embeddings.astype(np.float32) @ self.embeddings.T), axis=1)[:, :2]
        counts = self.is_nsfw[nearest].sum(axis=1)
        tags = [(schemas.NSFW_UNLIKELY, schemas.NSFW_UNSURE, schemas.NSFW)[c] for c in counts]
        return tags, [(self.names[a], self.names[b]) for a, b in nearest]

    def names_a_minor(self, *texts: str) -> bool:
        """Whether a word of `texts`, or its singular (a trailing "s" off), is one of `minors`."""
        words = set(re.findall(r"[a-z]+", " ".join(texts).lower()))
        return any(word in self.minors or word.removesuffix("s") in self.minors for word in words)


@dataclass
class PairsResult:
    table: pa.Table  # schemas.PAIRS (with `host`), sorted by key
    embeddings: pa.Table  # key, image_embedding, text_embedding of the kept rows, same order
    rows_in: int
    removed: dict[str, int]  # by rule, in funnel order
    nsfw: dict[str, int]  # kept rows by tag
    samples_in_tar: int = 0  # set by write_pairs


def write_pairs(
    store: DatasetStore,
    shard: str,
    settings: PairsSettings,
    encoder: ClipEncoder,
    run_id: str,
    write_embeddings: bool = False,
) -> PairsResult:
    """`pairs/<shard>.parquet` and `.tar` (and `pairs_embeddings/`) from the shard's crawl rows, images and
    embeddings. The footer records the rules' settings, the funnel and the provenance (`run_id`).

    Raises ModelMismatch when the embeddings come from another model or other weights than `encoder`'s,
    which embeds the NSFW categories they are compared with."""
    embeddings = store.read_parquet(EMBEDDINGS.parquet(shard))
    embeddings_footer = footer(embeddings.schema)  # its source and model
    made_by = ModelIdentity.from_footer(embeddings_footer)
    if made_by is not None:
        made_by.require(
            encoder.identity,
            f"shard {shard}: its embeddings were",
            "the clip resource",
            "the NSFW categories must be embedded by the same model: re-materialise clip_embeddings or "
            "set the model",
        )
    crawl = store.read_parquet(CRAWL_METADATA.parquet(shard))
    categories = NsfwCategories.load(lambda texts: encoder.encode_texts(texts).cpu().numpy())
    rules = settings.resolved()
    scores = stored_scores(store, shard, rules)
    result = build_pairs(
        crawl,
        store.read_parquet(IMAGES.parquet(shard)),
        embeddings,
        settings,
        categories,
        scores,
        *image_based_inputs(rules),
    )
    with contextlib.ExitStack() as stack:
        images_tar = stack.enter_context(store.open(IMAGES.tar(shard)))
        out = stack.enter_context(store.tar_write(PAIRS, shard))
        result.samples_in_tar = write_pairs_tar(images_tar, result.table, out)
    pairs_footer = {
        **inherited_footer(embeddings),
        **({} if scores is None else {names.SCORES_READ_FOOTER: identity_of(scores)}),
        names.PAIRS_SETTINGS_FOOTER: json.dumps(dataclasses.asdict(settings)),
        names.PAIRS_FUNNEL_FOOTER: json.dumps({"rows_in": result.rows_in, "removed": result.removed}),
        names.PROVENANCE_FOOTER: json.dumps(_provenance(shard, crawl, run_id)),
    }
    if write_embeddings:  # before the parquet, which says the shard's pairs are whole (store.tar_write)
        store.write_parquet(PAIRS_EMBEDDINGS.parquet(shard), result.embeddings, metadata=embeddings_footer)
    else:  # an earlier run's holds other rows, maybe another model's vectors, and dedup would read it
        store.remove(PAIRS_EMBEDDINGS.parquet(shard))
    write_pairs_parquet(store, shard, result.table, pairs_footer)
    return result


# How pairs parquet is encoded, for DuckDB's scans (bench/query.py writes its table with these too):
# the columns unique per row are not dictionary-encoded (a dictionary only costs there), every other one
# is (DuckDB groups nsfw, license and host by their dictionary); `similarity`, float32 values in a
# float64, is byte-stream-split, so that zstd drops their zero bytes: a quarter smaller than plain and
# about 1.5x as fast to scan.
_UNIQUE_PER_ROW = ("key", "caption", "url", "similarity", "sha256")
PAIRS_PARQUET_OPTIONS = {
    "use_dictionary": [name for name in schemas.PAIRS.names if name not in _UNIQUE_PER_ROW],
    "use_byte_stream_split": ["similarity"],
}


def write_pairs_parquet(
    store: DatasetStore, shard: str, table: pa.Table, metadata: dict[str, str] | None = None
) -> None:
    """`pairs/<shard>.parquet`, encoded with `PAIRS_PARQUET_OPTIONS`."""
    store.write_parquet(PAIRS.parquet(shard), table, metadata=metadata, **PAIRS_PARQUET_OPTIONS)


def _provenance(shard: str, crawl: pa.Table, run_id: str) -> dict[str, str | None]:
    source = footer(crawl.schema).get(names.SOURCE_FOOTER)  # recorded for a source without rows too
    return {
        "shard": shard,
        "source_file": json.loads(source)["file"] if source else None,
        "run_id": run_id,
        "materialized_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": importlib.metadata.version("laion_assets"),
    }


def score_rules(settings: PairsSettings) -> list[tuple[str, Callable[[pa.Table], pa.ChunkedArray]]]:
    """Each active rule on the quality scores (of resolved `settings`), in funnel order, with the rows of a
    table with the scores joined that it keeps (null where a row has no score: it cannot pass)."""
    rules: list[tuple[str, Callable[[pa.Table], pa.ChunkedArray]]] = []
    if settings.languages:
        languages = pa.array(settings.languages, pa.string())
        rules.append(("language", lambda t: pc.is_in(t.column("language"), languages)))
    if settings.max_punsafe is not None:
        rules.append(("punsafe", lambda t: pc.less(t.column("punsafe"), settings.max_punsafe)))
    if settings.max_pwatermark is not None:
        rules.append(("pwatermark", lambda t: pc.less(t.column("pwatermark"), settings.max_pwatermark)))
    if settings.min_aesthetic is not None:
        rules.append(("aesthetic", lambda t: pc.greater_equal(t.column("aesthetic"), settings.min_aesthetic)))
    return rules


def stored_scores(store: DatasetStore, shard: str, settings: PairsSettings) -> pa.Table | None:
    """The shard's quality scores the active rules of `settings` (resolved) read; None when none does.
    ValueError naming the file where it is missing or lacks a score a rule needs."""
    rules = settings.score_rules()
    if not rules:
        return None
    path = SCORES.parquet(shard)
    if not store.exists(path):
        raise ValueError(
            f"shard {shard}: the {', '.join(rules)} rules read quality scores, and {store.url(path)} does "
            "not exist: materialise quality_scores for it first"
        )
    scores = store.read_parquet(path, columns=["key", *rules])
    unscored = [column for column in rules if scores.column(column).null_count == scores.num_rows > 0]
    if unscored:
        raise ValueError(
            f"shard {shard}: {store.url(path)} has no {', '.join(unscored)} (its model is `none`, or `auto` "
            "found no head for the shard's CLIP), and a rule filters on it: set the model in the "
            "dataset's `scores` settings and re-materialise quality_scores, or turn the rule off"
        )
    return scores


def image_based_inputs(settings: PairsSettings) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The reference embeddings and centroids `settings` name (None where not), L2-normalised."""
    return tuple(
        _embedding_file(path, name) if path else None
        for name, path in (
            ("image_based_reference", settings.image_based_reference),
            ("image_based_centroids", settings.image_based_centroids),
        )
    )


def _embedding_file(path: str, setting: str) -> np.ndarray:
    try:
        vectors = np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{setting}: cannot read {path} as a .npy array: {exc}") from exc
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError(f"{setting}: {path} holds an array of shape {vectors.shape}; expected (rows, dim)")
    vectors = vectors.astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def image_based_keep(vectors: np.ndarray, reference: np.ndarray, centroids: np.ndarray | None) -> np.ndarray:
    """DataComp's image-based filter: whether each image's nearest centroid (by dot product) is the
    nearest centroid of a reference embedding. Without `centroids`, k-means of `vectors` makes one per
    IMAGES_PER_CLUSTER images, as DataComp's pool had (seeded: the same shard gives the same clusters)."""
    if len(vectors) == 0:
        return np.zeros(0, bool)
    for name, given in (("image_based_reference", reference), ("image_based_centroids", centroids)):
        if given is not None and given.shape[1] != vectors.shape[1]:
            raise ValueError(
                f"{name} has {given.shape[1]}-d vectors, the shard's embeddings {vectors.shape[1]}-d"
            )
    if centroids is None:
        import faiss

        kmeans = faiss.Kmeans(vectors.shape[1], max(1, len(vectors) // IMAGES_PER_CLUSTER), niter=20, seed=0)
        kmeans.train(np.ascontiguousarray(vectors))
        centroids = kmeans.centroids
    targets = np.unique(np.argmax(reference @ centroids.T, axis=1))
    return np.isin(np.argmax(vectors @ centroids.T, axis=1), targets)


def build_pairs(
    crawl: pa.Table,
    images: pa.Table,
    embeddings: pa.Table,
    settings: PairsSettings,
    categories: NsfwCategories,
    scores: pa.Table | None = None,
    reference: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
) -> PairsResult:
    """The pairs of a shard that pass the rules of `settings` (resolved), given its `scores` where a
    rule reads them, and the `reference` embeddings (and `centroids`) of the image-based rule."""
    settings = settings.resolved()
    removed = dict.fromkeys(FUNNEL, 0)
    has_license = "license" in crawl.column_names
    license_ = (
        crawl.column("license").cast(pa.string()) if has_license else pa.nulls(crawl.num_rows, pa.string())
    )
    table = pa.table({"key": crawl.column("key"), "license": license_})
    image_columns = [
        "key",
        "url",
        "caption",
        "status",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
    ]
    table = table.join(images.select(image_columns), "key", join_type="inner")
    rows_in = table.num_rows
    position = embeddings.select(["key", "similarity"]).append_column(
        "_embedding_row", pa.array(range(embeddings.num_rows), pa.int64())
    )
    table = table.join(position, "key", join_type="left outer").sort_by("key")

    def drop(rule: str, keep: pa.ChunkedArray | pa.Array) -> None:
        nonlocal table
        keep = pc.fill_null(keep, False)
        removed[rule] += table.num_rows - pc.sum(keep).as_py() if table.num_rows else 0
        table = table.filter(keep)

    drop("taken_down", pc.not_equal(table.column("status"), schemas.TAKEN_DOWN))
    drop("not_downloaded", pc.equal(table.column("status"), schemas.SUCCESS))
    drop(
        "short_caption",
        pc.greater_equal(pc.utf8_length(table.column("caption")), settings.min_caption_length),
    )
    if settings.datacomp_basic_filter:
        drop("datacomp_basic", _datacomp_basic(table))
    if settings.deduplicate:
        for rule, columns in (
            ("duplicate_url_caption", ["url", "caption"]),
            ("duplicate_sha256", ["sha256"]),
        ):
            before = table.num_rows
            table = keep_first(table, columns).sort_by("key")
            removed[rule] += before - table.num_rows
    drop("no_embedding", pc.is_valid(table.column("_embedding_row")))
    drop("low_similarity", _similarity_rule(table.column("similarity"), settings))
    if scores is not None:
        table = table.join(scores, "key", join_type="left outer").sort_by("key")
    for rule, keeps in score_rules(settings):
        drop(rule, keeps(table))
    if reference is not None:
        vectors = _vectors(embeddings.column("image_embedding"), table.column("_embedding_row").to_numpy())
        drop("image_based", pa.array(image_based_keep(vectors, reference, centroids)))

    rows = table.column("_embedding_row").to_numpy()
    image_vectors = _vectors(embeddings.column("image_embedding"), rows)
    tags, nearest = categories.tag(image_vectors)
    if settings.drop_minors:
        captions = table.column("caption").to_pylist()
        keep = [
            not (tag in (schemas.NSFW, schemas.NSFW_UNSURE) and categories.names_a_minor(caption, *near))
            for tag, caption, near in zip(tags, captions, nearest, strict=True)
        ]
        drop("minors", pa.array(keep, pa.bool_()))
        tags = [tag for tag, k in zip(tags, keep, strict=True) if k]
        rows = rows[np.array(keep, bool)] if len(keep) else rows

    table = table.append_column("nsfw", pa.array(tags, pa.string()))
    table = table.set_column(
        table.column_names.index("similarity"), "similarity", table.column("similarity").cast(pa.float64())
    )
    kept_embeddings = (
        pa.table({"key": table.column("key")})
        .append_column(
            "image_embedding", embeddings.column("image_embedding").take(pa.array(rows, pa.int64()))
        )
        .append_column("text_embedding", embeddings.column("text_embedding").take(pa.array(rows, pa.int64())))
    )
    counts = Counter(tags)
    return PairsResult(
        table=schemas.conform(schemas.with_host(table), schemas.PAIRS).select(schemas.PAIRS.names),
        embeddings=kept_embeddings,
        rows_in=rows_in,
        removed=removed,
        nsfw={tag: counts.get(tag, 0) for tag in schemas.NSFW_TAGS},
    )


def _datacomp_basic(table: pa.Table) -> pa.Array:
    """DataComp's basic filter but its English test: caption over 2 words and 5 characters, shorter side
    ≥ 200, aspect ≤ 3."""
    captions = table.column("caption").to_pylist()
    widths = table.column("original_width").to_pylist()
    heights = table.column("original_height").to_pylist()
    keep = []
    for caption, width, height in zip(captions, widths, heights, strict=True):
        shorter, longer = min(width or 0, height or 0), max(width or 0, height or 0)
        keep.append(
            len(caption.split()) > 2 and len(caption) > 5 and shorter >= 200 and longer <= 3 * shorter
        )
    return pa.array(keep, pa.bool_())


def _similarity_rule(similarity: pa.ChunkedArray, settings: PairsSettings) -> pa.Array:
    if settings.top_fraction <= 0:
        return pc.greater_equal(similarity, settings.min_similarity)
    # rounded first: in floats 0.07 * 100 is 7.000000000000001, whose ceiling would keep a row more
    keep_count = math.ceil(round(settings.top_fraction * len(similarity), 9))
    values = np.nan_to_num(similarity.to_numpy(zero_copy_only=False).astype(np.float64), nan=-np.inf)
    order = np.argsort(-values, kind="stable")  # ties keep key order
    keep = np.zeros(len(values), bool)
    keep[order[:keep_count]] = True
    return pa.array(keep)


def _vectors(column: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    if len(rows) == 0:
        return np.zeros((0, 0), np.float32)
    chosen = column.take(pa.array(rows, pa.int64())).combine_chunks()
    dim = chosen.type.list_size
    return chosen.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def stored_pair_shards(store: DatasetStore, purpose: str) -> list[str]:
    """The shards with a `pairs/<shard>.parquet`; ValueError naming the root if there are none, since
    `purpose` (e.g. "the dataset card") needs at least one."""
    shards = store.shards(PAIRS)
    if not shards:
        raise ValueError(
            f"no materialised shards under {store.root}: there is no pairs/*.parquet yet; "
            f"materialise filtered_pairs for a shard before {purpose}"
        )
    return shards


def write_pairs_tar(images_tar: IO[bytes], pairs: pa.Table, out: IO[bytes]) -> int:
    """The kept samples as a training-ready webdataset: the image bytes copied as they are, the caption,
    and a json with the pair's row. Returns the number of samples written."""
    rows = {row["key"]: row for row in pairs.to_pylist()}
    with TarShardWriter(out) as writer:
        for key, members in read_samples(images_tar):
            row = rows.get(key)
            if row is None:
                continue
            image = {ext: data for ext, data in members.items() if ext not in ("txt", "json")}
            sample = {
                **image,
                "txt": row["caption"].encode(),
                "json": json.dumps(row, ensure_ascii=False).encode(),
            }
            writer.write(key, sample)
        return writer.samples


def rule_violations(
    table: pa.Table, settings: PairsSettings, scores: pa.Table | None = None
) -> dict[str, int]:
    """Rows of a pairs table that break a rule the settings made active, or whose `host` is not their
    URL's (all zero for a sound shard). The rules on the quality scores are checked against `scores`, the
    shard's (`stored_scores`), where given.

    The minors and image-based rules need what the shard's files do not hold, and are not re-checked
    here."""
    settings = settings.resolved()
    captions = table.column("caption").to_pylist()
    similarity = table.column("similarity").to_numpy(zero_copy_only=False)
    same_host = pc.equal(table.column("host"), schemas.url_hosts(table.column("url")))
    violations = {
        "host_not_of_url": table.num_rows - pc.sum(same_host).as_py() if table.num_rows else 0,
        "short_caption": sum(len(c) < settings.min_caption_length for c in captions),
        "nsfw_tag": sum(tag not in schemas.NSFW_TAGS for tag in table.column("nsfw").to_pylist()),
        "low_similarity": int((similarity < settings.min_similarity).sum())
        if settings.top_fraction <= 0
        else 0,
        "duplicate_url_caption": 0,
        "duplicate_sha256": 0,
        "datacomp_basic": 0,
    }
    if settings.deduplicate:
        violations["duplicate_url_caption"] = table.num_rows - keep_first(table, ["url", "caption"]).num_rows
        violations["duplicate_sha256"] = table.num_rows - keep_first(table, ["sha256"]).num_rows
    if settings.datacomp_basic_filter:  # the sum of an empty mask is null, not 0
        violations["datacomp_basic"] = table.num_rows - (pc.sum(_datacomp_basic(table)).as_py() or 0)
    if scores is not None:
        scored = table.select(["key"]).join(scores, "key", join_type="left outer")
        for rule, keeps in score_rules(settings):
            violations[rule] = scored.num_rows - (pc.sum(pc.fill_null(keeps(scored), False)).as_py() or 0)
    return violations
