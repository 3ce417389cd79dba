"""The one place where the columns of every stored table are defined; every writer conforms to these."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pyarrow as pa

# crawl_metadata/<shard>.parquet: one row per (url, caption) found in a source file.
# `key` is `<shard>-<row:08d>` and is the join key of every later stage.
# `source_offset` is the byte offset of the WARC record for WAT sources and the
# row number inside the file for URL lists.
CRAWL_METADATA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("page_url", pa.string()),
        pa.field("license", pa.string()),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_offset", pa.int64()),
    ]
)


# images/<shard>.parquet: exactly one row per crawl_metadata row, whatever happened to it.
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_DECODE = "failed_to_decode"
OPTED_OUT = "opted_out"  # X-Robots-Tag opt-out directive, or robots.txt
BLOCKED = "blocked"  # the URL resolves to a private, loopback, link-local or multicast address
FILTERED_SIZE = "filtered_size"  # min_image_size / max_aspect_ratio
# on a block list (blocklist.py): never fetched (url, domain), or fetched and dropped (image hash), or
# removed after the build; the row keeps its key and host, its url and caption are null
TAKEN_DOWN = "taken_down"
STATUSES = (SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE, OPTED_OUT, BLOCKED, FILTERED_SIZE, TAKEN_DOWN)


def take_down(row: dict, why: str) -> dict:
    """An images row (a dict) marked `taken_down` in place: `why` (the list and kind) said, no link, no
    caption and no image size kept; its key, host, outcome and hashes stay. The downloader and the
    removal of a built sample both mark rows with it."""
    row.update(
        status=TAKEN_DOWN,
        error_message=f"on a block list: {why}",
        url=None,
        caption=None,
        width=None,
        height=None,
    )
    return row


FAILURES = (FAILED_TO_DOWNLOAD, FAILED_TO_DECODE)  # the statuses that count against a host
_AUTHORITY = re.compile(r"[^:/?#]*:?//([^/?#]*)")  # what RFC 3986 calls a URL's authority
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def url_host(url: str) -> str:
    """The host (with its port, if any) a URL is fetched from: what per-host limits and the failing-host
    reports count by, in the downloader's metadata and the dataset card alike. One host however written:
    lower-cased, without a name's trailing dot or the scheme's default port (they were hosts of their own,
    each with its own `per_host_connections`). A malformed authority ("http://[::1/a.jpg", which urlsplit
    refuses) is taken as written: its row fails, not its shard. The user name and password a URL may carry
    before "@" are not the host's: left out, so that they are neither a host of their own nor shown where
    hosts are."""
    try:
        parts = urlsplit(url)
        scheme, authority = parts.scheme, parts.netloc
    except ValueError:
        found = _AUTHORITY.match(url)
        scheme, authority = url.partition(":")[0].lower(), found.group(1) if found else ""
    host = authority.rpartition("@")[2].lower()
    name, _, port = host.rpartition(":") if ":" in host and not host.endswith("]") else (host, "", "")
    name = name.rstrip(".")
    return f"{name}:{port}" if port and port != _DEFAULT_PORTS.get(scheme) else name


def url_hostname(url: str) -> str | None:
    """A URL's host name, as its fetch looks it up; None for one with none, or a malformed authority
    (its fetch then fails with the reason)."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def url_hosts(urls: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`url_host` of each URL: the stored `host` column, so that a query by host reads a small
    dictionary-encoded column instead of parsing every URL."""
    return pa.array([url_host(url) for url in urls.to_pylist()], pa.string())


def with_host(table: pa.Table) -> pa.Table:
    """`table` with its `host` column (re)computed from `url`, as the last column."""
    if "host" in table.column_names:
        table = table.drop_columns(["host"])
    return table.append_column(pa.field("host", pa.string(), nullable=False), url_hosts(table.column("url")))


def error_class(error_message: str) -> str:
    """An `error_message`'s class: the text before its first colon (`HTTP 404: Not Found` -> `HTTP 404`)."""
    return error_message.split(":", 1)[0]


