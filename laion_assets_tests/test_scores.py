"""quality_scores: LAION's architectures loading LAION's weight layouts, the weight rules, the language
identifiers on real short captions, and the asset on the demo world."""

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import torch

from laion_assets import names
from laion_assets.defs.scores import one_row_per_embedding
from laion_assets.demo import DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.demo.world import FOREIGN, aesthetic_truth, is_unsafe, make_world
from laion_assets.pipeline import schemas
from laion_assets.pipeline.catalog import views as catalog
from laion_assets.pipeline.embeddings.clip import (
    ClipSettings,
    ModelIdentity,
    ModelMismatch,
    ModelUnavailable,
    values_from_env,
)
from laion_assets.pipeline.lineage import incoming_by_shard, stale_layers
from laion_assets.pipeline.pairs.filter import PairsSettings, stored_scores
from laion_assets.pipeline.scores.heads import build_head
from laion_assets.pipeline.scores.language import LanguageIdentifier
from laion_assets.pipeline.scores.score import (
    DEMO_AESTHETIC_HEAD,
    DEMO_PUNSAFE_HEAD,
    HEAD_SCORES,
    MODEL_FIELDS,
    SETTINGS_ENV,
    Scorers,
    ScoreSettings,
    write_scores,
)
from laion_assets.pipeline.scores.watermark import build_watermark_model
from laion_assets.pipeline.scores.weights import PUBLISHED, load_checkpoint, save_checkpoint
from laion_assets.pipeline.settings import load_settings
from laion_assets.pipeline.storage import EMBEDDINGS, PAIRS, SCORES, DatasetStore, footer
from laion_assets_tests.dagster_helpers import materialize_shard
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_SHARDS
from laion_assets_tests.short_captions import SHORT_CAPTIONS

ROOT = Path(__file__).resolve().parents[1]

# The state-dict layouts of LAION's published files (names and shapes, read from the files themselves):
# a head built here must load them unchanged.
LAION_LAYOUTS = {
    "nsfw-b32": (512, {"norm.mean": (512,), "norm.variance": (512,), "linear_1.weight": (32, 512),
                       "linear_1.bias": (32,), "linear_2.weight": (32, 32), "linear_2.bias": (32,),
                       "linear_3.weight": (1, 32), "linear_3.bias": (1,)}),
    "nsfw-l14": (768, {"norm.mean": (768,), "norm.variance": (768,), "linear_1.weight": (64, 768),
                       "linear_1.bias": (64,), "linear_2.weight": (512, 64), "linear_2.bias": (512,),
                       "linear_3.weight": (256, 512), "linear_3.bias": (256,), "linear_4.weight": (1, 256),
                       "linear_4.bias": (1,)}),
    "aesthetic-linear": (768, {"weight": (1, 768), "bias": (1,)}),
    "aesthetic-mlp": (768, {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
                            "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
                            "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                            "layers.6.weight": (16, 64), "layers.6.bias": (16,),
                            "layers.7.weight": (1, 16), "layers.7.bias": (1,)}),
}  # fmt: skip


@pytest.mark.parametrize("architecture", sorted(LAION_LAYOUTS))
def test_heads_load_laion_layouts_and_keep_their_meaning(architecture):
    dim, layout = LAION_LAYOUTS[architecture]
    generator = torch.Generator().manual_seed(0)
    state = {name: 0.05 * torch.randn(shape, generator=generator) for name, shape in layout.items()}
    if "norm.variance" in state:
        state["norm.variance"] = state["norm.variance"].abs() + 0.1
    head = build_head(architecture, dim, state)
    embeddings = torch.nn.functional.normalize(torch.randn(5, dim, generator=generator), dim=-1)
    with torch.inference_mode():
        out = head(embeddings)
    assert out.shape == (5,)
    if architecture.startswith("nsfw"):  # a probability: LAION's sigmoid out
        assert ((out > 0) & (out < 1)).all()
    if architecture == "aesthetic-linear":  # exactly the linear model
        assert torch.allclose(out, embeddings @ state["weight"][0] + state["bias"][0], atol=1e-5)
    with pytest.raises(ModelUnavailable, match="do not fit"):
        build_head(architecture, dim + 1, state)


