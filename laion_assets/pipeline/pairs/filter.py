"""The filtered_pairs rules: crawl rows, download outcomes and embeddings joined on key, then
filtered and tagged as LAION-400M did (defaults), or DataComp-style where configured.

Rules, in the order of the funnel:
0. `taken_down`: the image row is `taken_down` (on a block list, see removal.py).
1. `not_downloaded`: the image is not a `success` in `images`.
2. `short_caption`: caption under `min_caption_length` characters.
3. `datacomp_basic` (off by default): caption under 2 words or 6 characters, shorter side under 200,
   aspect ratio over 3.
4. `duplicate_url_caption`, `duplicate_sha256`: the first row (by key) of each kept.
5. `low_similarity` / `no_embedding`: CLIP cosine under `min_similarity`, or, with `top_fraction`,
   outside the top fraction by similarity; rows without an embedding cannot pass.
6. `minors`: tagged NSFW or UNSURE while the caption or the two nearest categories name a minor.
7. `duplicate`: removed after the build by dataset-level dedup (removal.py), never by `build_pairs`.
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
from laion_assets.pipeline.lineage import inherited_footer
from laion_assets.pipeline.shard_tar import TarShardWriter, read_samples
from laion_assets.pipeline.storage import (
    CRAWL_METADATA,
    EMBEDDINGS,
    IMAGES,
    PAIRS,
    PAIRS_EMBEDDINGS,
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
    "minors",
    "duplicate",
)


@dataclass(frozen=True)
class PairsSettings:
    min_similarity: float = 0.3  # LAION-400M's threshold for ViT-B/32
    top_fraction: float = 0.0  # > 0: keep this fraction with the highest similarity instead (DataComp)
    min_caption_length: int = 5
    datacomp_basic_filter: bool = False
    deduplicate: bool = True
    drop_minors: bool = True


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
        words = set(re.findall(r"[a-z]+", " ".join(texts).lower()))
        return any(word in words for word in self.minors)


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
    result = build_pairs(crawl, store.read_parquet(IMAGES.parquet(shard)), embeddings, settings, categories)
    with contextlib.ExitStack() as stack:
        images_tar = stack.enter_context(store.open(IMAGES.tar(shard)))
        out = stack.enter_context(store.atomic_write(PAIRS.tar(shard)))
        result.samples_in_tar = write_pairs_tar(images_tar, result.table, out)
    pairs_footer = {
        **inherited_footer(embeddings),
        names.PAIRS_SETTINGS_FOOTER: json.dumps(dataclasses.asdict(settings)),
        names.PAIRS_FUNNEL_FOOTER: json.dumps({"rows_in": result.rows_in, "removed": result.removed}),
        names.PROVENANCE_FOOTER: json.dumps(_provenance(shard, crawl, run_id)),
    }
    write_pairs_parquet(store, shard, result.table, pairs_footer)
    if write_embeddings:
        store.write_parquet(PAIRS_EMBEDDINGS.parquet(shard), result.embeddings, metadata=embeddings_footer)
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
    return {
        "shard": shard,
        "source_file": crawl.column("source_file")[0].as_py() if crawl.num_rows else None,
        "run_id": run_id,
        "materialized_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": importlib.metadata.version("laion_assets"),
    }


def build_pairs(
    crawl: pa.Table,
    images: pa.Table,
    embeddings: pa.Table,
    settings: PairsSettings,
    categories: NsfwCategories,
) -> PairsResult:
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
    """DataComp's basic filter: caption ≥ 2 words and > 5 characters, shorter side ≥ 200, aspect ≤ 3."""
    captions = table.column("caption").to_pylist()
    widths = table.column("original_width").to_pylist()
    heights = table.column("original_height").to_pylist()
    keep = []
    for caption, width, height in zip(captions, widths, heights, strict=True):
        shorter, longer = min(width or 0, height or 0), max(width or 0, height or 0)
        keep.append(
            len(caption.split()) >= 2 and len(caption) > 5 and shorter >= 200 and longer <= 3 * shorter
        )
    return pa.array(keep, pa.bool_())


def _similarity_rule(similarity: pa.ChunkedArray, settings: PairsSettings) -> pa.Array:
    if settings.top_fraction <= 0:
        return pc.greater_equal(similarity, settings.min_similarity)
    keep_count = math.ceil(settings.top_fraction * len(similarity))
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
    shards = [f.name.removesuffix(".parquet") for f in store.list(PAIRS.name) if f.name.endswith(".parquet")]
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


def rule_violations(table: pa.Table, settings: PairsSettings) -> dict[str, int]:
    """Rows of a pairs table that break a rule the settings made active, or whose `host` is not their
    URL's (all zero for a sound shard).

    The minors rule needs the category embeddings and is not re-checked here."""
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
    if settings.datacomp_basic_filter:
        violations["datacomp_basic"] = table.num_rows - pc.sum(_datacomp_basic(table)).as_py()
    return violations
