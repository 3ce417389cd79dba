"""Fetching image URLs: many at once on one event loop, bounded in time and bytes, polite, and refusing
private networks.

A request that waits on a slow or silent server costs a socket and a coroutine, not a thread, so a
worker keeps hundreds of requests in flight. Redirects are followed here, so that every hop passes the
same address guard and robots check. A host is resolved once (per `dns_cache_seconds`) in a bounded
number of lookups at a time, and the connection goes to the address the guard vetted (`http.py`), never
to an address a second lookup could answer (DNS rebinding); the Host header and, for https, the TLS
server name and certificate check go by the URL's name. Every request has a total deadline on top of
the per-read timeout, so a server that drips one byte at a time cannot hold a request longer than
`request_timeout`.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit
from urllib.robotparser import RobotFileParser

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download import http, tdmrep

T = TypeVar("T")
# A site's tdmrep.json still out when an image's request went ahead of it, and the image's path and query
_Unvetted = tuple[asyncio.Future[list[tdmrep.TdmRule]], str]
_REDIRECTS = {301, 302, 303, 307, 308}
_NOT_IMAGE_TYPES = (
    "text/",
    "application/json",
    "application/xml",
    "application/xhtml",
    "application/javascript",
)
_ROBOTS_MAX_BYTES = 512 * 1024


@dataclass(frozen=True)
class FetchSettings:
    # Defaults measured on bench/download.py's latency web (docs/benchmarks.md says why)
    connect_timeout: float = 5.0
    read_timeout: float = 5.0  # per read from the socket, the wait for the first byte included
    request_timeout: float = 30.0  # whole request, redirects and body included
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    retries: int = 0  # extra attempts after timeouts, resets, 429 and 5xx; retry_failed refetches later
    retry_backoff: float = 0.5  # seconds, doubled at each attempt
    max_retry_after: float = 30.0  # a longer 429/503 Retry-After gives up at once
    per_host_connections: int = 128  # a CDN with a sixth of a shard's URLs is not its tail
    user_agent_token: str = "laion_assets"
    respect_robots_txt: bool = False
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # W3C TDMRep: a `tdm-reservation: 1` response header, or a rule of the site's tdmrep.json, opts out
    respect_tdm_reservation: bool = True
    # An image waits this long for its site's tdmrep.json, then is requested while the file is still out;
    # a reservation the file then makes refuses it all the same (its bytes dropped, never stored), so a
    # slow or silent site file costs its images this wait, not its own read_timeout before theirs
    tdmrep_wait: float = 1.0
    allow_private_networks: bool = False
    dns_timeout: float = 5.0  # a host that does not resolve within it fails its rows at once
    dns_cache_seconds: float = 300.0  # how long a host's resolution (or its failure) is kept
    dns_lookups: int = 32  # resolutions in flight at once


@dataclass(frozen=True)
class Fetched:
    status: str  # success | failed_to_download | failed_to_decode | opted_out | blocked
    body: bytes | None = None
    error: str | None = None
    http_status: int | None = None


@dataclass(frozen=True)
class RetryLater:
    """An attempt that failed in a way another may not: try again after `wait` seconds."""

    wait: float


class _Retryable(Exception):
    def __init__(self, message: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after


class _FetchFailed(Exception):
    """A request that cannot succeed on retry (malformed URL or response, a certificate refused)."""


def _failed(error: str, http_status: int | None = None) -> Fetched:
    return Fetched(schemas.FAILED_TO_DOWNLOAD, error=error, http_status=http_status)


# A host's answer: a refusal, the vetted address to connect to, or None (an IP literal: nothing to pin)
Address = Fetched | str | None


class Fetcher:
    """One per event loop: `async with Fetcher(settings) as fetcher`, then `await fetcher.fetch(...)` from
    as many tasks as wanted."""

    def __init__(self, settings: FetchSettings, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.user_agent = f"Mozilla/5.0 (compatible; {settings.user_agent_token}; image-text dataset builder)"
        self._addresses: dict[str, tuple[float, Address]] = {}  # host -> (until when, answer)
        self._resolving: dict[str, asyncio.Future[Address]] = {}
        self._lookups = ThreadPoolExecutor(settings.dns_lookups, thread_name_prefix="dns")
        # per (file, origin): robots.txt (RobotFileParser, None, or why every path is refused), tdmrep.json
        self._site_files: dict[tuple[str, str], asyncio.Future[Any]] = {}
        # the caller bounds requests in flight, and per host
        headers = {"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.5"}
        self._connections = http.ConnectionPool(headers, ssl_context)

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._connections.close()
        self._lookups.shutdown(wait=False, cancel_futures=True)

    async def fetch(self, url: str, deadline: float) -> Fetched:
        """GET `url`, retrying transient failures after their backoff, never past `deadline`
        (time.monotonic)."""
        attempt = 0
        while True:
            outcome = await self.attempt(url, deadline, attempt)
            if isinstance(outcome, Fetched):
                return outcome
            await asyncio.sleep(outcome.wait)
            attempt += 1

    async def attempt(self, url: str, deadline: float, attempt: int) -> Fetched | RetryLater:
        """Attempt number `attempt` (from 0) at `url`: what it fetched or why it failed for good, or, where
        a later attempt may succeed, how long to wait before it (the caller decides how)."""
        s = self.settings
        try:
            return await self._follow(url, deadline, image=True)
        except _FetchFailed as exc:
            return _failed(str(exc))
        except _Retryable as exc:
            wait = exc.retry_after if exc.retry_after is not None else s.retry_backoff * 2**attempt
            tries = f" (gave up after {attempt + 1} attempts)" if attempt else ""
            if exc.retry_after is not None and wait > s.max_retry_after:
                tries = f" (Retry-After {wait:g}s is over max_retry_after={s.max_retry_after:g}s)"
                return _failed(f"{exc}{tries}", exc.http_status)
            if attempt >= s.retries or time.monotonic() + wait >= deadline:
                return _failed(f"{exc}{tries}", exc.http_status)
            return RetryLater(wait)

    async def _follow(self, url: str, deadline: float, image: bool) -> Fetched:
        """What GET `url` gives, redirects followed. Where a hop went ahead of its site's tdmrep.json
        (`tdmrep_wait`), the outcome, whatever it is, waits for the file, and a reservation it makes
        refuses the URL: as it would have without the request."""
        unvetted: list[_Unvetted] = []
        try:
            fetched = await self._hops(url, deadline, image, unvetted)
        except (_Retryable, _FetchFailed):
            if refusal := await self._reservation(unvetted):
                return refusal
            raise
        return await self._reservation(unvetted) or fetched

    async def _hops(self, url: str, deadline: float, image: bool, unvetted: list[_Unvetted]) -> Fetched:
        deadline = min(deadline, time.monotonic() + self.settings.request_timeout)
        visited = set()
        for _ in range(self.settings.max_redirects + 1):
            refusal = await self._vet(url, check_site_rules=image, unvetted=unvetted)
            if refusal:
                return refusal
            visited.add(url)
            async with await self._get(url, deadline, image) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        return _failed(
                            f"HTTP {response.status}: redirect without a Location", response.status
                        )
                    url = urljoin(url, location.strip())
                    if url in visited:
                        return _failed(f"redirect loop: back to {url}", response.status)
                    continue
                return await self._read(response, deadline, image)
        return _failed(f"too many redirects: more than max_redirects={self.settings.max_redirects}")

    async def _get(self, url: str, deadline: float, image: bool) -> http.Response:
        """The response to GET `url`, its headers read, its body not yet."""
        s = self.settings
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retryable(f"timeout: no time left of request_timeout={s.request_timeout:g}s")
        connect, read = min(s.connect_timeout, remaining), min(s.read_timeout, remaining)
        parts = urlsplit(url)
        answer = await self.resolve(parts.hostname)  # vetted by `_vet` a moment ago: from the cache
        address = answer if isinstance(answer, str) else None
        limit = self._body_limit(image)
        try:
            async with asyncio.timeout(remaining):
                return await self._connections.get(parts, address, connect, read, limit)
        except http.ConnectTimeout as exc:
            raise _Retryable(f"timeout: no connection within {connect:g}s{self._pinned(url)}") from exc
        except (http.ReadTimeout, TimeoutError) as exc:
            raise _Retryable(f"timeout: no response within {read:g}s") from exc
        except http.TlsRefused as exc:  # a certificate refused: retrying will not help
            raise _FetchFailed(f"request failed: {_reason(exc)}") from exc
        except http.ConnectFailed as exc:
            raise _Retryable(f"connection failed: {_reason(exc)}{self._pinned(url)}") from exc
        except http.ConnectionBroken as exc:
            raise _Retryable(f"connection broken: {_reason(exc)}") from exc
        except (http.BadResponse, ValueError, UnicodeError) as exc:  # malformed URL or response
            raise _FetchFailed(f"request failed: {_reason(exc)}") from exc

    def _body_limit(self, image: bool) -> int:
        """The bytes a body may hold: an image's `max_bytes`, a robots.txt or tdmrep.json's less."""
        return self.settings.max_bytes if image else _ROBOTS_MAX_BYTES

    def _pinned(self, url: str) -> str:
        """The vetted address a connection to `url`'s host went to, for an error message."""
        host = (urlsplit(url).hostname or "").rstrip(".")
        answer = self._addresses.get(host, (0, None))[1]
        return f" (address {answer})" if isinstance(answer, str) else ""

    async def _read(self, response: http.Response, deadline: float, image: bool) -> Fetched:
        s, status = self.settings, response.status
        if status == 429 or status >= 500:
            retry_after = (
                retry_after_seconds(response.headers.get("Retry-After")) if status in (429, 503) else None
            )
            raise _Retryable(f"HTTP {status}: {response.reason}", status, retry_after)
        if status != 200:
            return _failed(f"HTTP {status}: {response.reason}", status)
        if image:
            directive = self._opt_out(response.headers.getall("X-Robots-Tag"))
            if directive:
                return Fetched(schemas.OPTED_OUT, error=f"X-Robots-Tag: {directive}", http_status=status)
            if s.respect_tdm_reservation and response.headers.get("tdm-reservation").strip() == "1":
                return Fetched(schemas.OPTED_OUT, error="tdm-reservation: 1 (TDMRep)", http_status=status)
            content_type = response.headers.get("Content-Type").split(";")[0].strip().lower()
            if content_type.startswith(_NOT_IMAGE_TYPES):
                error = f"not an image: content type {content_type}"
                return Fetched(schemas.FAILED_TO_DECODE, error=error, http_status=status)
        limit = self._body_limit(image)
        declared = response.headers.get("Content-Length")
        if declared.isdigit() and int(declared) > limit:
            return _failed(f"too large: Content-Length {declared} is over max_bytes={limit}", status)
        try:
            # each read waits at most read_timeout (the connection's timer), the whole body until deadline
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                body = await response.read()
        except http.BodyTooLarge:
            return _failed(f"too large: body is over max_bytes={limit}", status)
        except http.ReadTimeout as exc:
            raise _Retryable(f"timeout: body stalled for {s.read_timeout:g}s", status) from exc
        except TimeoutError as exc:
            message = f"timeout: body not complete within request_timeout={s.request_timeout:g}s"
            raise _Retryable(message, status) from exc
        except http.ConnectionBroken as exc:
            raise _Retryable(f"connection broken: {_reason(exc)}", status) from exc
        except http.BadResponse as exc:
            raise _FetchFailed(f"request failed: {_reason(exc)}") from exc
        return Fetched(schemas.SUCCESS, body=body, http_status=status)

    async def _vet(self, url: str, check_site_rules: bool, unvetted: list[_Unvetted]) -> Fetched | None:
        """A refusal of `url`, or None when it may be fetched. A site's tdmrep.json that has not answered
        within `tdmrep_wait` goes on `unvetted`, for the caller to read once the request is done."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return _failed(f"unsupported URL: {url[:200]}")
        answer = await self.resolve(parts.hostname)
        if isinstance(answer, Fetched):
            return answer
        if check_site_rules and self.settings.respect_robots_txt:
            refusal = await self._robots_refusal(parts, url)
            if refusal:
                return Fetched(schemas.OPTED_OUT, error=refusal)
        if check_site_rules and self.settings.respect_tdm_reservation:
            rules = self._site_file(tdmrep.WELL_KNOWN_PATH, parts, self._load_tdmrep)
            if not rules.done():
                try:
                    await asyncio.wait_for(asyncio.shield(rules), self.settings.tdmrep_wait)
                except TimeoutError:
                    unvetted.append((rules, _path_and_query(parts)))
                    return None
            return _tdm_refusal(rules.result(), _path_and_query(parts))
        return None

    @staticmethod
    async def _reservation(unvetted: list[_Unvetted]) -> Fetched | None:
        """The refusal of the first reservation among the site files a request went ahead of."""
        for rules, path in unvetted:
            if refusal := _tdm_refusal(await asyncio.shield(rules), path):
                return refusal
        return None

    def remember(self, addresses: dict[str, Address]) -> None:
        """Hosts' answers looked up elsewhere (host -> answer, as `resolve` gives), kept as its own."""
        expiry = time.monotonic() + self.settings.dns_cache_seconds
        for host, answer in addresses.items():
            self._addresses[host.rstrip(".").lower()] = (expiry, answer)

    async def resolve(self, host: str) -> Address:
        """`host`'s answer, from the cache while it is fresh; one lookup at a time per host, `dns_lookups`
        in all, each bounded by `dns_timeout`."""
        host = host.rstrip(".").lower()
        cached = self._addresses.get(host)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        if host not in self._resolving:
            self._resolving[host] = asyncio.ensure_future(self._lookup(host))
        try:
            return await asyncio.shield(self._resolving[host])
        finally:
            self._resolving.pop(host, None)

    async def _lookup(self, host: str) -> Address:
        s = self.settings
        look_up = _address_refusal if not s.allow_private_networks else _any_address
        try:
            async with asyncio.timeout(s.dns_timeout):
                answer = await asyncio.get_running_loop().run_in_executor(self._lookups, look_up, host)
        except TimeoutError:
            answer = _failed(f"dns: cannot resolve {host}: no answer within dns_timeout={s.dns_timeout:g}s")
        self._addresses[host] = (time.monotonic() + s.dns_cache_seconds, answer)
        return answer

    def _opt_out(self, values: list[str]) -> str | None:
        """The first opt-out directive addressed to all robots or to our token."""
        token = self.settings.user_agent_token.lower()
        for value in values:
            for part in value.split(","):
                directive = part.strip().lower()
                agent, sep, rest = directive.partition(":")
                if sep:
                    if agent.strip() not in (token, "*"):
                        continue
                    directive = rest.strip()
                if directive in self.settings.opt_out_directives:
                    return directive
        return None

    def _site_file(
        self, path: str, parts: SplitResult, load: Callable[[str], Awaitable[T]]
    ) -> asyncio.Future[T]:
        """`load(origin)`, started once per site: the other requests that need it wait for the first one's
        (through `asyncio.shield`, so that one request's cancellation does not cancel it for the rest)."""
        origin = f"{parts.scheme}://{parts.netloc}"
        if (path, origin) not in self._site_files:
            self._site_files[(path, origin)] = asyncio.ensure_future(load(origin))
        return self._site_files[(path, origin)]

    async def _robots_refusal(self, parts: SplitResult, url: str) -> str | None:
        """Why robots.txt keeps us from `url`, or None when it allows it."""
        robots = await asyncio.shield(self._site_file("/robots.txt", parts, self._load_robots))
        if isinstance(robots, str):
            return robots
        if robots is None or robots.can_fetch(self.settings.user_agent_token, url):
            return None
        return f"robots.txt: disallows {parts.path or '/'} for {self.settings.user_agent_token}"

    async def _load_tdmrep(self, origin: str) -> list[tdmrep.TdmRule]:
        """The site's TDMRep rules; none when it has no readable file (TDMRep then leaves the header)."""
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            fetched = await self._follow(f"{origin}{tdmrep.WELL_KNOWN_PATH}", deadline, image=False)
        except (_Retryable, _FetchFailed):
            return []
        return tdmrep.parse_rules(fetched.body) if fetched.status == schemas.SUCCESS else []

    async def _load_robots(self, origin: str) -> RobotFileParser | str | None:
        """The parsed robots.txt; None (allow all) when there is none (4xx) or it cannot be parsed; the
        refusal of every path when it is unreachable (5xx, 429, timeouts and broken connections), as
        RFC 9309 (2.3.1.4) requires."""
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            fetched = await self._follow(f"{origin}/robots.txt", deadline, image=False)
        except _Retryable as exc:
            return f"robots.txt unreachable ({exc}): every path disallowed (RFC 9309)"
        except _FetchFailed:
            return None
        if fetched.status != schemas.SUCCESS:
            return None
        parser = RobotFileParser()
        parser.parse(fetched.body.decode("utf-8", errors="replace").splitlines())
        return parser


