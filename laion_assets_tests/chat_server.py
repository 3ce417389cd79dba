"""An OpenAI-compatible chat-completions server on 127.0.0.1 over a real (tiny) model: each request's
image, sent as a data URL, is captioned by the CoCa it is given. It records every request, checks the
Bearer key when it has one, and answers the statuses of `script` first, one per request, so that tests
can make it busy (429, with `retry_after` as its Retry-After), broken (5xx), slow to answer (`delay`) or
slow to send its answer (`drip`: seconds between its bytes, as a stalled gateway sends them)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from laion_assets.pipeline.recaptions.caption import CocaCaptioner


class ChatServer:
    def __init__(
        self, captioner: CocaCaptioner, api_key: str = "", delay: float = 0.0, drip: float = 0.0
    ) -> None:
        self.captioner, self.api_key, self.delay, self.drip = captioner, api_key, delay, drip
        self.requests: list[dict] = []
        self.script: list[int] = []  # statuses to answer before captioning again
        self.retry_after = "0"  # the Retry-After of those answers
        self.answers: list[str] = []  # captions to answer, one per request, before the model's again
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = server.script.pop(0) if server.script else 200
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    status = 401
                if status != 200:
                    error = {"error": {"message": f"scripted {status}"}}
                    return self._answer(status, error, {"Retry-After": server.retry_after})
                time.sleep(server.delay)
                (image_part,) = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
                data = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
                with server._lock:  # one model, one caption at a time
                    text = server.captioner.caption([Image.open(io.BytesIO(data)).convert("RGB")])[0]
                    text = server.answers.pop(0) if server.answers else text
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                self._answer(200, {"object": "chat.completion", "model": body["model"], "choices": [choice]})

            def _answer(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                    for piece in [data[i : i + 1] for i in range(len(data))] if server.drip else [data]:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(server.drip)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
