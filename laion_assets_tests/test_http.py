"""The downloader's HTTP client against a raw TCP server on 127.0.0.1 that answers as scripted: the
responses the test web's http.server cannot send (a body ended by closing, an interim 103, a keep-alive
connection closed while idle)."""

import asyncio
import contextlib
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from laion_assets.pipeline.download import http

Answer = Callable[[bytes, socket.socket], bool]  # (request, connection) -> keep the connection open


class RawServer:
    """Accepts connections; for each request read, `answer(request, connection)` writes the response
    bytes. `requests` keeps every request, `connections` counts the connections accepted."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):  # the client may hang up first
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffered += data
                request, _, buffered = buffered.partition(b"\r\n\r\n")
                self.requests.append(request)
                if not self.answer(request, connection):
                    return

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def get_all(urls: list[str], limit: int = 1_000_000, read_timeout: float = 2.0) -> list[tuple[int, bytes]]:
    """Each URL fetched after the last through one pool: (status, body)."""

    async def fetched() -> list[tuple[int, bytes]]:
        pool = http.ConnectionPool({"User-Agent": "test"})
        results = []
        try:
            for url in urls:
                parts = urlsplit(url)
                async with await pool.get(parts, None, 2.0, read_timeout, limit) as response:
                    results.append((response.status, await response.read()))
        finally:
            pool.close()
        return results

    return asyncio.run(fetched())


def test_a_body_without_a_length_ends_with_the_connection(serve):
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + b"x" * 100_000)
        return False

    server = serve(answer)
    url = f"http://127.0.0.1:{server.port}/a.jpg"
    assert get_all([url, url]) == [(200, b"x" * 100_000)] * 2
    assert server.connections == 2  # such a connection is never reused


def test_an_interim_response_is_skipped_for_the_final_one(serve):
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nhello"
        )
        return True

    server = serve(answer)

    async def headers() -> tuple[int, str, str]:
        pool = http.ConnectionPool({})
        try:
            parts = urlsplit(f"http://127.0.0.1:{server.port}/")
            async with await pool.get(parts, None, 2.0, 2.0, 100) as response:
                await response.read()
                return response.status, response.headers.get("X-Final"), response.headers.get("Link")
        finally:
            pool.close()

    assert asyncio.run(headers()) == (200, "yes", "")


def test_a_kept_alive_connection_the_server_closed_is_replaced_not_failed(serve):
    """The server answers one request per connection but says keep-alive, then closes it: the next
    request finds it gone, or goes out on it just as it closes, and is sent again on a new one."""
    server, url = _answering_ok(serve, keep_alive=False)
    assert get_all([url] * 5) == [(200, b"ok")] * 5
    assert len(server.requests) == 5


def test_kept_alive_connections_are_reused(serve):
    server, url = _answering_ok(serve, keep_alive=True)
    assert get_all([url] * 5) == [(200, b"ok")] * 5
    assert server.connections == 1


def test_an_idle_kept_alive_connection_holds_no_body(serve):
    """20 responses of 1 MB, at once, over 20 connections the pool then keeps: once the bodies are read
    and dropped, the idle connections hold none of them (they held their last one: a worker's pool of
    hundreds kept about 100 MB of bodies decoded long before)."""
    megabyte = b"x" * 2**20

    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(megabyte) + megabyte)
        return True

    server = serve(answer)
    parts = urlsplit(f"http://127.0.0.1:{server.port}/x")

    async def held_after_reading() -> int:
        pool = http.ConnectionPool({"User-Agent": "test"})

        async def read() -> int:
            async with await pool.get(parts, None, 2.0, 2.0, 2 * len(megabyte)) as response:
                return len(await response.read())

        try:
            tracemalloc.start()
            assert await asyncio.gather(*(read() for _ in range(20))) == [len(megabyte)] * 20
            return tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            pool.close()

    held = asyncio.run(held_after_reading())
    assert server.connections == 20
    assert held < 4 * len(megabyte)


def _answering_ok(serve, keep_alive: bool):
    """A server that answers each request 200 "ok", then keeps the connection open or closes it; its URL."""

    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return keep_alive

    server = serve(answer)
    return server, f"http://127.0.0.1:{server.port}/x"


def test_the_request_line_is_percent_encoded_and_the_host_is_idna(serve):
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    server = serve(answer)

    async def one() -> int:
        pool = http.ConnectionPool({"User-Agent": "test"})
        try:
            parts = urlsplit(f"http://bücher.example:{server.port}/a b/é.jpg?q=ü&x=1")
            async with await pool.get(parts, "127.0.0.1", 2.0, 2.0, 100) as response:
                await response.read()
                return response.status
        finally:
            pool.close()

    assert asyncio.run(one()) == 204
    lines = server.requests[0].decode("ascii").split("\r\n")
    assert lines[0] == "GET /a%20b/%C3%A9.jpg?q=%C3%BC&x=1 HTTP/1.1"
    assert f"Host: xn--bcher-kva.example:{server.port}" in lines
    assert "User-Agent: test" in lines


def test_a_body_over_the_limit_stops_the_read(serve):
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):
            connection.sendall(b"4000\r\n" + b"\0" * 0x4000 + b"\r\n")
        connection.sendall(b"0\r\n\r\n")
        return True

    server = serve(answer)
    with pytest.raises(http.BodyTooLarge):
        get_all([f"http://127.0.0.1:{server.port}/big"], limit=100_000)


def test_a_response_that_is_not_http_is_refused(serve):
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        return True

    server = serve(answer)
    with pytest.raises(http.BadResponse):
        get_all([f"http://127.0.0.1:{server.port}/"])


def test_a_stalled_response_times_out_after_the_read_timeout(serve):
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        threading.Event().wait(5)  # the rest never comes
        return False

    server = serve(answer)
    with pytest.raises(http.ReadTimeout):
        get_all([f"http://127.0.0.1:{server.port}/"], read_timeout=0.3)


@pytest.mark.parametrize(
    "start, line, end",
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Pad: " + b"a" * 1000 + b"\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nX-Pad: ", b"a" * 1000, b"\r\n"),
        (
            b"",
            b"HTTP/1.1 103 Early Hints\r\nLink: </" + b"a" * 1000 + b">; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
        ),
    ],
    ids=["header lines", "one header line", "interim responses"],
)
def test_a_response_head_without_end_is_refused_past_its_bound(serve, start, line, end):
    """10 MB before the body: header lines, one line, or 103s. All of it was kept (headers have no
    max_bytes), as long as the server sent it, and an endless line cost time quadratic in its length."""

    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(start)
        for _ in range(10_000):
            connection.sendall(line)
        connection.sendall(end + b"Content-Length: 2\r\n\r\nok")
        return True

    server = serve(answer)
    with pytest.raises(http.BadResponse, match="response head is over 262144 bytes"):
        get_all([f"http://127.0.0.1:{server.port}/"])


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\nContent-Type: image/jpeg\nContent-Length: 5\n\nhello",
        b"HTTP/1.0 200 OK\nContent-Type: image/jpeg\n\nhello",
    ],
    ids=["with a length", "ended by closing"],
)
def test_a_head_whose_lines_end_in_a_bare_lf_is_read(serve, response):
    # as browsers, curl and http.client (img2dataset's) read it (RFC 9112 2.2 lets a recipient): llhttp
    # refused it ("Missing expected CR after response line")
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(response)
        return False

    server = serve(answer)
    assert get_all([f"http://127.0.0.1:{server.port}/a.jpg"]) == [(200, b"hello")]


def test_a_chunked_body_with_a_content_length_too_is_read_as_chunked_on_a_connection_not_kept(serve):
    # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, as browsers and http.client read it (llhttp
    # refused the response); such a response may be an attempt at response splitting, so its connection
    # is not used again
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        return True

    server = serve(answer)
    url = f"http://127.0.0.1:{server.port}/a.jpg"
    assert get_all([url, url]) == [(200, b"hello")] * 2
    assert server.connections == 2


@pytest.mark.parametrize(
    "fields, body, read",
    [
        (
            b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n",
            None,
        ),  # no last chunk
        (b"Transfer-Encoding: chunked, gzip\r\n", b"hello", b"hello"),
        (b"Content-Length: 2\r\nTransfer-Encoding: gzip\r\n", b"hello", b"hello"),
    ],
    ids=[
        "chunked in a second field, cut short",
        "chunked, then another coding",
        "another coding and a length",
    ],
)
def test_a_body_is_chunked_where_its_last_transfer_coding_is_and_else_ends_with_the_connection(
    serve, fields, body, read
):
    # RFC 9112 6.3, as llhttp frames it: the first field's value decided whether the body was chunked, and
    # a Content-Length that Transfer-Encoding overrides whether it ended with the connection, so a chunked
    # body cut short was taken whole, and one ended by closing was taken as broken
    def answer(request: bytes, connection: socket.socket) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n" + body)
        return False

    server = serve(answer)
    url = f"http://127.0.0.1:{server.port}/a.jpg"
    if read is None:
        with pytest.raises(http.ConnectionBroken):
            get_all([url])
    else:
        assert get_all([url]) == [(200, read)]
