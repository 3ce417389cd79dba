"""Host names: each looked up once and its answer kept for its TTL, and DNS rebinding, a name that
answers a public address to the guard and 127.0.0.1 to the connection.

The names are a DNS server's on loopback (dns_server.py), which the fetcher asks (`dns_servers`), and
which counts their lookups. Nothing public can be reached from here, so a connection to the public
answer fails, its error naming that address; the point is that none goes to the loopback web server
instead, and that a name is looked up once. Where a test needs a name that resolves and is fetched, the
loopback server stands in for a public one: 127.0.0.1 counts as public there.
"""

import asyncio
import datetime
import io
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from laion_assets.pipeline import schemas
from laion_assets.pipeline.download import downloader as download
from laion_assets.pipeline.download import fetch
from laion_assets.pipeline.download.downloader import download_shard
from laion_assets.pipeline.download.fetch import Fetcher, FetchSettings
from laion_assets.pipeline.parallel import pipelined
from laion_assets.service.inputs import InputError, fetch_image
from laion_assets_tests.dns_server import DnsServer, Name
from laion_assets_tests.test_download import FAST, crawl_table, run
from laion_assets_tests.web import JPEG

PUBLIC = "1.2.3.4"  # a global unicast address, unreachable from here
# TDMRep off: its site file would be one more connection to count, beside the image's own
GUARDED = replace(
    FAST,
    allow_private_networks=False,
    connect_timeout=0.5,
    retries=0,
    processes=1,
    respect_tdm_reservation=False,
)
FETCH = FetchSettings(
    connect_timeout=0.5, read_timeout=2, request_timeout=3, retries=0, respect_tdm_reservation=False
)
UNREACHABLE = ("connection failed", "timeout: no connection")


NAMES = {
    "rebind.example": Name([PUBLIC], then=["127.0.0.1"]),
    "images.example": Name(["127.0.0.1"]),
    "other.example": Name(["127.0.0.1"]),
    "dual.example": Name(["2606:4700::1", PUBLIC]),
    "v6only.example": Name(["2606:4700::1"]),
    # an answer kept 1 s, then a private one: a lookup after the guard's would be refused
    "expiring.example": Name(["127.0.0.1"], ttl=1, then=["10.0.0.1"]),
}


@pytest.fixture
def resolver() -> Iterator[DnsServer]:
    with DnsServer(NAMES) as server:
        yield server


def asking(settings: FetchSettings, dns: DnsServer, **changes) -> FetchSettings:
    """`settings` with `dns` as their DNS server."""
    return replace(settings, dns_servers=(dns.server,), **changes)


@pytest.fixture
def loopback_is_public(monkeypatch) -> None:
    """The loopback web server stands in for a public one."""
    real = fetch._is_public
    monkeypatch.setattr(fetch, "_is_public", lambda address: str(address) == "127.0.0.1" or real(address))


def test_a_name_that_rebinds_to_loopback_is_not_fetched(web, resolver):
    url = f"http://rebind.example:{web.port}/img/red.jpg"
    _, _, rows = run([url], asking(GUARDED, resolver))
    assert rows[url]["status"] == schemas.FAILED_TO_DOWNLOAD
    assert rows[url]["error_message"].startswith(UNREACHABLE), rows[url]["error_message"]
    assert sum(web.hits.values()) == 0  # nothing reached the loopback server
    assert resolver.lookups["rebind.example"] == 1  # resolved once, by the guard
    assert f"(address {PUBLIC})" in rows[url]["error_message"]  # the connection went to the vetted address


def test_a_redirect_to_a_name_that_rebinds_is_not_followed_to_loopback(web, resolver, loopback_is_public):
    # the first hop is the loopback server standing in for a public one, as in test_download.py; were
    # rebind.example looked up again, its 127.0.0.1 would pass the guard too, and the lookups say so
    first = web.url(f"/redirect?to=http://rebind.example:{web.port}/img/red.jpg")
    _, _, rows = run([first], asking(GUARDED, resolver))
    assert rows[first]["status"] == schemas.FAILED_TO_DOWNLOAD
    assert rows[first]["error_message"].startswith(UNREACHABLE), rows[first]["error_message"]
    assert web.hits[first.removeprefix(web.url(""))] == 1
    assert web.hits["/img/red.jpg"] == 0  # the second hop did not reach the loopback server
    assert f"(address {PUBLIC})" in rows[first]["error_message"]
    assert resolver.lookups["rebind.example"] == 1