def test_watermark_model_has_laions_head_and_output_order():
    model = build_watermark_model("watermark:test_efficientnet")
    layout = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    features = model.num_features
    assert layout["classifier.0.weight"] == (625, features)
    assert layout["classifier.3.weight"] == (256, 625)
    assert layout["classifier.5.weight"] == (2, 256)
    with pytest.raises(ModelUnavailable, match="not a watermark model"):
        build_watermark_model("watermark:no_such_model")


def test_published_weights_are_never_fetched_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(ModelUnavailable) as raised:
        load_checkpoint("laion-watermark-v1", "watermark_model")
    message = str(raised.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert PUBLISHED["laion-watermark-v1"].url in message
    assert str(tmp_path / "hub" / "checkpoints" / "watermark_model_v1.pt") in message
    with pytest.raises(ModelUnavailable, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.pt"), "punsafe_head")


def test_a_head_refuses_embeddings_of_another_clip(demo_root, tmp_path):
    """A head trained on ViT-L/14 embeddings, given a shard embedded with the demo CLIP: refused, with
    both named (the one compatibility rule)."""
    head = build_head("nsfw-l14", 64)
    for_l14 = tmp_path / "l14-head.pt"
    save_checkpoint(for_l14, "nsfw-l14", head, ModelIdentity("ViT-L-14", "openai", "openai"))
    scorers = Scorers(ScoreSettings(punsafe_head=str(for_l14), watermark_model="none", device="cpu"))
    store = DatasetStore(str(tmp_path / "copy"))
    for path in (EMBEDDINGS.parquet(DEMO_SHARDS[0]), f"images/{DEMO_SHARDS[0]}.parquet"):
        with DatasetStore(demo_root).open(path) as f:
            store.write_bytes(path, f.read())
    with pytest.raises(ModelMismatch, match=r"ViT-L-14 / openai.*laion-assets-demo"):
        write_scores(store, DEMO_SHARDS[0], scorers)
    assert not store.exists(SCORES.parquet(DEMO_SHARDS[0]))


def test_a_head_of_the_wrong_kind_is_refused(tmp_path):
    scorers = Scorers(
        ScoreSettings(punsafe_head=str(DEMO_AESTHETIC_HEAD), watermark_model="none", device="cpu")
    )
    identity = load_checkpoint(str(DEMO_AESTHETIC_HEAD), "aesthetic_head").clip
    with pytest.raises(
        ModelMismatch, match="is a aesthetic-mlp head; punsafe_head takes nsfw-b32 or nsfw-l14"
    ):
        scorers.head("punsafe_head", identity, 64, "shard")


@pytest.mark.parametrize("identifier", ["py3langid", "cld3"])
def test_language_of_real_short_captions(identifier):
    """Hand-written alt text in ten languages, 3 to 8 words: at least 9 in 10 named right."""
    found = LanguageIdentifier(identifier)
    right = sum(
        found.identify(caption)[0] == language
        for language, captions in SHORT_CAPTIONS.items()
        for caption in captions
    )
    total = sum(map(len, SHORT_CAPTIONS.values()))
    assert len(SHORT_CAPTIONS) >= 8
    assert right / total >= 0.9, f"{identifier}: {right} of {total}"
    assert found.identify("  ") == (None, None)


def test_language_of_the_worlds_captions():
    items = make_world(images=700, seed=2, foreign_fraction=len(FOREIGN) / (len(FOREIGN) + 1)).images
    found = LanguageIdentifier("py3langid")
    right = sum(found.identify(item.caption)[0] == item.language for item in items)
    assert {item.language for item in items} == {"en", *FOREIGN}
    assert right / len(items) >= 0.95


def test_the_asset_scores_every_embedded_image(demo_root):
    """The demo dataset (its shards materialised with the demo CLIP): `auto` found the demo's heads, the
    watermark model read the pixels, and the scores agree with the world's truths."""
    store = DatasetStore(demo_root)
    world = {item.path: item for item in make_world(images=60, failures={}).items}
    connection = catalog.connect(store)
    rows = connection.sql("SELECT s.*, i.url FROM scores s JOIN images i USING (key) ORDER BY key").fetchall()
    columns = ["key", *schemas.SCORES.names[1:], "url"]
    table = [dict(zip(columns, row, strict=True)) for row in rows]
    embedded = connection.sql("SELECT count(*) FROM embeddings").fetchone()[0]
    assert len(table) == embedded > 0
    for shard in DEMO_SHARDS:
        assert one_row_per_embedding(store, shard).passed
    truth = [world[row["url"].split("/", 3)[3]] for row in table]
    punsafe = np.array([row["punsafe"] for row in table])
    unsafe = np.array([is_unsafe(item) for item in truth])
    assert ((punsafe >= 0.5) == unsafe).mean() >= 0.9
    aesthetic = np.array([row["aesthetic"] for row in table])
    assert np.corrcoef(aesthetic, [aesthetic_truth(item) for item in truth])[0, 1] >= 0.8
    assert all(0 <= row["pwatermark"] <= 1 for row in table)
    english = [row["language"] == "en" for row in table]  # the demo's captions are English, some 3 words
    assert sum(english) / len(english) >= 0.9
    scored = connection.sql("SELECT count(*), count(punsafe) FROM scored_pairs").fetchone()
    assert scored[0] == scored[1] == connection.sql("SELECT count(*) FROM pairs").fetchone()[0]


def test_scores_record_their_models_and_tiny_clip_has_no_heads(tmp_path):
    """A shard embedded with a CLIP no head was trained on: `auto` finds none, the heads' columns stay
    null and the footer says so; the language is still identified."""
    store = DatasetStore(str(tmp_path / "data"))
    keys = ["s-00000000", "s-00000001"]
    vectors = np.eye(2, 64, dtype=np.float16)
    embeddings = pa.table(
        {
            "key": keys,
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 64),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 64),
            "similarity": pa.array([0.3, 0.3], pa.float32()),
        },
        schema=schemas.embeddings(64),
    )
    tiny = ModelIdentity("laion-assets-tiny", "random:seed=0", "none")
    store.write_parquet(EMBEDDINGS.parquet("s"), embeddings, metadata=tiny.footer())
    store.write_parquet(
        "images/s.parquet", pa.table({"key": keys, "caption": ["un cercle rouge sur fond blanc", None]})
    )
    result = write_scores(store, "s", Scorers(ScoreSettings(watermark_model="none", device="cpu")))
    stored = store.read_parquet(SCORES.parquet("s"))
    assert stored.schema.remove_metadata() == schemas.SCORES
    assert stored.column("punsafe").null_count == stored.column("aesthetic").null_count == 2
    assert stored.column("language").to_pylist() == ["fr", None]
    assert result.weights == {
        "punsafe": "none",
        "aesthetic": "none",
        "pwatermark": "none",
        "language": "py3langid",
    }
    footer = (stored.schema.metadata or {})[names.SCORES_FOOTER.encode()].decode()
    assert '"punsafe_head": "auto"' in footer


