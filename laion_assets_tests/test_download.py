import io
import json
import multiprocessing
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import replace
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download import downloader as download
from laion_assets.pipeline.download import fetch
from laion_assets.pipeline.download.downloader import DownloadSettings, HostScheduler, _Job, download_shard
from laion_assets.pipeline.download.imaging import ImageSettings, process_image
from laion_assets.pipeline.leases import shard_lease
from laion_assets.pipeline.parallel import pipelined
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import CRAWL_METADATA, IMAGES, DatasetStore

# Short timeouts keep the failures quick; the guard is off because the web is on 127.0.0.1.
FAST = DownloadSettings(
    connect_timeout=1,
    read_timeout=1,
    request_timeout=2.5,
    retries=2,
    retry_backoff=0.05,
    max_bytes=1_000_000,
    max_retry_after=5,
    allow_private_networks=True,
    max_in_flight=16,
)


def crawl_table(urls: list[str], shard: str = "s") -> pa.Table:
    return pa.table(
        {
            "key": [schemas.make_key(shard, i) for i in range(len(urls))],
            "url": urls,
            "caption": [f"caption {i}" for i in range(len(urls))],
        }
    )


def run(urls: list[str], settings: DownloadSettings = FAST, previous=None):
    tar = io.BytesIO()
    result = download_shard(crawl_table(urls), settings, tar, previous)
    return result, tar.getvalue(), {r["url"]: r for r in result.table.to_pylist()}


# path → (status, start of error_message)
EXPECTED = {
    "/img/red.jpg": (schemas.SUCCESS, None),
    "/img/green.png": (schemas.SUCCESS, None),
    "/img/blue.webp": (schemas.SUCCESS, None),
    "/img/octet.jpg": (schemas.SUCCESS, None),
    "/flaky/1": (schemas.SUCCESS, None),
    "/busy/1": (schemas.SUCCESS, None),
    "/chain/3": (schemas.SUCCESS, None),
    "/exif.jpg": (schemas.SUCCESS, None),
    "/otherbot-noai.jpg": (schemas.SUCCESS, None),
    "/404.jpg": (schemas.FAILED_TO_DOWNLOAD, "HTTP 404: Not Found"),
    "/busy-for-an-hour.jpg": (schemas.FAILED_TO_DOWNLOAD, "HTTP 429: Too Many Requests (Retry-After 3600s"),
    "/drip.jpg": (schemas.FAILED_TO_DOWNLOAD, "timeout: body not complete within request_timeout=2.5s"),
    "/chain/9": (schemas.FAILED_TO_DOWNLOAD, "too many redirects: more than max_redirects=5"),
    "/loop-a": (schemas.FAILED_TO_DOWNLOAD, "redirect loop: back to"),
    "/big.jpg": (schemas.FAILED_TO_DOWNLOAD, "too large: Content-Length 2"),
    "/big-chunked.jpg": (schemas.FAILED_TO_DOWNLOAD, "too large: body is over max_bytes=1000000"),
    "/reset.jpg": (schemas.FAILED_TO_DOWNLOAD, "connection broken"),
    "/html.jpg": (schemas.FAILED_TO_DECODE, "not an image: content type text/html"),
    "/truncated.jpg": (schemas.FAILED_TO_DECODE, "cannot decode: image file is truncated"),
    "/empty.jpg": (schemas.FAILED_TO_DECODE, "empty body"),
    "/garbage.jpg": (schemas.FAILED_TO_DECODE, "not an image: no known image format"),
    "/bomb.png": (schemas.FAILED_TO_DECODE, "decompression bomb"),
    "/noai.jpg": (schemas.OPTED_OUT, "X-Robots-Tag: noai"),
}


@pytest.fixture(params=[1, 2], ids=["one process", "two worker processes"])
def processes(request, monkeypatch) -> int:
    """Each test using this runs in this process and again dealt over two worker processes."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)  # so that these small shards are split too
    return request.param


def test_every_failure_ends_in_its_status_and_the_shard_completes(web, processes):
    urls = [web.url(path) for path in EXPECTED] + [web.blackhole_url, "ftp://example.com/x.jpg"]
    result, _, rows = run(urls, replace(FAST, processes=processes))
    assert result.table.num_rows == len(urls)
    assert result.table.column("key").to_pylist() == [schemas.make_key("s", i) for i in range(len(urls))]
    for path, (status, error) in EXPECTED.items():
        row = rows[web.url(path)]
        assert row["status"] == status, (path, row)
        if error is None:
            assert row["error_message"] is None, (path, row)
        else:
            assert row["error_message"].startswith(error), (path, row["error_message"])
    never = rows[web.blackhole_url]
    assert never["status"] == schemas.FAILED_TO_DOWNLOAD
    assert never["error_message"] == "timeout: no response within 1s (gave up after 3 attempts)"
    assert rows["ftp://example.com/x.jpg"]["error_message"] == "unsupported URL: ftp://example.com/x.jpg"
    # retried exactly as far as needed
    assert web.hits["/flaky/1"] == 2 and web.hits["/busy/1"] == 2 and web.hits["/404.jpg"] == 1
    assert web.hits["/busy-for-an-hour.jpg"] == 1
    assert rows[web.url("/404.jpg")]["http_status"] == 404


def test_successful_samples_are_resized_hashed_and_readable_by_webdataset(web, tmp_path, processes):
    import hashlib

    from laion_assets_tests.web import IMAGES

    paths = ["/img/red.jpg", "/img/green.png", "/img/blue.webp", "/exif.jpg", "/404.jpg"]
    result, tar, rows = run([web.url(p) for p in paths], replace(FAST, processes=processes))
    red = rows[web.url("/img/red.jpg")]
    assert (red["width"], red["height"], red["original_width"], red["original_height"]) == (
        256,
        256,
        640,
        480,
    )
    assert red["sha256"] == hashlib.sha256(IMAGES["/img/red.jpg"][1]).hexdigest()
    assert red["num_bytes"] == len(IMAGES["/img/red.jpg"][1]) and red["http_status"] == 200
    from laion_assets.pipeline.download.imaging import decode_image, hamming, perceptual_hash

    # the hash of the image as resized, a few bits from the full-size original's
    assert hamming(red["phash"], perceptual_hash(decode_image(IMAGES["/img/red.jpg"][1], 10**8))) <= 4
    assert rows[web.url("/404.jpg")]["phash"] is None
    rotated = rows[web.url("/exif.jpg")]
    assert (rotated["original_width"], rotated["original_height"]) == (100, 200)  # EXIF orientation applied

    (tmp_path / "images.tar").write_bytes(tar)
    samples = list(wds.WebDataset(str(tmp_path / "images.tar"), shardshuffle=False))
    by_key = {s["__key__"]: s for s in samples}
    successes = {r["key"] for r in result.table.to_pylist() if r["status"] == schemas.SUCCESS}
    assert len(samples) == len(by_key) == 4 and set(by_key) == successes
    for key, sample in by_key.items():
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["status"] == "success"
        assert sample["txt"].decode() == meta["caption"]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (256, 256) and image.mode == "RGB"
    # the EXIF-rotated image is stored upright: portrait content centred with white borders left and right
    # (img2dataset's padding; this asserted black borders before border_color, which was the bug)
    exif_key = next(k for k, s in by_key.items() if json.loads(s["json"])["url"].endswith("/exif.jpg"))
    upright = Image.open(io.BytesIO(by_key[exif_key]["jpg"]))
    assert upright.getpixel((10, 128)) == (255, 255, 255) and upright.getpixel((128, 128)) != (255, 255, 255)


def test_size_filters(web):
    settings = DownloadSettings(**{**FAST.__dict__, "min_image_size": 64, "max_aspect_ratio": 3.0})
    _, _, rows = run([web.url("/img/small.jpg"), web.url("/img/wide.jpg"), web.url("/img/red.jpg")], settings)
    small, wide = rows[web.url("/img/small.jpg")], rows[web.url("/img/wide.jpg")]
    assert small["status"] == wide["status"] == schemas.FILTERED_SIZE
    assert small["error_message"] == "too small: 50x40 is under min_image_size=64"
    assert (small["original_width"], small["original_height"]) == (50, 40)
    assert wide["error_message"] == "aspect ratio: 10.00 is over max_aspect_ratio=3"
    assert rows[web.url("/img/red.jpg")]["status"] == schemas.SUCCESS


def test_x_robots_tag_directives_after_a_user_agent_are_that_agents(web):
    """`otherbot: noindex, noai` addresses both directives to otherbot, as Google's X-Robots-Tag syntax and
    img2dataset read it: the agent holds until the next one, and each header starts for all robots again.
    Before, every directive after the first comma was taken for all robots, and the image opted out. A
    `name:value` directive (max-image-preview:large) or a date's own comma is no user agent."""
    cases = {
        ("otherbot: noindex, noai",): None,
        ("otherbot: noindex, noimageai, nofollow",): None,
        ("otherbot: noindex, laion_assets: nofollow, noai",): "X-Robots-Tag: noai",
        ("unavailable_after: Saturday, 01-Jul-2099 00:00:00 GMT, noai",): "X-Robots-Tag: noai",
        ("max-image-preview:large, noimageai",): "X-Robots-Tag: noimageai",
        ("otherbot: nofollow, noai", "noimageai"): "X-Robots-Tag: noimageai",
    }
    urls = [
        web.url("/x-robots-tag.jpg?" + urllib.parse.urlencode({"tag": tags}, doseq=True)) for tags in cases
    ]
    _, _, rows = run(urls)
    for url, error in zip(urls, cases.values(), strict=True):
        assert rows[url]["status"] == (schemas.OPTED_OUT if error else schemas.SUCCESS), url
        assert rows[url]["error_message"] == error, url


