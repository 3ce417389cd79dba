"""Reading source files from `{root}/incoming/`: URL lists and Common Crawl WAT files.

A reader returns an Arrow table of candidate rows (`url`, `caption`, `page_url`, `license`,
`source_offset` and pass-through columns) plus the count of rows it dropped by reason. The rules
shared by every format (valid URL, non-empty caption, dedup) are applied later in `crawl.py`.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TypeVar
from urllib.parse import urljoin, urlsplit

import ftfy
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from laion_assets.pipeline import schemas
from laion_assets.pipeline.printable import printable
from laion_assets.pipeline.storage import replaced_while_read

URL_LIST_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
WAT_SUFFIXES = (".warc.wat", ".wat")

# Looked up case-insensitively, first match wins: LAION (URL/TEXT/LICENSE), DataComp (url/text),
# img2dataset (url/caption).
URL_CANDIDATES = ("url", "image_url", "img_url")
CAPTION_CANDIDATES = ("caption", "text", "alt", "alt_text")
LICENSE_CANDIDATES = ("license",)
PAGE_URL_CANDIDATES = ("page_url",)
_TEXT_NAMES = {*URL_CANDIDATES, *CAPTION_CANDIDATES, *LICENSE_CANDIDATES, *PAGE_URL_CANDIDATES}

# Columns a reader produces itself. A pass-through source column named like any contract column is
# renamed `source_<name>`.
READER_COLUMNS = ("url", "caption", "page_url", "license", "source_offset")
_BLOCK_SIZE = 1 << 20  # pyarrow's CSV and JSON readers' own
_MAX_BLOCK_SIZE = (1 << 31) - 1  # theirs take an int32
_T = TypeVar("_T")
_READER_SCHEMA = pa.schema([(c, pa.int64() if c == "source_offset" else pa.string()) for c in READER_COLUMNS])
# a drop's reason: missing, not an absolute http(s) URL, or an image link that cannot be resolved
INVALID_URL = "invalid_url"
# a drop's reason: a WAT record or a URL list's line that cannot be read
CORRUPT_RECORD = "corrupt_record"


class SourceError(ValueError):
    """A source file that cannot be read; the message names the file and the problem, with the file's own
    bytes that it quotes escaped and cut short."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


@dataclass(frozen=True)
class SourceName:
    name: str
    shard: str
    format: str  # parquet | csv | tsv | jsonl | wat | unknown
    gzipped: bool


def parse_source_name(name: str) -> SourceName:
    """The shard and format of a file in `incoming/`.

    The shard is the stem restricted to `[A-Za-z0-9_-]`, and starts with a letter or digit (an "s"
    put before another: a key's shard must, `schemas.shard_of_key`). A file of unknown format still
    names a shard (its last extension removed), so it shows up as a partition that fails with a clear
    message instead of being skipped unnoticed.
    """
    stem, gzipped = (name[: -len(".gz")], True) if name.lower().endswith(".gz") else (name, False)
    lower = stem.lower()
    suffix = next((s for s in (*WAT_SUFFIXES, *URL_LIST_FORMATS) if lower.endswith(s)), None)
    if suffix is None:
        fmt, stem = "unknown", stem.rsplit(".", 1)[0] if "." in stem.lstrip(".") else stem
    else:
        fmt, stem = ("wat" if suffix in WAT_SUFFIXES else URL_LIST_FORMATS[suffix]), stem[: -len(suffix)]
    shard = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    if not shard[:1].isalnum():  # "(train).csv", "日本語.tsv": their keys would be no keys
        shard = f"s{shard}"
    return SourceName(name=name, shard=shard, format=fmt, gzipped=gzipped)


def find_source(names: list[str], shard: str) -> SourceName:
    """The one source file among `names` that makes `shard`."""
    matches = [s for s in map(parse_source_name, names) if s.shard == shard]
    if not matches:
        raise SourceError(f"no file in incoming/ makes shard {shard!r} (is it deleted or renamed?)")
    if len(matches) > 1:
        raise SourceError(
            f"several files in incoming/ make shard {shard!r}: {[m.name for m in matches]}; "
            "rename all but one, shard names must be unique"
        )
    return matches[0]


