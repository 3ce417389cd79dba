"""Captioning at scale through an OpenAI-compatible chat-completions endpoint: how a LLaVA-class model is
served to billions of images (vLLM or SGLang, many replicas behind one URL).

Each image goes as a JPEG data URL in a `content` part beside the text prompt; the answer's first
choice is the caption. Requests run `in_flight` at a time; 429 and 5xx answers, timeouts and broken
connections are retried with exponential backoff (a 429's or 503's Retry-After honoured up to
`max_retry_after`; a longer one gives the sample up at once, as the downloader does). A sample
whose caption cannot be had gets a `NoCaption` with the reason, never an exception for the shard.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import urllib3
from urllib3.exceptions import HTTPError

from laion_assets.pipeline.download.fetch import retry_after_seconds
from laion_assets.pipeline.recaptions.caption import NoCaption

if TYPE_CHECKING:
    from PIL import Image

# Recap-DataComp-1B's instruction to LLaVA, as its paper gives it
RECAP_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
# ChatCaptionSettings field -> the environment variable that sets it in a deployment; with the base URL
# set, the recaptions asset captions through the endpoint instead of with CoCa
SETTINGS_ENV = {
    "base_url": "LAION_ASSETS_CHAT_BASE_URL",
    "model": "LAION_ASSETS_CHAT_MODEL",
    "api_key": "LAION_ASSETS_CHAT_API_KEY",
}
# bytes: the most of an answer read; a caption's is a few KB, so more is a broken server or gateway
MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True)
class ChatCaptionSettings:
    base_url: str  # the API root, e.g. http://vllm:8000/v1 (…/chat/completions is appended)
    model: str  # the served model's name
    api_key: str = ""  # sent as a Bearer token when set; never recorded
    prompt: str = RECAP_PROMPT
    max_completion_tokens: int = 128  # Recap-DataComp-1B's
    temperature: float = 0.0  # greedy, as Recap decoded
    in_flight: int = 16  # requests at once
    timeout: float = 120.0  # seconds per request, the answer read whole within them
    retries: int = 3  # extra attempts after 429, 5xx, timeouts and broken connections
    retry_backoff: float = 1.0  # seconds, doubled at each attempt
    max_retry_after: float = 60.0  # seconds: a longer Retry-After gives the sample up at once
    jpeg_quality: int = 90  # of the image sent


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ChatCaptioner:
    """Captions images through `settings.base_url`'s /chat/completions."""

    def __init__(self, settings: ChatCaptionSettings) -> None:
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.http = urllib3.PoolManager(maxsize=settings.in_flight, retries=False)
        self.headers = {"Content-Type": "application/json"}
        if settings.api_key:
            self.headers["Authorization"] = f"Bearer {settings.api_key}"

    def describe(self) -> dict[str, str]:
        """What made the captions, for the footer and the metadata (the API key left out)."""
        described = {"captioner": "chat completions", **asdict(self.settings)}
        return {name: str(value) for name, value in described.items() if name not in ("api_key", "in_flight")}

    def caption(self, images: list[Image.Image]) -> list[str | NoCaption]:
        """One caption, or the reason there is none, per image, in order."""
        with ThreadPoolExecutor(self.settings.in_flight, thread_name_prefix="caption") as pool:
            return list(pool.map(self._caption_one, images))

    def _caption_one(self, image: Image.Image) -> str | NoCaption:
        s = self.settings
        body = json.dumps(self._request(image)).encode()
        for attempt in range(s.retries + 1):
            try:
                return self._post(body)
            except _Retryable as exc:
                tries = f" (gave up after {attempt + 1} attempts)" if attempt else ""
                if exc.retry_after is not None and exc.retry_after > s.max_retry_after:
                    over = f"Retry-After {exc.retry_after:g}s is over max_retry_after={s.max_retry_after:g}s"
                    return NoCaption(f"{exc} ({over})", unreachable=True)
                if attempt == s.retries:
                    return NoCaption(f"{exc}{tries}", unreachable=True)
                time.sleep(exc.retry_after if exc.retry_after is not None else s.retry_backoff * 2**attempt)
            except _Unusable as exc:
                return NoCaption(str(exc), unreachable=exc.endpoint)
        raise AssertionError("unreachable")

    def _request(self, image: Image.Image) -> dict:
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=self.settings.jpeg_quality)
        data_url = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
        return {
            "model": self.settings.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.settings.prompt},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
            "max_completion_tokens": self.settings.max_completion_tokens,
            "temperature": self.settings.temperature,
        }

    def _post(self, body: bytes) -> str:
        timeout = self.settings.timeout
        deadline = time.monotonic() + timeout
        try:
            response = self.http.request(
                "POST", self.url, body=body, headers=self.headers, timeout=timeout, preload_content=False
            )
            data = _read_before(response, deadline)
        except urllib3.exceptions.NewConnectionError as exc:  # refused, unreachable: a TimeoutError subclass
            raise _Retryable(f"connection failed: {exc}") from exc
        except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise _Retryable(f"timeout: no answer within {timeout:g}s") from exc
        except HTTPError as exc:
            raise _Retryable(f"connection failed: {exc}") from exc
        if response.status == 429 or response.status >= 500:
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            raise _Retryable(f"HTTP {response.status}: {_detail(data)}", wait)
        if response.status != 200:
            raise _Unusable(f"HTTP {response.status}: {_detail(data)}", response.status in _REFUSALS)
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Unusable(f"unexpected answer: {data[:200]!r}") from exc
        if not isinstance(content, str) or not content.strip():
            raise _Unusable("empty caption in the answer")
        try:  # JSON may escape a lone surrogate, which no UTF-8 text can hold
            content.encode()
        except UnicodeEncodeError as exc:
            raise _Unusable(f"the caption is not valid Unicode: {content[:200]!r}") from exc
        return content.strip()


class _Unusable(Exception):
    """An answer that retrying will not mend (4xx other than 429, a malformed body, a caption that is not
    valid Unicode); `endpoint`: one the endpoint gives every image alike (`_REFUSALS`)."""

    def __init__(self, message: str, endpoint: bool = False) -> None:
        super().__init__(message)
        self.endpoint = endpoint


# A wrong key (401, 403), or a wrong route or model name (404): the deployment's fault, not an image's
_REFUSALS = (401, 403, 404)


def _read_before(response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
    """The answer's body, read as it comes until `deadline` and up to `MAX_ANSWER_BYTES`: the per-read
    timeout alone would let a server that sends a byte at a time hold the request as long as it likes,
    and one that sends without end fill the memory."""
    chunks, size = [], 0
    try:
        while chunk := response.read1(65536):
            size += len(chunk)
            if time.monotonic() > deadline or size > MAX_ANSWER_BYTES:
                response.close()  # the rest unread: its connection is not reused
                if size > MAX_ANSWER_BYTES:
                    raise _Unusable(f"unexpected answer: over {MAX_ANSWER_BYTES} bytes")
                raise TimeoutError
            chunks.append(chunk)
    finally:
        response.release_conn()
    return b"".join(chunks)


def _detail(data: bytes) -> str:
    return data[:200].decode("utf-8", errors="replace").strip()
