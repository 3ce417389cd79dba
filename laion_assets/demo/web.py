"""The synthetic world served over HTTP on 127.0.0.1, each item answered as its kind says."""

from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from laion_assets.demo import world as w

NOT_AN_IMAGE_PAGE = b"<!doctype html><html><body><h1>Image moved</h1><p>See our gallery.</p></body></html>"


class WebServer(ThreadingHTTPServer):
    """http.server with a real web server's accept queue (nginx's is 511), not its 5: the downloader
    opens up to `per_host_connections` connections to one host at once, and a queue of 5 drops the
    rest of them (their connections time out)."""

    request_queue_size = 1024
    daemon_threads = True


class WorldWeb:
    """A threaded HTTP/1.1 server on a free loopback port; `with WorldWeb(world) as web:` runs it."""

    def __init__(self, world: w.World, first_byte_delay: float = 0.0) -> None:
        self.world = world
        self.first_byte_delay = first_byte_delay  # seconds before each answer: a web that waits
        self._images: dict[str, bytes] = {}  # path -> encoded image, rendered on first request
        self._server = WebServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="world-web", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def rows(self) -> list[dict[str, str | None]]:
        """The world's URL list, pointing at this server."""
        return self.world.rows(self.base_url)

    def start(self) -> WorldWeb:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WorldWeb:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def response(self, path: str) -> tuple[int, str, bytes, dict[str, str]]:
        """Status, content type, body and extra headers for a request path."""
        item = self.world.item_at(path)
        if item is None or item.kind == w.NOT_FOUND:
            return 404, "text/plain", b"not found", {}
        if item.kind == w.SERVER_ERROR:
            return 500, "text/plain", b"internal server error", {}
        if item.kind == w.NOT_AN_IMAGE:
            return 200, "text/html; charset=utf-8", NOT_AN_IMAGE_PAGE, {}
        body = self._image(item)
        if item.kind == w.TRUNCATED:
            return 200, item.content_type, body[: len(body) // 2], {}
        if item.kind == w.OPTED_OUT:
            return 200, item.content_type, body, {"X-Robots-Tag": "noai"}
        return 200, item.content_type, body, {}

    def _image(self, item: w.Item) -> bytes:
        # Two threads may render the same item at once; both get the same bytes.
        if item.path not in self._images:
            self._images[item.path] = w.image_bytes(item)
        return self._images[item.path]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length

            def log_message(self, *args: object) -> None:
                pass

            def handle(self) -> None:
                # a client that hangs up (the downloader does after a failure) is no error
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    super().handle()

            def do_GET(self) -> None:
                time.sleep(web.first_byte_delay)
                status, content_type, body, headers = web.response(self.path.partition("?")[0])
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler
