"""HTTP/1.1 GETs for the downloader: keep-alive connections pooled per address, each response parsed by
httptools (llhttp, Node's parser) in an asyncio protocol that collects the body as it arrives.

Why not aiohttp, which the downloader used before: on bench/download.py's latency web a request cost
aiohttp 0.65 ms of CPU, and costs this 0.4 ms, and the downloader is bound by the CPU there
(docs/benchmarks.md). It needs little of an HTTP client: GET with fixed headers, no cookies, no
proxies, no compression (it sends no Accept-Encoding, so servers send the bytes as they are, as they do
to img2dataset), redirects followed by the caller (`fetch.py`), which also picks the address to
connect to. A connection's read timeout is one timer, moved on as data arrives, not one per read.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from urllib.parse import SplitResult, quote

import httptools
import idna

KEEPALIVE_SECONDS = 15.0  # an idle connection is closed after this long (servers close theirs too)
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # what stays as it is in a path; the rest is percent-encoded
_QUERY_SAFE = _PATH_SAFE + "?"
# bytes: the most a response's head (status line and headers, those of 1xx responses before it included)
# may take, as Chrome bounds it; headers have no max_bytes of their own
_MAX_HEAD_BYTES = 256 * 1024


class HttpError(Exception):
    """A request that failed below HTTP."""


class ConnectTimeout(HttpError):
    pass


class ConnectFailed(HttpError):
    """Refused, unreachable, or any other error of the TCP connect."""


class TlsRefused(HttpError):
    """The TLS handshake failed: a certificate refused, or no protocol in common."""


class ReadTimeout(HttpError):
    """Nothing arrived for the read timeout."""


class ConnectionBroken(HttpError):
    """The server closed or reset the connection before the response was complete."""


class BadResponse(HttpError):
    """Bytes that are not an HTTP/1.x response."""


class BodyTooLarge(HttpError):
    """A body over the request's limit; `first` is its start, the limit's worth of bytes (joined only
    when asked for: an image's is dropped)."""

    def __init__(self, message: str, parts: list[bytes]) -> None:
        super().__init__(message)
        self._parts = parts

    @property
    def first(self) -> bytes:
        return b"".join(self._parts)


class Headers:
    """A response's headers, their names case-insensitive; a name sent several times keeps each value."""

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str = "") -> str:
        values = self._values.get(name.lower())
        return values[0] if values else default

    def getall(self, name: str) -> list[str]:
        return list(self._values.get(name.lower(), ()))


class Response:
    """A response whose status and headers are in: `await read()` for its body. Use it as an async
    context manager: leaving it gives its connection back to the pool when the response is complete,
    and closes it otherwise (a body not read)."""

    def __init__(self, connection: _Connection, status: int, reason: str, headers: Headers) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self._connection = connection

    async def read(self) -> bytes:
        """The body; BodyTooLarge past the request's limit, ReadTimeout when it stalls, ConnectionBroken
        when the connection ends before it does."""
        return await self._connection.body()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._connection.release()


