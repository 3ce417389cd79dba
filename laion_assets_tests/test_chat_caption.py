"""The chat-completions captioner against a real OpenAI-compatible server on 127.0.0.1 over a real tiny
CoCa (chat_server.py). vLLM itself was not run here: see docs/stages/recaptions.md."""

import base64
import io
import shutil
import socket
from dataclasses import replace

import pytest
from PIL import Image

from laion_assets.demo.train import EVAL_SEED
from laion_assets.demo.views import pipeline_view
from laion_assets.demo.world import make_world
from laion_assets.pipeline.embeddings.clip import ClipEncoder
from laion_assets.pipeline.recaptions.caption import NoCaption
from laion_assets.pipeline.recaptions.chat_caption import (
    MAX_ANSWER_BYTES,
    RECAP_PROMPT,
    ChatCaptioner,
    ChatCaptionSettings,
)
from laion_assets.pipeline.recaptions.recaption import write_recaptions
from laion_assets.pipeline.storage import RECAPTIONS, DatasetStore
from laion_assets_tests.captioners import varied_coca
from laion_assets_tests.chat_server import ChatServer
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_SHARDS

KEY = "a-test-key-of-32-characters-long"


@pytest.fixture(scope="module")
def coca():
    return varied_coca()


@pytest.fixture
def server(coca):
    running = ChatServer(coca, api_key=KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def images():
    return [pipeline_view(item) for item in make_world(images=6, seed=EVAL_SEED, failures={}).images]


def _settings(server: ChatServer, **overrides) -> ChatCaptionSettings:
    base = ChatCaptionSettings(base_url=server.base_url, model="llava-tiny", api_key=KEY, retry_backoff=0.01)
    return replace(base, **overrides)


def _as_sent(image: Image.Image, quality: int = 90) -> Image.Image:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def test_captions_are_the_served_models_and_the_requests_speak_the_protocol(server, coca, images):
    captions = ChatCaptioner(_settings(server)).caption(images)
    assert captions == coca.caption([_as_sent(image) for image in images])  # the model's own, in order
    assert len(server.requests) == len(images)
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "llava-tiny" and body["max_completion_tokens"] == 128 and body["temperature"] == 0
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": RECAP_PROMPT}
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(image["image_url"]["url"].split(",", 1)[1])))
    assert sent.format == "JPEG" and sent.size == images[0].size


def test_busy_and_broken_answers_are_retried(server, images):
    server.script = [429, 503]
    (caption,) = ChatCaptioner(_settings(server, in_flight=1)).caption(images[:1])
    assert isinstance(caption, str) and caption
    assert len(server.requests) == 3


def test_a_retry_after_over_max_retry_after_gives_the_sample_up_not_the_shard(server, images):
    # a gateway's Retry-After: waited, it would hold the shard for years (and overflow time.sleep)
    server.retry_after, server.script = "99999999999", [429]
    failed, captioned = ChatCaptioner(_settings(server, in_flight=1)).caption(images[:2])
    assert failed == NoCaption(
        'HTTP 429: {"error": {"message": "scripted 429"}} (Retry-After 1e+11s is over max_retry_after=60s)'
    )
    assert isinstance(captioned, str) and captioned
    assert len(server.requests) == 2  # the 429 was not retried


def test_a_caption_that_cannot_be_had_is_a_reason_not_an_exception(server, images):
    server.script = [500] * 4
    (failed,) = ChatCaptioner(_settings(server, in_flight=1)).caption(images[:1])
    assert failed == NoCaption(
        "HTTP 500: " + '{"error": {"message": "scripted 500"}}' + " (gave up after 4 attempts)"
    )
    server.requests.clear()
    (refused,) = ChatCaptioner(_settings(server, api_key="wrong-key-of-32-characters-long!")).caption(
        images[:1]
    )
    assert isinstance(refused, NoCaption) and refused.reason.startswith("HTTP 401")
    assert len(server.requests) == 1  # a 401 is not retried


def test_a_slow_server_times_out_per_request(coca, images):
    slow = ChatServer(coca, delay=2.0)
    try:
        (late,) = ChatCaptioner(_settings(slow, timeout=0.3, retries=1)).caption(images[:1])
    finally:
        slow.stop()
    assert late == NoCaption("timeout: no answer within 0.3s (gave up after 2 attempts)")


