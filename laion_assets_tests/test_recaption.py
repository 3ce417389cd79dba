"""The recaptions stage over the demo dataset's kept pairs: a real CoCa captions (tiny, random weights;
see captioners.py), the demo CLIP that made the embeddings scores."""

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest

from laion_assets import names
from laion_assets.demo import DEMO_CAPTION_MODEL
from laion_assets.pipeline import schemas
from laion_assets.pipeline.embeddings.clip import ClipEncoder, ModelMismatch
from laion_assets.pipeline.recaptions.caption import CocaCaptioner
from laion_assets.pipeline.recaptions.recaption import write_recaptions
from laion_assets.pipeline.shard_tar import TarShardWriter, read_samples
from laion_assets.pipeline.storage import EMBEDDINGS, PAIRS, RECAPTIONS, DatasetStore, footer
from laion_assets_tests.captioners import varied_coca
from laion_assets_tests.dagster_helpers import TINY_CLIP
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_SHARDS

SHARD = DEMO_SHARDS[0]


@pytest.fixture(scope="module")
def captioner() -> CocaCaptioner:
    return varied_coca()


@pytest.fixture
def demo_copy(demo_root, tmp_path) -> DatasetStore:
    shutil.copytree(demo_root, tmp_path / "data")
    return DatasetStore(str(tmp_path / "data"))


def test_every_kept_pair_gets_a_recaption_with_both_scores(demo_copy, captioner):
    result = write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(DEMO_CLIP))
    table = demo_copy.read_parquet(RECAPTIONS.parquet(SHARD))
    pairs = demo_copy.read_parquet(PAIRS.parquet(SHARD))
    assert table.schema.remove_metadata() == schemas.RECAPTIONS
    assert table.column("key").to_pylist() == pairs.column("key").to_pylist()
    assert table.column("org_caption").to_pylist() == pairs.column("caption").to_pylist()
    assert table.column("sha256").to_pylist() == pairs.column("sha256").to_pylist()
    assert table.column("re_caption").null_count == 0 and table.column("re_caption_error").null_count == len(
        table
    )
    # the web caption's score is the pair's similarity, by the same model
    assert table.column("org_clip_score").to_pylist() == pytest.approx(
        pairs.column("similarity").to_pylist(), abs=1e-6
    )
    rows = table.to_pylist()
    # the new caption's score: the image's stored embedding against the caption's, by the same model
    encoder = ClipEncoder(DEMO_CLIP)
    embeddings = demo_copy.read_parquet(EMBEDDINGS.parquet(SHARD))
    vectors = dict(
        zip(
            embeddings.column("key").to_pylist(),
            embeddings.column("image_embedding").to_pylist(),
            strict=True,
        )
    )
    texts = encoder.encode_texts([row["re_caption"] for row in rows]).numpy()
    expected = [
        float(np.dot(np.asarray(vectors[row["key"]], np.float32), text))
        for row, text in zip(rows, texts, strict=True)
    ]
    assert [row["re_clip_score"] for row in rows] == pytest.approx(expected, abs=1e-5)
    assert len({row["re_caption"] for row in rows}) > 1
    assert all(row["re_length"] == len(row["re_caption"].split()) for row in rows)
    assert all(row["org_length"] == len(row["org_caption"].split()) for row in rows)
    recorded = footer(table.schema)
    described = json.loads(recorded[names.CAPTIONER_FOOTER])
    assert described["model"] == DEMO_CAPTION_MODEL and described["decoding"] == "greedy"
    assert described["weights"] == "random:seed=0"
    assert recorded[names.CLIP_MODEL_FOOTER] == DEMO_CLIP.model
    assert recorded[names.SOURCE_FOOTER] == footer(pairs.schema)[names.SOURCE_FOOTER]
    summary = result.summary()
    assert summary["recaptioned"] == len(rows) and summary["failed"] == 0
    re_above = sum(row["re_clip_score"] > row["org_clip_score"] for row in rows) / len(rows)
    assert summary["share_re_above_org"] == pytest.approx(re_above, abs=1e-4)
    assert summary["re_clip_score_p10"] <= summary["re_clip_score_p50"] <= summary["re_clip_score_p90"]


