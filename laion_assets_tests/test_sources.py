import gzip
import io
import json
import random

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.crawl.metadata import CrawlSettings, build_crawl_metadata, write_crawl_metadata
from laion_assets.pipeline.crawl.sources import ColumnNames, SourceError, find_source, parse_source_name
from laion_assets.pipeline.lineage import settings_changes
from laion_assets.pipeline.printable import MAX_MESSAGE
from laion_assets.pipeline.settings import DatasetSettings
from laion_assets.pipeline.storage import CRAWL_METADATA, DatasetStore
from laion_assets_tests.wat_files import Page, img, wat_bytes


@pytest.mark.parametrize(
    ("name", "shard", "fmt", "gzipped"),
    [
        (
            "CC-MAIN-20220924151538-20220924181538-00000.warc.wat.gz",
            "CC-MAIN-20220924151538-20220924181538-00000",
            "wat",
            True,
        ),
        ("part-00000.snappy.parquet", "part-00000_snappy", "parquet", False),
        ("urls.csv.gz", "urls", "csv", True),
        ("cc 3m (train).TSV", "cc_3m__train_", "tsv", False),
        ("datacomp.jsonl", "datacomp", "jsonl", False),
        ("notes.xlsx", "notes", "unknown", False),
    ],
)
def test_parse_source_name(name, shard, fmt, gzipped):
    source = parse_source_name(name)
    assert (source.shard, source.format, source.gzipped) == (shard, fmt, gzipped)


def test_find_source_names_the_problem():
    assert find_source(["a.csv", "b.jsonl"], "b").name == "b.jsonl"
    with pytest.raises(SourceError, match=r"no file in incoming/ makes shard 'c'"):
        find_source(["a.csv"], "c")
    with pytest.raises(SourceError, match=r"several files .* 'a': \['a.csv', 'a.jsonl'\]"):
        find_source(["a.csv", "a.jsonl"], "a")


# One table per dataset convention: LAION-400M parquet, DataComp, img2dataset.
LAION = {
    "URL": ["http://a.com/1.jpg", "https://b.org/2.png"],
    "TEXT": ["a red car", "two dogs"],
    "LICENSE": ["?", "https://creativecommons.org/licenses/by/4.0/"],
    "similarity": [0.31, 0.42],
}
DATACOMP = {
    "uid": ["u1", "u2"],
    "url": ["http://a.com/1.jpg", "https://b.org/2.png"],
    "text": ["a red car", "two dogs"],
}
IMG2DATASET = {"url": ["http://a.com/1.jpg", "https://b.org/2.png"], "caption": ["a red car", "two dogs"]}


def _encode(columns: dict, fmt: str) -> bytes:
    table = pa.table(columns)
    out = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, out)
    elif fmt in ("csv", "tsv"):
        pa_csv.write_csv(table, out, pa_csv.WriteOptions(delimiter="\t" if fmt == "tsv" else ","))
    else:
        out.write("".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode())
    return out.getvalue()


def _crawl(store: DatasetStore, name: str, data: bytes, config: CrawlSettings | None = None):
    store.write_bytes(f"incoming/{name}", data)
    return build_crawl_metadata(store, parse_source_name(name), config or CrawlSettings())


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("convention", "extras"), [(LAION, ["similarity"]), (DATACOMP, ["uid"]), (IMG2DATASET, [])]
)
def test_url_lists_every_format_and_convention(local_root, fmt, gz, convention, extras):
    data = _encode(convention, fmt)
    name = f"part-1.{fmt}" + (".gz" if gz else "")
    result = _crawl(DatasetStore(local_root), name, gzip.compress(data) if gz else data)
    rows = result.table.to_pylist()
    assert [(r["key"], r["url"], r["caption"]) for r in rows] == [
        ("part-1-00000000", "http://a.com/1.jpg", "a red car"),
        ("part-1-00000001", "https://b.org/2.png", "two dogs"),
    ]
    assert result.table.column_names == [
        "key",
        "url",
        "caption",
        "page_url",
        "license",
        "source_file",
        "source_offset",
        *extras,
    ]
    assert [r["source_file"] for r in rows] == [name, name]
    assert [r["source_offset"] for r in rows] == [0, 1]
    expected_license = LAION["LICENSE"] if convention is LAION else [None, None]
    assert [r["license"] for r in rows] == expected_license


