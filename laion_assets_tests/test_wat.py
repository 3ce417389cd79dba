import gzip
from collections import Counter

import pytest

from laion_assets.pipeline.crawl.metadata import CrawlSettings, build_crawl_metadata
from laion_assets.pipeline.crawl.sources import SourceError, _wat_envelopes, parse_source_name
from laion_assets.pipeline.storage import DatasetStore
from laion_assets_tests.wat_files import Page, _envelope, img, license_link, payload, wat_bytes, wat_of

CC_BY = "https://creativecommons.org/licenses/by-sa/4.0/"
WAT_NAME = "CC-MAIN-20220924151538-20220924181538-00000.warc.wat.gz"
SHARD = "CC-MAIN-20220924151538-20220924181538-00000"

PAGES = [
    Page(
        url="https://blog.example.com/posts/cats.html",
        links=[
            img("/img/cat.jpg", "A grey cat asleep on a sofa"),
            img("small.png", "cat"),  # alt under 5 characters
            img("https://cdn.example.net/logo.svg", "The blog logo"),
            img("anim.GIF?v=2", "An animated banner"),
            img("data:image/png;base64,iVBORw0KGgo=", "Inline pixel image"),
            img("javascript:void(0)", "Scripted image link"),
            img("photos/dog.webp", "  A  brown   dog\n running  "),  # whitespace collapsed
            img("photos/none.jpg"),  # no alt at all
            {"path": "A@/href", "url": "/about", "text": "About"},
            license_link(CC_BY),
        ],
    ),
    Page(
        url="http://shop.example.org/a/b/item?id=7",
        base="https://static.example.org/assets/",
        links=[
            img("chair.jpeg", "Oak chair with a woven seat"),
            img("//other.example.com/lamp.jpg", "Brass desk lamp â€” vintage"),  # mojibake fixed
            img("/img/cat.jpg", "Oak chair with a woven seat"),
            img("chair.jpeg", "Oak chair with a woven seat"),  # exact duplicate of the first
        ],
        head_links=[{"path": "LINK@/href", "url": "/license", "rel": "license"}],  # not Creative Commons
    ),
    Page(
        url="https://photos.example.com/",
        links=[img("mountain.jpg", "Snowy mountain at dawn")],
        head_links=[{"path": "LINK@/href", "url": CC_BY.replace("by-sa", "by"), "rel": "License"}],
    ),
]


def _crawl(store: DatasetStore, data: bytes, name: str = WAT_NAME):
    store.write_bytes(f"incoming/{name}", data)
    return build_crawl_metadata(store, parse_source_name(name), CrawlSettings())


def test_wat_extracts_images_exactly(store):
    result = _crawl(store, wat_bytes(PAGES))
    rows = [
        {k: r[k] for k in ("key", "url", "caption", "page_url", "license")} for r in result.table.to_pylist()
    ]
    assert rows == [
        {
            "key": f"{SHARD}-00000000",
            "url": "https://blog.example.com/img/cat.jpg",
            "caption": "A grey cat asleep on a sofa",
            "page_url": PAGES[0].url,
            "license": CC_BY,
        },
        {
            "key": f"{SHARD}-00000001",
            "url": "https://blog.example.com/posts/photos/dog.webp",
            "caption": "A brown dog running",
            "page_url": PAGES[0].url,
            "license": CC_BY,
        },
        {
            "key": f"{SHARD}-00000002",
            "url": "https://static.example.org/assets/chair.jpeg",
            "caption": "Oak chair with a woven seat",
            "page_url": PAGES[1].url,
            "license": None,
        },
        {
            "key": f"{SHARD}-00000003",
            "url": "https://other.example.com/lamp.jpg",
            "caption": "Brass desk lamp — vintage",
            "page_url": PAGES[1].url,
            "license": None,
        },
        {
            "key": f"{SHARD}-00000004",
            "url": "https://static.example.org/img/cat.jpg",
            "caption": "Oak chair with a woven seat",
            "page_url": PAGES[1].url,
            "license": None,
        },
        {
            "key": f"{SHARD}-00000005",
            "url": "https://photos.example.com/mountain.jpg",
            "caption": "Snowy mountain at dawn",
            "page_url": PAGES[2].url,
            "license": "https://creativecommons.org/licenses/by/4.0/",
        },
    ]
    assert result.dropped == {
        "data_or_javascript_url": 2,
        "duplicate": 1,
        "empty_caption": 0,
        "invalid_url": 0,
        "short_alt": 2,
        "svg_or_gif": 2,
    }
    assert {r["source_file"] for r in result.table.to_pylist()} == {WAT_NAME}


