"""The search page at `/`, in a real browser: Playwright driving Debian's chromium over the demo dataset
served by uvicorn, with an API key."""

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest
from PIL import Image

from laion_assets.demo.world import make_world
from laion_assets.pipeline.embeddings.clip import ClipEncoder
from laion_assets.pipeline.search.index import SearchIndex
from laion_assets.pipeline.storage import PAIRS, DatasetStore
from laion_assets.service.app import create_app
from laion_assets.service.settings import ServiceSettings
from laion_assets_tests.conftest import BROWSER_TIMEOUT_MS
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_IMAGES, DEMO_SHARDS
from laion_assets_tests.service_process import running

KEY = "a-key-for-the-page-test"
QUERY, COLOUR, SHAPE = "a blue square", "blue", "square"
SCREENSHOT = Path(__file__).parent.parent / "docs" / "search-page.png"


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return ClipEncoder(DEMO_CLIP)


@pytest.fixture(scope="module")
def planted(demo_root, encoder, tmp_path_factory) -> tuple[str, str]:
    """A copy of the demo dataset whose second hit for QUERY is tagged NSFW: (root, that key)."""
    root = str(tmp_path_factory.mktemp("page") / "data")
    shutil.copytree(demo_root, root)
    store = DatasetStore(root)
    hits = SearchIndex.load(store).search(encoder.encode_texts([QUERY])[0].numpy(), 3)
    key = hits[1].key
    shard = key.rsplit("-", 1)[0]
    pairs = store.read_parquet(PAIRS.parquet(shard))
    nsfw = pc.if_else(pc.equal(pairs.column("key"), key), "NSFW", pairs.column("nsfw"))
    store.write_parquet(
        PAIRS.parquet(shard), pairs.set_column(pairs.schema.get_field_index("nsfw"), "nsfw", nsfw)
    )
    return root, key


@pytest.fixture(scope="module")
def served(planted, encoder) -> Iterator[str]:
    with running(create_app(ServiceSettings(root=planted[0], api_key=KEY), encoder)) as url:
        yield url


def cards(page) -> list[dict]:
    """What the grid shows, in order: key, nsfw tag, the source URL, whether the thumbnail loaded."""
    return page.eval_on_selector_all(
        ".result",
        """cards => cards.map(card => ({
            key: card.querySelector('.key').textContent,
            nsfw: card.querySelector('.nsfw').textContent,
            url: card.querySelector('.source').textContent,
            src: card.querySelector('img').src,
        }))""",
    )


def wait_for_results(page, description: str) -> None:
    page.wait_for_function(
        "text => document.getElementById('status').textContent.includes(text)",
        arg=f"results for {description}",
        timeout=BROWSER_TIMEOUT_MS,
    )