class _Connection(asyncio.Protocol):
    """One connection: a request at a time, its response parsed as the bytes arrive."""

    def __init__(self, on_idle: Callable[[_Connection], None]) -> None:
        self._on_idle = on_idle
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self._parser: httptools.HttpResponseParser | None = None
        self._headers_done: asyncio.Future[Response] | None = None
        self._body_done: asyncio.Future[bytes] | None = None
        self._status = 0
        self._reason = b""
        self._headers = Headers()
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = 0
        self._complete = False
        self._keep_alive = False
        self._until_close = False  # the body ends with the connection (`_ends_with_the_connection`)
        self._received = False
        self._head_size = 0  # bytes received before the final response's headers were complete
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._last_data = 0.0

    # the pool's side
    def request(self, data: bytes, read_timeout: float, limit: int) -> asyncio.Future[Response]:
        """Sends `data` (a whole request); the future gets the response once its headers are in."""
        self._reset()
        self._parser = httptools.HttpResponseParser(self)
        # lines ended by a bare LF, as browsers and http.client read them (RFC 9112 2.2 lets a recipient);
        # a chunked body with a Content-Length too, read as chunked (RFC 9112 6.3), as they read it
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True, lenient_chunked_length=True)
        self._limit, self._read_timeout = limit, read_timeout
        self._headers_done = self._loop.create_future()
        self._body_done = self._loop.create_future()
        self._body_done.add_done_callback(_retrieve)  # a body nobody reads must not log an error
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + read_timeout, self._check_stall)
        self._transport.write(data)
        return self._headers_done

    async def body(self) -> bytes:
        return await self._body_done

    def release(self) -> None:
        """The caller is done with the response: back to the pool if it is complete and may stay open."""
        if self._complete and self._keep_alive and not self.closed:
            self._reset()  # an idle connection must not keep its last body: the pool holds hundreds
            self.idle_since = self._loop.time()
            self._on_idle(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            if self._transport is not None:
                self._transport.close()

    @property
    def received_nothing(self) -> bool:
        return not self._received

    # asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._received = True
        self._last_data = self._loop.time()
        if self._parser is None:  # bytes on an idle connection: it cannot be trusted with a request
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed response: {exc}"))
            return
        if not self._headers_done.done():
            self._head_size += len(data)
            if self._head_size > _MAX_HEAD_BYTES:
                self._fail(BadResponse(f"response head is over {_MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self._parser is None or self._complete:
            return
        if self._until_close and exc is None and self._headers_done.done():
            self._complete = True
            self._finish_body()
            return
        reason = str(exc) if exc else "the server closed the connection"
        self._fail(ConnectionBroken(reason))

    # httptools' callbacks
    def on_message_begin(self) -> None:
        if self._complete:  # bytes past the response's end: the stream cannot be trusted with a request
            self.close()
        self._reason, self._headers = b"", Headers()

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        if 100 <= self._status < 200:
            return  # an interim response (103 Early Hints): the real one follows
        headers = self._headers
        self._until_close = _ends_with_the_connection(self._status, headers)
        response = Response(self, self._status, self._reason.decode("latin-1").strip(), headers)
        if not self._headers_done.done():
            self._headers_done.set_result(response)

    def on_body(self, body: bytes) -> None:
        room = self._limit - self._size
        self._size += len(body)
        if self._size > self._limit:
            parts, self._chunks = [*self._chunks, body[:room]], []
            self._fail(BodyTooLarge(f"body is over {self._limit} bytes", parts))
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            return
        self._complete = True
        headers = self._headers
        # framed twice: maybe response splitting (RFC 9112 6.3), so what follows on the stream is not trusted
        framed_twice = headers.get("Transfer-Encoding") and headers.get("Content-Length")
        # llhttp knows it in this callback only
        self._keep_alive = self._parser.should_keep_alive() and not framed_twice
        self._cancel_timer()
        self._finish_body()

    # inside
    def _finish_body(self) -> None:
        if not self._body_done.done():
            self._body_done.set_result(b"".join(self._chunks))
        self._chunks = []

    def _fail(self, error: HttpError) -> None:
        for waiter in (self._headers_done, self._body_done):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        self.close()

    def _check_stall(self) -> None:
        due = self._last_data + self._read_timeout
        if self._loop.time() >= due:
            self._timer = None
            self._fail(ReadTimeout(f"nothing received for {self._read_timeout:g}s"))
        else:
            self._timer = self._loop.call_at(due, self._check_stall)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def ascii_host(host: str) -> str:
    """`host` as DNS, the Host header and TLS name it: lowercased, without a final dot, a non-ASCII name
    in IDNA A-labels as browsers map it (UTS 46: straße.de is xn--strae-oqa.de, where Python's own
    "idna" codec, IDNA 2003, makes it strasse.de, another domain). ValueError (idna.IDNAError) for a
    name IDNA forbids. An ASCII name is left as it is: DNS names in use hold what IDNA refuses ("_")."""
    host = host.rstrip(".").lower()
    return host if host.isascii() else idna.encode(host, uts46=True).decode("ascii")


def _ends_with_the_connection(status: int, headers: Headers) -> bool:
    """Whether the body ends with the connection, as RFC 9112 6.3 frames it and llhttp reads it: a status
    with a body, and Transfer-Encoding whose last coding (of all its fields) is not chunked, whatever the
    Content-Length; without Transfer-Encoding, no Content-Length."""
    if status in (204, 304):
        return False
    codings = ",".join(headers.getall("Transfer-Encoding"))
    if codings:
        return codings.split(",")[-1].strip().lower() != "chunked"
    return not headers.get("Content-Length")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class ConnectionPool:
    """GETs over keep-alive connections, pooled per (scheme, host name, address, port)."""

    def __init__(self, headers: dict[str, str], ssl_context: ssl.SSLContext | None = None) -> None:
        self._header_lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._ssl_context = ssl_context
        self._idle: dict[tuple, list[_Connection]] = {}

    async def get(
        self,
        parts: SplitResult,
        address: str,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
    ) -> Response:
        """GET the URL `parts` from `address`, never from whatever its host name resolves to now: the
        response once its headers are in. Its body may hold `limit` bytes at most."""
        https = parts.scheme == "https"
        host = ascii_host(parts.hostname or "")  # the name, as Host and TLS want it
        port = parts.port or (443 if https else 80)
        key = (parts.scheme, host, address, port)  # a name's own connections, as browsers keep
        request = _request_bytes(parts, host, self._header_lines)
        connection = self._idle_connection(key)
        if connection is not None:
            try:
                return await _send(connection, request, read_timeout, limit)
            except ConnectionBroken:
                if not connection.received_nothing:
                    raise
                # the server closed it while idle, as the request went out: once more, on a new one
        connection = await self._connect(key, connect_timeout)
        return await _send(connection, request, read_timeout, limit)

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _idle_connection(self, key: tuple) -> _Connection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, key: tuple, timeout: float) -> _Connection:
        scheme, host, address, port = key
        loop = asyncio.get_running_loop()
        tls = (self._ssl_context or _default_context()) if scheme == "https" else None
        tls_name = host if tls else None

        def on_idle(connection: _Connection) -> None:
            self._idle.setdefault(key, []).append(connection)
            loop.call_later(KEEPALIVE_SECONDS, self._expire, key, connection, connection.idle_since)

        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(on_idle), address, port, ssl=tls, server_hostname=tls_name
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection within {timeout:g}s") from exc
        except ssl.SSLError as exc:  # a certificate refused among them
            raise TlsRefused(str(exc)) from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {address}:{port}: {exc.strerror or exc}") from exc
        return connection

    def _expire(self, key: tuple, connection: _Connection, idle_since: float) -> None:
        """Closes `connection` if it is still idle since `idle_since` (not taken again meanwhile)."""
        connections = self._idle.get(key)
        if connections and connection.idle_since == idle_since and connection in connections:
            connections.remove(connection)
            connection.close()


async def _send(connection: _Connection, request: bytes, read_timeout: float, limit: int) -> Response:
    """`request` on `connection`; a connection whose caller gave up (a timeout, a cancellation) is
    closed, not left to finish a response nobody reads."""
    try:
        return await connection.request(request, read_timeout, limit)
    except BaseException:
        connection.close()
        raise


@functools.cache
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _request_bytes(parts: SplitResult, host: str, header_lines: str) -> bytes:
    """The GET request for `parts`: the path and query percent-encoded where they are not ASCII-safe,
    the host (`ascii_host`'s) in brackets if IPv6."""
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_QUERY_SAFE)
    name = f"[{host}]" if ":" in host else host
    authority = f"{name}:{parts.port}" if parts.port else name
    return f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n{header_lines}\r\n".encode("ascii")