IMAGES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),  # null only where taken_down
        pa.field("caption", pa.string()),  # null only where taken_down
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the bytes downloaded (before re-encoding), as md5
        pa.field("md5", pa.string()),  # what many takedown hash lists give
        pa.field("phash", pa.int64()),  # imaging.perceptual_hash of the image, for dataset-level dedup
        pa.field("num_bytes", pa.int64()),  # bytes downloaded (before re-encoding)
        pa.field("host", pa.string(), nullable=False),  # url_host(url): queries by host read no URL
    ]
)
# How images parquet is written (`download.write_images`; bench/query.py writes its table with these too):
# row groups of 20,000 rows, so that a large shard's `error_message` (and `host`) stays dictionary-encoded
# (a dictionary of every message of a 500,000-row shard outgrows parquet's 1 MB dictionary page, and the
# rest of the column is written plain): DuckDB reads it and runs docs/sql.md's `split_part` on it in half
# the time, the error-class query is 1.6x as fast. A shard of 10,000 rows is one row group either way.
IMAGES_PARQUET_OPTIONS = {"row_group_size": 20_000}


def embeddings(dim: int) -> pa.Schema:
    """embeddings/<shard>.parquet: L2-normalised CLIP embeddings of each `success` image and its caption.

    `similarity` is their cosine, computed in float32 before the cast to float16. The model name and
    pretrained tag are in the file's footer (`names.CLIP_*_FOOTER`).
    """
    vector = pa.list_(pa.float16(), dim)
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("image_embedding", vector, nullable=False),
            pa.field("text_embedding", vector, nullable=False),
            pa.field("similarity", pa.float32(), nullable=False),
        ]
    )


# pairs/<shard>.parquet: the filtered dataset, LAION-400M's features (names and types as theirs) plus our
# key, size and hash, and `host` (`url_host(url)`, the downloader's per-host key) for queries by host.
NSFW_UNLIKELY, NSFW_UNSURE, NSFW, NSFW_UNTAGGED = "UNLIKELY", "UNSURE", "NSFW", "UNTAGGED"
NSFW_TAGS = (NSFW_UNLIKELY, NSFW_UNSURE, NSFW, NSFW_UNTAGGED)

PAIRS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("license", pa.string()),
        pa.field("nsfw", pa.string(), nullable=False),
        pa.field("original_height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("similarity", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("host", pa.string(), nullable=False),
    ]
)


# recaptions/<shard>.parquet: one row per kept pair with Recap-DataComp-1B's columns, names and types as
# theirs (strings, float64 CLIP scores, int64 lengths in words), so that code written for it reads this
# unchanged; `re_caption` is null where no caption could be had, and `re_caption_error` (ours) says why.
RECAPTIONS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("org_caption", pa.string(), nullable=False),
        pa.field("re_caption", pa.string()),
        pa.field("org_clip_score", pa.float64()),
        pa.field("re_clip_score", pa.float64()),
        pa.field("org_length", pa.int64(), nullable=False),
        pa.field("re_length", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("re_caption_error", pa.string()),
    ]
)


# scores/<shard>.parquet: a row per embedded image (the keys of `embeddings`), LAION-5B's and
# LAION-Aesthetics' scores under their meaning: `punsafe` and `pwatermark` probabilities (0-1), `aesthetic`
# on LAION's 1-10 rating scale, and the caption's `language` code with the identifier's confidence (ISO 639-1
# where the language has one; otherwise the identifier's own: py3langid's `yue`, `zxx`, CLD3's `zh-Latn`).
# A score that was not computed (its model set to `none`, or `auto` found no head for the CLIP) is null;
# so is `pwatermark` where the stored image could not be decoded, and the language of an empty caption.
SCORES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("punsafe", pa.float32()),
        pa.field("pwatermark", pa.float32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("language", pa.string()),
        pa.field("language_confidence", pa.float32()),
    ]
)