def test_a_sample_missing_or_unreadable_keeps_its_row_with_the_reason(demo_copy, captioner):
    with demo_copy.open(PAIRS.tar(SHARD)) as f:
        samples = list(read_samples(f))
    (gone, _), (broken, members) = samples[0], samples[1]
    with demo_copy.atomic_write(PAIRS.tar(SHARD)) as out, TarShardWriter(out) as writer:
        writer.write(broken, {**members, "jpg": b"not a jpeg"})
        for key, kept in samples[2:]:
            writer.write(key, kept)
    table = write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(DEMO_CLIP)).table
    rows = {row["key"]: row for row in table.to_pylist()}
    assert len(rows) == len(samples)
    assert rows[gone]["re_caption"] is None and rows[gone]["re_caption_error"] == "no image in the pairs tar"
    assert rows[broken]["re_caption"] is None and rows[broken]["re_caption_error"].startswith("cannot decode")
    assert rows[gone]["re_clip_score"] is None and rows[gone]["re_length"] is None
    assert rows[gone]["org_clip_score"] is not None
    assert sum(row["re_caption"] is not None for row in rows.values()) == len(samples) - 2


def test_a_damaged_pairs_tar_is_an_error_naming_it(demo_copy, captioner):
    """A pairs tar cut short (a copy interrupted, a disk full): the error names the file and what to do,
    as the embeddings stage's does for the images tar, not tarfile's bare 'cut short'."""
    with demo_copy.open(PAIRS.tar(SHARD)) as f:
        whole = f.read()
    with demo_copy.atomic_write(PAIRS.tar(SHARD)) as out:
        out.write(whole[: len(whole) // 2])
    url = re.escape(demo_copy.url(PAIRS.tar(SHARD)))
    with pytest.raises(ValueError, match=rf"^{url} is damaged \(.+\): .*filtered_pairs"):
        write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(DEMO_CLIP))


def test_scores_need_the_model_that_made_the_embeddings(demo_copy, captioner):
    with demo_copy.open(RECAPTIONS.parquet(SHARD)) as f:  # the demo dataset's, made by its asset
        before = f.read()
    with pytest.raises(ModelMismatch, match="embeddings were embedded with laion-assets-demo"):
        write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(TINY_CLIP))
    with demo_copy.open(RECAPTIONS.parquet(SHARD)) as f:
        assert f.read() == before


def test_recaptions_view(demo_copy, captioner):
    from laion_assets.pipeline.catalog import views as catalog

    write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(DEMO_CLIP))
    connection = catalog.connect(demo_copy)
    (rows,) = connection.sql("SELECT count(*) FROM recaptions").fetchone()
    assert rows == sum(demo_copy.parquet_num_rows(RECAPTIONS.parquet(shard)) for shard in DEMO_SHARDS)
    joined = connection.sql("SELECT count(*) FROM pairs JOIN recaptions USING (key)").fetchone()[0]
    assert joined == rows
    assert isinstance(connection.sql("SELECT * FROM recaptions").to_arrow_table(), pa.Table)


def test_captioning_in_chunks_gives_the_same_recaptions(demo_copy, captioner, monkeypatch):
    from laion_assets.pipeline.recaptions import recaption

    whole = write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(DEMO_CLIP)).table
    monkeypatch.setattr(recaption, "_CHUNK", 3)  # several chunks, the last one short
    assert whole.num_rows > 3 * 2
    chunked = write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(DEMO_CLIP)).table
    assert chunked.to_pylist() == whole.to_pylist()


def test_the_check_names_a_missing_pair(demo_copy):
    from laion_assets.defs.recaptions import one_row_per_kept_pair

    assert one_row_per_kept_pair(demo_copy, SHARD).passed
    table = demo_copy.read_parquet(RECAPTIONS.parquet(SHARD))
    demo_copy.write_parquet(RECAPTIONS.parquet(SHARD), table.slice(1))
    result = one_row_per_kept_pair(demo_copy, SHARD)
    assert not result.passed
    assert result.metadata["missing_pairs"].value == "1"
    assert result.description == f"shard {SHARD}: missing_pairs: 1"


def test_the_ui_shows_beams_only_for_beam_search():
    from laion_assets.defs.recaptions import shown_settings

    greedy = {"decoding": "greedy", "beams": "4", "max_tokens": "30"}
    assert shown_settings(greedy) == {"decoding": "greedy", "max_tokens": "30"}
    assert shown_settings({**greedy, "decoding": "beam"}) == {**greedy, "decoding": "beam"}