def test_a_shard_with_no_embedded_image_records_the_heads_of_its_clip(tmp_path):
    """No image of the shard downloaded: no rows, and the footer names the heads its CLIP's images are
    scored with, as its other shards' do (not `none`, which says a score is not computed: the card would
    list the shard apart, as scored without them)."""
    store = DatasetStore(str(tmp_path / "data"))
    demo_clip = ModelIdentity.of(ClipSettings(model=DEMO_MODEL, pretrained=str(DEMO_CHECKPOINT)))
    empty = pa.Table.from_pylist([], schema=schemas.embeddings(64))
    store.write_parquet(EMBEDDINGS.parquet("s"), empty, metadata=demo_clip.footer())
    store.write_parquet("images/s.parquet", pa.table({"key": ["s-00000000"], "caption": ["a red ring"]}))
    result = write_scores(store, "s", Scorers(ScoreSettings(watermark_model="none", device="cpu")))
    assert store.read_parquet(SCORES.parquet("s")).num_rows == 0
    assert result.weights["punsafe"] == load_checkpoint(str(DEMO_PUNSAFE_HEAD), "punsafe_head").weights
    assert result.weights["aesthetic"] == load_checkpoint(str(DEMO_AESTHETIC_HEAD), "aesthetic_head").weights


def test_demo_heads_record_the_clip_they_read():
    demo_clip = ModelIdentity.of(ClipSettings(model=DEMO_MODEL, pretrained=str(DEMO_CHECKPOINT)))
    for path in (DEMO_PUNSAFE_HEAD, DEMO_AESTHETIC_HEAD):
        assert load_checkpoint(str(path), "head").clip == demo_clip