def test_opt_out_directives_are_matched_whatever_their_case_and_spaces_in_the_settings(web):
    """The header's directives are read lower-cased; the setting's were taken as written, so
    `opt_out_directives: [NoAI]` honoured no opt-out at all. img2dataset strips and lower-cases both."""
    settings = replace(FAST, opt_out_directives=("NoAI", " NOIMAGEAI "))
    urls = [web.url("/noai.jpg"), web.url("/x-robots-tag.jpg?tag=noimageai")]
    _, _, rows = run(urls, settings)
    assert [rows[url]["error_message"] for url in urls] == ["X-Robots-Tag: noai", "X-Robots-Tag: noimageai"]
    assert {rows[url]["status"] for url in urls} == {schemas.OPTED_OUT}


def test_pixel_cap_is_configurable(web):
    settings = DownloadSettings(**{**FAST.__dict__, "max_pixels": 100_000})
    _, _, rows = run([web.url("/img/red.jpg")], settings)
    assert rows[web.url("/img/red.jpg")]["error_message"] == (
        "decompression bomb: 640x480 pixels is over max_pixels=100000"
    )


def test_robots_txt_respected_when_asked_and_fetched_once(web):
    settings = DownloadSettings(**{**FAST.__dict__, "respect_robots_txt": True})
    urls = [web.url(f"/private/{i}.jpg") for i in range(5)] + [web.url(f"/up/{i}") for i in range(5)]
    _, _, rows = run(urls, settings)
    assert {rows[u]["status"] for u in urls[:5]} == {schemas.OPTED_OUT}
    assert rows[urls[0]]["error_message"] == "robots.txt: disallows /private/0.jpg for laion_assets"
    assert {rows[u]["status"] for u in urls[5:]} == {schemas.SUCCESS}
    assert web.hits["/robots.txt"] == 1
    assert web.hits["/private/0.jpg"] == 0  # refused before any request
    # off by default
    _, _, rows = run(urls[:1])
    assert rows[urls[0]]["status"] == schemas.SUCCESS


def test_a_robots_txt_over_512_kb_is_read_up_to_there(web):
    """RFC 9309 (2.5) has a crawler parse 500 KiB of a robots.txt at least: one that is longer is read to
    its last whole line within 512 KB, not ignored (before, it allowed everything)."""
    web.robots_txt = b"User-agent: *\nDisallow: /private/\n" + b"# long\n" * 100_000 + b"Disallow: /up/\n"
    settings = DownloadSettings(**{**FAST.__dict__, "respect_robots_txt": True})
    urls = [web.url("/private/big-robots.jpg"), web.url("/up/big-robots")]
    _, _, rows = run(urls, settings)
    assert rows[urls[0]]["status"] == schemas.OPTED_OUT
    assert rows[urls[0]]["error_message"] == "robots.txt: disallows /private/big-robots.jpg for laion_assets"
    assert rows[urls[1]]["status"] == schemas.SUCCESS  # its rule comes after the first 512 KB
    assert web.hits["/private/big-robots.jpg"] == 0


def test_robots_txt_rules_are_matched_as_rfc_9309_says(web):
    """The most specific rule decides, an Allow on a tie; `*` is any run of characters and a final `$` the
    end; paths compare percent-encoded alike; a byte order mark starts the file. urllib.robotparser, used
    before, took the first rule that matched (Allow: / let /private/ through), matched `*` and `$`
    literally, and lost the BOM's group, so each of the refused URLs here was fetched."""
    web.robots_txt = (
        "\ufeffUser-agent: *\n"
        "Allow: /\n"
        "Disallow: /private/\n"
        "Allow: /private/free/\n"
        "Disallow: /up/*.gif$\n"
        "Disallow: /up/caf%c3%a9/\n"
    ).encode()
    settings = replace(FAST, respect_robots_txt=True, respect_tdm_reservation=False)
    refused = ["/private/a.jpg", "/up/b.gif", "/up/café/c.jpg"]
    allowed = ["/private/free/d.jpg", "/up/e.gif?size=large", "/up/f.jpg", "/up/cafe/g.jpg"]
    urls = [web.url(path) for path in refused + allowed]
    _, _, rows = run(urls, settings)
    assert [rows[u]["status"] for u in urls] == [schemas.OPTED_OUT] * 3 + [schemas.SUCCESS] * 4
    assert rows[urls[0]]["error_message"] == "robots.txt: disallows /private/a.jpg for laion_assets"
    assert web.hits["/private/a.jpg"] == web.hits["/up/b.gif"] == 0


def test_robots_txt_groups_are_ours_by_product_token_and_combined(web):
    """Our groups are those whose product token is ours, case-insensitively, all of them combined, and a
    blank line does not end one; the `*` group then does not apply. urllib.robotparser, used before, took
    `laion` for ours (a substring of laion_assets), kept the first group only, and dropped a group's rules
    after a blank line."""
    web.robots_txt = (
        b"User-agent: *\nDisallow: /\n\n"
        b"User-agent: laion\nDisallow: /up/\n\n"
        b"User-agent: LAION_assets\nDisallow: /private/\n\n"
        b"User-agent: otherbot\nUser-agent: laion_assets\n\nDisallow: /up/blocked/\n"
    )
    settings = replace(FAST, respect_robots_txt=True, respect_tdm_reservation=False)
    urls = [web.url(path) for path in ("/up/a.jpg", "/private/b.jpg", "/up/blocked/c.jpg")]
    _, _, rows = run(urls, settings)
    assert [rows[u]["status"] for u in urls] == [schemas.SUCCESS, schemas.OPTED_OUT, schemas.OPTED_OUT]
    assert rows[urls[2]]["error_message"] == "robots.txt: disallows /up/blocked/c.jpg for laion_assets"


def test_robots_txt_that_cannot_be_read_disallows_everything(web):
    """RFC 9309 2.3.1.4: a robots.txt unreachable for a server error means complete disallow."""
    settings = DownloadSettings(**{**FAST.__dict__, "respect_robots_txt": True, "retries": 0})
    web.down.add("/robots.txt")
    try:
        _, _, rows = run([web.url("/up/robots-down-0"), web.url("/up/robots-down-1")], settings)
    finally:
        web.down.discard("/robots.txt")
    assert {row["status"] for row in rows.values()} == {schemas.OPTED_OUT}
    assert rows[web.url("/up/robots-down-0")]["error_message"] == (
        "robots.txt unreachable (HTTP 503: Service Unavailable): every path disallowed (RFC 9309)"
    )
    assert web.hits["/up/robots-down-0"] == 0  # refused before any request
    assert web.hits["/robots.txt"] >= 1