def test_a_refused_connection_is_recorded_as_one_not_as_a_timeout(images):
    """urllib3's NewConnectionError (refused, unreachable, no such host) is a subclass of its
    ConnectTimeoutError: the sample's reason said 'timeout: no answer within 120s' of an endpoint that
    refused at once, sending whoever read it after a slow server rather than a wrong URL or a server down."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    settings = ChatCaptionSettings(base_url=url, model="m", retries=1, retry_backoff=0)
    (refused,) = ChatCaptioner(settings).caption(images[:1])
    assert isinstance(refused, NoCaption)
    assert refused.reason.startswith("connection failed: ") and "refused" in refused.reason
    assert refused.reason.endswith("(gave up after 2 attempts)")


def test_a_server_that_drips_its_answer_times_out_per_request(coca, images):
    """The timeout bounds the whole request: a server that sends its answer a byte at a time, each byte well
    within the timeout of the one before (a stalled gateway), is given up at the timeout, not after it."""
    dripping = ChatServer(coca, drip=0.05)  # about 150 bytes: 7.5 s per answer
    try:
        (late,) = ChatCaptioner(_settings(dripping, timeout=0.5, retries=1)).caption(images[:1])
    finally:
        dripping.stop()
    assert late == NoCaption("timeout: no answer within 0.5s (gave up after 2 attempts)")


def test_an_answer_over_the_size_bound_is_given_up_unread(server, images):
    """A broken server or gateway may send an answer without end: it was held whole in memory. A chat
    answer of a caption is a few KB; over `MAX_ANSWER_BYTES` the rest is not read."""
    server.answers = ["word " * (MAX_ANSWER_BYTES // 5 + 1)]
    (huge,) = ChatCaptioner(_settings(server)).caption(images[:1])
    assert huge == NoCaption(f"unexpected answer: over {MAX_ANSWER_BYTES} bytes")
    (fine,) = ChatCaptioner(_settings(server)).caption(images[:1])  # the server's next answer is its model's
    assert isinstance(fine, str) and fine


def test_the_description_never_holds_the_key(server):
    described = ChatCaptioner(_settings(server)).describe()
    assert described["captioner"] == "chat completions" and described["model"] == "llava-tiny"
    assert KEY not in str(described) and "api_key" not in described


def test_recaptions_through_the_endpoint_keep_failed_rows(server, demo_root, tmp_path):
    shutil.copytree(demo_root, tmp_path / "data")
    store = DatasetStore(str(tmp_path / "data"))
    server.script = [400]  # the first request is refused; the rest are captioned
    captioner = ChatCaptioner(_settings(server, in_flight=1))
    table = write_recaptions(store, DEMO_SHARDS[0], captioner, ClipEncoder(DEMO_CLIP)).table
    rows = table.to_pylist()
    assert table.num_rows == store.parquet_num_rows(RECAPTIONS.parquet(DEMO_SHARDS[0]))
    failed = [row for row in rows if row["re_caption"] is None]
    assert len(failed) == 1 and failed[0]["re_caption_error"].startswith("HTTP 400")
    assert failed[0]["re_clip_score"] is None and failed[0]["org_clip_score"] is not None
    assert all(row["re_caption"] and row["re_clip_score"] is not None for row in rows if row is not failed[0])


def test_an_answer_that_is_not_unicode_is_a_reason_not_a_failed_shard(server, demo_root, tmp_path):
    """JSON may escape a lone surrogate (half an emoji, cut): Python reads it into a str that UTF-8, the
    tokenizer and the parquet cannot hold: kept, it failed the shard; now it is the sample's reason."""
    shutil.copytree(demo_root, tmp_path / "data")
    store = DatasetStore(str(tmp_path / "data"))
    server.answers = ["a red \ud83d circle"]
    captioner = ChatCaptioner(_settings(server, in_flight=1))
    rows = write_recaptions(store, DEMO_SHARDS[0], captioner, ClipEncoder(DEMO_CLIP)).table.to_pylist()
    failed = [row for row in rows if row["re_caption"] is None]
    assert [row["re_caption_error"] for row in failed] == [
        "the caption is not valid Unicode: 'a red \\ud83d circle'"
    ]
    assert all(row["re_caption"] and row["re_clip_score"] is not None for row in rows if row is not failed[0])


def test_a_shard_the_endpoint_never_answered_is_not_written(server, demo_root, tmp_path):
    """The endpoint down (or busy past its retries) for a whole shard: a file of rows that all say
    'connection failed' would be a materialised, done shard that no later run recaptions; the shard fails,
    nothing written, and is captioned when the endpoint is back. One image answered keeps the shard."""
    from laion_assets.pipeline.recaptions.recaption import CaptionerUnreachable

    shutil.copytree(demo_root, tmp_path / "data")
    store, shard = DatasetStore(str(tmp_path / "data")), DEMO_SHARDS[0]
    with store.open(RECAPTIONS.parquet(shard)) as f:
        before = f.read()
    busy = ChatCaptioner(_settings(server, in_flight=1, retries=0))
    server.script = [503] * 1000
    none = rf"^shard {shard}: the captioner captioned none of its \d+ images \(HTTP 503"
    with pytest.raises(CaptionerUnreachable, match=none):
        write_recaptions(store, shard, busy, ClipEncoder(DEMO_CLIP))
    with store.open(RECAPTIONS.parquet(shard)) as f:
        assert f.read() == before
    server.script = [503] * (len(server.requests) - 1)  # all but the last image
    rows = write_recaptions(store, shard, busy, ClipEncoder(DEMO_CLIP)).table.to_pylist()
    assert sum(row["re_caption"] is not None for row in rows) == 1
    assert all(row["re_caption_error"].startswith("HTTP 503") for row in rows if row["re_caption"] is None)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_shard_the_endpoint_refused_throughout_is_not_written(server, demo_root, tmp_path, status):
    """A wrong key (401, 403) or a wrong route or model name (404) refuses every image alike: the endpoint's
    fault, not an image's. The shard was written as a file of failed rows, a done shard no later run
    recaptioned; it fails, nothing written, as when the endpoint is down. A 400 stays an image's own."""
    from laion_assets.pipeline.recaptions.recaption import CaptionerUnreachable

    shutil.copytree(demo_root, tmp_path / "data")
    store, shard = DatasetStore(str(tmp_path / "data")), DEMO_SHARDS[0]
    with store.open(RECAPTIONS.parquet(shard)) as f:
        before = f.read()
    server.script = [status] * 1000
    refused = ChatCaptioner(_settings(server, in_flight=1))
    with pytest.raises(CaptionerUnreachable, match=rf"captioned none of its \d+ images \(HTTP {status}"):
        write_recaptions(store, shard, refused, ClipEncoder(DEMO_CLIP))
    with store.open(RECAPTIONS.parquet(shard)) as f:
        assert f.read() == before
    server.script = [400] * 1000
    rows = write_recaptions(store, shard, refused, ClipEncoder(DEMO_CLIP)).table.to_pylist()
    server.script = []
    assert rows and all(row["re_caption_error"].startswith("HTTP 400") for row in rows)