def test_wat_offsets_point_at_the_records(local_root):
    data = wat_bytes(PAGES)
    result = _crawl(DatasetStore(local_root), data)
    offsets = result.table.column("source_offset").to_pylist()
    # images of one page share their record's offset; each offset starts a gzip member
    assert offsets[0] == offsets[1] < offsets[2] == offsets[3] == offsets[4] < offsets[5]
    assert all(data[o : o + 2] == b"\x1f\x8b" for o in offsets)


def test_corrupt_record_is_skipped_and_counted(local_root):
    result = _crawl(DatasetStore(local_root), wat_bytes(PAGES, corrupt_after=0))
    assert result.table.num_rows == 6
    assert result.dropped["corrupt_record"] == 1


def test_damaged_tail_keeps_what_was_read(local_root):
    data = wat_bytes(PAGES)
    result = _crawl(DatasetStore(local_root), data[:-40])
    assert result.table.num_rows == 5  # the last page's record is cut
    assert result.dropped["corrupt_record"] == 1


def test_a_cut_warcio_takes_for_the_end_of_the_file_is_counted(local_root):
    # warcio ends quietly where a file stops a few bytes into a gzip member or inside its trailer, or inside
    # an uncompressed record's header: the rest of the file was lost and nothing said so
    store = DatasetStore(local_root)
    data = wat_bytes(PAGES)
    last = _crawl(store, data).table.column("source_offset")[-1].as_py()  # the last page's record
    raw = gzip.decompress(data)
    for name, cut, rows in [
        (WAT_NAME, data[: last + 10], 5),
        (WAT_NAME, data[:-4], 6),  # every record is whole, but the file goes on
        ("uncompressed.warc.wat", raw[: raw.rindex(b"WARC/1.0") + 20], 5),
    ]:
        result = _crawl(store, cut, name)
        assert (result.table.num_rows, result.dropped.get("corrupt_record")) == (rows, 1), (name, len(cut))
    # a cut in the blank lines after the last record loses nothing
    assert "corrupt_record" not in _crawl(store, raw[:-2], "uncompressed.warc.wat").dropped


def test_not_a_wat_file(local_root):
    with pytest.raises(SourceError, match=rf"{WAT_NAME}: not a readable gzip file"):
        _crawl(DatasetStore(local_root), b"<html>not a warc</html>")


def test_min_alt_length_is_configurable(local_root):
    store = DatasetStore(local_root)
    store.write_bytes(f"incoming/{WAT_NAME}", wat_bytes(PAGES))
    result = build_crawl_metadata(store, parse_source_name(WAT_NAME), CrawlSettings(min_alt_length=3))
    assert "cat" in result.table.column("caption").to_pylist()


def test_a_malformed_link_is_dropped_as_an_invalid_url_not_the_file(local_root):
    # urlsplit refuses an unclosed IPv6 bracket; one such <img> (or page URL, or <base>) in a WAT file
    # stopped its whole shard with a ValueError
    pages = [
        Page(
            url="https://blog.example.com/posts/cats.html",
            links=[
                img("http://[oops/cat.jpg", "A broken bracket in the link"),
                img("/img/cat.jpg", "A grey cat asleep on a sofa"),
                license_link("http://[creativecommons.org/licenses/by/4.0/"),
            ],
        ),
        Page(url="http://[oops/page.html", links=[img("/img/dog.jpg", "A dog on a page with a bad URL")]),
        Page(
            url="https://photos.example.com/", base="http://[oops/", links=[img("fox.jpg", "A fox at dusk")]
        ),
    ]
    result = _crawl(DatasetStore(local_root), wat_bytes(pages))
    assert [(r["url"], r["license"]) for r in result.table.to_pylist()] == [
        ("https://blog.example.com/img/cat.jpg", None),
        ("https://photos.example.com/fox.jpg", None),  # a malformed <base> falls back to the page's URL
    ]
    assert result.dropped["invalid_url"] == 2