def fetch_one(url: str, settings: FetchSettings) -> Fetched:
    """`url` fetched on an event loop of its own (the service's, per query image): no host cache outlives
    the call."""

    async def fetched() -> Fetched:
        async with Fetcher(settings) as fetcher:
            return await fetcher.fetch(url, time.monotonic() + settings.request_timeout)

    return asyncio.run(fetched())


def _address_refusal(host: str) -> Address:
    """Refuses a host that does not resolve or resolves to a non-public address (private, loopback, ...).

    Otherwise the address to connect to, all of them vetted: the first IPv4 one if there is one (a
    crawler's machine without an IPv6 route would otherwise fail every dual-stack host whose resolver
    lists IPv6 first, since only this one address is tried), else the first. None for a public IP
    literal, which has no name to resolve again.
    """
    addresses = _addresses(host)
    if isinstance(addresses, Fetched):
        return addresses
    for address in addresses:
        if not _is_public(address):
            error = f"private address: {host} resolves to {address} (set allow_private_networks to fetch it)"
            return Fetched(schemas.BLOCKED, error=error)
    return None if _is_ip_literal(host) else _preferred(addresses)


def _any_address(host: str) -> Address:
    """The address to connect to, private ones allowed (allow_private_networks), as `_address_refusal`
    picks it; a refusal only when the host does not resolve."""
    if _is_ip_literal(host):
        return None
    addresses = _addresses(host)
    return addresses if isinstance(addresses, Fetched) else _preferred(addresses)


def _addresses(host: str) -> Fetched | list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        return _failed(f"dns: cannot resolve {host}: {exc}")
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        addresses.append(address)
    return addresses or _failed(f"dns: cannot resolve {host}: no addresses")


def _preferred(addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    return str(min(addresses, key=lambda address: address.version))


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_global and not address.is_multicast


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _tdm_refusal(rules: list[tdmrep.TdmRule], path: str) -> Fetched | None:
    refusal = tdmrep.reservation(rules, path)
    return Fetched(schemas.OPTED_OUT, error=refusal) if refusal else None


def _path_and_query(parts: SplitResult) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's wait in seconds (delay-seconds or an HTTP date); None when absent or
    unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reason(exc: Exception) -> str:
    return (str(exc) or type(exc).__name__)[:300]