def test_the_search_page(served, planted, browser, tmp_path):
    world = make_world(images=DEMO_IMAGES, failures={})
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    page.goto(served + "/")

    # The page is public; it asks for the key, and a wrong one is an error on the page, not a blank one.
    page.locator("#key-input").fill("not-the-key")
    page.locator("#key-form button").click()
    page.locator("#key-error").wait_for(state="visible")
    assert "wrong api_key" in page.locator("#key-error").text_content()
    assert page.locator("#key-section").is_visible() and not page.locator("#search-section").is_visible()
    page.locator("#key-input").fill(KEY)
    page.locator("#key-form button").click()
    page.locator("#search-section").wait_for(state="visible")
    assert page.locator("#key-error").is_hidden()

    # A text query, safe mode on (the default): the top hits show the colour and shape asked for, and
    # the pair tagged NSFW is hidden.
    nsfw_key = planted[1]
    assert page.locator("#safe").is_checked()
    page.locator("#count").fill("10")
    page.locator("#text-input").fill(QUERY)
    page.locator("#text-form button").click()
    wait_for_results(page, f"“{QUERY}”")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    safe = cards(page)
    assert len(safe) == 10 and nsfw_key not in {card["key"] for card in safe}
    assert {card["nsfw"] for card in safe} <= {"UNLIKELY", "UNTAGGED"}
    # every blue square the page may show comes first (this asserted three blue shapes first, two of them
    # squares: the model that ranked by colour before shape; the demo model now knows shapes)
    store = DatasetStore(planted[0])
    kept = [
        world.item_at(url)
        for shard in DEMO_SHARDS
        for url in store.read_parquet(PAIRS.parquet(shard), columns=["url"]).column("url").to_pylist()
    ]
    shown_squares = sum((item.colour, item.shape) == (COLOUR, SHAPE) for item in kept) - 1  # one hidden
    items = [world.item_at(card["url"]) for card in safe]
    assert shown_squares >= 2, kept
    assert all((item.colour, item.shape) == (COLOUR, SHAPE) for item in items[:shown_squares]), items
    assert all(card["src"].startswith("blob:") for card in safe)  # fetched with the key, no key in a URL
    assert "1 hidden by safe mode" in page.locator("#status").text_content()

    # Safe mode off: the planted pair is back, tagged, and the top three are blue squares.
    page.locator("#safe").uncheck()
    page.wait_for_function(
        "key => [...document.querySelectorAll('.result .key')].some(k => k.textContent === key)", arg=nsfw_key
    )
    unsafe = cards(page)
    assert next(card["nsfw"] for card in unsafe if card["key"] == nsfw_key) == "NSFW"
    assert all(
        (item.colour, item.shape) == (COLOUR, SHAPE) for item in (world.item_at(c["url"]) for c in unsafe[:3])
    )
    page.locator("#safe").check()
    wait_for_results(page, f"“{QUERY}”")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(tmp_path / "search-page.png"))
    if os.environ.get("UPDATE_SCREENSHOT"):  # docs/service.md's picture: UPDATE_SCREENSHOT=1 pytest this file
        SCREENSHOT.parent.mkdir(exist_ok=True)
        picture = Image.open(tmp_path / "search-page.png").convert("RGB")
        picture.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT, optimize=True)

    # "Similar images" on a result finds that result first.
    chosen = safe[4]["key"]
    page.locator(f'.result[data-key="{chosen}"] .similar').click()
    wait_for_results(page, f"images similar to {chosen}")
    assert cards(page)[0]["key"] == chosen

    # An uploaded image: the first thumbnail's own bytes, as a file.
    thumbnail = page.request.get(f"{served}/image/{chosen}", headers={"X-API-Key": KEY})
    assert thumbnail.ok and thumbnail.headers["cache-control"].startswith("private, max-age=")
    Image.open(io.BytesIO(thumbnail.body())).verify()
    page.locator("#file-input").set_input_files(
        files=[{"name": "query.jpg", "mimeType": "image/jpeg", "buffer": thumbnail.body()}]
    )
    wait_for_results(page, "query.jpg")
    assert cards(page)[0]["key"] == chosen

    # Everything came from this server: no original URL was hotlinked.
    assert requested and all(url.startswith((served, "blob:", "data:")) for url in requested), requested
    assert not errors, errors
    page.close()


def test_image_route_needs_the_key_and_knows_its_keys(served, browser):
    page = browser.new_page()
    request = page.request
    key = "synthetic-web-0-00000003"
    assert request.get(f"{served}/image/{key}").status == 401
    first = request.get(f"{served}/image/{key}", headers={"X-API-Key": KEY})
    assert first.status == 200 and first.headers["content-type"] == "image/jpeg"
    again = request.get(
        f"{served}/image/{key}", headers={"X-API-Key": KEY, "If-None-Match": first.headers["etag"]}
    )
    assert again.status == 304
    assert request.get(f"{served}/image/synthetic-web-0-99999999", headers={"X-API-Key": KEY}).status == 404
    assert request.get(f"{served}/image/nothing", headers={"X-API-Key": KEY}).status == 404
    for public in ("/", "/static/page.js", "/static/page.css"):
        assert request.get(served + public).status == 200, public
    page.close()


def test_an_image_of_a_shard_rewritten_since_it_was_scanned_is_its_own(root):
    """A removal rewrites pairs/<shard>.tar without its samples, which moves the others; the offsets
    scanned before were used on the new file for RECHECK_SECONDS, so /image served another sample's bytes
    under the old ETag, which browsers keep for a day."""
    from laion_assets.pipeline.shard_tar import TarShardWriter, drop_samples
    from laion_assets.service.page import Pairs

    store = DatasetStore(root)
    images = {f"a-{i:08d}": bytes([i]) * (700 + 300 * i) for i in range(3)}
    with store.atomic_write(PAIRS.tar("a")) as f, TarShardWriter(f) as writer:
        for key, data in images.items():
            writer.write(key, {"jpg": data, "txt": b"a caption"})
    pairs = Pairs(store)
    before = pairs.image("a-00000002")
    assert before[0] == images["a-00000002"]
    assert drop_samples(store, PAIRS.tar("a"), {"a-00000000"}) == 1
    after = pairs.image("a-00000002")
    assert after[0] == images["a-00000002"] and after[2] != before[2]
    assert pairs.image("a-00000000") is None