@dataclass(frozen=True)
class ColumnNames:
    """Source column names; None means: find it among the common names."""

    url: str | None = None
    caption: str | None = None
    license: str | None = None


def read_source(stream: IO[bytes], source: SourceName, columns: ColumnNames, min_alt_length: int):
    """Read one source file into candidate rows. Returns (table, dropped-by-reason counter)."""
    if source.format == "unknown":
        known = ", ".join([*URL_LIST_FORMATS, ".warc.wat"])
        raise SourceError(f"{source.name}: unknown source format; expected one of {known}, optionally .gz")
    try:
        if source.gzipped:
            _check_gzip_magic(stream, source.name)
        if source.format == "wat":
            # warcio decompresses member by member itself, so offsets are those of the file on disk
            # (what Common Crawl's indexes use to fetch one record with a range request).
            return read_wat(stream, source.name, min_alt_length)
        if source.gzipped:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        return read_url_list(stream, source, columns)
    except SourceError:
        raise
    except (OSError, EOFError, zlib.error, pa.ArrowException, UnicodeDecodeError) as exc:
        raise SourceError(f"{source.name}: cannot read as {source.format}: {exc}") from exc


def _check_gzip_magic(stream: IO[bytes], name: str) -> None:
    if stream.read(2) != b"\x1f\x8b":
        raise SourceError(f"{name}: not a readable gzip file (it does not start with the gzip magic bytes)")
    stream.seek(0)


# URL lists


def read_url_list(stream: IO[bytes], source: SourceName, columns: ColumnNames) -> tuple[pa.Table, Counter]:
    configured = {c for c in (columns.url, columns.caption, columns.license) if c}
    dropped: Counter = Counter()
    table = _read_table(
        stream, source.format, lambda name: name.lower() in _TEXT_NAMES or name in configured, dropped
    )
    if table.num_columns == table.num_rows == 0:  # an empty file: no rows, as a header-only csv has
        return _READER_SCHEMA.empty_table(), dropped
    if repeated := sorted(n for n, count in Counter(table.column_names).items() if count > 1):
        raise SourceError(
            f"{source.name}: repeated column names {repeated}; columns are {table.column_names}"
        )
    picked: dict[str, str | None] = {}
    for name, what, configured_name, candidates, required in (
        ("url", "URL", columns.url, URL_CANDIDATES, True),
        ("caption", "caption", columns.caption, CAPTION_CANDIDATES, True),
        ("license", "license", columns.license, LICENSE_CANDIDATES, False),
        ("page_url", "page URL", None, PAGE_URL_CANDIDATES, False),
    ):
        taken = {c for c in picked.values() if c}  # a column is one thing: a found one is not found again
        picked[name] = _find_column(table, configured_name, candidates, what, source.name, required, taken)
    out = {
        name: table.column(col).cast(pa.string()) if col else pa.nulls(table.num_rows, pa.string())
        for name, col in picked.items()
    }
    out["source_offset"] = pa.array(range(table.num_rows), pa.int64())
    used = {c for c in picked.values() if c}
    for name in table.column_names:
        if name not in used:
            target = name
            while target in schemas.CRAWL_METADATA.names or (target != name and target in table.column_names):
                target = f"source_{target}"  # a reserved name passes through renamed, overwriting none
            out[target] = table.column(name)
    return pa.table(out), dropped