def test_tdm_reservation_header_opts_out(web):
    urls = [web.url("/tdm-reserved.jpg"), web.url("/tdm-not-reserved.jpg")]
    _, tar, rows = run(urls)
    assert rows[urls[0]]["status"] == schemas.OPTED_OUT
    assert rows[urls[0]]["error_message"] == "tdm-reservation: 1 (TDMRep)"
    assert rows[urls[1]]["status"] == schemas.SUCCESS
    from laion_assets.pipeline.shard_tar import read_samples

    assert [key for key, _ in read_samples(io.BytesIO(tar))] == [rows[urls[1]]["key"]]
    _, _, ignored = run(urls[:1], DownloadSettings(**{**FAST.__dict__, "respect_tdm_reservation": False}))
    assert ignored[urls[0]]["status"] == schemas.SUCCESS


def test_tdmrep_well_known_file_is_read_once_per_site_and_its_first_matching_rule_applies(web):
    urls = [web.url(p) for p in ("/tdm-site/a.jpg", "/tdm-site/b.jpg", "/tdm-site/free/c.jpg")]
    urls.append(web.url("/tdm-site/d.jpg?size=large"))  # `$` anchors the path: not reserved
    _, _, rows = run(urls)
    assert [rows[u]["status"] for u in urls] == [
        schemas.OPTED_OUT,
        schemas.OPTED_OUT,
        schemas.SUCCESS,
        schemas.SUCCESS,
    ]
    assert rows[urls[0]]["error_message"] == (
        "tdmrep.json: tdm-reservation 1 for /tdm-site/*.jpg$, policy https://example.org/tdm-policy (TDMRep)"
    )
    assert web.hits["/.well-known/tdmrep.json"] == 1
    assert web.hits["/tdm-site/a.jpg"] == 0  # refused before any request
    _, _, ignored = run(urls[:1], DownloadSettings(**{**FAST.__dict__, "respect_tdm_reservation": False}))
    assert ignored[urls[0]]["status"] == schemas.SUCCESS
    assert web.hits["/.well-known/tdmrep.json"] == 1


def test_a_tdmrep_file_that_starts_with_a_byte_order_mark_still_reserves(web):
    """json.loads refuses a text that starts with U+FEFF, and the file was taken for one that cannot be
    parsed: a site that saved its tdmrep.json with a BOM (as Windows editors do) reserved nothing, and its
    images were stored. RFC 8259 lets a parser skip it; robots.txt's is skipped already."""
    web.tdmrep_json = b"\xef\xbb\xbf" + web.tdmrep_json
    _, _, rows = run([web.url("/tdm-site/a.jpg")])
    assert rows[web.url("/tdm-site/a.jpg")]["status"] == schemas.OPTED_OUT
    assert web.hits["/tdm-site/a.jpg"] == 0


def test_a_tdmrep_location_of_many_wildcards_does_not_hold_the_fetch_loop(web):
    """A location's `*`s were a regex of `.*`s, which backtracks through every way of placing them on a
    path it does not match: 8 of them against a 60-character path took 71 s, 12 against this one hours,
    holding the GIL (every thread of the process waited). Now matched piece by piece, never going back."""
    hostile = "/tdm-site/" + "*a" * 12 + "*b$"
    web.tdmrep_json = json.dumps(
        [{"location": hostile, "tdm-reservation": 1}, {"location": "/tdm-site/*.jpg$", "tdm-reservation": 1}]
    ).encode()
    paths = ["/tdm-site/" + "a" * 100 + ".jpg", "/tdm-site/" + "a" * 30 + "b", "/up/c.jpg"]
    urls = [web.url(path) for path in paths]
    _, _, rows = run(urls)  # before, it never ended: the regex held the GIL, every thread waited
    assert [rows[u]["status"] for u in urls] == [schemas.OPTED_OUT, schemas.OPTED_OUT, schemas.SUCCESS]
    assert rows[urls[0]]["error_message"] == "tdmrep.json: tdm-reservation 1 for /tdm-site/*.jpg$ (TDMRep)"
    assert rows[urls[1]]["error_message"] == f"tdmrep.json: tdm-reservation 1 for {hostile} (TDMRep)"


def test_a_tdmrep_location_matches_its_paths_however_they_are_percent_encoded(web):
    """A location and a URL's path are compared percent-encoded alike, as robots.txt's are (RFC 9309
    2.2.2): a location written in UTF-8 reserves the path a crawl's URL has percent-encoded, and the other
    way round. They were compared as written, so these images were downloaded against the reservation."""
    web.tdmrep_json = json.dumps(
        [
            {"location": "/tdm-site/été/*", "tdm-reservation": 1},
            {"location": "/tdm-site/%c3%a0-bas/*", "tdm-reservation": 1},
            {"location": "/tdm-site/%7Euser/*", "tdm-reservation": 1},
        ]
    ).encode()
    paths = [
        "/tdm-site/%C3%A9t%C3%A9/a.jpg",
        "/tdm-site/à-bas/b.jpg",
        "/tdm-site/~user/c.jpg",
        "/tdm-site/d.jpg",
    ]
    urls = [web.url(path) for path in paths]
    _, _, rows = run(urls)
    assert [rows[u]["status"] for u in urls] == [schemas.OPTED_OUT] * 3 + [schemas.SUCCESS]
    assert rows[urls[0]]["error_message"] == "tdmrep.json: tdm-reservation 1 for /tdm-site/été/* (TDMRep)"


def test_an_image_goes_ahead_of_a_slow_tdmrep_file_which_still_refuses_it(web):
    """A site file slower than `tdmrep_wait` no longer holds its images back: they are requested while it
    is out (this one answers only once the image has been asked for), and its reservation then refuses
    them as before, their bytes never stored. A site file that answers within the wait still refuses
    before any request."""
    web.site_file_held_until = "/tdm-site/a.jpg"
    urls = [web.url(p) for p in ("/tdm-site/a.jpg", "/tdm-site/free/c.jpg")]
    _, tar, rows = run(urls, DownloadSettings(**{**FAST.__dict__, "tdmrep_wait": 0.05}))
    assert [rows[u]["status"] for u in urls] == [schemas.OPTED_OUT, schemas.SUCCESS]
    assert rows[urls[0]]["error_message"].startswith("tdmrep.json: tdm-reservation 1 for /tdm-site/*.jpg$")
    assert web.hits["/tdm-site/a.jpg"] == 1  # requested ahead of the file's answer
    from laion_assets.pipeline.shard_tar import read_samples

    assert [key for key, _ in read_samples(io.BytesIO(tar))] == [rows[urls[1]]["key"]]

    web.site_file_held_until = None
    _, _, rows = run(urls, DownloadSettings(**{**FAST.__dict__, "tdmrep_wait": 30}))
    assert [rows[u]["status"] for u in urls] == [schemas.OPTED_OUT, schemas.SUCCESS]
    assert web.hits["/tdm-site/a.jpg"] == 1  # refused before any request
    assert web.hits["/.well-known/tdmrep.json"] == 2  # once per run


def test_a_tdmrep_file_that_never_answers_reserves_nothing(web):
    """The images that went ahead of a site file that never answers are kept once it times out: TDMRep
    then leaves the response header to say."""
    web.site_file_held_until = "/asked-by-nobody"
    urls = [web.url(p) for p in ("/tdm-site/a.jpg", "/tdm-site/b.jpg", "/tdm-reserved.jpg")]
    _, _, rows = run(urls, DownloadSettings(**{**FAST.__dict__, "tdmrep_wait": 0.05}))
    assert [rows[u]["status"] for u in urls] == [schemas.SUCCESS, schemas.SUCCESS, schemas.OPTED_OUT]
    assert rows[urls[2]]["error_message"] == "tdm-reservation: 1 (TDMRep)"
    assert web.hits["/.well-known/tdmrep.json"] == 1
    assert ("done", "/.well-known/tdmrep.json") not in web.requests  # still held when the shard ended