def test_rules_drop_and_count(local_root):
    rows = [
        {"url": "http://a.com/1.jpg", "caption": "kept"},
        {"url": "  http://a.com/1.jpg ", "caption": "kept  "},  # the same pair once trimmed
        {"url": "http://a.com/1.jpg", "caption": "same url, other caption"},
        {"url": None, "caption": "no url"},
        {"url": "ftp://a.com/x.jpg", "caption": "ftp"},
        {"url": "/relative/x.jpg", "caption": "relative"},
        {"url": "http://", "caption": "no host"},
        {"url": "HTTPS://B.org/2.png", "caption": "upper-case scheme"},
        {"url": "http://a.com/2.jpg", "caption": "   "},
        {"url": "http://a.com/3.jpg", "caption": None},
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    result = _crawl(DatasetStore(local_root), "s.jsonl", data)
    assert [(r["url"], r["caption"], r["source_offset"]) for r in result.table.to_pylist()] == [
        ("http://a.com/1.jpg", "kept", 0),
        ("http://a.com/1.jpg", "same url, other caption", 2),
        ("HTTPS://B.org/2.png", "upper-case scheme", 7),
    ]
    assert result.rows_read == 10
    assert result.dropped == {"duplicate": 1, "empty_caption": 2, "invalid_url": 4}


def test_configured_columns_and_reserved_names_pass_through(local_root):
    data = _encode(
        {
            "link": ["http://a.com/x.jpg"],
            "alt": ["a thing"],
            "page_url": ["http://a.com/"],
            "key": ["theirs"],
            "lic": ["cc-by"],
        },
        "parquet",
    )
    config = CrawlSettings(columns=ColumnNames(url="link", license="lic"))
    row = _crawl(DatasetStore(local_root), "c.parquet", data, config).table.to_pylist()[0]
    assert row["url"] == "http://a.com/x.jpg"
    assert row["caption"] == "a thing"  # found by its common name
    assert row["license"] == "cc-by"
    assert row["page_url"] == "http://a.com/"
    assert row["key"] == "c-00000000" and row["source_key"] == "theirs"


def test_no_url_column_names_file_and_columns(local_root):
    data = _encode({"link": ["http://a.com/x.jpg"], "caption": ["x"]}, "csv")
    with pytest.raises(
        SourceError, match=r"bad\.csv: no URL column found .* columns are \['link', 'caption'\]"
    ):
        _crawl(DatasetStore(local_root), "bad.csv", data)


def test_configured_column_missing(local_root):
    with pytest.raises(SourceError, match=r"configured caption column 'words' not found"):
        _crawl(
            DatasetStore(local_root),
            "x.csv",
            _encode(IMG2DATASET, "csv"),
            CrawlSettings(columns=ColumnNames(caption="words")),
        )


def test_unreadable_gzip(local_root):
    with pytest.raises(SourceError, match=r"broken\.csv\.gz: not a readable gzip file"):
        _crawl(DatasetStore(local_root), "broken.csv.gz", b"url,caption\nhttp://a/x.jpg,x\n")


def test_truncated_gzip(local_root):
    data = gzip.compress(_encode(IMG2DATASET, "jsonl") * 50)
    with pytest.raises(SourceError, match=r"cut\.jsonl\.gz: cannot read as jsonl"):
        _crawl(DatasetStore(local_root), "cut.jsonl.gz", data[: len(data) // 2])


def test_unknown_format(local_root):
    with pytest.raises(SourceError, match=r"notes\.xlsx: unknown source format"):
        _crawl(DatasetStore(local_root), "notes.xlsx", b"PK\x03\x04")


def test_not_parquet(local_root):
    with pytest.raises(SourceError, match=r"fake\.parquet: cannot read as parquet"):
        _crawl(DatasetStore(local_root), "fake.parquet", b"url,caption\n")


def test_crawl_on_s3(s3_root):
    result = _crawl(DatasetStore(s3_root), "laion.parquet", _encode(LAION, "parquet"))
    assert result.table.num_rows == 2


@pytest.mark.parametrize("name", ["garbage.csv", "garbage.warc.wat", "garbage.jsonl"])
def test_garbage_bytes_are_escaped_and_cut_short_in_the_error(local_root, name):
    garbage = random.Random(name).randbytes(20_000)
    with pytest.raises(SourceError) as raised:
        _crawl(DatasetStore(local_root), name, garbage)
    message = str(raised.value)
    assert message.startswith(f"{name}: ")
    assert message.isprintable() and "\ufffd" not in message
    assert len(message) <= MAX_MESSAGE + len("... (00000 more characters)")


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_a_csv_or_tsv_lists_text_is_read_as_written(local_root, fmt):
    # pyarrow's inference made the captions 7, 1.5 and 1000.0, and NA, null and nan nothing (dropped)
    captions = ["007", "1.50", "1e3", "NA", "null", "nan"]
    separator = "\t" if fmt == "tsv" else ","
    lines = [separator.join(["url", "caption", "similarity"])]
    lines += [separator.join([f"http://a.com/{i}.jpg", caption, "0.3"]) for i, caption in enumerate(captions)]
    result = _crawl(DatasetStore(local_root), f"t.{fmt}", ("\n".join(lines) + "\n").encode())
    assert result.table.column("caption").to_pylist() == captions
    assert result.table.schema.field("similarity").type == pa.float64()  # a column passed through: inferred


def test_repeated_column_names_are_a_source_error(local_root):
    with pytest.raises(SourceError, match=r"dup\.csv: repeated column names \['x'\]"):
        _crawl(DatasetStore(local_root), "dup.csv", b"url,caption,x,x\nhttp://a.com/1.jpg,a cat,1,2\n")


def test_a_configured_column_is_not_found_again_by_its_common_name(local_root):
    # the URLs under "text", which is also a common caption name: the captions were the URLs
    data = _encode({"text": ["http://a.com/x.jpg"], "alt": ["a thing"]}, "parquet")
    config = CrawlSettings(columns=ColumnNames(url="text"))
    row = _crawl(DatasetStore(local_root), "c.parquet", data, config).table.to_pylist()[0]
    assert (row["url"], row["caption"]) == ("http://a.com/x.jpg", "a thing")


def test_a_renamed_column_overwrites_none(local_root):
    data = _encode(
        {"url": ["http://a.com/x.jpg"], "caption": ["a thing"], "key": ["theirs"], "source_key": ["other"]},
        "parquet",
    )
    row = _crawl(DatasetStore(local_root), "c.parquet", data).table.to_pylist()[0]
    assert (row["source_key"], row["source_source_key"]) == ("other", "theirs")


def test_a_parquet_string_that_is_not_utf8_is_a_source_error(local_root):
    captions = pa.array([b"bad \xff caption"], pa.binary()).view(pa.string())
    out = io.BytesIO()
    pq.write_table(pa.table({"url": ["http://a.com/x.jpg"], "caption": captions}), out)
    with pytest.raises(SourceError, match=r"bad\.parquet: cannot read as parquet: .*UTF8"):
        _crawl(DatasetStore(local_root), "bad.parquet", out.getvalue())


@pytest.mark.parametrize(
    ("name", "shard"), [("(train).csv", "s_train_"), ("日本語.tsv", "s___"), ("-a.csv", "s-a")]
)
def test_a_shard_starts_with_a_letter_or_digit_so_its_keys_are_keys(name, shard):
    assert parse_source_name(name).shard == shard
    assert schemas.shard_of_key(schemas.make_key(shard, 0)) == shard


def test_a_column_parquet_cannot_hold_is_an_error_naming_the_file(local_root):
    """A JSON list whose field is `{}` in every row: pyarrow cannot write an empty struct, and its error
    named no file. It is a SourceError naming the source file, and no shard is written."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/e.jsonl", b'{"url": "http://a.com/1.jpg", "caption": "a cat", "meta": {}}\n')
    with pytest.raises(SourceError, match=r"incoming/e.jsonl: its columns cannot be stored: .*'meta'"):
        write_crawl_metadata(store, "e", CrawlSettings())
    assert not store.exists(CRAWL_METADATA.parquet("e"))


def test_a_jsonl_lists_strings_are_read_as_written(local_root):
    # pyarrow's JSON reader takes strings that look like dates for timestamps: the caption "2021-01-01"
    # became "2021-01-01 00:00:00", and a passed-through "+02:00" time was moved to UTC
    rows = [
        {"url": "http://a.com/1.jpg", "caption": "2021-01-01", "taken": "2021-01-01T10:00:00+02:00", "n": 1},
        {"url": "http://a.com/2.jpg", "caption": "2021-01-02", "taken": "2021-01-02", "n": 2},
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    table = _crawl(DatasetStore(local_root), "dates.jsonl", data).table
    assert table.column("caption").to_pylist() == ["2021-01-01", "2021-01-02"]
    assert table.column("taken").to_pylist() == ["2021-01-01T10:00:00+02:00", "2021-01-02"]
    assert table.schema.field("n").type == pa.int64()  # other types are still inferred


def test_a_jsonl_line_that_is_not_a_json_object_is_counted_not_the_shards_end(local_root):
    # one such line made the whole file unreadable: "JSON parse error: Invalid value. in row 1"
    lines = [
        b'{"url": "http://a.com/1.jpg", "caption": "a cat"}',
        b"not json",
        b"[1, 2]",
        b'{"url": "http://a',
    ]
    lines.append(b'{"url": "http://a.com/2.jpg", "caption": "a dog"}')
    result = _crawl(DatasetStore(local_root), "j.jsonl", b"\n".join(lines) + b"\n")
    assert result.table.column("caption").to_pylist() == ["a cat", "a dog"]
    assert result.dropped["corrupt_record"] == 3


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_a_csv_or_tsv_row_with_other_than_the_headers_fields_is_counted_not_the_shards_end(local_root, fmt):
    # one such row (a tab in a TSV caption) made the whole file unreadable: "Expected 2 columns, got 3"
    rows = [["url", "caption"], ["http://a.com/1.jpg", "a cat"], ["http://a.com/2.jpg", "a", "b"]]
    rows += [["http://a.com/3.jpg"], ["http://a.com/4.jpg", "a dog"]]
    lines = ["\t".join(row) if fmt == "tsv" else ",".join(row) for row in rows]
    result = _crawl(DatasetStore(local_root), f"r.{fmt}", ("\n".join(lines) + "\n").encode())
    assert result.table.column("caption").to_pylist() == ["a cat", "a dog"]
    assert result.dropped["corrupt_record"] == 2


def test_a_jsonl_line_that_is_not_utf8_is_counted_not_stored_or_the_shards_end(local_root):
    # pyarrow's JSON reader took such bytes into its strings: in a caption the crawl failed on a raw
    # "Invalid UTF8 sequence in input" naming no file; in a passed-through column they reached the parquet,
    # which DuckDB (the catalog) then refused to read; a lone surrogate, escaped, failed the whole file
    lines = [
        b'{"url": "http://a.com/1.jpg", "caption": "a cat", "note": "ok"}',
        b'{"url": "http://a.com/2.jpg", "caption": "un caf\xe9", "note": "ok"}',  # Latin-1
        b'{"url": "http://a.com/3.jpg", "caption": "a dog", "note": "caf\xe9"}',
        '{"url": "http://a.com/4.jpg", "caption": "a café", "note": "ok"}'.encode(),
        b'{"url": "http://a.com/5.jpg", "caption": "a lone \\ud83d surrogate"}',  # pyarrow refused the file
    ]
    result = _crawl(DatasetStore(local_root), "latin.jsonl", b"\n".join(lines) + b"\n")
    result.table.validate(full=True)
    assert result.table.column("caption").to_pylist() == ["a cat", "a café"]
    assert result.dropped["corrupt_record"] == 3


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("e.jsonl", b""),  # pyarrow: "Empty JSON file"
        ("e.jsonl", b"\n \r\n"),  # "no URL column found; columns are []"
        ("e.jsonl.gz", gzip.compress(b"", mtime=0)),
        ("e.csv", b""),  # "Empty CSV file"
        ("e.csv", b"\xef\xbb\xbf"),  # a spreadsheet's empty sheet, with its byte-order mark
        ("e.csv", b"url,caption"),  # a header alone, unended: "Empty CSV file or block"
        ("e.tsv", b"\xef\xbb\xbfurl\tcaption"),
    ],
)
def test_a_url_list_without_rows_is_a_shard_of_no_rows_in_every_text_format(local_root, name, data):
    """A header-only CSV made a shard of no rows, while an empty jsonl or csv (and a header without its
    line end) failed the crawl: a URL list with no rows is a shard of no rows, whatever its format."""
    store = DatasetStore(local_root)
    header_only = _crawl(store, "h.csv", b"url,caption\n").table
    result = _crawl(store, name, data)
    assert result.table.schema == header_only.schema
    assert (result.table.num_rows, result.rows_read) == (0, 0)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_row_longer_than_pyarrows_block_is_read_not_the_shards_end(local_root, fmt):
    # pyarrow reads in blocks of 1 MiB: one longer row (a long caption, an embedded thumbnail) failed the
    # whole file with "straddling object straddles two block boundaries (try to increase block size?)"
    long_caption = "a cat " * 400_000  # 2.4 MB
    rows = [
        ("http://a.com/1.jpg", "a dog"),
        ("http://a.com/2.jpg", long_caption),
        ("http://a.com/3.jpg", "a fox"),
    ]
    if fmt == "jsonl":
        lines = [json.dumps({"url": url, "caption": caption}) for url, caption in rows]
        lines.insert(1, "not json")
    else:
        separator = "\t" if fmt == "tsv" else ","
        lines = [separator.join(["url", "caption"]), *(separator.join(row) for row in rows)]
        lines.insert(2, separator.join(["http://a.com/x.jpg", "a", "b"]))  # counted once, not per read
    result = _crawl(DatasetStore(local_root), f"long.{fmt}", ("\n".join(lines) + "\n").encode())
    assert result.table.column("caption").to_pylist() == ["a dog", long_caption.strip(), "a fox"]
    assert result.dropped["corrupt_record"] == 1


def test_a_shard_is_reported_built_with_other_settings_only_for_settings_that_shape_it(local_root):
    """The footer recorded every crawl setting for every format: a change of `min_alt_length` (a WAT
    file's rule) reported each URL list's crawl_metadata built with other settings, and one of
    `url_column` each WAT file's; `--rebuild-stale` made them again, their images too (the crawl's
    footer is part of what the images were made from), for the same rows."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/urls.csv", _encode(IMG2DATASET, "csv"))
    page = Page("https://x.example/", links=[img("a.jpg", "a long enough caption")])
    store.write_bytes("incoming/seg.warc.wat.gz", wat_bytes([page]))
    for shard in ("urls", "seg"):
        write_crawl_metadata(store, shard, CrawlSettings())

    def changes(**section) -> dict:
        settings = DatasetSettings({names.CRAWL_METADATA_ASSET: section})
        return settings_changes(store, ["urls", "seg"], settings)

    assert changes(min_alt_length=5, url_column=None) == {}
    assert changes(min_alt_length=3) == {"seg": {"crawl_metadata": ["min_alt_length: 5 -> 3"]}}
    assert changes(url_column="link") == {"urls": {"crawl_metadata": ["url_column: None -> 'link'"]}}