def test_the_service_does_not_fetch_a_name_that_rebinds(web, resolver):
    url = f"http://rebind.example:{web.port}/img/red.jpg"
    with pytest.raises(InputError) as raised:
        fetch_image("image", url, asking(FETCH, resolver))
    assert raised.value.status == 400
    assert raised.value.reason.startswith(f"image: cannot fetch {url}: {UNREACHABLE[0]}") or (
        raised.value.reason.startswith(f"image: cannot fetch {url}: {UNREACHABLE[1]}")
    )
    assert sum(web.hits.values()) == 0
    assert f"(address {PUBLIC})" in raised.value.reason


def fetch_in_turn(urls: list[str], settings: FetchSettings = FETCH, **fetcher_options) -> list[fetch.Fetched]:
    """Each URL fetched after the last, by one Fetcher (its host cache and kept-alive connections)."""

    async def fetched() -> list[fetch.Fetched]:
        async with Fetcher(settings, **fetcher_options) as fetcher:
            return [await fetcher.fetch(url, deadline=float("inf")) for url in urls]

    return asyncio.run(fetched())


def test_a_name_is_fetched_from_its_vetted_address_with_its_host_header(web, resolver, loopback_is_public):
    paths = ["/img/red.jpg", "/img/green.png", "/up/1", "/up/2"]
    # a redirect hop to another name is resolved and vetted on its own
    hop = f"http://images.example:{web.port}/redirect?to=http://other.example:{web.port}/up/3"
    urls = [f"http://images.example:{web.port}{path}" for path in paths] + [hop]
    results = fetch_in_turn(urls, asking(FETCH, resolver))
    assert [r.status for r in results] == [schemas.SUCCESS] * 5, results
    for path in paths:
        assert web.hosts[path] == f"images.example:{web.port}"
    assert web.hosts["/up/3"] == f"other.example:{web.port}"
    # each name looked up once, by the guard, never again to connect
    assert resolver.lookups == {"images.example": 1, "other.example": 1}
    # one kept-alive connection for images.example, one of its own for other.example
    assert len(web.connections) == 2


@pytest.mark.parametrize(
    ("name", "host"),
    [("images.example", "images.example"), ("Images.Example.", "images.example")],
)
def test_the_host_header_is_the_urls_name_without_its_trailing_dot(
    web, resolver, loopback_is_public, name, host
):
    [fetched] = fetch_in_turn([f"http://{name}:{web.port}/up/9"], asking(FETCH, resolver))
    assert fetched.status == schemas.SUCCESS, fetched
    assert web.hosts["/up/9"] == f"{host}:{web.port}"


def test_the_connection_goes_to_the_address_the_guard_passed_after_its_answer_expired(
    web, resolver, loopback_is_public
):
    """The guard passes 127.0.0.1 (public here), then the request waits `tdmrep_wait` for the site's
    tdmrep.json (held until the image is asked), past the answer's TTL of 1 s, after which the name
    answers a private address. The connection still goes to the address the guard passed, with no
    second lookup: before, it looked the name up again, and the refusal sent the connection to whatever
    the system's resolver said the name was."""
    web.site_file_held_until = "/img/red.jpg"
    url = f"http://expiring.example:{web.port}/img/red.jpg"
    settings = asking(FETCH, resolver, respect_tdm_reservation=True, tdmrep_wait=1.5, request_timeout=5)
    [fetched] = fetch_in_turn([url], settings)
    assert fetched.status == schemas.SUCCESS, fetched
    assert web.hits["/img/red.jpg"] == 1
    assert web.hosts["/img/red.jpg"] == f"expiring.example:{web.port}"
    assert resolver.lookups["expiring.example"] == 1


