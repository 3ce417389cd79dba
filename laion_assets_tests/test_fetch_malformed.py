"""Malformed and hostile input to the fetch: URLs that urlsplit refuses, host names that IDNA forbids,
redirects to either, site files that break their parsers, raw UTF-8 in a Location, an HTTP date in
asctime's form, and bytes past a response's end. Each costs its own row a recorded failure (or
nothing), never the shard, the site's other images, or the next request on its connection."""

import datetime
import socket
import time
from dataclasses import replace

import pyarrow as pa
import pytest

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download import downloader as download
from laion_assets.pipeline.download import fetch, http
from laion_assets.pipeline.download.fetch import FetchSettings, fetch_one
from laion_assets.pipeline.takedowns.blocklist import Blocklist
from laion_assets_tests.dns_server import DnsServer, Name
from laion_assets_tests.test_download import FAST, run
from laion_assets_tests.test_http import RawServer, get_all
from laion_assets_tests.web import JPEG

SITE = FetchSettings(
    connect_timeout=1, read_timeout=2, request_timeout=3, retries=0, allow_private_networks=True
)


@pytest.fixture(params=[1, 2], ids=["one process", "two worker processes"])
def processes(request, monkeypatch) -> int:
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 2)  # so that this small shard is split too
    return request.param


@pytest.fixture
def serve():
    servers: list[RawServer] = []

    def start(answers: dict[str, bytes]) -> RawServer:
        """A server that answers each path's request with its bytes, and 404 to any other."""

        def answer(request: bytes, connection: socket.socket) -> bool:
            path = request.split(b" ")[1].decode("ascii")
            connection.sendall(answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
            return True

        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ok(body: bytes, content_type: str = "image/jpeg") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_a_malformed_url_or_a_forbidden_host_name_fails_its_row_not_the_shard(web, processes):
    # urlsplit raises on the first (an unclosed IPv6 bracket); IDNA forbids the snowman, which c-ares
    # raised on before its lookup: the exception killed the lookups, and the row went missing
    urls = ["http://[::1/a.jpg", "http://☃.example/a.jpg", web.url("/img/red.jpg"), web.url("/img/green.png")]
    result, _, rows = run(urls, replace(FAST, processes=processes))
    assert result.table.num_rows == len(urls)
    assert rows[urls[0]]["status"] == schemas.FAILED_TO_DOWNLOAD
    assert rows[urls[0]]["error_message"] == "malformed URL (Invalid IPv6 URL): http://[::1/a.jpg"
    assert rows[urls[0]]["host"] == "[::1"
    assert rows[urls[1]]["status"] == schemas.FAILED_TO_DOWNLOAD
    assert rows[urls[1]]["error_message"].startswith("dns: cannot resolve ☃.example: not a valid host name (")
    assert [rows[url]["status"] for url in urls[2:]] == [schemas.SUCCESS] * 2


def test_a_block_list_with_domains_matches_a_malformed_url_by_nothing():
    entries = pa.table({"list": ["legal"], "kind": ["domain"], "entry": ["example.com"]})
    blocklist = Blocklist(entries.cast(schemas.BLOCKLIST_ENTRIES))
    assert blocklist.match_url("http://[::1/a.jpg") is None
    assert blocklist.match_url("http://images.example.com/a.jpg").why == "legal (domain)"


def test_a_redirect_to_a_malformed_url_fails_its_row(web):
    url = web.url("/redirect?to=http://[oops/x.jpg")
    _, _, rows = run([url])
    assert rows[url]["status"] == schemas.FAILED_TO_DOWNLOAD
    assert rows[url]["error_message"] == "HTTP 302: malformed redirect (Invalid IPv6 URL): http://[oops/x.jpg"
    assert rows[url]["http_status"] == 302


def test_site_files_that_break_their_parsers_leave_the_images_alone(serve):
    # a robots.txt that redirects to a malformed URL, and a tdmrep.json nested past Python's stack: each
    # raised out of the fetch of every image of the site. Unreadable, the one allows all and the other
    # reserves nothing, as the download page says
    server = serve(
        {
            "/robots.txt": (
                b"HTTP/1.1 302 Found\r\nLocation: http://[oops/robots.txt\r\nContent-Length: 0\r\n\r\n"
            ),
            "/.well-known/tdmrep.json": ok(b"[" * 200_000, "application/json"),
            "/a.jpg": ok(JPEG),
        }
    )
    settings = replace(SITE, respect_robots_txt=True, respect_tdm_reservation=True)
    fetched = fetch_one(f"http://127.0.0.1:{server.port}/a.jpg", settings)
    assert (fetched.status, fetched.body) == (schemas.SUCCESS, JPEG)


def test_a_location_in_raw_utf8_is_read_as_utf8(serve):
    server = serve(
        {
            "/start": b"HTTP/1.1 302 Found\r\nLocation: /caf\xc3\xa9.jpg\r\nContent-Length: 0\r\n\r\n",
            "/caf%C3%A9.jpg": ok(JPEG),
        }
    )
    fetched = fetch_one(f"http://127.0.0.1:{server.port}/start", SITE)
    assert fetched.status == schemas.SUCCESS
    request_lines = [request.split(b"\r\n")[0] for request in server.requests]
    assert b"GET /caf%C3%A9.jpg HTTP/1.1" in request_lines  # not /caf%C3%83%C2%A9.jpg


def test_an_http_date_in_asctimes_form_is_read_as_gmt(monkeypatch):
    # RFC 9110 has a recipient accept asctime's form, which carries no zone: it is GMT, not local time
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        in_a_minute = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=60)
        for value in (
            in_a_minute.strftime("%a %b %d %H:%M:%S %Y"),
            in_a_minute.strftime("%a, %d %b %Y %H:%M:%S -0000"),
        ):
            assert 50 < fetch.retry_after_seconds(value) <= 60, value
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_connection_that_sent_bytes_past_its_response_is_not_used_again(serve):
    server = serve(
        {
            # a second response's start right after the first's end, in the same segment
            "/first": (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nST"
            ),
            "/second": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine",
        }
    )
    base = f"http://127.0.0.1:{server.port}"
    assert get_all([f"{base}/first", f"{base}/second"]) == [(200, b"ok"), (200, b"fine")]
    assert server.connections == 2  # the second on a new connection: the first one's stream is spoiled