# hosts/hosts.parquet, written by the catalog: `images` grouped by host, one row per host, with its URLs
# and their count in each status. "Success rate by host" reads it, since grouping 10 M image rows over
# a million hosts runs at 15 to 18 M rows/s however the images are stored.
HOSTS = pa.schema(
    [
        pa.field("host", pa.string()),
        pa.field("urls", pa.int64(), nullable=False),
        *(pa.field(status, pa.int64(), nullable=False) for status in STATUSES),
        pa.field("success_rate", pa.float64(), nullable=False),
    ]
)
# several row groups, so that DuckDB scans them in parallel: 10 ms instead of 15 for 945,000 hosts
HOSTS_PARQUET_OPTIONS = {"row_group_size": 100_000}


SEARCH_ROW_COLUMNS = ["key", "url", "caption"]  # what a search hit tells of its pair, before its vector


def search_index(dim: int) -> pa.Schema:
    """search_index/index.parquet: every pair of every shard with its image embedding, for /search.

    The model of the embeddings is in the file's footer (`names.CLIP_*_FOOTER`), as in the embeddings
    files it is built from.
    """
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("url", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("image_embedding", pa.list_(pa.float16(), dim), nullable=False),
        ]
    )


# blocklist_entries/entries.parquet: the active entries of every block list (blocklist.py), as hashes:
# a `url` entry is recorded as its url_sha256; the other kinds as they are, lower-cased.
BLOCKLIST_ENTRIES = pa.schema(
    [
        pa.field("list", pa.string(), nullable=False),  # the list's file name without its suffix
        pa.field("kind", pa.string(), nullable=False),  # blocklist.KINDS
        pa.field("entry", pa.string(), nullable=False),
    ]
)

# What removal.remove_keys takes: the keys to remove, each with why (the entry it matched).
REMOVALS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("list", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("entry", pa.string(), nullable=False),
    ]
)

# takedowns/<timestamp>.parquet, the removal ledger: a row per removal. It holds no link and no caption:
# `entry` is the matched entry as recorded (a hash, or a domain).
LEDGER = pa.schema(
    [
        *REMOVALS,
        pa.field("shard", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # removal.TAKEN_DOWN or removal.DUPLICATE
        pa.field("removed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("export_shards", pa.list_(pa.string())),  # the training-shards tars that held the key
    ]
)


# duplicates/duplicates.parquet (pipeline/dedup/deduplicate.py): a row per pair removed as a duplicate
# of another.
DUPLICATES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("duplicate_of", pa.string(), nullable=False),  # the pair kept
        pa.field("kind", pa.string(), nullable=False),  # dedup.KINDS
        pa.field("cosine", pa.float32()),  # near copies: of the two image embeddings
        pa.field("phash_distance", pa.int32()),  # near copies: bits apart of the two perceptual hashes
        pa.field("shard", pa.string(), nullable=False),
        pa.field("duplicate_of_shard", pa.string(), nullable=False),
        pa.field("found_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
# duplicates/state/hashes/<run>.parquet: each surviving pair's exact hashes, one row per kind
DEDUP_HASHES = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),
        pa.field("hash", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
    ]
)


def dedup_members(dim: int) -> pa.Schema:
    """duplicates/state/members/<bucket>/<run>.parquet: the surviving pairs' image embeddings by cluster.
    Internal state, so the embedding is `dim` little-endian fp16 values as one fixed-size binary:
    parquet writes and reads that about ten times as fast as a list of `dim` values."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("cluster", pa.int32(), nullable=False),
            pa.field("phash", pa.int64()),
            pa.field("image_embedding", pa.binary(2 * dim), nullable=False),
        ]
    )


def make_key(shard: str, row: int) -> str:
    return f"{shard}-{row:08d}"


_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*-[0-9]+")


def shard_of_key(key: str) -> str | None:
    """The shard of a `make_key` key, or None for a string that cannot be one."""
    return key.rsplit("-", 1)[0] if _KEY.fullmatch(key) else None


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema` for the contract columns, keeping any extra columns after them.

    Raises ValueError naming the missing columns, so a writer can never drop one silently.
    """
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"table lacks contract columns {missing}; has {table.column_names}")
    extras = [name for name in table.column_names if name not in schema.names]
    contract = table.select(schema.names).cast(schema)
    for name in extras:
        contract = contract.append_column(table.schema.field(name), table.column(name))
    return contract