def _read_table(stream: IO[bytes], fmt: str, is_text: Callable[[str], bool], dropped: Counter) -> pa.Table:
    """The table of a URL list; of a CSV or TSV, the columns `is_text` names as written, strings: by
    pyarrow's inference a caption "007" became 7, "1e3" 1000, and "NA" or "null" nothing. A JSONL line
    that is no JSON object, or a CSV or TSV row whose fields are not the header's, is counted in
    `dropped`, not read. A CSV, TSV or JSONL file of nothing but blanks (and a byte-order mark) has no
    columns and no rows."""
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(stream.read()))
        table.validate(full=True)  # strings that are not UTF-8: the stages after would fail on them
        return table
    data = stream.read()
    if not data.removeprefix(codecs.BOM_UTF8).strip():  # pyarrow: "Empty JSON file", "Empty CSV file"
        return pa.table({})
    if fmt == "jsonl":
        try:
            table = _read_json(data)
        except pa.ArrowInvalid:  # one bad line stopped the whole file: read again without such lines
            data = _json_object_lines(data, dropped)
            if not data:  # no line is one: the reader's own error says more
                raise
            table = _read_json(data)
        schema = pa.schema([f.with_type(_strings_kept(f.type)) for f in table.schema])
        if schema == table.schema:
            return table
        return _read_json(data, pa_json.ParseOptions(explicit_schema=schema))
    if b"\n" not in data and b"\r" not in data:  # a header alone, unended: pyarrow read no columns in it
        data += b"\n"
    table, skipped = _whole_rows(lambda block: _read_csv(data, fmt == "tsv", is_text, block), len(data))
    if skipped:
        dropped[CORRUPT_RECORD] += skipped
    return table


def _read_csv(
    data: bytes, tsv: bool, is_text: Callable[[str], bool], block_size: int
) -> tuple[pa.Table, int]:
    """The table of a CSV or TSV file, and the count of its rows with more or fewer fields than the
    header, which are skipped."""
    skipped = 0

    def skip(row: object) -> str:
        nonlocal skipped
        skipped += 1
        return "skip"

    read = pa_csv.ReadOptions(block_size=block_size)
    parse = pa_csv.ParseOptions(delimiter="\t" if tsv else ",", newlines_in_values=True)
    parse.invalid_row_handler = lambda row: "skip"  # counted where the rows are read, below
    names = pa_csv.open_csv(io.BytesIO(data), read_options=read, parse_options=parse).schema.names
    convert = pa_csv.ConvertOptions(
        column_types={name: pa.string() for name in names if is_text(name)},
        strings_can_be_null=True,
        null_values=[""],
    )
    parse.invalid_row_handler = skip
    table = pa_csv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)
    return table, skipped


def _read_json(data: bytes, parse: pa_json.ParseOptions | None = None) -> pa.Table:
    """pyarrow's JSON reader passes bytes that are not UTF-8 into its strings unchecked: such a line
    failed the crawl on a raw ArrowInvalid naming no file, or, in a passed-through column, reached the
    parquet, which DuckDB then refuses to read."""

    def read(block_size: int) -> pa.Table:
        options = pa_json.ReadOptions(block_size=block_size)
        return pa_json.read_json(io.BytesIO(data), read_options=options, parse_options=parse)

    table = _whole_rows(read, len(data))
    table.validate(full=True)
    return table


def _whole_rows(read: Callable[[int], _T], size: int) -> _T:
    """`read(block_size)` in pyarrow's blocks of 1 MiB, or, where a row is longer than that, in one block
    of the whole file: one such row (a long caption, an embedded thumbnail) failed the whole file with
    "straddling object straddles two block boundaries (try to increase block size?)"."""
    try:
        return read(_BLOCK_SIZE)
    except pa.ArrowInvalid as exc:
        if "straddl" not in str(exc):
            raise
        return read(min(size + 1, _MAX_BLOCK_SIZE))


def _json_object_lines(data: bytes, dropped: Counter) -> bytes:
    """The lines of a JSONL file that are JSON objects in UTF-8; every other line but a blank one is
    counted."""
    kept = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            is_object = isinstance(value, dict)
            if is_object:  # a lone surrogate JSON escapes ("\ud83d") UTF-8 cannot hold, nor pyarrow read
                json.dumps(value, ensure_ascii=False).encode()
        except (ValueError, RecursionError):  # UnicodeDecodeError and UnicodeEncodeError are ValueErrors
            is_object = False
        if is_object:
            kept.append(line)
        else:
            dropped[CORRUPT_RECORD] += 1
    return b"\n".join(kept)


