"""Fetching image URLs: many at once on one event loop, bounded in time and bytes, polite, and refusing
private networks.

A request that waits on a slow or silent server costs a socket and a coroutine, not a thread, so a
worker keeps hundreds of requests in flight. Redirects are followed here, so that every hop passes the
same address guard and robots check. A host is resolved once, by c-ares (`aiodns`: on the event loop,
where the system's getaddrinfo would take a thread, and with the answer's TTL), in a bounded number of
lookups at a time, and its answer kept for that TTL (`_dns_seconds`). The connection goes to the
address the guard vetted (`http.py`), never to an address a second lookup could answer (DNS
rebinding); the Host header and, for https, the TLS server name and certificate check go by the URL's
name. Every request has a total deadline on top of the per-read timeout, so a server that drips one
byte at a time cannot hold a request longer than `request_timeout`.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import ipaddress
import math
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit

import aiodns

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download import http, robots, tdmrep

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
# X-Robots-Tag: the directives written `name: value`, whose name is no user agent (nor is a date's part
# after its comma, which has a space)
_VALUED_DIRECTIVES = ("max-snippet", "max-image-preview", "max-video-preview", "unavailable_after")
_AGENT = re.compile(r"[a-z0-9_*-]+")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215: a network's own NAT64 prefix, whose addresses reach IPv4 ones inside it (Python calls it
# global before 3.12.4)
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
# s: the least time an answer is kept. A TTL of 0 (or an /etc/hosts entry, which c-ares reports as 0)
# would otherwise cost a lookup per request to the host
_DNS_MIN_SECONDS = 1.0


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
    # how long a failure to resolve is kept, and the longest an answer is (its TTL, if shorter; past this,
    # within the TTL, c-ares answers from its own cache without a query)
    dns_cache_seconds: float = 300.0
    dns_lookups: int = 32  # resolutions in flight at once
    # the DNS servers to ask, "address" or "address:port" (a local caching resolver, at scale); empty: the
    # system's (/etc/resolv.conf). /etc/hosts is read first either way
    dns_servers: tuple[str, ...] = ()


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


# A host's answer: a refusal, or the vetted address to connect to (an IP literal's own)
Address = Fetched | str
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class HostAnswer:
    expiry: float  # time.monotonic() when it is to be looked up again
    address: Address


class Fetcher:
    """One per event loop: `async with Fetcher(settings) as fetcher`, then `await fetcher.fetch(...)` from
    as many tasks as wanted."""

    def __init__(self, settings: FetchSettings, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.user_agent = f"Mozilla/5.0 (compatible; {settings.user_agent_token}; image-text dataset builder)"
        # as the header's are read, and img2dataset reads its `disallowed_header_directives`
        self._opt_out_directives = frozenset(d.strip().lower() for d in settings.opt_out_directives)
        self._addresses: dict[str, HostAnswer] = {}
        self._resolving: dict[str, asyncio.Future[Address]] = {}
        self._resolver: aiodns.DNSResolver | None = None  # made on the first lookup, on the running loop
        self._lookup_slots = asyncio.Semaphore(settings.dns_lookups)
        # per (file, origin): robots.txt (robots.Robots, None, or why every path is refused), tdmrep.json
        self._site_files: dict[tuple[str, str], asyncio.Future[Any]] = {}
        # the caller bounds requests in flight, and per host
        headers = {"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.5"}
        self._connections = http.ConnectionPool(headers, ssl_context)

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._connections.close()
        if self._resolver is not None:
            await self._resolver.close()

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
            vetted = await self._vet(url, check_site_rules=image, unvetted=unvetted)
            if isinstance(vetted, Fetched):
                return vetted
            visited.add(url)
            async with await self._get(url, vetted, deadline, image) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        return _failed(
                            f"HTTP {response.status}: redirect without a Location", response.status
                        )
                    try:
                        url = urljoin(url, _utf8(location).strip())
                    except ValueError as exc:
                        error = f"HTTP {response.status}: malformed redirect ({exc}): {location[:200]}"
                        return _failed(error, response.status)
                    if url in visited:
                        return _failed(f"redirect loop: back to {url}", response.status)
                    continue
                return await self._read(response, deadline, image)
        return _failed(f"too many redirects: more than max_redirects={self.settings.max_redirects}")

    async def _get(self, url: str, address: str, deadline: float, image: bool) -> http.Response:
        """The response to GET `url` from `address`, the one `_vet` passed (never looked up again: the
        answer may have expired, and changed, while the site's rules were read), its headers read, its
        body not yet."""
        s = self.settings
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retryable(f"timeout: no time left of request_timeout={s.request_timeout:g}s")
        connect, read = min(s.connect_timeout, remaining), min(s.read_timeout, remaining)
        parts = urlsplit(url)
        limit = self._body_limit(image)
        try:
            async with asyncio.timeout(remaining):
                return await self._connections.get(parts, address, connect, read, limit)
        except http.ConnectTimeout as exc:
            raise _Retryable(f"timeout: no connection within {connect:g}s (address {address})") from exc
        except (http.ReadTimeout, TimeoutError) as exc:
            raise _Retryable(f"timeout: no response within {read:g}s") from exc
        except http.TlsRefused as exc:  # a certificate refused: retrying will not help
            raise _FetchFailed(f"request failed: {_reason(exc)}") from exc
        except http.ConnectFailed as exc:
            raise _Retryable(f"connection failed: {_reason(exc)} (address {address})") from exc
        except http.ConnectionBroken as exc:
            raise _Retryable(f"connection broken: {_reason(exc)}") from exc
        except (http.BadResponse, ValueError, UnicodeError) as exc:  # malformed URL or response
            raise _FetchFailed(f"request failed: {_reason(exc)}") from exc

    def _body_limit(self, image: bool) -> int:
        """The bytes a body may hold: an image's `max_bytes`; of a robots.txt or tdmrep.json, the first
        512 KB are read (RFC 9309 asks robots.txt parsers for 500 KiB at least)."""
        return self.settings.max_bytes if image else _ROBOTS_MAX_BYTES

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
        if image and declared.isdigit() and int(declared) > limit:
            return _failed(f"too large: Content-Length {declared} is over max_bytes={limit}", status)
        try:
            # each read waits at most read_timeout (the connection's timer), the whole body until deadline
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                body = await response.read()
        except http.BodyTooLarge as exc:
            if not image:  # a site file: its whole lines within the limit, as RFC 9309 (2.5) reads robots.txt
                whole_lines = exc.first[: exc.first.rfind(b"\n") + 1]
                return Fetched(schemas.SUCCESS, body=whole_lines, http_status=status)
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

    async def _vet(self, url: str, check_site_rules: bool, unvetted: list[_Unvetted]) -> Fetched | str:
        """A refusal of `url`, or the address it may be fetched from, which the guard passed. A site's
        tdmrep.json that has not answered within `tdmrep_wait` goes on `unvetted`, for the caller to read
        once the request is done."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # an unclosed "[" of an IPv6 address, among others
            return _failed(f"malformed URL ({exc}): {url[:200]}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return _failed(f"unsupported URL: {url[:200]}")
        address = await self.resolve(parts.hostname)
        if isinstance(address, Fetched):
            return address
        if check_site_rules and self.settings.respect_robots_txt:
            refusal = await self._robots_refusal(parts)
            if refusal:
                return Fetched(schemas.OPTED_OUT, error=refusal)
        if check_site_rules and self.settings.respect_tdm_reservation:
            rules = self._site_file(tdmrep.WELL_KNOWN_PATH, parts, self._load_tdmrep)
            if not rules.done():
                try:
                    await asyncio.wait_for(asyncio.shield(rules), self.settings.tdmrep_wait)
                except TimeoutError:
                    unvetted.append((rules, _path_and_query(parts)))
                    return address
            return _tdm_refusal(rules.result(), _path_and_query(parts)) or address
        return address

    @staticmethod
    async def _reservation(unvetted: list[_Unvetted]) -> Fetched | None:
        """The refusal of the first reservation among the site files a request went ahead of."""
        for rules, path in unvetted:
            if refusal := _tdm_refusal(await asyncio.shield(rules), path):
                return refusal
        return None

    def remember(self, answers: dict[str, HostAnswer]) -> None:
        """Hosts' answers looked up elsewhere (on this machine: their expiry is `time.monotonic()`'s)."""
        for host, answer in answers.items():
            self._addresses[host.rstrip(".").lower()] = answer

    def answers(self, hosts: Iterable[str]) -> dict[str, HostAnswer]:
        """The kept answers of `hosts` (resolved), for another Fetcher to `remember`."""
        return {host: self._addresses[host.rstrip(".").lower()] for host in hosts}

    def kept(self, host: str) -> bool:
        """Whether `host`'s answer is kept and fresh: `resolve` gives it at once."""
        cached = self._addresses.get(host.rstrip(".").lower())
        return cached is not None and cached.expiry > time.monotonic()

    async def resolve(self, host: str) -> Address:
        """`host`'s answer, from the cache while it is fresh; one lookup at a time per host, `dns_lookups`
        in all, each bounded by `dns_timeout`."""
        host = host.rstrip(".").lower()
        if self.kept(host):
            return self._addresses[host].address
        lookup = self._resolving.get(host)
        if lookup is None or lookup.done():  # done: its waiters were all cancelled, and it is stale
            lookup = self._resolving[host] = asyncio.ensure_future(self._lookup(host))
        try:
            return await asyncio.shield(lookup)
        finally:
            if lookup.done() and self._resolving.get(host) is lookup:  # not where this waiter was cancelled
                del self._resolving[host]

    async def _lookup(self, host: str) -> Address:
        if _is_ip_literal(host):
            answer = _vetted(host, [_address(host)], self.settings.allow_private_networks)
            self._addresses[host] = HostAnswer(math.inf, answer)
            return answer
        async with self._lookup_slots:  # the wait for a slot is not the host's: its timeout starts after
            answer, seconds = await self._query(host)
        self._addresses[host] = HostAnswer(time.monotonic() + seconds, answer)
        return answer

    async def _query(self, host: str) -> tuple[Address, float]:
        """`host`'s answer from DNS and how long to keep it (a failure: `dns_cache_seconds`)."""
        s = self.settings
        try:
            name = http.ascii_host(host)  # as Host and TLS name it (c-ares would encode by other rules)
            async with asyncio.timeout(s.dns_timeout):
                result = await self._dns().getaddrinfo(name, proto=socket.IPPROTO_TCP)
        except ValueError as exc:  # idna.IDNAError: a name IDNA forbids
            error = f"not a valid host name ({exc})"
        except TimeoutError:
            error = f"no answer within dns_timeout={s.dns_timeout:g}s"
        except aiodns.error.DNSError as exc:
            error = str(exc.args[-1])
        else:
            addresses = [_address(node.addr[0]) for node in result.nodes]
            if addresses:
                seconds = _dns_seconds(result, s.dns_cache_seconds)
                return _vetted(host, addresses, s.allow_private_networks), seconds
            error = "no addresses"
        return _failed(f"dns: cannot resolve {host}: {error}"), s.dns_cache_seconds

    def _dns(self) -> aiodns.DNSResolver:
        if self._resolver is None:
            servers = list(self.settings.dns_servers) or None
            self._resolver = aiodns.DNSResolver(nameservers=servers)
        return self._resolver

    def _opt_out(self, values: list[str]) -> str | None:
        """The first opt-out directive addressed to all robots or to our token: a header's directives are
        for all robots until a `user-agent:` prefix, whose agent's they are until the next one."""
        token = self.settings.user_agent_token.lower()
        for value in values:
            ours = True
            for part in value.split(","):
                directive = part.strip().lower()
                agent, sep, rest = directive.partition(":")
                agent = agent.strip()
                if sep and agent not in _VALUED_DIRECTIVES and _AGENT.fullmatch(agent):
                    ours, directive = agent in (token, "*"), rest.strip()
                if ours and directive in self._opt_out_directives:
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

    async def _robots_refusal(self, parts: SplitResult) -> str | None:
        """Why robots.txt keeps us from the URL of `parts`, or None when it allows it."""
        rules = await asyncio.shield(self._site_file("/robots.txt", parts, self._load_robots))
        if isinstance(rules, str):
            return rules
        if rules is None or rules.allows(self.settings.user_agent_token, _path_and_query(parts)):
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

    async def _load_robots(self, origin: str) -> robots.Robots | str | None:
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
        return robots.parse(fetched.body)


def fetch_one(url: str, settings: FetchSettings) -> Fetched:
    """`url` fetched on an event loop of its own (the service's, per query image): no host cache outlives
    the call."""

    async def fetched() -> Fetched:
        async with Fetcher(settings) as fetcher:
            return await fetcher.fetch(url, time.monotonic() + settings.request_timeout)

    return asyncio.run(fetched())


def _vetted(host: str, addresses: list[IPAddress], allow_private: bool) -> Address:
    """The address to connect to of those `host` resolves to, or why it is refused: without
    `allow_private`, if any of them is not public (private, loopback, ...).

    The first IPv4 one if there is one (a crawler's machine without an IPv6 route would otherwise fail
    every dual-stack host whose resolver lists IPv6 first, since only this one address is tried), else the
    first; an IP literal's own address.
    """
    if not allow_private:
        for address in addresses:
            if not _is_public(address):
                why = (
                    f"private address: {host} resolves to {address} (set allow_private_networks to fetch it)"
                )
                return Fetched(schemas.BLOCKED, error=why)
    return _preferred(addresses)


def _address(text: str | bytes) -> IPAddress:
    """An address as a resolver gives it (bytes from c-ares; a scope after %), IPv4-mapped ones as IPv4."""
    address = ipaddress.ip_address((text.decode() if isinstance(text, bytes) else text).split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _dns_seconds(result: Any, most: float) -> float:
    """How long an answer (c-ares' getaddrinfo result) is kept: the shortest TTL of its addresses and the
    CNAMEs that led to them, at least `_DNS_MIN_SECONDS` and at most `most` (dns_cache_seconds)."""
    ttls = [node.ttl for node in result.nodes] + [cname.ttl for cname in result.cnames]
    return min(most, max(_DNS_MIN_SECONDS, min(ttls, default=0)))


def _preferred(addresses: list[IPAddress]) -> str:
    return str(min(addresses, key=lambda address: address.version))


def _is_public(address: IPAddress) -> bool:
    """Global and not multicast; an IPv6 address that carries an IPv4 one, which a gateway delivers to
    (`_embedded_ipv4`), only where that one is public too: Python calls 64:ff9b::a00:1 global, and on a
    NAT64 network it reaches 10.0.0.1. None of a local-use NAT64 prefix, whatever it carries."""
    embedded = _embedded_ipv4(address)
    if embedded is not None and not _is_public(embedded):
        return False
    if address in _LOCAL_NAT64:
        return False
    return address.is_global and not address.is_multicast


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv6 one of NAT64's well-known prefix (RFC 6052), 6to4's (RFC 3056)
    or the deprecated IPv4-compatible form (::a.b.c.d); None for any other."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64 or int(address) >> 32 == 0:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


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
    delay = value.strip()
    if delay.isascii() and delay.isdigit():  # isdigit() alone passes "¹", which float() refuses
        return float(delay)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # asctime's form, or "-0000": an HTTP date is GMT, whatever this zone
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _utf8(header: str) -> str:
    """A header value as UTF-8 where its bytes are (http.py reads headers as latin-1): servers send a
    Location's non-ASCII path as raw UTF-8, which browsers and curl read so."""
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return header


def _reason(exc: Exception) -> str:
    return (str(exc) or type(exc).__name__)[:300]