def test_a_deployment_recaptions_with_the_dataset_s_captioner(demo_copy, monkeypatch):
    """Resources from the environment, as the UI's runs, the sensor's and the schedule's have them: with no
    LAION_ASSETS_CAPTION_* variable set, the captioner is the dataset's (`captioner` in its settings), as
    the CLIP model is, not open_clip's default CoCa."""
    import dagster as dg

    from laion_assets.defs.partitions import shards
    from laion_assets.defs.recaptions import recaptions
    from laion_assets.defs.resources import build_resources

    for name in ("CHAT_BASE_URL", "HF_CAPTION_MODEL", "CAPTION_MODEL", "CAPTION_PRETRAINED", "CLIP_MODEL"):
        monkeypatch.delenv(f"LAION_ASSETS_{name}", raising=False)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shards.name, [SHARD])
    result = dg.materialize(
        [recaptions], partition_key=SHARD, resources=build_resources(demo_copy.root), instance=instance
    )
    assert result.success
    described = json.loads(
        footer(demo_copy.read_parquet(RECAPTIONS.parquet(SHARD)).schema)[names.CAPTIONER_FOOTER]
    )
    assert (described["model"], described["pretrained"]) == (DEMO_CAPTION_MODEL, "none")


def test_decoding_is_the_dataset_s_and_a_shard_decoded_otherwise_is_stale(demo_copy, monkeypatch):
    """Decoding and length shape the captions as the model does: the dataset's settings record them (the
    demo's recaptions wrote its `captioner` section), a deployment's CoCa decodes as they say, and a shard
    recaptioned otherwise (a run's own resource config) is reported stale, not mixed in silently."""
    from dataclasses import replace

    import dagster as dg

    from laion_assets.defs.partitions import shards
    from laion_assets.defs.recaptions import recaptions
    from laion_assets.defs.resources import build_resources
    from laion_assets.pipeline.lineage import settings_changes
    from laion_assets.pipeline.settings import CAPTIONER_SECTION, load_settings, write_settings
    from laion_assets_tests.captioners import RANDOM_COCA

    section = load_settings(demo_copy).section(CAPTIONER_SECTION)
    assert (section["decoding"], section["beams"], section["max_tokens"]) == ("greedy", 4, 8)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shards.name, [SHARD])
    beam = build_resources(demo_copy.root, DEMO_CLIP, replace(RANDOM_COCA, decoding="beam"))
    assert dg.materialize([recaptions], partition_key=SHARD, resources=beam, instance=instance).success
    assert load_settings(demo_copy).section(CAPTIONER_SECTION) == section  # the run's config, for that run
    changes = settings_changes(demo_copy, list(DEMO_SHARDS), load_settings(demo_copy))
    assert changes == {SHARD: {RECAPTIONS.name: ["decoding: 'beam' -> 'greedy'"]}}

    for name in ("CHAT_BASE_URL", "HF_CAPTION_MODEL", "CAPTION_MODEL", "CAPTION_PRETRAINED"):
        monkeypatch.delenv(f"LAION_ASSETS_{name}", raising=False)
    settings = load_settings(demo_copy)
    write_settings(demo_copy, settings.with_sections({CAPTIONER_SECTION: {**section, "decoding": "beam"}}))
    deployed = build_resources(demo_copy.root)["captioner"].captioner_settings(demo_copy)
    assert (deployed.decoding, deployed.max_tokens) == ("beam", 8)


def test_an_empty_caption_is_a_row_with_the_reason(demo_copy):
    """A captioner whose first token is end-of-text answers "" (a CoCa here; a transformers model can too):
    the row has no caption and says why, as for the chat endpoint's empty answer, not a recaption of no
    words that the counts, the card and `WHERE re_caption IS NOT NULL` take for one."""
    import torch

    captioner = varied_coca()
    decoder = captioner.model.text_decoder
    with torch.no_grad():  # every position's output the same vector, which end-of-text alone matches
        decoder.ln_final.weight.zero_()
        decoder.ln_final.bias.fill_(1.0)
        decoder.text_projection.zero_()
        decoder.text_projection[:, captioner.eot] = 1.0
    result = write_recaptions(demo_copy, SHARD, captioner, ClipEncoder(DEMO_CLIP))
    rows = result.table.to_pylist()
    assert rows and all(row["re_caption"] is None for row in rows)
    assert all(row["re_caption_error"] == "empty caption" and row["re_length"] is None for row in rows)
    summary = result.summary()
    assert (summary["recaptioned"], summary["failed"]) == (0, len(rows))
    # the asset's metadata in the UI: no scores, not recaptions that all score a cosine of 0.0
    assert summary["re_clip_score_mean"] is None and summary["share_re_above_org"] is None