def test_an_ip_literal_is_fetched_from_its_own_address():
    """A URL whose host is an address goes to that address: 127.0.0.2 here, where a server listens and
    127.0.0.1 has none (an address left out once reached the client as None, which asyncio took for
    localhost: 127.0.0.1 URLs worked by that chance, every other address was refused)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.2:{server.server_address[1]}/x.jpg"
        [fetched] = fetch_in_turn([url], replace(FETCH, allow_private_networks=True))
    finally:
        server.shutdown()
        server.server_close()
    assert fetched.status == schemas.SUCCESS, fetched
    assert fetched.body == JPEG


# HTTPS: the connection goes to the address, but TLS is with the name (SNI and the certificate check)


def _certificates(folder: Path, name: str) -> tuple[Path, Path]:
    """A CA certificate and a server certificate (with its key, in one file) for `name`, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        )
        if ca:
            usage = dict(digital_signature=True, key_cert_sign=True, crl_sign=True)
        else:
            usage = dict(digital_signature=True, key_cert_sign=False, crl_sign=False)
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), False)
        flags = dict(
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(x509.KeyUsage(**usage, **flags), critical=True)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("rebinding test CA", ca_key, "rebinding test CA", ca_key, ca=True)
    server = certificate(name, server_key, "rebinding test CA", ca_key, ca=False)
    ca_path, server_path = folder / "ca.pem", folder / "server.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server_path.write_bytes(server.public_bytes(serialization.Encoding.PEM) + key_pem)
    return ca_path, server_path


class TlsWeb:
    """An HTTPS server on 127.0.0.1 with a certificate for `name`; it records the SNI and Host it got."""

    def __init__(self, folder: Path, name: str) -> None:
        self.ca, certificate = _certificates(folder, name)
        self.server_names: list[str | None] = []
        self.hosts: list[str | None] = []
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                web.hosts.append(self.headers.get("Host"))
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(JPEG)))
                self.end_headers()
                self.wfile.write(JPEG)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate)
        context.sni_callback = lambda sock, server_name, ctx: self.server_names.append(server_name)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def tls_web(tmp_path) -> Iterator[TlsWeb]:
    pytest.importorskip("cryptography")
    server = TlsWeb(tmp_path, "images.example")
    yield server
    server.stop()


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_https_to_the_vetted_address_uses_the_name_for_tls(tls_web, resolver, loopback_is_public):
    url = f"https://images.example:{tls_web.port}/x.jpg"
    results = fetch_in_turn([url, url], asking(FETCH, resolver), ssl_context=_trusting(tls_web.ca))
    assert [r.status for r in results] == [schemas.SUCCESS] * 2, results
    assert tls_web.server_names == ["images.example"]  # one handshake: the connection was kept alive
    assert tls_web.hosts == [f"images.example:{tls_web.port}"] * 2
    assert resolver.lookups["images.example"] == 1


def test_https_checks_the_certificate_against_the_name_not_the_address(tls_web, resolver, loopback_is_public):
    url = f"https://other.example:{tls_web.port}/x.jpg"
    [fetched] = fetch_in_turn([url], asking(FETCH, resolver), ssl_context=_trusting(tls_web.ca))
    assert fetched.status == schemas.FAILED_TO_DOWNLOAD
    assert "other.example" in fetched.error and "certificate" in fetched.error.lower(), fetched.error
    assert tls_web.hosts == []


def resolved(names: list[str], settings: FetchSettings) -> list[fetch.Address]:
    """Each name's answer from one Fetcher."""

    async def answers() -> list[fetch.Address]:
        async with Fetcher(settings) as fetcher:
            return [await fetcher.resolve(name) for name in names]

    return asyncio.run(answers())


def test_an_ipv4_address_is_preferred_when_the_name_has_both(resolver):
    """Only one vetted address is tried, so it is the IPv4 one when there is one: a machine without an
    IPv6 route must still reach dual-stack hosts whose resolver lists IPv6 first."""
    answers = resolved(["dual.example", "v6only.example"], asking(FETCH, resolver))
    assert answers == [PUBLIC, "2606:4700::1"]
    v6_first = [ipaddress.ip_address("2606:4700::1"), ipaddress.ip_address(PUBLIC)]
    assert fetch._vetted("dual.example", v6_first, allow_private=False) == PUBLIC


def test_an_ipv6_address_carrying_a_private_ipv4_one_is_not_public():
    """NAT64's well-known prefix, 6to4 and the IPv4-compatible form carry an IPv4 address that a gateway
    delivers to: Python calls them global, so 64:ff9b::a00:1 (10.0.0.1 through NAT64) passed the guard."""
    for private in ("64:ff9b::a00:1", "64:ff9b::7f00:1", "2002:a00:1::1", "::10.0.0.1", "::127.0.0.1"):
        address = ipaddress.ip_address(private)
        vetted = fetch._vetted("carrier.example", [address], allow_private=False)
        assert isinstance(vetted, fetch.Fetched) and vetted.status == schemas.BLOCKED, private
        assert vetted.error.startswith(f"private address: carrier.example resolves to {address} ")
    for public in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1"):
        assert fetch._vetted("carrier.example", [ipaddress.ip_address(public)], allow_private=False) == public


