"""Fetching one image URL: bounded in time and bytes, polite, and refusing private networks.

Redirects are followed here, not by urllib3, so that every hop passes the same address guard
and robots check. The guard resolves a host once and the connection goes to the address it vetted,
not to the name, which would be resolved again and could answer a private address the second time
(DNS rebinding). Every request has a total deadline on top of the per-read timeout, so a server
that drips one byte at a time cannot hold a worker longer than `request_timeout`.
"""

from __future__ import annotations

import email.utils
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit
from urllib.robotparser import RobotFileParser

import urllib3
from urllib3.connection import port_by_scheme
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import Url, parse_url

from laion_assets.pipeline import schemas, tdmrep

T = TypeVar("T")
_REDIRECTS = {301, 302, 303, 307, 308}
_NOT_IMAGE_TYPES = (
    "text/",
    "application/json",
    "application/xml",
    "application/xhtml",
    "application/javascript",
)
_ROBOTS_MAX_BYTES = 512 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0  # per read from the socket
    request_timeout: float = 30.0  # whole request, redirects and body included
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    retries: int = 2  # extra attempts after timeouts, resets, 429 and 5xx
    retry_backoff: float = 0.5  # seconds, doubled at each attempt
    max_retry_after: float = 30.0  # a longer 429/503 Retry-After gives up at once
    per_host_connections: int = 8
    user_agent_token: str = "laion_assets"
    respect_robots_txt: bool = False
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # W3C TDMRep: a `tdm-reservation: 1` response header, or a rule of the site's tdmrep.json, opts out
    respect_tdm_reservation: bool = True
    allow_private_networks: bool = False


@dataclass(frozen=True)
class Fetched:
    status: str  # success | failed_to_download | failed_to_decode | opted_out | blocked
    body: bytes | None = None
    error: str | None = None
    http_status: int | None = None


