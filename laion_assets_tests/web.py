"""A small web on 127.0.0.1 with real images and the failures the real web has."""

import io
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

from PIL import Image

from laion_assets.demo.web import WebServer


def make_image(fmt: str, size: tuple[int, int], color=(200, 40, 40), mode: str = "RGB", **save) -> bytes:
    image = Image.new(mode, size, color)
    # a diagonal stripe, so orientation and crops are visible
    for i in range(min(size)):
        image.putpixel((i, i), (255, 255, 255) if mode == "RGB" else (255, 255, 255, 255))
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 200x100 JPEG whose EXIF orientation (6) says: show it rotated, 100x200."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return make_image("JPEG", (200, 100), exif=exif.tobytes())


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims `width` x `height` 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


JPEG = make_image("JPEG", (640, 480))
IMAGES = {
    "/img/red.jpg": ("image/jpeg", JPEG),
    "/img/green.png": ("image/png", make_image("PNG", (300, 600), (40, 200, 40))),
    "/img/blue.webp": ("image/webp", make_image("WEBP", (400, 400), (40, 40, 200))),
    "/img/small.jpg": ("image/jpeg", make_image("JPEG", (50, 40))),
    "/img/wide.jpg": ("image/jpeg", make_image("JPEG", (1000, 100))),
    "/img/transparent.png": ("image/png", make_image("PNG", (64, 64), (0, 0, 0, 0), mode="RGBA")),
    "/img/octet.jpg": ("application/octet-stream", JPEG),  # no image type, but image bytes
    "/exif.jpg": ("image/jpeg", exif_rotated_jpeg()),
    "/truncated.jpg": ("image/jpeg", JPEG[: len(JPEG) // 2]),
    "/empty.jpg": ("image/jpeg", b""),
    "/bomb.png": ("image/png", png_bomb()),
    "/garbage.jpg": ("image/jpeg", b"\x00\x01 definitely not an image " * 20),
    "/html.jpg": ("text/html; charset=utf-8", b"<html><body>Not found, but 200</body></html>"),
}
ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"
# W3C TDMRep's site file: the first rule whose location matches applies
TDMREP_JSON = b"""[
  {"location": "/tdm-site/free/*", "tdm-reservation": 0},
  {"location": "/tdm-site/*.jpg$", "tdm-reservation": 1, "tdm-policy": "https://example.org/tdm-policy"}
]"""


class TestWeb:
    """`url(path)` gives the address of a route; `hits` counts requests per path, `hosts` keeps the
    Host header of each path's last request, `connections` the client end of each connection, and
    `requests` each request's start and end in order: ("asked" or "done", path)."""

    def __init__(self) -> None:
        self.hits: Counter = Counter()
        self.hosts: dict[str, str | None] = {}
        self.connections: set[tuple[str, int]] = set()  # the client address of each connection served
        self.down: set[str] = set()  # paths answering 503 until removed
        self.robots_txt = ROBOTS_TXT
        self.tdmrep_json = TDMREP_JSON
        # /.well-known/tdmrep.json answers only once this path has been asked (None: at once)
        self.site_file_held_until: str | None = None
        self._site_file_released = threading.Event()
        self.requests: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = WebServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        # a socket that accepts connections (the kernel does) but never answers
        self._blackhole = socket.socket()
        self._blackhole.bind(("127.0.0.1", 0))
        self._blackhole.listen(64)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def blackhole_url(self) -> str:
        return f"http://127.0.0.1:{self._blackhole.getsockname()[1]}/never.jpg"

    def start(self) -> "TestWeb":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._blackhole.close()

    def _handler(self):
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path
                with web._lock:
                    web.hits[path] += 1
                    web.requests.append(("asked", path))
                    if path == web.site_file_held_until:
                        web._site_file_released.set()
                    web.hosts[path] = self.headers.get("Host")
                    web.connections.add(self.client_address[:2])
                    hits = web.hits[path]
                    web.in_flight += 1
                    web.max_in_flight = max(web.max_in_flight, web.in_flight)
                try:
                    self._route(path, hits)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with web._lock:
                        web.in_flight -= 1
                        web.requests.append(("done", path))

            def _send(
                self, status: int, body: bytes = b"", content_type: str = "image/jpeg", **headers
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self._send(302, b"", "text/plain", Location=location)

            def _route(self, path: str, hits: int) -> None:
                route, _, query = path.partition("?")
                if route in IMAGES:
                    content_type, body = IMAGES[route]
                    return self._send(200, body, content_type)
                if route == "/robots.txt":  # 503 while listed in `down`
                    if route in web.down:
                        return self._send(503, b"down", "text/plain")
                    return self._send(200, web.robots_txt, "text/plain")
                if route == "/.well-known/tdmrep.json":
                    while web.site_file_held_until and not web._site_file_released.wait(0.05):
                        if web._stop.is_set():
                            return None
                    return self._send(200, web.tdmrep_json, "application/json")
                if route.startswith(("/private/", "/tdm-site/")):
                    return self._send(200, JPEG)
                if route == "/404.jpg":
                    return self._send(404, b"not found", "text/plain")
                if route.startswith("/flaky/"):  # 500 the first time, then the image
                    return self._send(500, b"oops", "text/plain") if hits == 1 else self._send(200, JPEG)
                if route.startswith("/busy/"):  # 429 with Retry-After the first time
                    if hits == 1:
                        return self._send(429, b"slow down", "text/plain", Retry_After="1")
                    return self._send(200, JPEG)
                if route == "/busy-for-an-hour.jpg":
                    return self._send(429, b"slow down", "text/plain", Retry_After="3600")
                if route.startswith("/down/"):  # 503 while listed in `down`, then the image
                    return (
                        self._send(503, b"down", "text/plain") if route in web.down else self._send(200, JPEG)
                    )
                if route.startswith("/up/"):
                    return self._send(200, JPEG)
                if route.startswith("/slow/"):  # answers after a pause, for concurrency counting
                    time.sleep(0.3)
                    return self._send(200, JPEG)
                if route == "/drip.jpg":  # a byte at a time, never done in time
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(JPEG)))
                    self.end_headers()
                    for byte in JPEG:
                        if web._stop.wait(0.2):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    return None
                if route.startswith("/chain/"):  # /chain/3 → /chain/2 → ... → the image
                    n = int(route.rsplit("/", 1)[1])
                    return self._redirect(f"/chain/{n - 1}" if n > 0 else "/img/red.jpg")
                if route == "/loop-a":
                    return self._redirect("/loop-b")
                if route == "/loop-b":
                    return self._redirect("/loop-a")
                if route == "/redirect":  # to the URL in ?to=
                    return self._redirect(parse_qs(query)["to"][0])
                if route == "/to-private":
                    return self._redirect("http://10.255.255.1/x.jpg")
                if route == "/tdm-reserved.jpg":  # W3C TDMRep: rights reserved
                    return self._send(200, JPEG, tdm_reservation="1")
                if route == "/tdm-not-reserved.jpg":
                    return self._send(200, JPEG, tdm_reservation="0")
                if route == "/noai.jpg":
                    return self._send(200, JPEG, X_Robots_Tag="max-image-preview:large, noai")
                if route == "/x-robots-tag.jpg":  # an X-Robots-Tag header for each `tag` of the query
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(JPEG)))
                    for tag in parse_qs(query)["tag"]:
                        self.send_header("X-Robots-Tag", tag)
                    self.end_headers()
                    self.wfile.write(JPEG)
                    return None
                if route == "/otherbot-noai.jpg":
                    return self._send(200, JPEG, X_Robots_Tag="otherbot: noai")
                if route == "/big.jpg":  # declares its size up front
                    return self._send(200, JPEG + b"\0" * 2_000_000)
                if route == "/big-chunked.jpg":  # does not
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for _ in range(40):
                        chunk = b"\0" * 65536
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                if route == "/reset.jpg":  # a TCP reset instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return None
                return self._send(404, b"no such route", "text/plain")

        return Handler