def test_private_network_guard(web):
    guarded = DownloadSettings(**{**FAST.__dict__, "allow_private_networks": False})
    urls = [
        web.url("/img/red.jpg"),
        f"http://localhost:{web.port}/img/red.jpg",
        "http://10.1.2.3/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.jpg",
        "http://224.0.0.1/x.jpg",
        "http://no-such-host.invalid/x.jpg",
    ]
    _, _, rows = run(urls, guarded)
    for url in urls[:-1]:
        assert rows[url]["status"] == schemas.BLOCKED, url
        assert rows[url]["error_message"].startswith("private address:"), url
    assert rows[urls[-1]]["status"] == schemas.FAILED_TO_DOWNLOAD
    assert rows[urls[-1]]["error_message"].startswith("dns: cannot resolve no-such-host.invalid")
    assert web.hits["/img/red.jpg"] == 0


def test_redirect_into_a_private_network_is_refused_at_the_hop(web, monkeypatch):
    # No public server can be reached from here, so the loopback test server stands in for one:
    # the guard takes 127.0.0.1 for public and judges every other address as it really does.
    real = fetch._is_public
    monkeypatch.setattr(fetch, "_is_public", lambda address: str(address) == "127.0.0.1" or real(address))
    guarded = DownloadSettings(**{**FAST.__dict__, "allow_private_networks": False})
    _, _, rows = run([web.url("/to-private"), web.url("/img/red.jpg")], guarded)
    hop = rows[web.url("/to-private")]
    assert hop["status"] == schemas.BLOCKED
    assert hop["error_message"].startswith("private address: 10.255.255.1 resolves to 10.255.255.1")
    assert rows[web.url("/img/red.jpg")]["status"] == schemas.SUCCESS


def test_per_host_cap(web, processes):
    settings = replace(FAST, per_host_connections=2, max_in_flight=8, processes=processes)
    _, _, rows = run([web.url(f"/slow/{i}") for i in range(8)], settings)
    assert {r["status"] for r in rows.values()} == {schemas.SUCCESS}
    assert web.max_in_flight == 2  # with two workers: one connection each


def test_a_urls_user_and_password_are_not_its_host(web):
    """`host` (the per-host cap's key, the failing-host reports') is the host alone: credentials in a URL
    were a host of their own and shown in the UI's top_failing_hosts."""
    port = urlsplit(web.url("/")).port
    urls = [f"http://user:secret@127.0.0.1:{port}/404.jpg", f"http://127.0.0.1:{port}/img/red.jpg"]
    result, _, rows = run(urls)
    assert {row["host"] for row in rows.values()} == {f"127.0.0.1:{port}"}
    assert rows[urls[0]]["status"] == schemas.FAILED_TO_DOWNLOAD
    assert "secret" not in str(result.top_failing_hosts())


def test_per_host_cap_holds_across_pipelined_shards(web, processes):
    """The next shard starts while the last one drains, through the run's workers: a host's cap holds
    across the two, in this process (a small shard's, or `processes: 1`) as in worker processes. Each
    shard fetched here had its own fetcher with the whole cap, so two at once made it 4."""
    settings = replace(FAST, per_host_connections=2, max_in_flight=8, processes=processes)
    shards = {name: [web.url(f"/slow/{name}{i}") for i in range(8)] for name in ("a", "b")}
    with download.DownloadWorkers(settings) as workers:

        def fetch(name: str, draining: threading.Event):
            table = crawl_table(shards[name], shard=name)
            return download_shard(table, settings, io.BytesIO(), draining=draining, workers=workers)

        results = dict(pipelined(list(shards), fetch))
    assert [results[name].status_counts()[schemas.SUCCESS] for name in shards] == [8, 8]
    assert web.max_in_flight == 2


def test_a_dead_worker_process_costs_its_unfinished_rows_only(web, monkeypatch):
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    settings = replace(FAST, per_host_connections=2, max_in_flight=2, processes=2)
    urls = [web.url(f"/slow/{i}") for i in range(16)]
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(zip("rtm", run(urls, settings), strict=True)))
    thread.start()
    victim = wait_until(lambda: next(iter(multiprocessing.active_children()), None))
    wait_until(lambda: sum(web.hits.values()) >= 2)
    victim.kill()
    thread.join(60)
    result, rows = outcome["r"], outcome["m"]
    assert result.table.num_rows == 16 and set(rows) == set(urls)  # every row, each once
    died = [r for r in rows.values() if r["status"] == schemas.FAILED_TO_DOWNLOAD]
    assert died and all(
        r["error_message"].startswith("unexpected: download worker process died") for r in died
    )
    assert len(died) <= 8  # the other worker's rows all succeeded
    assert sum(r["status"] == schemas.SUCCESS for r in rows.values()) == 16 - len(died)
    with tarfile.open(fileobj=io.BytesIO(outcome["t"])) as tar:
        assert len(tar.getnames()) == 3 * (16 - len(died))  # jpg, txt and json of each success