class _Retryable(Exception):
    def __init__(self, message: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after


class _FetchFailed(Exception):
    """A request that cannot succeed on retry (malformed URL or response)."""


def _failed(error: str, http_status: int | None = None) -> Fetched:
    return Fetched(schemas.FAILED_TO_DOWNLOAD, error=error, http_status=http_status)


class Fetcher:
    """Thread-safe: one per shard, shared by the worker threads."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self.user_agent = f"Mozilla/5.0 (compatible; {settings.user_agent_token}; image-text dataset builder)"
        self.http = urllib3.PoolManager(
            num_pools=256,
            maxsize=settings.per_host_connections,
            block=False,
            retries=False,
            headers={"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.5"},
        )
        self._guard_cache: dict[str, Fetched | str | None] = {}  # host → refusal or vetted address
        # per (file, origin): robots.txt (RobotFileParser, None, or why every path is refused), tdmrep.json
        self._site_files: dict[tuple[str, str], object] = {}
        self._site_locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def fetch(self, url: str, deadline: float) -> Fetched:
        """GET `url`, retrying transient failures, and never past `deadline` (time.monotonic)."""
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                return self._follow(url, deadline, image=True)
            except _FetchFailed as exc:
                return _failed(str(exc))
            except _Retryable as exc:
                wait = exc.retry_after if exc.retry_after is not None else s.retry_backoff * 2**attempt
                tries = f" (gave up after {attempt + 1} attempts)" if attempt else ""
                if exc.retry_after is not None and wait > s.max_retry_after:
                    tries = f" (Retry-After {wait:g}s is over max_retry_after={s.max_retry_after:g}s)"
                    return _failed(f"{exc}{tries}", exc.http_status)
                if attempt == s.retries or time.monotonic() + wait >= deadline:
                    return _failed(f"{exc}{tries}", exc.http_status)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _follow(self, url: str, deadline: float, image: bool) -> Fetched:
        deadline = min(deadline, time.monotonic() + self.settings.request_timeout)
        visited = set()
        for _ in range(self.settings.max_redirects + 1):
            refusal, address = self._vet(url, check_site_rules=image)
            if refusal:
                return refusal
            visited.add(url)
            response = self._get(url, address, deadline)
            reusable = False
            try:
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
                fetched = self._read(response, deadline, image)
                reusable = fetched.status == schemas.SUCCESS  # only then was the body read to its end
                return fetched
            finally:
                if not reusable:
                    response.close()  # unread bytes left: the connection cannot be reused
                response.release_conn()
        return _failed(f"too many redirects: more than max_redirects={self.settings.max_redirects}")

    def _get(self, url: str, address: str | None, deadline: float) -> urllib3.BaseHTTPResponse:
        """GET `url` from `address` (the host's vetted address), or by name when `address` is None."""
        s = self.settings
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retryable(f"timeout: no time left of request_timeout={s.request_timeout:g}s")
        timeout = urllib3.Timeout(
            connect=min(s.connect_timeout, remaining), read=min(s.read_timeout, remaining)
        )
        try:
            if address is None:
                return self.http.request("GET", url, redirect=False, preload_content=False, timeout=timeout)
            return self._get_from(address, parse_url(url), timeout)
        except ConnectTimeoutError as exc:
            raise _Retryable(f"timeout: no connection within {timeout.connect_timeout:g}s") from exc
        except ReadTimeoutError as exc:
            raise _Retryable(f"timeout: no response within {timeout.read_timeout:g}s") from exc
        except NewConnectionError as exc:
            raise _Retryable(f"connection failed: {_reason(exc)}") from exc
        except ProtocolError as exc:
            raise _Retryable(f"connection broken: {_reason(exc)}") from exc
        except HTTPError as exc:  # malformed URL or response: retrying will not help
            raise _FetchFailed(f"request failed: {_reason(exc)}") from exc

    def _get_from(self, address: str, url: Url, timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
        """The request urllib3 makes for `url`, connected to `address` instead of the name it would resolve.

        The Host header, and for https the SNI and the certificate check (server_hostname), go by the
        URL's name. server_hostname is in the pool's key even for http, so each (scheme, address, port,
        name) has its own pool of kept-alive connections, `per_host_connections` of them, as each host
        had when connecting by name; hosts that share an address do not share a pool.
        """
        pool = self.http.connection_from_host(
            f"[{address}]" if ":" in address else address,
            port=url.port,
            scheme=url.scheme,
            pool_kwargs={"server_hostname": url.host.rstrip(".")},
        )
        return pool.urlopen(
            "GET",
            url.request_uri,
            headers={**self.http.headers, "Host": _host_header(url)},
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            timeout=timeout,
        )

    def _read(self, response: urllib3.BaseHTTPResponse, deadline: float, image: bool) -> Fetched:
        s, status = self.settings, response.status
        if status == 429 or status >= 500:
            retry_after = (
                retry_after_seconds(response.headers.get("Retry-After")) if status in (429, 503) else None
            )
            raise _Retryable(f"HTTP {status}: {response.reason}", status, retry_after)
        if status != 200:
            return _failed(f"HTTP {status}: {response.reason}", status)
        if image:
            directive = self._opt_out(response.headers.getlist("X-Robots-Tag"))
            if directive:
                return Fetched(schemas.OPTED_OUT, error=f"X-Robots-Tag: {directive}", http_status=status)
            if s.respect_tdm_reservation and response.headers.get("tdm-reservation", "").strip() == "1":
                return Fetched(schemas.OPTED_OUT, error="tdm-reservation: 1 (TDMRep)", http_status=status)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type.startswith(_NOT_IMAGE_TYPES):
                error = f"not an image: content type {content_type}"
                return Fetched(schemas.FAILED_TO_DECODE, error=error, http_status=status)
        limit = s.max_bytes if image else _ROBOTS_MAX_BYTES
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            return _failed(f"too large: Content-Length {declared} is over max_bytes={limit}", status)
        body = bytearray()
        try:
            # read1 returns after one socket read: a dripping body cannot outlast the deadline
            while chunk := response.read1(_CHUNK):
                body += chunk
                if len(body) > limit:
                    return _failed(f"too large: body is over max_bytes={limit}", status)
                if time.monotonic() > deadline:
                    raise _Retryable(
                        f"timeout: body not complete within request_timeout={s.request_timeout:g}s"
                    )
        except ReadTimeoutError as exc:
            raise _Retryable(f"timeout: body stalled for {s.read_timeout:g}s", status) from exc
        except ProtocolError as exc:
            raise _Retryable(f"connection broken: {_reason(exc)}", status) from exc
        return Fetched(schemas.SUCCESS, body=bytes(body), http_status=status)

    def _vet(self, url: str, check_site_rules: bool) -> tuple[Fetched | None, str | None]:
        """A refusal, or None and the address to connect to (None: connect by name, nothing to pin)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return _failed(f"unsupported URL: {url[:200]}"), None
        address = None
        if not self.settings.allow_private_networks:
            # A race only resolves a host twice; each thread connects to the address it read here.
            if parts.hostname not in self._guard_cache:
                self._guard_cache[parts.hostname] = _address_refusal(parts.hostname)
            guard = self._guard_cache[parts.hostname]
            if isinstance(guard, Fetched):
                return guard, None
            address = guard
        if check_site_rules and self.settings.respect_robots_txt:
            refusal = self._robots_refusal(parts, url)
            if refusal:
                return Fetched(schemas.OPTED_OUT, error=refusal), None
        if check_site_rules and self.settings.respect_tdm_reservation:
            rules = self._site_file(tdmrep.WELL_KNOWN_PATH, parts, self._load_tdmrep)
            refusal = tdmrep.reservation(rules, _path_and_query(parts))
            if refusal:
                return Fetched(schemas.OPTED_OUT, error=refusal), None
        return None, address

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

    def _site_file(self, path: str, parts: SplitResult, load: Callable[[str], T]) -> T:
        """`load(origin)`, once per site: the other threads that need it wait for the first one."""
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            lock = self._site_locks.setdefault((path, origin), threading.Lock())
        with lock:
            if (path, origin) not in self._site_files:
                self._site_files[(path, origin)] = load(origin)
        return self._site_files[(path, origin)]

    def _robots_refusal(self, parts: SplitResult, url: str) -> str | None:
        """Why robots.txt keeps us from `url`, or None when it allows it."""
        robots = self._site_file("/robots.txt", parts, self._load_robots)
        if isinstance(robots, str):
            return robots
        if robots is None or robots.can_fetch(self.settings.user_agent_token, url):
            return None
        return f"robots.txt: disallows {parts.path or '/'} for {self.settings.user_agent_token}"

    def _load_tdmrep(self, origin: str) -> list[tdmrep.TdmRule]:
        """The site's TDMRep rules; none when it has no readable file (TDMRep then leaves the header)."""
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            fetched = self._follow(f"{origin}{tdmrep.WELL_KNOWN_PATH}", deadline, image=False)
        except (_Retryable, _FetchFailed):
            return []
        return tdmrep.parse_rules(fetched.body) if fetched.status == schemas.SUCCESS else []

    def _load_robots(self, origin: str) -> RobotFileParser | str | None:
        """The parsed robots.txt; None (allow all) when there is none (4xx) or it cannot be parsed; the
        refusal of every path when it is unreachable (5xx, 429, timeouts and broken connections, after
        the retries), as RFC 9309 (2.3.1.4) requires."""
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            fetched = self._follow(f"{origin}/robots.txt", deadline, image=False)
        except _Retryable as exc:
            return f"robots.txt unreachable ({exc}): every path disallowed (RFC 9309)"
        except _FetchFailed:
            return None
        if fetched.status != schemas.SUCCESS:
            return None
        parser = RobotFileParser()
        parser.parse(fetched.body.decode("utf-8", errors="replace").splitlines())
        return parser


def _address_refusal(host: str) -> Fetched | str | None:
    """Refuses a host that does not resolve or resolves to a non-public address (private, loopback, ...).

    Otherwise the address to connect to, all of them vetted: the first IPv4 one if there is one (a
    crawler's machine without an IPv6 route would otherwise fail every dual-stack host whose resolver
    lists IPv6 first, since only this one address is tried), else the first. None for a public IP
    literal, which has no name to resolve again.
    """
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        return _failed(f"dns: cannot resolve {host}: {exc}")
    vetted = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not _is_public(address):
            error = f"private address: {host} resolves to {address} (set allow_private_networks to fetch it)"
            return Fetched(schemas.BLOCKED, error=error)
        vetted.append(str(address))
    if not vetted:
        return _failed(f"dns: cannot resolve {host}: no addresses")
    return None if _is_ip_literal(host) else min(vetted, key=lambda a: ":" in a)


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_global and not address.is_multicast


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _path_and_query(parts: SplitResult) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _host_header(url: Url) -> str:
    """The Host header urllib3 sends when it connects by name: no trailing dot, no default port."""
    host = url.host.rstrip(".")
    return host if url.port in (None, port_by_scheme.get(url.scheme)) else f"{host}:{url.port}"


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
    reason = getattr(exc, "reason", None) or (exc.args[0] if exc.args else exc)
    return str(reason)[:300]