def test_a_non_ascii_host_is_named_by_the_same_a_label_to_dns_and_in_host(serve):
    # UTS 46, as browsers: straße is xn--strae-oqa, where Python's own codec (IDNA 2003) makes it strasse
    assert http.ascii_host("Straße.Example.") == "xn--strae-oqa.example"
    server = serve({"/a.jpg": ok(JPEG)})
    with DnsServer({"xn--strae-oqa.example": Name(["127.0.0.1"])}) as dns:
        settings = replace(SITE, dns_servers=(dns.server,), respect_tdm_reservation=False)
        fetched = fetch_one(f"http://straße.example:{server.port}/a.jpg", settings)
        assert fetched.status == schemas.SUCCESS
        assert dns.lookups["xn--strae-oqa.example"] == 1
    assert f"Host: xn--strae-oqa.example:{server.port}".encode() in server.requests[0].split(b"\r\n")


def test_a_retry_after_of_a_digit_python_calls_a_digit_but_float_refuses_is_no_wait(serve):
    # str.isdigit() holds for "¹" (0xB9 read as latin-1), float() refuses it: the ValueError left the fetch,
    # a 500 of the service and an "unexpected" row of the downloader, where a 429 is the server's answer
    busy = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: \xb9\r\nContent-Length: 0\r\n\r\n"
    server = serve({"/a.jpg": busy})
    fetched = fetch_one(f"http://127.0.0.1:{server.port}/a.jpg", SITE)
    assert (fetched.status, fetched.error) == (schemas.FAILED_TO_DOWNLOAD, "HTTP 429: Too Many Requests")
    assert fetch.retry_after_seconds("\xb9") is None