def wait_until(condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def test_scheduler_serves_the_host_with_most_queued_first_within_its_cap():
    """The busiest host first, up to its cap, then the next busiest; hosts with as many queued alternate."""
    jobs = [_Job(f"k{i}", f"http://{host}/{i}", "c") for i, host in enumerate("abbbbbcc")]
    scheduler = HostScheduler(jobs, per_host=2)
    first = [scheduler.next() for _ in range(5)]
    assert [j.host for j in first] == ["b", "b", "c", "a", "c"]  # b at its cap; then c (2), a and c (1)
    assert scheduler.next() is None  # b, the only host with work, is at its cap
    scheduler.done(first[0])
    assert scheduler.next().host == "b"
    assert scheduler.queued == 2 and not scheduler.idle()


def test_scheduler_keeps_each_host_within_its_cap():
    jobs = [_Job(f"k{i}", f"http://{host}/{i}", "c") for i, host in enumerate("aaaabbc")]
    scheduler = HostScheduler(jobs, per_host=1)
    first = [scheduler.next() for _ in range(4)]
    assert [j.host for j in first[:3]] == ["a", "b", "c"] and first[3] is None
    scheduler.done(first[0])
    assert scheduler.next().host == "a"


def test_one_host_written_four_ways_is_one_host_under_its_cap():
    """A trailing dot, the scheme's default port and capitals name the same host: they counted as four hosts,
    so a list that wrote a site four ways sent it four times `per_host_connections` requests at once."""
    urls = [
        "http://img.example/0",
        "http://IMG.example./1",
        "http://img.example:80/2",
        "https://img.example:443/3",
    ]
    scheduler = HostScheduler([_Job(f"k{i}", url, "c") for i, url in enumerate(urls)], per_host=1)
    first = scheduler.next()
    assert first.host == "img.example" and scheduler.next() is None
    scheduler.done(first)
    assert scheduler.next().host == "img.example"
    # another port is another server, whatever the scheme
    assert [schemas.url_host(u) for u in ("http://a.b:8080/", "https://a.b:80/", "http://[::1]:80/")] == [
        "a.b:8080",
        "a.b:80",
        "[::1]",
    ]


def test_shard_deadline_fails_the_rest_with_a_reason(web):
    settings = DownloadSettings(**{**FAST.__dict__, "shard_timeout": 1.0, "max_in_flight": 1, "retries": 0})
    result, _, rows = run(
        [web.url("/drip.jpg"), web.url("/img/red.jpg"), web.url("/img/green.png")], settings
    )
    assert result.seconds < 5
    assert rows[web.url("/drip.jpg")]["error_message"].startswith("timeout")
    later = [rows[web.url(p)] for p in ("/img/red.jpg", "/img/green.png")]
    assert {r["status"] for r in later} == {schemas.FAILED_TO_DOWNLOAD}
    assert later[0]["error_message"] == "shard deadline: not started within shard_timeout=1s"


def test_retry_failed_refetches_only_failures(web):
    urls = [web.url("/up/1"), web.url("/down/2"), web.url("/404.jpg"), web.url("/html.jpg")]
    web.down.add("/down/2")
    first, first_tar, rows = run(urls)
    assert [rows[u]["status"] for u in urls] == [
        schemas.SUCCESS,
        schemas.FAILED_TO_DOWNLOAD,
        schemas.FAILED_TO_DOWNLOAD,
        schemas.FAILED_TO_DECODE,
    ]
    web.down.clear()
    hits_before = web.hits.copy()
    settings = DownloadSettings(**{**FAST.__dict__, "retry_failed": True})
    second, second_tar, rows = run(urls, settings, previous=(first.table, io.BytesIO(first_tar)))
    assert [rows[u]["status"] for u in urls] == [
        schemas.SUCCESS,
        schemas.SUCCESS,
        schemas.FAILED_TO_DOWNLOAD,
        schemas.FAILED_TO_DECODE,
    ]
    assert web.hits["/up/1"] == hits_before["/up/1"]  # kept, not fetched again
    assert web.hits["/html.jpg"] == hits_before["/html.jpg"]  # failed to decode: not retried
    assert (
        web.hits["/down/2"] > hits_before["/down/2"] and web.hits["/404.jpg"] == hits_before["/404.jpg"] + 1
    )
    assert (second.fetched, second.reused) == (2, 2)
    from laion_assets.pipeline.shard_tar import read_samples

    assert [k for k, _ in read_samples(io.BytesIO(second_tar))] == ["s-00000000", "s-00000001"]


_KILLED_BEFORE_ITS_PARQUET = """
import os, signal, sys
from laion_assets.pipeline.download.downloader import DownloadSettings, write_images
from laion_assets.pipeline.storage import IMAGES, DatasetStore

class KilledBeforeItsParquet(DatasetStore):
    def write_parquet(self, relpath, *args, **kwargs):
        if relpath == IMAGES.parquet("s"):  # the new tar is in place
            os.kill(os.getpid(), signal.SIGKILL)
        super().write_parquet(relpath, *args, **kwargs)

settings = DownloadSettings(allow_private_networks=True, image_size=int(sys.argv[2]), resize_mode="border")
write_images(KilledBeforeItsParquet(sys.argv[1]), "s", settings)
"""


def test_a_download_killed_between_its_tar_and_its_parquet_leaves_no_parquet_that_claims_the_tar(web, store):
    """The images tar is written, then its parquet. A shard downloaded again (at another image_size here)
    by a run killed between the two was left with the new tar beside the old parquet, which still counted
    as current: 64 px in its rows, 32 px in the tar, for good. Now the old parquet goes as the new tar
    takes its place, so the shard is not made until a run writes both."""
    urls = [web.url("/up/1.jpg"), web.url("/up/2.jpg")]
    store.write_parquet(CRAWL_METADATA.parquet("s"), crawl_table(urls))
    settings = DownloadSettings(allow_private_networks=True, image_size=64, resize_mode="border")
    download.write_images(store, "s", settings)
    assert store.read_parquet(IMAGES.parquet("s")).column("width").to_pylist() == [64, 64]
    killed = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_ITS_PARQUET, store.root, "32"], check=False)
    assert killed.returncode == -signal.SIGKILL
    with store.open(IMAGES.tar("s")) as tar:  # the new tar
        assert {Image.open(io.BytesIO(m["jpg"])).size for _, m in read_samples(tar)} == {(32, 32)}
    assert not store.exists(IMAGES.parquet("s"))
    download.write_images(store, "s", replace(settings, image_size=32))
    assert store.read_parquet(IMAGES.parquet("s")).column("width").to_pylist() == [32, 32]


def test_retry_failed_keeps_no_sample_made_with_other_image_settings(web, store):
    """`retry_failed` with another image_size than the shard was made at (the dataset's settings changed,
    or the run's config) kept the earlier 64 px samples beside new 32 px ones, under a footer recording
    32 px for all. Where the image settings differ, every row is fetched again."""
    urls = [web.url("/up/1.jpg"), web.url("/down/2.jpg")]
    web.down.add("/down/2.jpg")
    store.write_parquet(CRAWL_METADATA.parquet("s"), crawl_table(urls))
    settings = DownloadSettings(allow_private_networks=True, image_size=64, resize_mode="border")
    download.write_images(store, "s", settings)
    assert store.read_parquet(IMAGES.parquet("s")).column("width").to_pylist() == [64, None]
    web.down.clear()
    retried = download.write_images(store, "s", replace(settings, image_size=32, retry_failed=True))
    assert (retried.fetched, retried.reused) == (2, 0)
    assert store.read_parquet(IMAGES.parquet("s")).column("width").to_pylist() == [32, 32]
    with store.open(IMAGES.tar("s")) as tar:
        assert {Image.open(io.BytesIO(m["jpg"])).size for _, m in read_samples(tar)} == {(32, 32)}
    again = download.write_images(store, "s", replace(settings, image_size=32, retry_failed=True))
    assert (again.fetched, again.reused) == (0, 2)  # the same settings: the successes are kept


def test_retry_failed_keeps_no_row_made_under_other_opt_out_rules(web, local_root):
    """A shard downloaded without `noai` among the opt-out directives, then retried with it: the image its
    site marked `noai` was kept as a success, under a footer that recorded the new directives, so the
    shard claimed an opt-out it never applied (and lineage saw no setting changed). Where a setting of what
    the shard holds differs, every row is fetched again."""
    store = DatasetStore(local_root)
    urls = [web.url("/noai.jpg"), web.url("/down/2.jpg")]
    web.down.add("/down/2.jpg")
    store.write_parquet(CRAWL_METADATA.parquet("s"), crawl_table(urls))
    download.write_images(store, "s", replace(FAST, opt_out_directives=()))
    web.down.clear()
    retried = download.write_images(store, "s", replace(FAST, retry_failed=True))
    assert (retried.fetched, retried.reused) == (2, 0)
    assert store.read_parquet(IMAGES.parquet("s")).column("status").to_pylist() == [
        schemas.OPTED_OUT,
        schemas.SUCCESS,
    ]
    with store.open(IMAGES.tar("s")) as tar:
        assert [k for k, _ in read_samples(tar)] == ["s-00000001"]
    # a setting of how rows are fetched (a timeout) keeps them
    again = download.write_images(store, "s", replace(FAST, retry_failed=True, read_timeout=2))
    assert (again.fetched, again.reused) == (0, 2)


def test_retry_failed_over_a_damaged_tar_names_it_and_leaves_the_shard_as_it_was(web, local_root):
    """A previous tar cut short stopped a `retry_failed` run with tarfile's bare `ReadError: unexpected end
    of data`, naming neither the file nor what to do."""
    store = DatasetStore(local_root)
    urls = [web.url("/up/1.jpg"), web.url("/up/2.jpg"), web.url("/down/3.jpg")]
    web.down.add("/down/3.jpg")
    store.write_parquet(CRAWL_METADATA.parquet("s"), crawl_table(urls))
    download.write_images(store, "s", FAST)
    with store.open(IMAGES.tar("s")) as tar:
        cut = tar.read()[:1500]
    store.write_bytes(IMAGES.tar("s"), cut)
    web.down.clear()
    with pytest.raises(ValueError, match=r"images/s\.tar is damaged \(.*\): retry_failed cannot keep"):
        download.write_images(store, "s", replace(FAST, retry_failed=True))
    with store.open(IMAGES.tar("s")) as tar:
        assert tar.read() == cut
    assert store.read_parquet(IMAGES.parquet("s")).num_rows == 3


