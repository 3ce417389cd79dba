"""The service's settings, apart from the app so that the CLI can read their defaults without FastAPI."""

from __future__ import annotations

from dataclasses import dataclass

from laion_assets.pipeline.download.fetch import FetchSettings
from laion_assets.pipeline.download.imaging import ImageSettings

API_KEY_ENV = "LAION_ASSETS_API_KEY"
MIN_API_KEY_CHARS = 16


class WeakApiKey(ValueError):
    """The service was asked to start with a key too short to resist guessing."""


@dataclass(frozen=True)
class ServiceSettings:
    host: str = "127.0.0.1"
    port: int = 9001
    root: str | None = None  # the dataset root whose search index /search answers from
    api_key: str | None = None  # when set, every route but the docs requires it
    max_batch: int = 8  # images or compare prompts per request, as Roboflow's CLIP_MAX_BATCH_SIZE
    max_texts: int = 1000  # texts per /clip/embed_text request: Roboflow's server takes any number there
    max_image_bytes: int = 5_000_000  # per image, after base64 decoding or as fetched
    max_pixels: int = ImageSettings.max_pixels  # decompression-bomb cap, as the downloader's
    max_text_chars: int = 10_000
    batching: bool = True
    batch_wait: float = 0.002  # seconds a batch waits for requests still being prepared
    allow_private_networks: bool = False  # fetch from loopback and private networks (tests, local demos)
    allow_short_api_key: bool = False  # start with a key under MIN_API_KEY_CHARS characters

    def check_api_key(self) -> None:
        """WeakApiKey if the key is shorter than MIN_API_KEY_CHARS and that was not allowed."""
        short = self.api_key is not None and len(self.api_key) < MIN_API_KEY_CHARS
        if short and not self.allow_short_api_key:
            raise WeakApiKey(
                f"the API key has {len(self.api_key)} characters, under {MIN_API_KEY_CHARS}: use a longer "
                "one (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`), or pass "
                "--allow-short-api-key"
            )

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: a compare's subject and max_batch prompts, all images in base64."""
        return (self.max_batch + 1) * (4 * -(-self.max_image_bytes // 3) + 1024) + 65_536

    def fetch_settings(self) -> FetchSettings:
        """The downloader's timeouts and retries, this service's size cap and guard. A query image is not
        mined into a dataset: TDMRep's reservation, which would cost a request for the site's
        tdmrep.json before each URL, is the downloader's to honour (X-Robots-Tag is honoured here too)."""
        return FetchSettings(
            max_bytes=self.max_image_bytes,
            allow_private_networks=self.allow_private_networks,
            respect_tdm_reservation=False,
        )