def test_wat_json_of_other_types_than_wats_is_taken_as_missing(local_root):
    # each of these raised out of the reader (AttributeError, TypeError, UnicodeEncodeError when the
    # table was built, RecursionError), or made data of a Python repr ("https://p.example/None")
    def page(change) -> dict:
        envelope = _envelope(
            Page(url="https://p.example/", links=[img("/ok.jpg", "A good long alt")]), "response"
        )
        html = envelope["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
        change(envelope, envelope["WARC-Header-Metadata"], html)
        return envelope

    odd = [
        page(lambda envelope, header, html: envelope.update({"WARC-Header-Metadata": ["x"]})),
        page(lambda envelope, header, html: envelope.update({"Payload-Metadata": "x"})),
        page(lambda envelope, header, html: html.update(Head=["x"])),
        page(lambda envelope, header, html: html.update(Links=7)),
        page(lambda envelope, header, html: html["Head"].update(Link=True, Base=5)),
        page(lambda envelope, header, html: header.update({"WARC-Target-URI": 7})),
        page(lambda envelope, header, html: header.update({"WARC-Target-URI": ["https://p.example/"]})),
        page(lambda envelope, header, html: header.update({"WARC-Target-URI": "https://p.example/\udc80"})),
        page(
            lambda e, h, html: html.update(
                Links=[img(None, "A null link"), img(42, "A number"), img([], "A list")]
            )
        ),
        page(
            lambda e, h, html: html.update(
                Links=[img("/\udc80.jpg", "A lone surrogate"), img("/a.jpg", ["A list"])]
            )
        ),
    ]
    records = [("https://p.example/", payload(envelope)) for envelope in odd]
    records.append(("https://p.example/", b'{"Envelope": ' + b"[" * 100_000))
    good = Page(
        url="https://good.example/",
        links=[img("/cat.jpg", "A grey cat asleep"), license_link("https://creativecommons.org/\udc80")],
    )
    records.append((good.url, payload(_envelope(good, "response"))))
    result = _crawl(DatasetStore(local_root), wat_of(records))
    assert [(r["url"], r["caption"], r["license"]) for r in result.table.to_pylist()] == [
        ("https://p.example/ok.jpg", "A good long alt", None),  # a Head, Link or Base of another type: none
        ("https://good.example/cat.jpg", "A grey cat asleep", None),
    ]
    assert result.dropped["duplicate"] == 1  # the same image of the two pages with an odd Head
    assert result.dropped["invalid_url"] == 4  # null, 42, a list, a lone surrogate
    assert result.dropped["short_alt"] == 1  # an alt that is a list
    assert result.dropped["corrupt_record"] == 1  # nested past the stack


@pytest.mark.parametrize(
    ("data", "records"), [(wat_of([]), 1), (gzip.compress(b""), 0)], ids=["warcinfo only", "empty gzip"]
)
def test_a_wat_without_metadata_records_is_a_source_error_not_an_empty_shard(local_root, data, records):
    with pytest.raises(SourceError, match=rf"{WAT_NAME}: no WAT metadata records in its {records} records"):
        _crawl(DatasetStore(local_root), data)


def test_a_wat_replaced_on_s3_while_read_is_an_error_not_a_damaged_tail(s3_root):
    # s3fs refuses the ranges of a replaced object; that was taken for a damaged tail: the shard kept the
    # first pages of the old file and counted one corrupt record
    store = DatasetStore(s3_root)
    pages = [Page(f"https://p{i}.example/", links=[img(f"/{i}.jpg", f"Image {i}")]) for i in range(500)]
    store.write_bytes(f"incoming/{WAT_NAME}", wat_bytes(pages))
    # a block far smaller than the file, as s3fs's 50 MiB one is beside a real WAT file
    with store.fs.open(store.path(f"incoming/{WAT_NAME}"), "rb", block_size=16_384) as f:
        envelopes = _wat_envelopes(f, WAT_NAME, Counter())
        next(envelopes)
        store.write_bytes(f"incoming/{WAT_NAME}", wat_bytes(pages[:3]))
        with pytest.raises(SourceError, match=rf"{WAT_NAME}: replaced while it was read"):
            list(envelopes)


@pytest.mark.parametrize("first", ["warcinfo", "metadata"])
def test_a_wat_gzipped_as_one_stream_is_a_source_error_not_a_damaged_tail(local_root, first):
    # `gzip file.warc.wat` makes one member of every record; warcio reads the first record and stops. That
    # was taken for a damaged tail: behind a warcinfo record, "no WAT metadata records (a WARC or WET
    # file?)"; behind a metadata record, a shard of the first page alone and one corrupt_record
    raw = gzip.decompress(wat_bytes(PAGES))
    if first == "metadata":
        raw = raw[raw.index(b"WARC/1.0", 1) :]  # the warcinfo record left out
    with pytest.raises(SourceError, match=rf"{WAT_NAME}: gzipped as one stream.*warcio recompress"):
        _crawl(DatasetStore(local_root), gzip.compress(raw))