def test_retry_failed_keeps_no_row_of_a_key_the_crawl_no_longer_has(web):
    """A taken-down row of the previous result whose key left the crawl (its source file shortened) is not
    kept: the images parquet holds one row per crawl row."""
    urls = [web.url("/up/1"), web.url("/up/2"), web.url("/up/3")]
    first, first_tar, _ = run(urls)
    rows = first.table.to_pylist()
    schemas.take_down(rows[2], "list.txt: url")  # as a removal marks a built row
    previous = (pa.Table.from_pylist(rows, schema=schemas.IMAGES), io.BytesIO(first_tar))
    settings = DownloadSettings(**{**FAST.__dict__, "retry_failed": True})
    second, second_tar, _ = run(urls[:2], settings, previous=previous)
    from laion_assets.pipeline.shard_tar import read_samples

    assert second.table.column("key").to_pylist() == ["s-00000000", "s-00000001"]
    assert sorted(k for k, _ in read_samples(io.BytesIO(second_tar))) == ["s-00000000", "s-00000001"]


def test_retry_failed_fetches_again_a_row_whose_caption_the_crawl_changed(web):
    """A source re-crawled with a corrected caption keeps its keys and URLs: `retry_failed` kept the old
    row, so the images parquet and the sample's `.txt` and `.json` said the old caption, against the
    crawl_metadata it was made from. Now such a row is fetched again, with the crawl's caption."""
    urls = [web.url("/up/1"), web.url("/up/2")]
    first, first_tar, _ = run(urls)
    crawl = crawl_table(urls).set_column(2, "caption", pa.array(["caption 0", "corrected"]))
    settings = replace(FAST, retry_failed=True)
    tar = io.BytesIO()
    second = download_shard(crawl, settings, tar, (first.table, io.BytesIO(first_tar)))
    assert (second.fetched, second.reused) == (1, 1)
    assert second.table.column("caption").to_pylist() == ["caption 0", "corrected"]
    samples = dict(read_samples(io.BytesIO(tar.getvalue())))
    assert {k: (m["txt"].decode(), json.loads(m["json"])["caption"]) for k, m in samples.items()} == {
        "s-00000000": ("caption 0", "caption 0"),
        "s-00000001": ("corrected", "corrected"),
    }


def test_metadata_summaries(web):
    urls = [web.url("/404.jpg"), web.url("/img/red.jpg"), web.url("/html.jpg"), web.url("/garbage.jpg")]
    result, _, _ = run(urls)
    assert result.status_counts() == {
        "success": 1,
        "failed_to_download": 1,
        "failed_to_decode": 2,
        "opted_out": 0,
        "blocked": 0,
        "filtered_size": 0,
        "taken_down": 0,  # every status is counted, this one since takedowns
    }
    assert dict(result.top_errors()) == {"HTTP 404": 1, "not an image": 2}
    assert result.top_failing_hosts() == [(f"127.0.0.1:{web.port}", 3)]


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("border", (256, 256)),
        ("keep_ratio", (341, 256)),
        ("keep_ratio_largest", (256, 192)),
        ("center_crop", (256, 256)),
        ("no", (640, 480)),
    ],
)
def test_resize_modes(web, mode, size):
    _, tar, rows = run([web.url("/img/red.jpg")], DownloadSettings(**{**FAST.__dict__, "resize_mode": mode}))
    row = rows[web.url("/img/red.jpg")]
    assert (row["width"], row["height"]) == size
    from laion_assets.pipeline.shard_tar import read_samples

    ((_, members),) = list(read_samples(io.BytesIO(tar)))
    assert Image.open(io.BytesIO(members["jpg"])).size == size


def _wide_photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (400, 200), (200, 30, 30)).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_border_pads_white_like_img2dataset_or_in_the_colour_asked():
    """LAION's datasets were resized by img2dataset, whose `border` pads white; CLIP sees the padding."""
    padded = Image.open(io.BytesIO(process_image(_wide_photo(), ImageSettings()).data))
    assert padded.size == (256, 256)
    assert all(v >= 250 for v in padded.getpixel((128, 5)))  # the band above the picture
    red, green, _ = padded.getpixel((128, 128))
    assert red > 150 and green < 80
    black = Image.open(io.BytesIO(process_image(_wide_photo(), ImageSettings(border_color="black")).data))
    assert all(v <= 5 for v in black.getpixel((128, 5)))
    with pytest.raises(ValueError, match="unknown color specifier"):
        ImageSettings(border_color="no-such-colour")


def test_resize_mode_no_survives_yaml():
    """YAML 1.1 (PyYAML, as `--config` and `dagster job launch` read it) turns a bare `no` into false."""
    import yaml

    value = yaml.safe_load("resize_mode: no")["resize_mode"]
    assert value is False
    assert ImageSettings(resize_mode=value).resize_mode == "no"
    with pytest.raises(ValueError, match="resize_mode True is not one of"):
        ImageSettings(resize_mode=True)


def test_interpolations_are_img2datasets_names_and_defaults():
    from laion_assets_tests.web import IMAGES

    with pytest.raises(ValueError, match="interpolation 'sinc' is not one of"):
        ImageSettings(downscale_interpolation="sinc")
    photo = IMAGES["/img/red.jpg"][1]  # 640 x 480: made smaller
    area = process_image(photo, ImageSettings(border_color="black"))
    lanczos = process_image(photo, ImageSettings(border_color="black", downscale_interpolation="lanczos"))
    assert (area.width, area.height) == (lanczos.width, lanczos.height) == (256, 256)
    small = IMAGES["/exif.jpg"][1]  # 100 x 200 before EXIF rotation: made larger, Lanczos by default
    up = process_image(small, ImageSettings(resize_mode="keep_ratio"))
    bicubic = process_image(small, ImageSettings(resize_mode="keep_ratio", upscale_interpolation="bicubic"))
    assert (up.width, up.height) == (bicubic.width, bicubic.height) == (256, 512)
    assert up.data != bicubic.data


def test_perceptual_hash_survives_resizing_but_not_another_image():
    from PIL import Image, ImageDraw

    from laion_assets.pipeline.download.imaging import hamming, perceptual_hash

    def picture(x: int) -> Image.Image:
        image = Image.new("RGB", (200, 150), "white")
        ImageDraw.Draw(image).ellipse((x, 30, x + 80, 110), fill="red")
        return image

    original = perceptual_hash(picture(20))
    assert 0 <= original < 2**63
    assert hamming(original, perceptual_hash(picture(20).resize((180, 135)))) <= 4
    assert hamming(original, perceptual_hash(picture(110))) > 16