def _strings_kept(type_: pa.DataType) -> pa.DataType:
    """`type_` with strings again where pyarrow's JSON reader made timestamps of strings that look like
    dates: a caption "2021-01-01" read "2021-01-01 00:00:00", a time with an offset moved to UTC."""
    if pa.types.is_timestamp(type_):
        return pa.string()
    if pa.types.is_struct(type_):
        return pa.struct([f.with_type(_strings_kept(f.type)) for f in type_])
    if pa.types.is_list(type_):
        return pa.list_(type_.value_field.with_type(_strings_kept(type_.value_type)))
    return type_


def _find_column(
    table: pa.Table,
    configured: str | None,
    candidates: tuple[str, ...],
    what: str,
    name: str,
    required: bool,
    taken: set[str],
) -> str | None:
    if configured:
        if configured not in table.column_names:
            raise SourceError(
                f"{name}: configured {what} column {configured!r} not found; columns are {table.column_names}"
            )
        return configured
    by_lower = {}
    for col in table.column_names:
        if col not in taken:
            by_lower.setdefault(col.lower(), col)
    found = next((by_lower[c] for c in candidates if c in by_lower), None)
    if found is None and required:
        raise SourceError(
            f"{name}: no {what} column found (looked for {list(candidates)}, any case); "
            f"columns are {table.column_names}; set the column name in the crawl_metadata config"
        )
    return found


# Common Crawl WAT


def read_wat(stream: IO[bytes], name: str, min_alt_length: int) -> tuple[pa.Table, Counter]:
    """Every `<img>` with alt text in the HTML response records of a WAT file, as LAION extracted them."""
    dropped: Counter = Counter()
    rows: dict[str, list] = {c: [] for c in READER_COLUMNS}
    for offset, envelope in _wat_envelopes(stream, name, dropped):
        for row in _image_links(envelope, min_alt_length, dropped):
            for column, value in zip(READER_COLUMNS, (*row, offset), strict=True):
                rows[column].append(value)
    return pa.table(rows, schema=_READER_SCHEMA), dropped


def _wat_envelopes(stream: IO[bytes], name: str, dropped: Counter) -> Iterator[tuple[int, dict]]:
    """(record offset, Envelope) of each parseable metadata record; unparseable ones are counted."""
    records = ArchiveIterator(stream, no_record_parse=False, arc2warc=False)
    seen = metadata = 0
    last, whole = (0, 0), True  # the offset and length of the last record read, and whether it was whole
    try:
        for record in records:
            seen += 1
            is_metadata = record.rec_type == "metadata"
            payload = record.content_stream().read() if is_metadata else b""
            last = records.get_record_offset(), records.get_record_length()  # these read to the record's end
            metadata += is_metadata
            # a record cut short (in its header or its content) is what warcio found of it
            whole = record.length is not None and (not is_metadata or len(payload) == record.length)
            if not whole:
                dropped[CORRUPT_RECORD] += 1
                continue
            if not is_metadata:
                continue
            try:
                envelope = json.loads(payload)["Envelope"]
            except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested past the stack
                dropped[CORRUPT_RECORD] += 1
                continue
            yield last[0], envelope
    except (ArchiveLoadFailed, OSError, EOFError, zlib.error) as exc:
        if replaced_while_read(exc):  # on S3: the rest would come from another version, no damaged tail
            raise SourceError(f"{name}: replaced while it was read; run the shard again") from exc
        if "non-chunked gzip" in str(exc):  # warcio's word for it: whole, not a damaged tail
            raise SourceError(
                f"{name}: gzipped as one stream; a WAT file has a gzip member per record (its offsets "
                f"are those of the records): recompress it with `warcio recompress {name} <new file>`"
            ) from exc
        if seen == 0:
            raise SourceError(f"{name}: not a readable WAT file: {exc}") from exc
        # A damaged tail: what was read stands, the rest of the file is one counted corrupt record.
        dropped[CORRUPT_RECORD] += 1
    else:
        if seen and whole and _cut_short(stream, *last):
            dropped[CORRUPT_RECORD] += 1
    if not metadata:  # an empty file, or a WARC or WET one: not a shard with no images
        raise SourceError(f"{name}: no WAT metadata records in its {seen} records (a WARC or WET file?)")


