import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from laion_assets import names
from laion_assets.cli import main
from laion_assets.pipeline import schemas
from laion_assets.pipeline.crawl.metadata import CrawlSettings, write_crawl_metadata
from laion_assets.pipeline.lineage import (
    identity_of,
    incoming_by_shard,
    inherited_footer,
    source_footer,
    stale_layers,
)
from laion_assets.pipeline.storage import (
    CRAWL_METADATA,
    EMBEDDINGS,
    IMAGES,
    PAIRS,
    RECAPTIONS,
    SCORES,
    DatasetStore,
)
from laion_assets_tests.dagster_helpers import local_web_config
from laion_assets_tests.web import TestWeb as Web

A = b"url,caption\nhttp://a.com/1.jpg,a cat\n"
ROW = pa.table({"key": ["a-00000000"]})
IMAGES_ROWS = schemas.IMAGES.empty_table()  # images and pairs files must have the contract's columns


def test_a_shard_is_done_when_every_layer_was_made_from_the_current_source(root):
    store = DatasetStore(root)
    store.write_bytes("incoming/a.csv", A)
    source = incoming_by_shard(store)["a"]
    layers = [CRAWL_METADATA, IMAGES, EMBEDDINGS]
    assert stale_layers(store, {"a": source}, layers)["a"] == layers  # nothing made yet

    store.write_parquet(CRAWL_METADATA.parquet("a"), ROW, metadata=source_footer(source))
    made_from_crawl = inherited_footer(store.read_parquet(CRAWL_METADATA.parquet("a")))
    store.write_parquet(IMAGES.parquet("a"), IMAGES_ROWS, metadata=made_from_crawl)
    assert stale_layers(store, {"a": source}, layers)["a"] == [EMBEDDINGS]
    store.write_parquet(EMBEDDINGS.parquet("a"), ROW)  # a file that does not say what it was made from
    assert stale_layers(store, {"a": source}, layers)["a"] == [EMBEDDINGS]
    store.write_parquet(
        EMBEDDINGS.parquet("a"), ROW, metadata=inherited_footer(store.read_parquet(IMAGES.parquet("a")))
    )
    assert stale_layers(store, {"a": source}, layers)["a"] == []

    # The images were made from an older crawl: they and everything after them are stale.
    store.write_parquet(IMAGES.parquet("a"), IMAGES_ROWS)
    assert stale_layers(store, {"a": source}, layers)["a"] == [IMAGES, EMBEDDINGS]
    # ... or from this crawl, but before `host` joined the contract: the same
    store.write_parquet(IMAGES.parquet("a"), IMAGES_ROWS.drop_columns(["host"]), metadata=made_from_crawl)
    assert stale_layers(store, {"a": source}, layers)["a"] == [IMAGES, EMBEDDINGS]
    store.write_parquet(IMAGES.parquet("a"), IMAGES_ROWS, metadata=made_from_crawl)
    assert stale_layers(store, {"a": source}, layers)["a"] == []

    store.write_bytes("incoming/a.csv", A + b"http://a.com/2.jpg,a dog\n")  # replaced with new content
    replaced = incoming_by_shard(store)["a"]
    assert replaced.fingerprint != source.fingerprint
    assert stale_layers(store, {"a": replaced}, layers)["a"] == layers