def quality_queries(path: Path, heading: str) -> list[str]:
    """The SQL of each `laion-assets sql` example under `heading` in `path`, one line each."""
    section = path.read_text().split(heading, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [
        " ".join(sql.split()) for sql in re.findall(r'laion-assets sql (?:--\S+ \S+ )*"(.*?)"', section, re.S)
    ]


def test_the_documented_score_queries_run_on_the_demo_dataset(demo_root):
    """The README's LAION-Aesthetics-style query and docs/sql.md's, on a dataset with scores."""
    connection = catalog.connect(DatasetStore(demo_root))
    readme = quality_queries(ROOT / "README.md", "## Filtering on the quality scores")
    docs = quality_queries(ROOT / "docs" / "sql.md", "The [quality scores]")
    assert readme and len(docs) == 2
    for sql in readme + docs:
        connection.sql(sql).fetchall()
    aesthetics = connection.sql(docs[0]).fetchall()
    assert aesthetics and all(row[2] >= 6 for row in aesthetics)


def test_auto_picks_laions_head_for_the_clip_and_never_downloads_offline(tmp_path, monkeypatch):
    """For OpenAI's L/14 (open_clip's `ViT-L-14-quickgelu`), `auto` takes LAION-Aesthetics v2 (before v1)
    and the L/14 NSFW head; offline, it refuses, naming the file to put in the cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    scorers = Scorers(ScoreSettings(watermark_model="none", device="cpu"))
    l14 = ModelIdentity("ViT-L-14-quickgelu", "openai", "openai")
    with pytest.raises(ModelUnavailable, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        scorers.head("aesthetic_head", l14, 768, "s")
    with pytest.raises(ModelUnavailable, match=r"clip_ViT-L-14_openai_binary_nsfw_head\.pth"):
        scorers.head("punsafe_head", l14, 768, "s")


def test_laions_heads_are_for_openais_clip_as_open_clip_builds_it():
    """LAION's heads read OpenAI's CLIP, whose transformer has QuickGELU. open_clip builds that model from
    the `openai` weights under the `-quickgelu` names; under `ViT-L-14` it builds a GELU model (open_clip
    only warns), whose embeddings the heads were not trained on, so `auto` gives it none."""
    import open_clip

    for tag, published in PUBLISHED.items():
        if published.clip is not None:
            assert open_clip.get_model_config(published.clip.model).get("quick_gelu"), tag
            assert open_clip.get_pretrained_cfg(published.clip.model, published.clip.pretrained), tag
    scorers = Scorers(ScoreSettings(watermark_model="none", device="cpu"))
    gelu = ModelIdentity("ViT-L-14", "openai", "openai")
    assert [scorers.head(setting, gelu, 768, "s") for setting in HEAD_SCORES] == [None, None]


def test_a_head_that_records_no_clip_is_refused(tmp_path):
    unmatched = tmp_path / "head.pt"
    save_checkpoint(unmatched, "nsfw-b32", build_head("nsfw-b32", 64))
    scorers = Scorers(ScoreSettings(punsafe_head=str(unmatched), watermark_model="none", device="cpu"))
    with pytest.raises(ModelUnavailable, match="records no CLIP"):
        scorers.head("punsafe_head", ModelIdentity("laion-assets-demo", "x"), 64, "s")


def test_a_preset_filters_the_pairs_on_the_stored_scores(demo_root, tmp_path):
    """`preset: laion-aesthetics-6` in filtered_pairs' run config, on the demo's shards: every pair kept
    passes the subset's rules, the funnel counts what each rule removed, the pairs' footer records the
    preset and the scores file it read (so scores rebuilt otherwise make the pairs stale), and the
    dataset's settings stay as they were."""
    root = str(tmp_path / "data")
    shutil.copytree(demo_root, root)
    config = {"ops": {"filtered_pairs": {"config": {"preset": "laion-aesthetics-6"}}}}
    instance = dg.DagsterInstance.ephemeral()
    shard = DEMO_SHARDS[0]
    done = materialize_shard(instance, root, shard, config, selection=["filtered_pairs"], clip=DEMO_CLIP)
    assert done.success
    store = DatasetStore(root)
    kept = (
        catalog.connect(store)
        .sql(f"SELECT punsafe, pwatermark, aesthetic FROM scored_pairs WHERE key LIKE '{shard}-%'")
        .fetchall()
    )
    assert kept and all(p < 0.5 and w < 0.8 and a >= 6 for p, w, a in kept)
    funnel = json.loads(store.parquet_metadata(f"pairs/{shard}.parquet")[names.PAIRS_FUNNEL_FOOTER])
    assert funnel["removed"]["aesthetic"] > 0
    recorded = json.loads(store.parquet_metadata(f"pairs/{shard}.parquet")[names.PAIRS_SETTINGS_FOOTER])
    assert recorded["preset"] == "laion-aesthetics-6"
    assert load_settings(store).section("filtered_pairs")["preset"] == ""  # a run's config: that run only
    source = {shard: incoming_by_shard(store)[shard]}
    assert stale_layers(store, source, [SCORES, PAIRS])[shard] == []
    scores = store.read_parquet(SCORES.parquet(shard))  # as another head would score them
    other_head = {**footer(scores.schema), names.SCORES_FOOTER: json.dumps({"aesthetic_head": "another"})}
    store.write_parquet(SCORES.parquet(shard), scores, metadata=other_head)
    assert stale_layers(store, source, [SCORES, PAIRS])[shard] == [PAIRS]


def test_a_rule_on_a_score_that_was_not_computed_refuses_naming_the_file(tmp_path):
    store = DatasetStore(str(tmp_path / "data"))
    store.write_parquet(
        SCORES.parquet("s"), pa.Table.from_pylist([{"key": "s-00000000"}], schema=schemas.SCORES)
    )
    with pytest.raises(ValueError, match=r"scores/s\.parquet has no aesthetic"):
        stored_scores(store, "s", PairsSettings(min_aesthetic=6.0))
    with pytest.raises(ValueError, match=r"materialise quality_scores for it first"):
        stored_scores(store, "t", PairsSettings(languages=("en",)))
    assert stored_scores(store, "t", PairsSettings()) is None  # no rule reads the scores


def test_the_shipped_score_models_hold_their_figures_on_a_held_out_world():
    """What `python -m laion_assets.demo.train_scores` checks after training, on a smaller held-out world:
    punsafe and pwatermark precision and recall, the aesthetic Spearman at least 0.9, the language
    at least 0.95 right."""
    from laion_assets.demo import DEMO_WATERMARK_MODEL
    from laion_assets.demo.train import EVAL_SEED
    from laion_assets.demo.train_scores import evaluate, world

    figures = evaluate(
        world(240, EVAL_SEED, 0.3), (DEMO_PUNSAFE_HEAD, DEMO_AESTHETIC_HEAD, DEMO_WATERMARK_MODEL)
    )
    assert figures.punsafe.true_positive and figures.pwatermark.true_positive
    assert figures.holds(), figures.lines()


@pytest.mark.parametrize(
    ("section", "env", "refusal"),
    [
        ("  aesthetic_head:\n", {}, r"laion_assets\.yaml, section scores: aesthetic_head: expected str, got"),
        ("", {"batch_size": "0"}, r"scores batch_size 0 \(LAION_ASSETS_SCORES_BATCH_SIZE\): .* 1 or more"),
    ],
)
def test_score_settings_no_run_can_use_are_refused_naming_the_setting(
    tmp_path, monkeypatch, section, env, refusal
):
    """A `scores` section whose head is left empty (YAML reads None), or a batch of 0 images: refused where
    the run's settings are made, as every entry point makes them, naming the setting; not an AttributeError,
    pydantic's traceback or range()'s 'arg 3 must not be zero' deep in a run."""
    for name, value in env.items():
        monkeypatch.setenv(SETTINGS_ENV[name], value)
    store = DatasetStore(str(tmp_path / "data"))
    store.write_bytes("laion_assets.yaml", f"scores:\n  punsafe_head: auto\n{section}".encode())
    environment = values_from_env(SETTINGS_ENV)
    with pytest.raises(ValueError, match=refusal):
        load_settings(store).recorded_in(ScoreSettings(), "scores", MODEL_FIELDS, environment)