def _cut_short(stream: IO[bytes], offset: int, length: int) -> bool:
    """Whether bytes no record could be read from follow the last whole record (at `offset`, `length`
    long): warcio ends quietly where a file stops inside a gzip member's first bytes or its trailer, or
    where a member cannot be decompressed."""
    chunks = iter(lambda: stream.read(1 << 20), b"")
    stream.seek(offset)
    if stream.read(2) != b"\x1f\x8b":  # uncompressed: only the blank lines that end a record may follow
        stream.seek(offset + length)
        return any(chunk.strip() for chunk in chunks)
    stream.seek(offset)
    member = zlib.decompressobj(wbits=31)
    try:
        for chunk in chunks:
            member.decompress(chunk)
            if member.eof:
                return bool(member.unused_data or stream.read(1))
    except zlib.error:
        return True
    return True  # the member's end is missing


def _image_links(envelope: dict, min_alt_length: int, dropped: Counter) -> Iterator[tuple]:
    """(url, caption, page_url, license) for each usable `<img>` of one HTML response. Its JSON is
    taken as it comes: a field of another type than WAT's is missing, a link that is no string is an
    invalid URL, an alt that is none is short."""
    envelope = _dict(envelope)
    header = _dict(envelope.get("WARC-Header-Metadata"))
    if header.get("WARC-Type") != "response":
        return
    html = _dict(_dict(envelope.get("Payload-Metadata")).get("HTTP-Response-Metadata")).get("HTML-Metadata")
    page_url = _text(header.get("WARC-Target-URI"))
    if not isinstance(html, dict) or page_url is None:
        return  # not an HTML page, or one without a readable address: no images to take
    head = _dict(html.get("Head"))
    base = _resolved(page_url, _text(head.get("Base")) or "") or page_url
    links = [link for link in _list(html.get("Links")) if isinstance(link, dict)]
    license_ = _page_license(links + [x for x in _list(head.get("Link")) if isinstance(x, dict)], base)
    for link in links:
        if link.get("path") != "IMG@/src" or "url" not in link:
            continue
        src = (_text(link["url"]) or "").strip()
        if not src:
            dropped[INVALID_URL] += 1
            continue
        if src.lower().startswith(("data:", "javascript:")):
            dropped["data_or_javascript_url"] += 1
            continue
        url = _resolved(base, src)
        if url is None:
            dropped[INVALID_URL] += 1
            continue
        if urlsplit(url).path.lower().endswith((".svg", ".gif")):
            dropped["svg_or_gif"] += 1
            continue
        alt = clean_text(_text(link.get("alt")) or "")
        if len(alt) < min_alt_length:
            dropped["short_alt"] += 1
            continue
        yield url, alt, page_url, license_


def _page_license(links: list[dict], base: str) -> str | None:
    """The first Creative Commons URL linked with rel=license, as LAION recorded it."""
    for link in links:
        rel = str(link.get("rel") or "").lower().split()
        url = _resolved(base, _text(link.get("url")) or "")
        if "license" in rel and url and "creativecommons.org" in url.lower():
            return url
    return None


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _text(value: object) -> str | None:
    """`value` if it is a string that UTF-8 can hold: JSON's "\\udc80", a lone surrogate, it cannot (a
    WAT written in Java may hold one), and the parquet could not be written."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _resolved(base: str, link: str) -> str | None:
    """`link` resolved against `base`; None where either is malformed (an unclosed IPv6 "[", which
    urlsplit refuses): one such link on a page must not stop the whole file."""
    try:
        url = urljoin(base, link)
        urlsplit(url)
    except ValueError:
        return None
    return url


def clean_text(text: str) -> str:
    """Mojibake fixed and whitespace collapsed."""
    return " ".join(ftfy.fix_text(text).split())
