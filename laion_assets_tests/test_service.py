"""The CLIP service on a real uvicorn server on a free loopback port, with real models."""

import base64
import contextlib
import io
import json
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import hypothesis
import hypothesis.configuration
import numpy as np
import pytest
import schemathesis
import torch
import urllib3
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from laion_assets.demo import DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.world import make_world
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.download.imaging import decode_image
from laion_assets.pipeline.embeddings.clip import ClipEncoder
from laion_assets.pipeline.search.index import write_search_index
from laion_assets.pipeline.shard_tar import read_samples
from laion_assets.pipeline.storage import SEARCH_INDEX, DatasetStore
from laion_assets.service.app import create_app
from laion_assets.service.routes import API_KEY_HEADER
from laion_assets.service.settings import ServiceSettings
from laion_assets_tests.dagster_helpers import TINY_CLIP
from laion_assets_tests.demo_dataset import DEMO_CLIP
from laion_assets_tests.service_process import running
from laion_assets_tests.web import IMAGES, make_image

KEY = "test-key"
MAX_IMAGE_BYTES = 1_000_000
PICTURES = ["/img/red.jpg", "/img/green.png", "/img/blue.webp", "/exif.jpg", "/img/transparent.png"]
TOLERANCE = 1e-5  # the same model on the same inputs, in batches of other sizes


class Client:
    def __init__(self, url: str, key: str | None = KEY) -> None:
        self.url, self.key = url, key
        self.http = urllib3.PoolManager(maxsize=16, retries=False)

    def request(self, method: str, path: str, body: object = None, **headers: str) -> tuple[int, dict]:
        if self.key:
            headers.setdefault(API_KEY_HEADER, self.key)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        response = self.http.request(
            method, self.url + path, body=data, headers={"Content-Type": "application/json", **headers}
        )
        return response.status, json.loads(response.data)

    def post(self, path: str, body: object, **headers: str) -> tuple[int, dict]:
        return self.request("POST", path, body, **headers)

    def ok(self, path: str, body: object = None, method: str = "POST") -> dict:
        status, answer = self.request(method, path, body)
        assert status == 200, answer
        return answer


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return ClipEncoder(TINY_CLIP)


@pytest.fixture(scope="module")
def service(encoder) -> Iterator[Client]:
    """Guarded: an API key, the private-network guard on, images capped at MAX_IMAGE_BYTES."""
    settings = ServiceSettings(api_key=KEY, max_image_bytes=MAX_IMAGE_BYTES)
    with running(create_app(settings, encoder)) as url:
        yield Client(url)