def _photo(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(out, "JPEG", quality=95)
    return out.getvalue()


@pytest.mark.parametrize(
    ("mode", "image_size", "expected"),
    [
        # img2dataset's resizer: with resize_only_if_bigger, an image whose side (the shorter for
        # keep_ratio and center_crop, the longer for border and keep_ratio_largest) is not over
        # image_size is left as it is, in every mode; one that is over is resized, cropped or padded
        ("keep_ratio", 256, (123, 456)),
        ("center_crop", 256, (123, 456)),
        ("border", 256, (256, 256)),
        ("keep_ratio_largest", 256, (69, 256)),
        ("keep_ratio", 512, (123, 456)),
        ("center_crop", 512, (123, 456)),
        ("border", 512, (123, 456)),
        ("keep_ratio_largest", 512, (123, 456)),
        ("no", 256, (123, 456)),
    ],
)
def test_resize_only_if_bigger_leaves_an_image_that_is_not_bigger_as_it_is(mode, image_size, expected):
    settings = ImageSettings(image_size=image_size, resize_mode=mode, resize_only_if_bigger=True)
    processed = process_image(_photo(123, 456), settings)
    assert (processed.width, processed.height) == expected
    assert Image.open(io.BytesIO(processed.data)).size == expected
    # a bigger one is brought to image_size as without the flag
    big = process_image(_photo(1230, 4560), settings)
    plain = process_image(_photo(1230, 4560), replace(settings, resize_only_if_bigger=False))
    assert (big.width, big.height) == (plain.width, plain.height)


def test_the_next_shard_starts_while_the_last_one_drains(web):
    """pipelined(): the second shard's requests go out while the first waits on its slowest URL."""
    settings = replace(FAST, max_in_flight=4, retries=0)
    first = [web.url("/drip.jpg")] + [web.url(f"/up/a{i}") for i in range(7)]
    second = [web.url(f"/up/b{i}") for i in range(3)]
    ended = {}

    def download(urls, draining):
        result = download_shard(crawl_table(urls), settings, io.BytesIO(), draining=draining)
        ended[urls[0]] = time.monotonic()
        return result

    results = list(pipelined([first, second], download))
    assert [urls for urls, _ in results] == [first, second]  # in order
    first_result, second_result = results[0][1], results[1][1]
    assert first_result.status_counts()[schemas.SUCCESS] == 7  # all but the drip
    assert second_result.status_counts()[schemas.SUCCESS] == 3
    # the second shard was fetched and done while the drip still held the first one
    assert ended[second[0]] < ended[first[0]]


def test_a_failed_item_starts_no_other_and_the_one_under_way_is_finished_and_yielded_first():
    """pipelined(): where an item fails, the item started beside it (its shard's files written) is
    finished and yielded before the error is raised, so the caller can record it; none starts after. Its
    result was dropped, and an item that failed before draining still started the next one."""
    started = []

    def work(item: str, draining: threading.Event) -> str:
        started.append(item)
        if item == "b":  # fails as it drains: c is under way
            draining.set()
            wait_until(lambda: "c" in started)
            raise ValueError("b is bad")
        if item == "d":  # fails before draining: nothing more starts
            raise ValueError("d is bad")
        return item.upper()

    for items, error, done in (("abcz", "b is bad", ["a", "c"]), ("adz", "d is bad", ["a"])):
        started.clear()
        yielded = []
        with pytest.raises(ValueError, match=error):
            for item, result in pipelined(list(items), work):
                yielded.append(item)
                assert result == item.upper()
        assert yielded == done
        assert "z" not in started


def test_a_run_that_stops_ends_its_shards_under_way_and_writes_none_of_them(local_root, web, monkeypatch):
    """A run that stops while shard b downloads (an error or an interrupt in the step's thread: here the
    step closes pipelined()) ends b at once through the workers' `stop`: b writes no tar and no parquet,
    and lets its lease go. Before, the step waited for b's whole download and wrote it, unrecorded."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 1)
    settings = replace(FAST, processes=2, request_timeout=60, retries=0)
    store = DatasetStore(local_root)
    shards = {"a": [web.url("/up/a0"), web.url("/up/a1")], "b": [web.url("/drip.jpg"), web.url("/up/b1")]}
    for shard, urls in shards.items():
        store.write_parquet(CRAWL_METADATA.parquet(shard), crawl_table(urls, shard=shard))
    with download.DownloadWorkers(settings) as workers:

        def work(shard: str, draining: threading.Event):
            with shard_lease(store, shard, "run"):
                return download.write_images(store, shard, settings, None, draining, workers)

        results = pipelined(list(shards), work, workers.stop)
        assert next(results)[0] == "a"
        wait_until(lambda: web.hits["/drip.jpg"])
        results.close()
    assert store.exists(IMAGES.parquet("a"))
    assert not store.exists(IMAGES.parquet("b")) and not store.exists(IMAGES.tar("b"))
    assert not store.exists("_leases/b.json")


def test_images_waiting_for_the_cpu_do_not_hold_requests_back(web, monkeypatch):
    """A slot is its request's alone: while the first image's decode waits, every other URL is requested
    (with 2 slots for 12 URLs)."""
    urls = [web.url(f"/up/wait{i}") for i in range(12)]
    requested = []

    def decode_once_all_are_requested(data, settings):
        deadline = time.monotonic() + 10  # a bound, so that a regression fails instead of hanging
        while _requested(web, "/up/wait") < len(urls) and time.monotonic() < deadline:
            time.sleep(0.01)
        requested.append(_requested(web, "/up/wait"))
        return process_image(data, settings)

    monkeypatch.setattr(download, "process_image", decode_once_all_are_requested)
    result, _, _ = run(urls, replace(FAST, max_in_flight=2, processes=1))
    assert result.status_counts()[schemas.SUCCESS] == 12
    assert requested[0] == 12


def test_the_bodies_waiting_for_the_cpu_are_bounded_by_bytes(web, monkeypatch):
    """Past `_WAITING_BYTES_PER_SLOT` per slot of undecoded bodies, no request starts until the CPU
    catches up: here with 1 byte a slot, only the 2 requests in flight when the first body came."""
    monkeypatch.setattr(download, "_WAITING_BYTES_PER_SLOT", 1)
    urls = [web.url(f"/up/bound{i}") for i in range(12)]
    requested = []

    def decode(data, settings):
        requested.append(_requested(web, "/up/bound"))
        return process_image(data, settings)

    monkeypatch.setattr(download, "process_image", decode)
    result, _, _ = run(urls, replace(FAST, max_in_flight=2, processes=1))
    assert result.status_counts()[schemas.SUCCESS] == 12
    assert requested[0] <= 2


def test_the_bodies_still_arriving_count_toward_the_bound(web, monkeypatch):
    """Requests in flight count toward the bound at the mean body size so far, so that the bodies they
    bring cannot overshoot it: with room for 3 bodies and 4 slots, the first body and the 3 still arriving
    fill it, and no fifth request starts while that body waits for the CPU (counting only the bodies in,
    7 would: one more after each of the first three bodies)."""
    size = len(urllib.request.urlopen(web.url("/up/size")).read())
    monkeypatch.setattr(download, "_WAITING_BYTES_PER_SLOT", 3 * size // 4)
    urls = [web.url(f"/up/arriving{i}") for i in range(12)]
    requested = []

    def decode(data, settings):
        if not requested:
            time.sleep(0.5)  # the first decode waits: any request the bound lets start goes out meanwhile
        requested.append(_requested(web, "/up/arriving"))
        return process_image(data, settings)

    monkeypatch.setattr(download, "process_image", decode)
    result, _, _ = run(urls, replace(FAST, max_in_flight=4, per_host_connections=4, processes=1))
    assert result.status_counts()[schemas.SUCCESS] == 12
    assert requested[0] == 4


def _requested(web, prefix: str) -> int:
    return sum(hits for path, hits in web.hits.items() if path.startswith(prefix))


def test_draining_is_set_once_few_rows_are_left(web):
    """With one request in flight, the shard drains from two rows left (download._NEXT_SHARD_WITHIN)."""
    settings = replace(FAST, max_in_flight=1, per_host_connections=1)
    draining = threading.Event()
    urls = [web.url(f"/slow/{i}") for i in range(5)]
    done = []
    thread = threading.Thread(
        target=lambda: done.append(
            download_shard(crawl_table(urls), settings, io.BytesIO(), draining=draining)
        )
    )
    thread.start()
    assert not draining.wait(0.3 * 2)  # 0.3 s a row, one at a time: 3 rows or more are left here
    assert draining.wait(30)
    thread.join(30)
    assert done[0].table.num_rows == 5


def test_a_shard_of_few_rows_lets_the_next_one_start_at_once(monkeypatch):
    """With no more than `_NEXT_SHARD_WITHIN` x `max_in_flight` rows, draining is set before any is
    fetched, so the next shard does not wait for this one's first answer; with more, it is not."""
    draining_when_fetching_began = []

    def fetch_nothing(workers, jobs, deadline, blocked_images):
        draining_when_fetching_began.append(draining.is_set())
        yield from ()

    monkeypatch.setattr(download.DownloadWorkers, "fetch", fetch_nothing)
    for rows in (8, 9):  # 2 x 4 in flight, and one more
        draining = threading.Event()
        urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(rows)]
        download_shard(crawl_table(urls), replace(FAST, max_in_flight=4), io.BytesIO(), draining=draining)
    assert draining_when_fetching_began == [True, False]


