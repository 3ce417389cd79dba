"""Roboflow's own client, `inference-sdk`, unmodified, against `laion-assets serve` run as a process."""

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from inference_sdk import InferenceConfiguration, InferenceHTTPClient
from inference_sdk.http.errors import HTTPCallErrorError
from inference_sdk.http.utils.loaders import load_static_inference_input
from PIL import Image

from laion_assets.pipeline.download.imaging import decode_image
from laion_assets.pipeline.embeddings.clip import ClipEncoder
from laion_assets_tests.dagster_helpers import TINY_CLIP
from laion_assets_tests.service_process import Served, serving
from laion_assets_tests.web import IMAGES

KEY = "a-key-of-24-characters-x"
# The service answers float32 from the same model; the encoder here runs the same weights on the same
# pixels, in batches of other sizes.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return ClipEncoder(TINY_CLIP)


@pytest.fixture(scope="module")
def open_url() -> Iterator[str]:
    with serving() as served:
        yield served.url


@pytest.fixture(scope="module")
def keyed() -> Iterator[Served]:
    with serving("--api-key", KEY) as served:
        yield served


@pytest.fixture
def keyed_url(keyed) -> str:
    return keyed.url


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, object]:
    """One picture in each form the client takes: a PNG path, a JPEG path, a PIL image, a numpy array
    (BGR, as the client reads arrays, like OpenCV)."""
    folder = tmp_path_factory.mktemp("images")
    png, jpeg = folder / "green.png", folder / "red.jpg"
    png.write_bytes(IMAGES["/img/green.png"][1])
    jpeg.write_bytes(IMAGES["/img/red.jpg"][1])
    blue = Image.open(io.BytesIO(IMAGES["/img/blue.webp"][1])).convert("RGB")
    bgr = np.ascontiguousarray(np.asarray(decode_image(IMAGES["/exif.jpg"][1], 10**8))[:, :, ::-1])
    return {"png path": str(png), "jpeg path": str(jpeg), "PIL image": blue, "numpy array": bgr}


def expected_images(encoder: ClipEncoder, references: list) -> np.ndarray:
    """The encoder's own embeddings of exactly the bytes the client sends for `references`."""
    sent = [base64.b64decode(value) for value, _ in load_static_inference_input(references)]
    pixels = [encoder.prepare(decode_image(data, 10**8)) for data in sent]
    return encoder.encode_images(torch.stack(pixels)).numpy()


def expected_texts(encoder: ClipEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode_texts(texts).numpy()


def close(answer: list, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(answer, np.float32), expected, atol=TOLERANCE)


def exercise(client: InferenceHTTPClient, encoder: ClipEncoder, images: dict[str, object]) -> None:
    """Every CLIP call of the client, checked against the encoder."""
    references = list(images.values())
    for name, reference in images.items():
        answer = client.get_clip_image_embeddings(inference_input=reference)
        assert answer["frame_id"] is None and answer["time"] > 0, name
        close(answer["embeddings"], expected_images(encoder, [reference]))
    several = client.get_clip_image_embeddings(inference_input=references)  # one request per image
    assert len(several) == len(references)
    close([a["embeddings"][0] for a in several], expected_images(encoder, references))

    texts = ["a red square", "a green circle", "a blue triangle"]
    one = client.get_clip_text_embeddings(text=texts[0])
    close(one["embeddings"], expected_texts(encoder, texts[:1]))
    close(client.get_clip_text_embeddings(text=texts)["embeddings"], expected_texts(encoder, texts))

    subject = images["jpeg path"]
    image_vector = expected_images(encoder, [subject])[0]
    text_vectors = expected_texts(encoder, texts)
    against_texts = client.clip_compare(subject=subject, prompt=texts)
    assert against_texts["parent_id"] is None
    close(against_texts["similarity"], text_vectors @ image_vector)
    prompts = [images["png path"], images["PIL image"]]
    against_images = client.clip_compare(subject=subject, prompt=prompts, prompt_type="image")
    close(against_images["similarity"], expected_images(encoder, prompts) @ image_vector)
    named = client.clip_compare(subject=subject, prompt=dict(zip("abc", texts, strict=True)))
    assert list(named["similarity"]) == ["a", "b", "c"]
    close(list(named["similarity"].values()), text_vectors @ image_vector)
    text_subject = client.clip_compare(subject=texts[0], subject_type="text", prompt=texts[1:])
    close(text_subject["similarity"], text_vectors[1:] @ text_vectors[0])


def test_every_call_without_a_key(open_url, encoder, images):
    exercise(InferenceHTTPClient(api_url=open_url), encoder, images)


def test_a_batch_of_images_in_one_request(open_url, encoder, images):
    client = InferenceHTTPClient(api_url=open_url)
    client.configure(InferenceConfiguration(max_batch_size=4))
    references = list(images.values())
    answers = client.get_clip_image_embeddings(inference_input=references)  # one request of 4
    close([a["embeddings"][0] for a in answers], expected_images(encoder, references))


def test_texts_in_any_number_in_one_request(open_url, encoder):
    """Roboflow's server embeds any number of texts in one request (its CLIP_MAX_BATCH_SIZE bounds only
    images and compare prompts), and the client sends a list of texts whole: 50 class names."""
    texts = [f"a photo of thing number {i}" for i in range(50)]
    answer = InferenceHTTPClient(api_url=open_url).get_clip_text_embeddings(text=texts)
    close(answer["embeddings"], expected_texts(encoder, texts))


@pytest.mark.parametrize(
    "transport",
    ["v1 JSON body", "v0 query", "Bearer header", "body and Bearer header"],
)
def test_every_call_with_the_key_where_the_client_puts_it(keyed_url, encoder, images, transport):
    client = InferenceHTTPClient(api_url=keyed_url, api_key=KEY)
    if transport == "v0 query":
        client.select_api_v0()
    elif transport == "Bearer header":
        client.configure(InferenceConfiguration(api_key_transport="header"))
    elif transport == "body and Bearer header":
        client.configure(InferenceConfiguration(api_key_transport="both"))
    exercise(client, encoder, images)


@pytest.mark.parametrize("transport", ["v1 JSON body", "v0 query", "Bearer header"])
def test_a_wrong_or_missing_key_is_refused_with_401(keyed_url, images, transport):
    for key in ("not-the-key-but-long-enough", None):
        client = InferenceHTTPClient(api_url=keyed_url, api_key=key)
        if transport == "v0 query":
            client.select_api_v0()
        elif transport == "Bearer header":
            client.configure(InferenceConfiguration(api_key_transport="header"))
        for call in (
            lambda c: c.get_clip_text_embeddings(text="a red square"),
            lambda c: c.get_clip_image_embeddings(inference_input=images["png path"]),
            lambda c: c.clip_compare(subject=images["png path"], prompt=["a red square"]),
        ):
            with pytest.raises(HTTPCallErrorError) as refused:
                call(client)
            assert refused.value.status_code == 401
            assert "api_key" in refused.value.api_message


def test_the_key_is_never_logged(keyed, encoder, images):
    """After calls with the key in the body, the query and the header, and with wrong keys: the server's
    log shows the requests (uvicorn's access log) but never the key, not even from the query string."""
    exercise(InferenceHTTPClient(api_url=keyed.url, api_key=KEY), encoder, images)
    v0 = InferenceHTTPClient(api_url=keyed.url, api_key=KEY)
    v0.select_api_v0()
    v0.get_clip_text_embeddings(text="a red square")
    log = keyed.log()
    assert "POST /clip/embed_text" in log and "api_key=***" in log
    assert KEY not in log