def test_a_lookup_in_flight_is_shared_after_one_of_its_waiters_is_cancelled():
    """A request that gives up on a slow lookup (its deadline) leaves the lookup to the others: the next
    request for the host waits for it instead of starting a second one."""
    held = threading.Event()
    with DnsServer({"held.example": Name([PUBLIC], held=held)}) as dns:

        async def cancel_one_then_resolve() -> fetch.Address:
            async with Fetcher(asking(FETCH, dns)) as fetcher:
                first = asyncio.ensure_future(fetcher.resolve("held.example"))
                while not dns.lookups["held.example"]:
                    await asyncio.sleep(0.01)
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                second = asyncio.ensure_future(fetcher.resolve("held.example"))
                await asyncio.sleep(0.1)  # a second lookup, if one were made, is asked now
                held.set()
                return await second

        assert asyncio.run(cancel_one_then_resolve()) == PUBLIC
        assert dns.lookups["held.example"] == 1


# An answer is kept for its TTL


def test_an_answer_is_looked_up_again_once_its_ttl_has_passed(web, loopback_is_public):
    names = {"short.example": Name(["127.0.0.1"], ttl=1), "long.example": Name(["127.0.0.1"], ttl=300)}
    with DnsServer(names) as dns:
        settings = asking(FETCH, dns)
        urls = [f"http://{name}:{web.port}/up/1" for name in names]

        async def fetched() -> list[fetch.Fetched]:
            async with Fetcher(settings) as fetcher:
                first = [await fetcher.fetch(url, float("inf")) for url in urls]
                await asyncio.sleep(1.5)  # past short.example's TTL
                return first + [await fetcher.fetch(url, float("inf")) for url in urls]

        results = asyncio.run(fetched())
    assert [r.status for r in results] == [schemas.SUCCESS] * 4, results
    assert dns.lookups == {"short.example": 2, "long.example": 1}


def test_a_ttl_of_zero_is_not_a_lookup_per_request(web, loopback_is_public):
    with DnsServer({"zero.example": Name(["127.0.0.1"], ttl=0)}) as dns:
        urls = [f"http://zero.example:{web.port}/up/{i}" for i in range(5)]
        results = fetch_in_turn(urls, asking(FETCH, dns))
    assert [r.status for r in results] == [schemas.SUCCESS] * 5, results
    assert dns.lookups == {"zero.example": 1}  # kept `_DNS_MIN_SECONDS`, longer than these requests took


def test_worker_processes_keep_the_answers_of_the_steps_process(web, monkeypatch, loopback_is_public):
    """The step's process looks each host up and hands the workers its answers with their expiry, which
    they keep: no worker asks again within the TTL."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    with DnsServer({"images.example": Name(["127.0.0.1"], ttl=300)}) as dns:
        urls = [f"http://images.example:{web.port}/up/{i}" for i in range(12)]
        _, _, rows = run(urls, asking(GUARDED, dns, processes=2))
    assert {r["status"] for r in rows.values()} == {schemas.SUCCESS}
    assert dns.lookups == {"images.example": 1}


@pytest.mark.parametrize("processes", [1, 2], ids=["one process", "two worker processes"])
def test_a_shards_rows_are_fetched_while_a_slow_lookup_is_still_out(
    web, monkeypatch, loopback_is_public, processes
):
    """The step's process hands each row to be fetched as soon as its host's answer is in: the rows of the
    hosts that answer are fetched while another host's answer is held back, and that host's rows once
    it comes."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    released = threading.Event()
    names = {"fast.example": Name(["127.0.0.1"]), "slow.example": Name(["127.0.0.1"], held=released)}
    fast = [f"http://fast.example:{web.port}/up/{i}" for i in range(8)]
    slow = [f"http://slow.example:{web.port}/up/{i}" for i in range(8, 12)]
    outcome: list = []
    with DnsServer(names) as dns:
        settings = asking(GUARDED, dns, processes=processes, dns_timeout=120)
        download_run = threading.Thread(target=lambda: outcome.append(run(fast + slow, settings)))
        download_run.start()
        give_up = time.monotonic() + 60
        while sum(web.hits[f"/up/{i}"] for i in range(8)) < 8 and time.monotonic() < give_up:
            time.sleep(0.05)
        fast_hits_before_the_answer = sum(web.hits[f"/up/{i}"] for i in range(8))
        slow_hits_before_the_answer = sum(web.hits[f"/up/{i}"] for i in range(8, 12))
        released.set()
        download_run.join()
    assert (fast_hits_before_the_answer, slow_hits_before_the_answer) == (8, 0)
    _, _, rows = outcome[0]
    assert {rows[url]["status"] for url in fast + slow} == {schemas.SUCCESS}