def test_worker_processes_use_the_hosts_resolved_once_in_the_steps_process(web, monkeypatch):
    """The step's process resolves each host once and hands the answers to the workers, which do not look
    the host up again: here the answer it hands them refuses the host, and every row says so."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    refusal = fetch.Fetched(schemas.BLOCKED, error="private address: as the step's process resolved it")
    resolved = []

    def resolve(resolver, hosts, deliver, deadline):
        resolved.append(sorted(hosts))
        deliver(dict.fromkeys(hosts, fetch.HostAnswer(time.monotonic() + 300, refusal)))

    monkeypatch.setattr(download._Resolver, "resolve", resolve)
    urls = [f"http://localhost:{web.port}/up/{i}" for i in range(12)]
    _, _, rows = run(urls, replace(FAST, processes=2))
    assert resolved == [["localhost"]]  # once, for the whole shard
    assert {r["error_message"] for r in rows.values()} == {refusal.error}
    assert sum(web.hits.values()) == 0


def test_rows_whose_hosts_were_not_looked_up_fail_when_the_lookups_break(web, processes, monkeypatch):
    """A bug in the host lookups costs their rows a recorded failure each, not the shard or the rows."""

    def resolve(resolver, hosts, deliver, deadline):
        deliver({hosts[0]: fetch.HostAnswer(time.monotonic() + 300, None)})
        raise RuntimeError("a bug")

    monkeypatch.setattr(download._Resolver, "resolve", resolve)
    urls = [web.url(f"/up/{i}") for i in range(6)] + [f"http://localhost:{web.port}/up/{i}" for i in range(6)]
    _, _, rows = run(urls, replace(FAST, processes=processes))
    assert {rows[url]["status"] for url in urls[:6]} == {schemas.SUCCESS}  # 127.0.0.1: handed out first
    assert {rows[url]["error_message"] for url in urls[6:]} == {
        "unexpected: host lookups ended: RuntimeError: a bug"
    }


@pytest.mark.parametrize("name", ["max_in_flight", "per_host_connections", "dns_lookups"])
def test_a_bound_of_zero_requests_or_lookups_at_once_is_refused_with_its_name(name):
    """0 reads as "no limit" where 0 turns the setting off elsewhere (max_image_area, processes), but here
    it started no request (or lookup): the shard never ended, whatever shard_timeout, holding its lease
    and its run. The settings refuse it in one line."""
    with pytest.raises(ValueError, match=f"^{name}=0: "):
        replace(FAST, shard_timeout=2, processes=1, **{name: 0})


def test_a_host_that_does_not_resolve_fails_each_of_its_rows_with_one_error(web, processes):
    urls = [f"http://no-such-host.invalid/{i}.jpg" for i in range(6)] + [web.url("/up/1")]
    _, _, rows = run(urls, replace(FAST, processes=processes))
    failed = [rows[url] for url in urls[:-1]]
    assert {r["status"] for r in failed} == {schemas.FAILED_TO_DOWNLOAD}
    assert all(r["error_message"].startswith("dns: cannot resolve no-such-host.invalid:") for r in failed)
    assert rows[urls[-1]]["status"] == schemas.SUCCESS


def test_a_retry_the_shard_deadline_overtakes_says_so(web):
    """A retry waits at the back of the queue; one the deadline overtakes there was tried, not unstarted."""
    settings = replace(FAST, shard_timeout=1.0, max_in_flight=1, retries=1)
    _, _, rows = run([web.url("/flaky/9"), web.url("/drip.jpg")], settings)
    assert rows[web.url("/flaky/9")]["error_message"] == "shard deadline: not retried within shard_timeout=1s"
    assert web.hits["/flaky/9"] == 1  # its first attempt, a 500; the retry never went out
    assert rows[web.url("/drip.jpg")]["error_message"].startswith("timeout")


def test_shards_running_at_once_share_the_worker_processes_and_each_hosts_cap(web, monkeypatch):
    """Two shards of one run at once (the second starts while the first drains) go through the run's
    worker processes: two in all, not two each, and one host gets `per_host_connections` in all."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    settings = replace(FAST, per_host_connections=2, max_in_flight=8, processes=2)
    shards = {name: [web.url(f"/slow/{name}{i}") for i in range(8)] for name in ("a", "b")}
    children = set()
    with download.DownloadWorkers(settings) as workers:

        def work(name: str, draining: threading.Event):
            crawl = crawl_table(shards[name], shard=name)
            result = download_shard(crawl, settings, io.BytesIO(), draining=draining, workers=workers)
            children.update(child.pid for child in multiprocessing.active_children())
            return result

        results = dict(pipelined(list(shards), work))
    assert [results[name].status_counts()[schemas.SUCCESS] for name in shards] == [8, 8]
    assert len(children) == 2
    assert web.max_in_flight == 2  # both shards at once, on one host


def test_a_small_first_shard_does_not_leave_the_run_with_fewer_workers(web, monkeypatch):
    """The run's worker processes are `processes` from its first shard over `ROWS_PER_PROCESS` rows, not
    one per `ROWS_PER_PROCESS` of that shard's rows: they serve every later shard, and a first shard of
    5 rows (of 4 a process here) left a run of 3 processes with 2 for all its shards."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    settings = replace(FAST, processes=3)
    children = set()
    with download.DownloadWorkers(settings) as workers:
        for name, rows in (("a", 5), ("b", 12)):
            urls = [web.url(f"/up/{name}{i}") for i in range(rows)]
            result = download_shard(crawl_table(urls, shard=name), settings, io.BytesIO(), workers=workers)
            assert result.status_counts()[schemas.SUCCESS] == rows
            children.update(child.pid for child in multiprocessing.active_children())
    assert len(children) == 3


def test_a_worker_that_died_is_replaced_for_the_next_shard(web, monkeypatch):
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    settings = replace(FAST, processes=2)
    with download.DownloadWorkers(settings) as workers:
        for name in ("a", "b"):
            urls = [web.url(f"/up/{name}{i}") for i in range(8)]
            result = download_shard(crawl_table(urls, shard=name), settings, io.BytesIO(), workers=workers)
            assert result.status_counts()[schemas.SUCCESS] == 8
            victim = multiprocessing.active_children()[0]
            victim.kill()
            victim.join()
        assert len(multiprocessing.active_children()) == 1


def test_a_worker_lets_go_of_each_shards_block_list_once_the_shard_is_done(web, monkeypatch):
    """The run's workers serve every shard of it, and each shard sends them its block list's image hashes:
    a worker kept each shard's copy to the run's end (about 45 MB a shard for 200,000 hashes, so a run of
    many shards grew each worker without bound). Their memory now stays flat from shard to shard."""
    import hashlib
    from pathlib import Path

    from laion_assets.pipeline.takedowns.blocklist import Blocklist

    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(200_000)]
    entries = {"list": ["big"] * len(hashes), "kind": ["sha256"] * len(hashes), "entry": hashes}
    blocklist = Blocklist(pa.table(entries, schema=schemas.BLOCKLIST_ENTRIES))

    def resident_mb() -> list[int]:
        status = [
            Path(f"/proc/{child.pid}/status").read_text() for child in multiprocessing.active_children()
        ]
        return [
            int(line.split()[1]) // 1024 for text in status for line in text.splitlines() if "VmRSS" in line
        ]

    settings = replace(FAST, processes=2)
    memory = []
    with download.DownloadWorkers(settings) as workers:
        for shard in range(8):
            name = f"b{shard}"
            urls = [web.url(f"/up/{name}-{i}") for i in range(8)]
            crawl = crawl_table(urls, shard=name)
            result = download_shard(crawl, settings, io.BytesIO(), blocklist=blocklist, workers=workers)
            assert result.status_counts()[schemas.SUCCESS] == 8
            memory.append(resident_mb())
    assert len(memory[-1]) == 2
    growth = [last - first for first, last in zip(memory[1], memory[-1], strict=True)]
    assert max(growth) < 100, memory  # six more shards' copies would be about 270 MB