def test_a_shard_that_several_files_make_is_never_done(local_root):
    """The sensor, the schedule and `run` share this rule: a second file making a done shard is not
    ignored (the shard's crawl then fails, naming both files)."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a_b.csv", A)
    source = incoming_by_shard(store)["a_b"]
    store.write_parquet(CRAWL_METADATA.parquet("a_b"), ROW, metadata=source_footer(source))
    assert stale_layers(store, {"a_b": source}, [CRAWL_METADATA])["a_b"] == []
    store.write_bytes("incoming/a.b.csv", A)
    sources = incoming_by_shard(store)
    assert list(sources) == ["a_b"]
    assert stale_layers(store, sources, [CRAWL_METADATA])["a_b"] == [CRAWL_METADATA]


def test_a_layer_made_from_an_upstream_file_since_rebuilt_otherwise_is_stale(local_root):
    """`run --select downloaded_images --rebuild-stale` rebuilt the images at a new image_size and left the
    embeddings and pairs made from the old ones: they record the same source, so `status` said up to
    date, and no run made them again. A layer records what the file it was made from says about itself
    (source, settings, and what that one was made from); a rebuild with the same of these, or a removal's
    rewrite, which keeps the footer, leaves the layers after it current."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", A)
    sources = incoming_by_shard(store)
    layers = [CRAWL_METADATA, IMAGES, EMBEDDINGS]
    store.write_parquet(CRAWL_METADATA.parquet("a"), ROW, metadata=source_footer(sources["a"]))

    def build(layer, upstream, settings: dict) -> None:
        made_from = inherited_footer(store.read_parquet(upstream.parquet("a")))
        table = IMAGES_ROWS if layer is IMAGES else ROW
        store.write_parquet(
            layer.parquet("a"), table, metadata={**made_from, "laion_assets.settings": json.dumps(settings)}
        )

    build(IMAGES, CRAWL_METADATA, {"image_size": 256})
    build(EMBEDDINGS, IMAGES, {})
    assert stale_layers(store, sources, layers)["a"] == []
    build(IMAGES, CRAWL_METADATA, {"image_size": 256})  # again, as it was: the embeddings stay current
    assert stale_layers(store, sources, layers)["a"] == []
    build(IMAGES, CRAWL_METADATA, {"image_size": 128})
    assert stale_layers(store, sources, layers)["a"] == [EMBEDDINGS]
    assert stale_layers(store, sources, [EMBEDDINGS])["a"] == [EMBEDDINGS]  # asked for on its own too
    build(EMBEDDINGS, IMAGES, {})
    assert stale_layers(store, sources, layers)["a"] == []