@pytest.fixture(scope="module")
def open_service(encoder) -> Iterator[Client]:
    """No key, and url images may come from 127.0.0.1 (the test web)."""
    settings = ServiceSettings(allow_private_networks=True, max_image_bytes=MAX_IMAGE_BYTES)
    with running(create_app(settings, encoder)) as url:
        yield Client(url, key=None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(path: str) -> dict:
    return {"type": "base64", "value": b64(IMAGES[path][1])}


def images_directly(encoder: ClipEncoder, paths: list[str]) -> np.ndarray:
    pixels = [encoder.prepare(decode_image(IMAGES[p][1], 10**8)) for p in paths]
    return encoder.encode_images(torch.stack(pixels)).numpy()


def texts_directly(encoder: ClipEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode_texts(texts).numpy()


def assert_close(answer: list, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(answer), expected, atol=TOLERANCE)


def test_embed_text_gives_the_encoders_numbers(service, encoder):
    texts = ["a red square", "a photo of a cat", ""]
    one = service.ok("/clip/embed_text", {"text": texts[0]})
    assert_close(one["embeddings"], texts_directly(encoder, texts[:1]))
    assert one["time"] > 0
    assert_close(
        service.ok("/clip/embed_text", {"text": texts})["embeddings"], texts_directly(encoder, texts)
    )


def test_embed_image_gives_the_encoders_numbers(service, encoder):
    expected = images_directly(encoder, PICTURES)
    answer = service.ok("/clip/embed_image", {"image": [image(p) for p in PICTURES]})
    assert len(answer["embeddings"]) == len(PICTURES) and len(answer["embeddings"][0]) == encoder.dim
    assert_close(answer["embeddings"], expected)
    # one image, not in a list, as a data: URL with MIME line breaks
    text = b64(IMAGES[PICTURES[1]][1])
    value = "data:image/png;base64," + "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    answer = service.ok("/clip/embed_image", {"image": {"type": "base64", "value": value}})
    assert_close(answer["embeddings"], expected[1:2])


def test_url_images_are_fetched_as_the_downloader_fetches(open_service, web, encoder):
    urls = [{"type": "url", "value": web.url(p)} for p in PICTURES]
    answer = open_service.ok("/clip/embed_image", {"image": urls})
    assert_close(answer["embeddings"], images_directly(encoder, PICTURES))
    big = len(IMAGES["/img/red.jpg"][1]) + 2_000_000  # what the test web's /big.jpg declares
    for path, status, reason in [
        ("/404.jpg", 400, "HTTP 404: Not Found"),
        ("/html.jpg", 400, "not an image: content type text/html"),
        ("/garbage.jpg", 400, "image: not an image: no known image format in the bytes"),
        ("/truncated.jpg", 400, "image: cannot decode"),
        ("/big.jpg", 413, f"too large: Content-Length {big} is over max_bytes={MAX_IMAGE_BYTES}"),
        ("/noai.jpg", 403, "X-Robots-Tag: noai"),
    ]:
        got, answer = open_service.post(
            "/clip/embed_image", {"image": {"type": "url", "value": web.url(path)}}
        )
        assert (got, reason in answer["detail"]) == (status, True), (path, answer)


def test_compare_gives_cosine_similarities(service, encoder):
    prompts = ["a red square", "a green rectangle", "a blue circle"]
    red = images_directly(encoder, ["/img/red.jpg"])[0]
    expected = texts_directly(encoder, prompts) @ red
    listed = service.ok("/clip/compare", {"subject": image("/img/red.jpg"), "prompt": prompts})
    assert_close(listed["similarity"], expected)
    named = service.ok(
        "/clip/compare", {"subject": image("/img/red.jpg"), "prompt": dict(zip("abc", prompts, strict=True))}
    )
    assert list(named["similarity"]) == ["a", "b", "c"]
    assert_close(list(named["similarity"].values()), expected)
    one = service.ok("/clip/compare", {"subject": image("/img/red.jpg"), "prompt": prompts[0]})
    assert_close(one["similarity"], expected[:1])

    # a text against images, and an image against itself
    body = {"subject": prompts[0], "subject_type": "text", "prompt_type": "image"}
    text_vs_images = service.ok("/clip/compare", {**body, "prompt": [image(p) for p in PICTURES[:3]]})
    pictures = images_directly(encoder, PICTURES[:3])
    assert_close(text_vs_images["similarity"], pictures @ texts_directly(encoder, prompts[:1])[0])
    body = {"subject": image("/img/red.jpg"), "prompt": [image("/img/red.jpg")], "prompt_type": "image"}
    assert service.ok("/clip/compare", body)["similarity"] == [pytest.approx(1.0, abs=TOLERANCE)]


def dds_of_an_unknown_format() -> bytes:
    """A DDS file whose pixel-format flags Pillow does not know: Image.open raises NotImplementedError."""
    out = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(out, "DDS")
    return out.getvalue()[:80] + struct.pack("<I", 0x2000) + out.getvalue()[84:]


PNG = image("/img/green.png")
# 25,000 x 1 pixels in a PNG of 160 bytes, far under max_pixels; but the tiny model's resize, its shorter side
# to 64, makes 1,600,000 x 64, over max_pixels: 400 MB of pixels before its crop (5 GB at ViT-B-32's 224)
ELONGATED = {"type": "base64", "value": b64(make_image("PNG", (25_000, 1)))}
BAD_REQUESTS = [
    (
        "wrong image type",
        "/clip/embed_image",
        {"image": {"type": "numpy", "value": "x"}},
        422,
        "'url' or 'base64'",
    ),
    ("text not a string", "/clip/embed_text", {"text": 42}, 422, "text"),
    ("no text", "/clip/embed_text", {"text": []}, 422, "at least 1 item"),
    ("not json", "/clip/embed_text", b'{"text": "a', 422, "JSON decode error"),
    (
        "bad base64",
        "/clip/embed_image",
        {"image": {"type": "base64", "value": "abc"}},
        400,
        "not valid base64",
    ),
    (
        "not an image",
        "/clip/embed_image",
        {"image": {"type": "base64", "value": b64(b"hello")}},
        400,
        "not an image",
    ),
    ("truncated image", "/clip/embed_image", {"image": image("/truncated.jpg")}, 400, "image: cannot decode"),
    ("bomb", "/clip/embed_image", {"image": image("/bomb.png")}, 400, "decompression bomb"),
    (
        "bomb by its resize",
        "/clip/embed_image",
        {"image": ELONGATED},
        400,
        "image: decompression bomb: 25000x1 is 1600000x64 resized for the model, over max_pixels=89478485",
    ),
    (
        "a decoder's own error",
        "/clip/compare",
        {"subject": {"type": "base64", "value": b64(dds_of_an_unknown_format())}, "prompt": "a"},
        400,
        "subject: cannot decode: NotImplementedError: Unknown pixel format flags 8192",
    ),
    ("too many images", "/clip/embed_image", {"image": [PNG] * 9}, 413, "image: 9 items is over max_batch=8"),
    (
        "too many texts",
        "/clip/embed_text",
        {"text": ["a"] * 1001},
        413,
        "text: 1001 items is over max_texts=1000",
    ),
    ("too many prompts", "/clip/compare", {"subject": PNG, "prompt": ["a"] * 9}, 413, "prompt: 9 items"),
    (
        "image too large",
        "/clip/embed_image",
        {"image": {"type": "base64", "value": b64(b"\0" * (MAX_IMAGE_BYTES + 1))}},
        413,
        f"image: the image is over max_image_bytes={MAX_IMAGE_BYTES}",
    ),
    ("text too long", "/clip/embed_text", {"text": "a" * 10_001}, 413, "over max_text_chars=10000"),
    (
        "private URL",
        "/clip/embed_image",
        {"image": [PNG, {"type": "url", "value": "http://127.0.0.1:9/x.jpg"}]},
        403,
        "image[1]: cannot fetch http://127.0.0.1:9/x.jpg: private address",
    ),
    (
        "private URL by name",
        "/clip/embed_image",
        {"image": {"type": "url", "value": "http://localhost/x.jpg"}},
        403,
        "private address",
    ),
    (
        "not http",
        "/clip/embed_image",
        {"image": {"type": "url", "value": "file:///etc/passwd"}},
        400,
        "unsupported URL",
    ),
    (
        "subject not an image",
        "/clip/compare",
        {"subject": "a cat", "prompt": "a dog"},
        422,
        "subject_type is image",
    ),
    ("prompt not a text", "/clip/compare", {"subject": PNG, "prompt": [PNG]}, 422, "prompt_type is text"),
    (
        "other model",
        "/clip/embed_text",
        {"text": "a", "clip_version_id": "ViT-L-14"},
        400,
        "runs 'laion-assets-tiny'",
    ),
    ("search text and image", "/search", {"text": "a", "image": PNG}, 422, "exactly one of text and image"),
    ("search k", "/search", {"text": "a", "top_k": 0}, 422, "top_k"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"), [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_requests_get_a_4xx_with_the_reason(service, path, body, status, reason):
    got, answer = service.post(path, body)
    assert got == status, answer
    assert reason in answer["detail"]


def test_api_key_by_query_or_header(service):
    body = {"text": "a"}
    assert service.post("/clip/embed_text", body, **{API_KEY_HEADER: KEY})[0] == 200
    anonymous = Client(service.url, key=None)
    assert anonymous.post(f"/clip/embed_text?api_key={KEY}", body)[0] == 200
    assert anonymous.post("/clip/embed_text", body) == (
        401,
        {
            "detail": "missing api_key: send it as ?api_key=..., an Authorization: Bearer header, an "
            f"{API_KEY_HEADER} header or an api_key field of the JSON body"
        },
    )
    # inference-sdk's other two places: the Bearer header and the JSON body, checked in the same order
    assert anonymous.post("/clip/embed_text", body, Authorization=f"Bearer {KEY}")[0] == 200
    assert anonymous.post("/clip/embed_text", {**body, "api_key": KEY})[0] == 200
    assert anonymous.post("/clip/embed_text", {**body, "api_key": "nope"})[0] == 401
    assert anonymous.post("/clip/embed_text?api_key=nope", {**body, "api_key": KEY})[0] == 401  # query first
    assert anonymous.post("/clip/embed_text?api_key=nope", body) == (401, {"detail": "wrong api_key"})
    assert anonymous.request("GET", "/info")[0] == 401
    assert anonymous.request("GET", "/openapi.json")[0] == 200  # the schema is public


def test_a_body_over_the_limit_is_refused_before_parsing(service):
    limit = ServiceSettings(max_image_bytes=MAX_IMAGE_BYTES).max_body_bytes
    got, answer = service.post("/clip/embed_text", b"x" * (limit + 1))
    assert (got, answer) == (413, {"detail": f"request body is over {limit} bytes"})


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_fuzzed_requests_never_get_a_server_error(service, mode, tmp_path):
    """Generated requests to every operation in the published schema, valid ones and invalid ones; the
    guard stays on, so no generated URL reaches anything."""
    hypothesis.configuration.set_hypothesis_home_dir(tmp_path)  # its caches stay out of the checkout
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    operations = {result.ok().label for result in schema.get_all_operations()}
    assert operations == {
        "POST /clip/embed_image",
        "POST /clip/embed_text",
        "POST /clip/compare",
        "POST /search",
        "GET /info",
        "GET /image/{key}",
        "POST /pairs",
    }
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    @hypothesis.given(case=schema.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=150, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
    )
    def fuzz(case) -> None:
        # the right key where it is read first, over any key the generator puts in the other places
        response = case.call_and_validate(
            headers={API_KEY_HEADER: KEY}, params={"api_key": KEY}, checks=checks
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    statuses: dict[int, int] = {}
    fuzz()
    print(f"{mode}: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 100 and not any(status >= 500 for status in statuses)


def test_concurrent_load_is_answered_in_full_and_batched(encoder):
    requests, concurrency = 500, 16
    texts = [f"a picture of thing number {i}" for i in range(requests)]
    expected_texts = texts_directly(encoder, texts)
    expected_images = images_directly(encoder, PICTURES)

    def one(i: int) -> None:
        if i % 5:
            answer = client.ok("/clip/embed_text", {"text": texts[i]})
            assert_close(answer["embeddings"], expected_texts[i : i + 1])
        else:
            picture = i // 5 % len(PICTURES)
            answer = client.ok("/clip/embed_image", {"image": image(PICTURES[picture])})
            assert_close(answer["embeddings"], expected_images[picture : picture + 1])

    with running(create_app(ServiceSettings(), encoder)) as url:
        client = Client(url, key=None)
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))  # raises the first failure
        info = client.ok("/info", method="GET")
    text_requests = requests - requests // 5
    assert info["text_batches"]["items"] == text_requests
    assert info["image_batches"]["items"] == requests // 5
    assert info["text_batches"]["model_calls"] < text_requests  # requests arriving together shared a call


@pytest.fixture(scope="module")
def demo_encoder() -> ClipEncoder:
    return ClipEncoder(DEMO_CLIP)


def test_search_finds_pairs_by_caption_and_by_image(demo_root, demo_encoder):
    store = DatasetStore(demo_root)
    world = make_world(images=60, failures={})
    pairs = {
        key: (url, caption)
        for key, url, caption in catalog.connect(store).sql("SELECT key, url, caption FROM pairs").fetchall()
    }
    with running(create_app(ServiceSettings(root=demo_root), demo_encoder)) as url:
        client = Client(url, key=None)
        assert client.ok("/info", method="GET")["search_index_rows"] == len(pairs) > 30

        # The stored image of a pair finds that pair first.
        with store.open("pairs/synthetic-web-1.tar") as f:
            samples = list(read_samples(f))[:10]
        for key, members in samples:
            results = client.ok(
                "/search", {"image": {"type": "base64", "value": b64(members["jpg"])}, "top_k": 3}
            )["results"]
            assert len(results) == 3 and results[0]["key"] == key
            assert results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)  # float16 in the index

        # A pair's caption finds an image of its colour first, and the pair itself near the top. The demo
        # model tells colours apart better than shapes: it ranks the pair first for 28 of these 48 captions.
        in_top_5 = 0
        for key, (url_, caption) in pairs.items():
            top = client.ok("/search", {"text": caption, "top_k": 5})["results"]
            assert [h["similarity"] for h in top] == sorted((h["similarity"] for h in top), reverse=True)
            assert all(pairs[h["key"]] == (h["url"], h["caption"]) for h in top)
            assert world.item_at(top[0]["url"]).colour == world.item_at(url_).colour, (caption, top[0])
            in_top_5 += key in {h["key"] for h in top}
        assert in_top_5 >= 0.9 * len(pairs)


def test_search_waits_for_an_index_of_its_model(demo_root, demo_encoder, encoder, tmp_path):
    empty = DatasetStore(str(tmp_path / "data"))
    with running(create_app(ServiceSettings(root=empty.root), demo_encoder)) as url:
        client = Client(url, key=None)
        got, answer = client.post("/search", {"text": "a red circle"})
        assert got == 404 and f"no search index at {empty.url(SEARCH_INDEX)}" in answer["detail"]
        assert client.post("/clip/embed_text", {"text": "a red circle"})[0] == 200  # the rest works
        with DatasetStore(demo_root).open(SEARCH_INDEX) as f:
            empty.write_bytes(SEARCH_INDEX, f.read())  # built later: found without a restart
        assert len(client.ok("/search", {"text": "a red circle"})["results"]) == 10

    with running(create_app(ServiceSettings(root=demo_root), encoder)) as url:
        client = Client(url, key=None)
        got, answer = client.post("/search", {"text": "a red circle"})
        assert got == 409
        assert (
            f"embedded with {DEMO_MODEL} / {DEMO_CHECKPOINT}, this service runs laion-assets-tiny / none"
            in answer["detail"]
        )
        assert client.post("/clip/embed_text", {"text": "a red circle"})[0] == 200


class HoldingProxy:
    """A TCP proxy on loopback to `upstream` (host, port) that, while held, keeps what clients send: an S3
    endpoint that stops answering."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.released = threading.Event()
        self.released.set()
        self.holding = threading.Event()  # set once a request waits on the hold
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, held: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if held and not self.released.is_set():
                    self.holding.set()
                    self.released.wait()
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.released.set()
        self.listener.close()


def test_a_search_waiting_on_the_stores_ledgers_holds_up_no_other_request(s3_root, s3_endpoint, monkeypatch):
    """/search listed the removal ledgers (two S3 requests a query) on the event loop: while S3 was slow
    to answer, every request of the service, the CLIP routes' too, waited behind it."""
    from laion_assets_tests.test_faiss_index import _write_shard

    encoder = ClipEncoder(TINY_CLIP)
    _write_shard(DatasetStore(s3_root), "a", 20, model=encoder.identity)
    write_search_index(DatasetStore(s3_root))
    proxy = HoldingProxy(urllib3.util.parse_url(s3_endpoint).netloc.split(":"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the service's store goes through the proxy
    app = create_app(ServiceSettings(root=s3_root), encoder)
    with ThreadPoolExecutor(1) as pool, running(app) as url, contextlib.closing(proxy):
        client = Client(url, key=None)
        assert len(client.ok("/search", {"text": "a red circle"})["results"]) == 10
        proxy.released.clear()
        search = pool.submit(client.post, "/search", {"text": "a red circle"})
        assert proxy.holding.wait(60)  # the search waits on S3
        body, headers = json.dumps({"text": "a"}).encode(), {"Content-Type": "application/json"}
        answer = client.http.request("POST", url + "/clip/embed_text", body=body, headers=headers, timeout=30)
        assert answer.status == 200 and not search.done()
        proxy.released.set()
        assert search.result()[0] == 200


def test_texts_tokenised_in_parallel_threads_all_get_their_tokens(monkeypatch):
    """The service tokenises in its prepare threads. The tokenizer's word cache, bounded so that a service's
    endless new words do not grow it for ever, dropped its oldest word unguarded: two threads dropped the same
    one (KeyError), or one dropped a word the other had just found in it, and the request was a 500."""
    import random
    import string
    import sys

    from laion_assets.pipeline.embeddings import clip

    monkeypatch.setattr(clip, "TOKENIZER_CACHE_WORDS", 5)  # each new word drops one, as in a busy service
    encoder = ClipEncoder(TINY_CLIP)
    texts = [
        [" ".join("".join(random.Random(f"{t}-{i}").choices(string.ascii_lowercase, k=8)) for _ in range(8))]
        for t in range(4)
        for i in range(400)
    ]
    expected = [encoder.tokenize(text) for text in texts]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, as many busy ones do
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(encoder.tokenize, texts))
    finally:
        sys.setswitchinterval(switch)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