@pytest.mark.parametrize("processes", [1, 2], ids=["one process", "two worker processes"])
def test_a_host_is_looked_up_once_a_run_by_its_shards_at_once(
    web, monkeypatch, loopback_is_public, processes
):
    """The shards of a run share its lookups, the next shard's while the last one drains too."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    with DnsServer({"images.example": Name(["127.0.0.1"])}) as dns:
        settings = asking(GUARDED, dns, processes=processes, max_in_flight=4)
        shards = {
            shard: crawl_table([f"http://images.example:{web.port}/up/{shard}{i}" for i in range(12)], shard)
            for shard in ("a", "b", "c")
        }

        def fetch(shard: str, draining: threading.Event) -> pa.Table:
            return download_shard(
                shards[shard], settings, io.BytesIO(), draining=draining, workers=workers
            ).table

        with download.DownloadWorkers(settings) as workers:
            tables = [table for _, table in pipelined(shards, fetch)]
    assert [set(table.column("status").to_pylist()) for table in tables] == [{schemas.SUCCESS}] * 3
    assert dns.lookups == {"images.example": 1}


def test_a_dns_server_that_never_answers_fails_the_host_at_dns_timeout(web):
    with DnsServer({}, silent={"silent.example"}) as dns:
        urls = [f"http://silent.example/{i}.jpg" for i in range(6)] + [web.url("/up/1")]
        _, _, rows = run(urls, asking(FAST, dns, dns_timeout=0.5, processes=1))
    error = "dns: cannot resolve silent.example: no answer within dns_timeout=0.5s"
    assert [rows[url]["error_message"] for url in urls[:-1]] == [error] * 6
    assert rows[urls[-1]]["status"] == schemas.SUCCESS


def test_a_name_on_the_local_use_nat64_prefix_is_not_fetched(web):
    """RFC 8215's 64:ff9b:1::/48 is a site's own NAT64 prefix: its gateway delivers 64:ff9b:1:a00:0:100::
    to 10.0.0.1. Python before 3.12.4 calls the prefix global, and a name answering it passed the guard
    and was connected to; it is refused as the well-known prefix's private IPv4 addresses are."""
    local_nat64 = "64:ff9b:1:a00:0:100::"
    with DnsServer({"nat64.example": Name([local_nat64])}) as dns:
        url = f"http://nat64.example:{web.port}/img/red.jpg"
        _, _, rows = run([url], asking(GUARDED, dns))
    assert rows[url]["status"] == schemas.BLOCKED
    assert rows[url]["error_message"].startswith(f"private address: nat64.example resolves to {local_nat64} ")


@pytest.mark.parametrize("processes", [1, 2], ids=["one process", "two worker processes"])
def test_lookups_not_started_by_the_shard_deadline_are_never_started(monkeypatch, processes):
    """The shard's hosts were each looked up, `dns_lookups` at a time, whatever its deadline: a resolver
    that hangs held the shard for hosts / dns_lookups x dns_timeout, past shard_timeout, and left the
    next shard's lookups queued behind them. At the deadline the lookups not started are not, and every
    row not started fails as the deadline says."""
    monkeypatch.setattr(download, "ROWS_PER_PROCESS", 4)
    never = threading.Event()  # the DNS server holds every answer: a resolver that hangs
    hosts = [f"h{i}.example" for i in range(6)]
    urls = [f"http://{host}/{n}.jpg" for host in hosts for n in range(6 - hosts.index(host))]  # h0 first
    with DnsServer({host: Name([PUBLIC], held=never) for host in hosts}) as dns:
        settings = asking(GUARDED, dns, processes=processes, dns_lookups=1, dns_timeout=3, shard_timeout=1)
        _, _, rows = run(urls, settings)
        never.set()
    assert set(dns.lookups) == {"h0.example"}
    assert {row["error_message"] for row in rows.values()} == {
        "shard deadline: not started within shard_timeout=1s"
    }
