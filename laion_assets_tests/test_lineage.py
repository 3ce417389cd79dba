import json

import pyarrow as pa

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.lineage import (
    identity_of,
    incoming_by_shard,
    inherited_footer,
    source_footer,
    stale_layers,
)
from laion_assets.pipeline.storage import CRAWL_METADATA, EMBEDDINGS, IMAGES, PAIRS, SCORES, DatasetStore

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