def test_pairs_filtered_on_scores_since_rebuilt_otherwise_are_stale(local_root):
    """Pairs whose rules read the quality scores (a LAION-Aesthetics preset) were reported up to date after
    `run --select quality_scores --rebuild-stale` rebuilt the scores with another head: they record only
    the embeddings they were made from. They record the scores file they read too; pairs that read none
    stay current whatever the scores become."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", A)
    sources = incoming_by_shard(store)
    layers = [CRAWL_METADATA, IMAGES, EMBEDDINGS, SCORES, PAIRS]
    store.write_parquet(CRAWL_METADATA.parquet("a"), ROW, metadata=source_footer(sources["a"]))

    def write(layer, metadata: dict) -> None:
        table = IMAGES_ROWS if layer is IMAGES else schemas.PAIRS.empty_table() if layer is PAIRS else ROW
        store.write_parquet(layer.parquet("a"), table, metadata=metadata)

    write(IMAGES, inherited_footer(store.read_parquet(CRAWL_METADATA.parquet("a"))))
    write(EMBEDDINGS, inherited_footer(store.read_parquet(IMAGES.parquet("a"))))
    from_embeddings = inherited_footer(store.read_parquet(EMBEDDINGS.parquet("a")))
    write(SCORES, {**from_embeddings, names.SCORES_FOOTER: json.dumps({"aesthetic": "head-1"})})
    read = {names.SCORES_READ_FOOTER: identity_of(store.read_parquet(SCORES.parquet("a"), columns=["key"]))}
    write(PAIRS, {**from_embeddings, **read})
    assert stale_layers(store, sources, layers)["a"] == []

    write(SCORES, {**from_embeddings, names.SCORES_FOOTER: json.dumps({"aesthetic": "head-2"})})
    assert stale_layers(store, sources, layers)["a"] == [PAIRS]
    assert stale_layers(store, sources, [PAIRS])["a"] == [PAIRS]  # asked for on its own too
    write(PAIRS, from_embeddings)  # rules that read no scores
    assert stale_layers(store, sources, layers)["a"] == []


# A dataset built by `laion-assets run` (every per-shard layer, from the test web), shared by the tests
# below, so read-only: copy it to change it.
TINY_MODELS = {
    "LAION_ASSETS_CLIP_MODEL": "laion-assets-tiny",
    "LAION_ASSETS_CLIP_PRETRAINED": "none",
    "LAION_ASSETS_CAPTION_MODEL": "laion-assets-demo-coca",
    "LAION_ASSETS_CAPTION_PRETRAINED": "none",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[tuple[str, Web, str]]:
    """(the dataset's root, the web it was downloaded from, the run config file)."""
    web = Web().start()
    tmp = tmp_path_factory.mktemp("built")
    root = str(tmp / "data")
    config = tmp / "run.yaml"
    run_config = local_web_config()
    run_config["ops"]["filtered_pairs"] = {"config": {"min_similarity": -1.0, "drop_minors": False}}
    config.write_text(yaml.safe_dump(run_config))
    with pytest.MonkeyPatch.context() as env:
        env.delenv("DAGSTER_HOME", raising=False)
        env.chdir(tmp)
        for key, value in TINY_MODELS.items():
            env.setenv(key, value)
        urls = [web.url("/img/red.jpg"), web.url("/404.jpg"), web.url("/img/blue.webp")]
        rows = "".join(f"{url},image {i}\n" for i, url in enumerate(urls))
        DatasetStore(root).write_bytes("incoming/w.csv", f"url,caption\n{rows}".encode())
        assert main(["run", "--root", root, "--config", str(config)]) == 0
        yield root, web, str(config)
    web.stop()


def _shard_files(root: str) -> dict[str, bytes]:
    """Each per-shard file under `root` (its parquets and tars), by its path under the root."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(Path(root).rglob("w.*"))
        if path.parent.name != "incoming"
    }


def test_a_copied_root_is_done_and_a_run_over_it_downloads_nothing(built, tmp_path, capsys, monkeypatch):
    """A root copied without keeping mtimes (`cp -r`, an rsync without -t) recorded other fingerprints
    for every source (size and mtime): `status` reported every layer to make, and `run` downloaded the
    whole dataset again and rewrote it. A source is the same when its content is: the footers record its
    size and sha256 too, and the digest of a copy is kept in the root, so it is read once."""
    root, web, config = built
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy, copy_function=shutil.copy)  # new mtimes
    store = DatasetStore(copy)
    source = incoming_by_shard(store)["w"]
    assert source.fingerprint != incoming_by_shard(DatasetStore(root))["w"].fingerprint
    monkeypatch.chdir(tmp_path)
    for key, value in TINY_MODELS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    files, asked = _shard_files(copy), sum(web.hits.values())
    capsys.readouterr()

    assert main(["status", "--root", copy]) == 0
    assert "w: up to date" in capsys.readouterr().out
    assert main(["run", "--root", copy, "--config", config]) == 0
    assert "w: up to date" in capsys.readouterr().out
    assert sum(web.hits.values()) == asked
    assert _shard_files(copy) == files
    # the copy's digest is kept in the root under its fingerprint now
    digest = hashlib.sha256(Path(store.path("incoming/w.csv")).read_bytes()).hexdigest()
    assert json.loads(store.read_bytes("_lineage/digests.json")) == {"w.csv": [source.fingerprint, digest]}

    # a layer made after the copy carries the source entry of the layer before, and is judged the same way
    Path(store.path(RECAPTIONS.parquet("w"))).unlink()
    assert main(["run", "--root", copy, "--config", config]) == 0
    assert "w: recaptions 2 rows" in capsys.readouterr().out
    assert main(["status", "--root", copy]) == 0
    assert sum(web.hits.values()) == asked


def test_a_root_uploaded_to_s3_is_done(built, s3_root, capsys):
    """Moved from a local folder to S3, every source's fingerprint is another kind (an ETag, not size and
    mtime): every shard was to be made again."""
    root, _, _ = built
    store = DatasetStore(s3_root)
    store.fs.put(f"{root}/", store.path(""), recursive=True)
    assert incoming_by_shard(store)["w"].fingerprint.startswith("etag:")
    capsys.readouterr()
    assert main(["status", "--root", s3_root]) == 0
    assert "w: up to date" in capsys.readouterr().out


def test_a_source_is_the_same_when_its_content_is(root):
    """The crawl records its source's size and sha256. Touched (a new mtime), a source is still the one its
    layers were made from; rewritten with other bytes of the same size, it is not."""
    store = DatasetStore(root)
    store.write_bytes("incoming/a.csv", A)
    write_crawl_metadata(store, "a", CrawlSettings())
    recorded = json.loads(store.parquet_metadata(CRAWL_METADATA.parquet("a"))[names.SOURCE_FOOTER])
    assert (recorded["size"], recorded["sha256"]) == (len(A), hashlib.sha256(A).hexdigest())
    if not store.is_s3:
        os.utime(store.path("incoming/a.csv"), (1_000_000_000, 1_000_000_000))
        assert stale_layers(store, incoming_by_shard(store), [CRAWL_METADATA])["a"] == []

    store.write_bytes("incoming/a.csv", A.replace(b"a cat", b"a cow"))  # the same size
    assert stale_layers(store, incoming_by_shard(store), [CRAWL_METADATA])["a"] == [CRAWL_METADATA]
    store.write_bytes("incoming/a.csv", A)  # its content again, a new mtime
    assert stale_layers(store, incoming_by_shard(store), [CRAWL_METADATA])["a"] == []
