import base64
import io
import json
import re
import signal
import subprocess
import sys
import textwrap

import dagster as dg
import pytest
import yaml
from PIL import Image

from laion_assets import names
from laion_assets.defs.card import dataset_card
from laion_assets.defs.resources import DatasetStoreResource
from laion_assets.pipeline import schemas
from laion_assets.pipeline.card import UI_FIGURE_WIDTH, CardSettings, write_card
from laion_assets.pipeline.card.readme import size_category
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.pairs.filter import FUNNEL
from laion_assets.pipeline.storage import CARD, CARD_FIGURES, DatasetStore
from laion_assets_tests.dagster_helpers import LOCAL_WEB, materialize_shard

# shard -> image paths on the test web; each has a 404, `b` also an image that does not decode
SHARDS = {
    "a": ["/img/red.jpg", "/img/green.png", "/404.jpg"],
    "b": ["/img/blue.webp", "/exif.jpg", "/404.jpg", "/garbage.jpg"],
}


# the per-shard assets up to the pairs: a shard whose recaptions are not made yet
BEFORE_RECAPTIONS = [
    "crawl_metadata",
    "downloaded_images",
    "clip_embeddings",
    "quality_scores",
    "filtered_pairs",
]


def _materialize(
    instance: dg.DagsterInstance,
    root: str,
    web,
    shard: str,
    min_similarity: float,
    selection=None,
    paths: list[str] | None = None,
    captions: list[str] | None = None,
    preset: str = "",
):
    """One shard (its `paths` or whole URLs, else `SHARDS`', with `captions` if given) through every
    per-shard asset (or `selection`), the pairs' rules a `preset` if given; random CLIP weights, so every
    pair is kept."""
    store = DatasetStore(root)
    paths = paths or SHARDS[shard]
    captions = captions or [f"a picture of {path} in {shard}" for path in paths]
    lines = [
        {"url": path if "://" in path else web.url(path), "caption": caption, "license": "cc-by-4.0"}
        for path, caption in zip(paths, captions, strict=True)
    ]
    store.write_bytes(f"incoming/{shard}.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())
    ops = {
        "downloaded_images": {"config": LOCAL_WEB},
        "filtered_pairs": {
            "config": {"min_similarity": min_similarity, "drop_minors": False, "preset": preset}
        },
    }
    config = {"ops": {op: c for op, c in ops.items() if selection is None or op in selection}}
    result = materialize_shard(instance, root, shard, config, selection=selection)
    assert result.success
    return result


def _front_matter(markdown: str) -> dict:
    assert markdown.startswith("---\n")
    return yaml.safe_load(markdown[4:].split("\n---\n", 1)[0])


def test_card_over_two_shards(root, web):
    store = DatasetStore(root)
    instance = dg.DagsterInstance.ephemeral()
    # the shards used different thresholds: the card lists both
    runs = {
        "a": _materialize(instance, root, web, "a", -1.0),
        "b": _materialize(instance, root, web, "b", -0.9),
    }

    result = write_card(store)
    markdown = result.markdown
    with store.open(CARD) as f:
        assert f.read().decode() == markdown

    pairs = catalog.connect(store).sql("SELECT count(*) FROM pairs").fetchone()[0]
    assert result.shards == 2 and result.pairs == pairs == 4
    header = _front_matter(markdown)
    assert header["license"] == "other"
    assert header["size_categories"] == ["n<1K"]
    assert header["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "pairs/*.parquet"}]},
        {"config_name": "recap", "data_files": [{"split": "train", "path": "recaptions/*.parquet"}]},
    ]
    assert "zero-shot-image-classification" in header["task_categories"]

    funnels = []
    for shard in SHARDS:
        metadata = store.read_parquet(f"pairs/{shard}.parquet").schema.metadata
        funnels.append(json.loads(metadata[names.PAIRS_FUNNEL_FOOTER.encode()]))
    rows_in = sum(f["rows_in"] for f in funnels)
    assert f"| rows in |  | {rows_in} |" in markdown
    remaining = rows_in
    for rule in FUNNEL:
        removed = sum(f["removed"][rule] for f in funnels)
        remaining -= removed
        assert f"| {rule} | {removed} | {remaining} |" in markdown  # then the share of what it saw kept
    assert remaining == pairs

    statuses = dict(catalog.connect(store).sql("SELECT status, count(*) FROM images GROUP BY 1").fetchall())
    assert statuses[schemas.FAILED_TO_DOWNLOAD] == 2 and statuses[schemas.FAILED_TO_DECODE] == 1
    for status in schemas.STATUSES:
        assert f"| {status} | {statuses.get(status, 0)} |" in markdown
    assert "| HTTP 404 | 2 |" in markdown
    assert f"| 127.0.0.1:{web.port} | 3 |" in markdown

    assert "| laion-assets-tiny | none | a, b |" in markdown
    assert "| min_similarity | -1.0 | -0.9 |" in markdown
    for shard, run in runs.items():
        assert f"| {shard} | {shard}.jsonl | {run.run_id} |" in markdown

    assert "| `similarity` | double |" in markdown
    for path in result.figures:
        with store.open(path) as f:
            image = Image.open(io.BytesIO(f.read()))
            assert image.format == "PNG" and image.width > 100
        assert f"](figures/{path.rsplit('/', 1)[1]})" in markdown
    # each figure named by its content: `similarity-<hash>.png`
    assert {re.sub(r"-[0-9a-f]{12}[.]png$", ".png", p.rsplit("/", 1)[1]) for p in result.figures} == {
        "similarity.png",
        "image_sizes.png",
        "nsfw.png",
        "licenses.png",
        "samples.png",
        "recaption_scores.png",
        "caption_lengths.png",
        "scores.png",
        "languages.png",
    }
    # the quality scores: the tiny random CLIP has no head (`auto` finds none), the watermark and the
    # language are computed for every embedded image
    scored, pwatermark = catalog.connect(store).sql("SELECT count(*), avg(pwatermark) FROM scores").fetchone()
    assert f"for {scored} of the {scored} embedded images" in markdown  # every one scored
    assert "| punsafe | not computed |" in markdown and "| aesthetic | not computed |" in markdown
    assert f"| pwatermark | {pwatermark:.4f} |" in markdown
    assert "| punsafe: none, pwatermark: sha256:" in markdown
    assert ", aesthetic: none, language: py3langid | a, b |" in markdown
    assert "| none | a, b |" in markdown  # no rule on the scores
    recaptions = catalog.connect(store).sql(
        "SELECT count(*), count(re_caption), count(*) FILTER (re_clip_score > org_clip_score), "
        "avg(org_length), avg(re_length) FROM recaptions"
    )
    rows, recaptioned, above, org_length, re_length = recaptions.fetchone()
    assert rows == pairs and recaptioned == pairs
    assert (
        f"{recaptioned} of {pairs} pairs recaptioned; the new caption scores higher than the web's "
        f"for {above} (" in markdown
    )
    assert f"| mean length, words | {org_length:.1f} | {re_length:.1f} |" in markdown
    for (key,) in catalog.connect(store).sql("SELECT key FROM recaptions").fetchall():
        assert f"| {key} |" in markdown  # four pairs: every one is an example
    assert "captioner: open_clip CoCa" in markdown and "| a, b |" in markdown
    assert "@misc{laion_style_image_text_pairs20" in markdown and "arXiv:2111.02114" in markdown

    # the same stored data makes the same card, figures included
    figures = {}
    for path in result.figures:
        with store.open(path) as f:
            figures[path] = f.read()
    again = write_card(store)
    assert again.markdown == markdown
    for path in again.figures:
        with store.open(path) as f:
            assert f.read() == figures[path]


def test_every_count_is_over_the_shards_that_have_pairs(root, web):
    """Shard b crawled, downloaded, embedded and scored, its pairs not built yet: its rows were counted in
    the crawl rows, downloads, embedded images, statuses, errors, failing hosts, similarity histogram and
    quality scores, while the pairs, the shard count and the funnel were a's alone ("2 pairs from 1
    shards: 7 crawl rows")."""
    from laion_assets.pipeline.card.stats import gather_stats

    store = DatasetStore(root)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(instance, root, web, "a", -1.0)
    before_pairs = ["crawl_metadata", "downloaded_images", "clip_embeddings", "quality_scores"]
    _materialize(instance, root, web, "b", -1.0, selection=before_pairs)

    markdown = write_card(store).markdown
    images = store.read_parquet("images/a.parquet").to_pylist()
    statuses = {status: sum(r["status"] == status for r in images) for status in schemas.STATUSES}
    crawl_rows, embedded = (
        store.parquet_num_rows(f"{layer}/a.parquet") for layer in ("crawl_metadata", "embeddings")
    )
    pairs = store.parquet_num_rows("pairs/a.parquet")
    assert (
        f"{pairs} pairs from 1 shards: {crawl_rows} crawl rows, {statuses[schemas.SUCCESS]} images "
        f"downloaded, {embedded} embedded. Every number and figure of this card is over these shards. 1 more "
        "shards are being built and have no pairs yet: nothing of theirs is counted on this card (b)."
    ) in markdown
    assert "| a.jsonl |" in markdown and "b.jsonl" not in markdown
    for status, n in statuses.items():
        assert f"| {status} | {n} |" in markdown
    failed = statuses[schemas.FAILED_TO_DOWNLOAD] + statuses[schemas.FAILED_TO_DECODE]
    assert f"| HTTP 404 | {statuses[schemas.FAILED_TO_DOWNLOAD]} |" in markdown
    assert f"| 127.0.0.1:{web.port} | {failed} |" in markdown
    assert f"for {embedded} of the {embedded} embedded images" in markdown
    stats = gather_stats(store, CardSettings())
    assert sum(n for _, n in stats.similarity_bins) == embedded
    assert sum(n for _, n in stats.size_bins["original_width"]) == statuses[schemas.SUCCESS]
    assert stats.scores.scored == embedded and stats.in_progress == ["b"]


def test_a_source_without_rows_is_in_the_sources(local_root, web):
    """A header-only CSV makes a shard of no rows, with pairs (none): the card counted it among its shards
    and left it out of the Sources table, whose rows came from grouping the crawl rows."""
    store = DatasetStore(local_root)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(instance, local_root, web, "a", -1.0)
    store.write_bytes("incoming/e.csv", b"url,caption\n")
    config = {"ops": {"downloaded_images": {"config": LOCAL_WEB}}}
    assert materialize_shard(instance, local_root, "e", config).success
    assert store.parquet_num_rows("pairs/e.parquet") == 0

    markdown = write_card(store).markdown
    assert "2 pairs from 2 shards: 3 crawl rows" in markdown
    sources = markdown.split("### Sources\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert sources.endswith("| source file | crawl rows |\n|---|---|\n| a.jsonl | 3 |\n| e.csv | 0 |")


# A card written in its own process, which SIGKILLs itself as the README's write begins.
_KILLED_AT_README = textwrap.dedent(
    """
    import os, signal, sys
    from laion_assets.pipeline.card import CardSettings, write_card
    from laion_assets.pipeline.storage import CARD, CARD_FIGURES, DatasetStore
    atomic_write = DatasetStore.atomic_write

    def killed_at_readme(self, relpath):
        if relpath == CARD:
            os.kill(os.getpid(), signal.SIGKILL)
        return atomic_write(self, relpath)

    DatasetStore.atomic_write = killed_at_readme
    write_card(DatasetStore(sys.argv[1]), CardSettings(grid_samples=int(sys.argv[2])))
    """
)


def _card_on_disk(store: DatasetStore) -> tuple[str, dict[str, bytes]]:
    """The README and every file in card/figures/."""
    figures = {f.name: store.read_bytes(f"{CARD_FIGURES}/{f.name}") for f in store.list(CARD_FIGURES)}
    return store.read_bytes(CARD).decode(), figures


def _linked(markdown: str) -> set[str]:
    return set(re.findall(r"\]\(figures/([^)]+)\)", markdown))


def test_the_card_leaves_only_the_figures_it_links_and_changes_them_with_its_readme(local_root, web):
    """The figures went to fixed names, before the README, and none was ever removed: a figure the new card
    no longer links (the recaptions', once they were dropped) stayed in card/figures/ for ever, and a card
    run killed before its README left the old README showing the new run's figures."""
    store = DatasetStore(local_root)
    _materialize(dg.DagsterInstance.ephemeral(), local_root, web, "a", -1.0)
    write_card(store, CardSettings(grid_samples=1))
    old_readme, old_figures = _card_on_disk(store)
    assert _linked(old_readme) == set(old_figures)

    # killed as it writes the README of a card with another sample grid: the old card stays whole
    command = [sys.executable, "-c", _KILLED_AT_README, local_root, "2"]
    killed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    readme, figures = _card_on_disk(store)
    assert readme == old_readme
    assert {name: figures[name] for name in _linked(readme)} == old_figures

    # the recaptions dropped: the next card links no recaption figure, and only its figures are left
    store.remove("recaptions/a.parquet")
    result = write_card(store, CardSettings(grid_samples=2))
    readme, figures = _card_on_disk(store)
    assert readme == result.markdown and "## Recaptions" not in readme
    assert _linked(readme) == set(figures) == {path.rsplit("/", 1)[1] for path in result.figures}
    assert not any(name.startswith(("recaption_scores", "caption_lengths")) for name in figures)


def test_without_recaptions_the_card_has_no_recap_config(root, web):
    _materialize(dg.DagsterInstance.ephemeral(), root, web, "a", -1.0, selection=BEFORE_RECAPTIONS)
    result = write_card(DatasetStore(root))
    assert [c["config_name"] for c in _front_matter(result.markdown)["configs"]] == ["default"]
    assert "## Recaptions" not in result.markdown
    shown = [p.rsplit("/", 1)[1] for p in result.figures]
    assert not any(name.startswith(("recaption_scores-", "caption_lengths-")) for name in shown)
    assert any(name.startswith("similarity-") for name in shown)


def test_asset_puts_the_card_in_its_metadata(local_root, web):
    instance = dg.DagsterInstance.ephemeral()
    _materialize(instance, local_root, web, "a", -1.0)
    result = dg.materialize(
        [dataset_card],
        resources={"store": DatasetStoreResource(root=local_root)},
        run_config={"ops": {"dataset_card": {"config": {"license": "cc-by-4.0", "grid_samples": 2}}}},
        instance=instance,
    )
    assert result.success
    metadata = result.asset_materializations_for_node("dataset_card")[0].metadata
    with DatasetStore(local_root).open(CARD) as f:
        markdown = f.read().decode()
    assert _front_matter(markdown)["license"] == "cc-by-4.0"  # the Hub's card, on disk
    # the UI's: the card's body, no front matter, each figure inside it, no wider than the dialog
    shown = metadata["card"].value
    body = markdown.split("\n---\n", 1)[1].lstrip("\n")
    figures_as = "(F)"
    assert re.sub(r"\(data:image/(png|jpeg);base64,[^)]+\)", figures_as, shown) == re.sub(
        r"\(figures/[^)]+\)", figures_as, body
    )
    sources = re.findall(r"!\[[^\]]*\]\(data:image/(?:png|jpeg);base64,([^)]+)\)", shown)
    assert len(sources) == len(re.findall(r"!\[[^\]]*\]\(figures/", markdown)) >= 5
    for source in sources:
        figure = Image.open(io.BytesIO(base64.b64decode(source)))
        assert figure.format in ("PNG", "JPEG") and 0 < figure.width <= UI_FIGURE_WIDTH
    assert metadata["dagster/row_count"].value == 2 and metadata["shards"].value == 1
    assert metadata["path"].value == DatasetStore(local_root).url(CARD)


def test_the_recaptions_count_the_pairs_of_every_shard(local_root, web):
    """Shard b filtered, its recaptions not made yet: the card read "2 of 2 pairs recaptioned" of 4 pairs,
    the count of pairs being the recaptions' rows."""
    store = DatasetStore(local_root)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(instance, local_root, web, "a", -1.0)
    _materialize(instance, local_root, web, "b", -1.0, selection=BEFORE_RECAPTIONS)
    pairs = [store.parquet_num_rows(f"pairs/{shard}.parquet") for shard in ("a", "b")]
    recaptioned = store.parquet_num_rows("recaptions/a.parquet")
    assert recaptioned == pairs[0] and pairs[1] > 0

    markdown = write_card(store).markdown
    assert f"{sum(pairs)} pairs from 2 shards" in markdown
    assert f"{recaptioned} of {sum(pairs)} pairs recaptioned; " in markdown
    assert "The pairs of shard b have no recaptions yet." in markdown


def test_the_quality_scores_say_which_embedded_images_they_cover(local_root, web):
    """Shard b's pairs made with no quality scores (no rule reads them; its quality_scores step run
    later, or failed): the card said the scores were "for each of the 2 embedded images" of 4."""
    store = DatasetStore(local_root)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(instance, local_root, web, "a", -1.0)
    _materialize(
        instance,
        local_root,
        web,
        "b",
        -1.0,
        selection=["crawl_metadata", "downloaded_images", "clip_embeddings"],
    )
    _materialize(instance, local_root, web, "b", -1.0, selection=["filtered_pairs"])
    assert store.exists("pairs/b.parquet") and not store.exists("scores/b.parquet")
    scored, embedded = (
        sum(store.parquet_num_rows(f"{layer}/{shard}.parquet") for shard in shards)
        for layer, shards in (("scores", ["a"]), ("embeddings", ["a", "b"]))
    )

    markdown = write_card(store).markdown
    assert f"{embedded} embedded." in markdown and scored < embedded
    assert f"for {scored} of the {embedded} embedded images" in markdown
    assert "The images of shard b have no quality scores yet." in markdown


def test_a_dataset_without_pairs_has_true_recaption_figures(local_root, web):
    # every download failed: the shard has an empty recaptions file, so no pair, and no mean of nothing
    _materialize(dg.DagsterInstance.ephemeral(), local_root, web, "z", -1.0, paths=["/404.jpg", "/404.jpg"])
    markdown = write_card(DatasetStore(local_root)).markdown
    assert "0 of 0 pairs recaptioned; the new caption scores higher than the web's for 0 (0.0%)" in markdown
    assert "| mean CLIP score | none | none |" in markdown
    assert "| mean length, words | none | none |" in markdown


def test_a_caption_with_line_breaks_stays_in_its_table_row(local_root, web):
    # a source list's captions keep their inner CRLF and CR; markdown ends a line at either
    captions = ["a red square\r\non white", "a green\rcircle | here"]
    paths = ["/img/red.jpg", "/img/green.png"]
    _materialize(dg.DagsterInstance.ephemeral(), local_root, web, "w", -1.0, paths=paths, captions=captions)
    markdown = write_card(DatasetStore(local_root)).markdown
    assert "\r" not in markdown
    examples = markdown.split("### Examples\n\n", 1)[1].split("\n\n", 1)[0].split("\n")
    assert len(examples) == 2 + len(captions)  # header, rule, a line per pair
    assert examples[2].startswith("| w-00000000 | a red square on white | ")
    assert examples[3].startswith("| w-00000001 | a green circle \\| here | ")
    assert all(line.count(" | ") == 4 for line in examples[2:])  # five cells each


def test_a_caption_s_html_and_markdown_show_as_written(local_root, web):
    # alt text is text: a tag in it must not render, nor an image link fetch a third party's pixel
    captions = ['a <img src="http://t.example/p.gif"> square', "a ![pixel](http://t.example/p.gif) *star*"]
    paths = ["/img/red.jpg", "/img/green.png"]
    _materialize(dg.DagsterInstance.ephemeral(), local_root, web, "h", -1.0, paths=paths, captions=captions)
    markdown = write_card(DatasetStore(local_root)).markdown
    examples = markdown.split("### Examples\n\n", 1)[1].split("\n\n", 1)[0]
    assert "| h-00000000 | a &lt;img src=&quot;http://t.example/p.gif&quot;&gt; square | " in examples
    assert "| h-00000001 | a \\!\\[pixel\\](http://t.example/p.gif) \\*star\\* | " in examples
    assert "<img" not in examples and "![" not in examples


def test_a_failing_host_s_html_shows_as_written(local_root, web):
    # a crawled URL's host is the page's to write; `\\` being `/` to a browser, this one was an image that
    # loaded a third party's pixel wherever the card was shown
    paths = ["/img/red.jpg", "http://<img src=\\\\t.example\\p.gif>/a.jpg"]
    _materialize(dg.DagsterInstance.ephemeral(), local_root, web, "v", -1.0, paths=paths)
    markdown = write_card(DatasetStore(local_root)).markdown
    hosts = markdown.split("failing hosts\n\n", 1)[1].split("\n## ", 1)[0]
    assert "| &lt;img src=\\\\\\\\t.example\\\\p.gif&gt; | 1 |" in hosts and "<img" not in hosts


def test_the_card_gives_the_rules_a_preset_applied(local_root, web):
    """A shard filtered by `datacomp-clip-score` kept its top 30 %; its footer records the preset and the
    fields as set (top_fraction 0, min_similarity 0.3), which the card showed as the rules, and the
    similarity histogram marked a threshold of 0.3 that no pair was filtered by."""
    from laion_assets.pipeline.card.stats import gather_stats

    store = DatasetStore(local_root)
    _materialize(dg.DagsterInstance.ephemeral(), local_root, web, "a", 0.3, preset="datacomp-clip-score")
    assert store.read_parquet("pairs/a.parquet").num_rows == 1  # of the two images, the top 30 %
    markdown = write_card(store).markdown
    assert "| top_fraction | 0.3 |" in markdown and "| preset | datacomp-clip-score |" in markdown
    assert gather_stats(store, CardSettings()).thresholds() == []  # no threshold line on the histogram


def test_no_shards_is_an_error(root):
    store = DatasetStore(root)
    with pytest.raises(ValueError, match=f"no materialised shards under {store.root}"):
        write_card(store, CardSettings())
    assert not store.exists(CARD)


@pytest.mark.parametrize(
    ("rows", "category"),
    [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"), (250_000, "100K<n<1M"), (10**12, "n>1T")],
)
def test_size_category(rows, category):
    assert size_category(rows) == category
