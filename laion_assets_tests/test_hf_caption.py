"""The transformers captioner (the `recap` extra): the real BlipForConditionalGeneration on a tiny
config with seeded random weights, saved to a folder and loaded from it. Its captions mean nothing;
shapes, determinism, batching, what is recorded and the errors are what is tested."""

import dataclasses
import shutil
import sys

import dagster as dg
import pytest

from laion_assets.defs.partitions import shards
from laion_assets.defs.recaptions import recaptions
from laion_assets.defs.resources import build_resources
from laion_assets.demo.train import EVAL_SEED
from laion_assets.demo.views import pipeline_view
from laion_assets.demo.world import make_world
from laion_assets.pipeline.embeddings.clip import ClipEncoder, ModelUnavailable
from laion_assets.pipeline.lineage import settings_changes
from laion_assets.pipeline.recaptions.hf_caption import HfCaptioner, HfCaptionSettings
from laion_assets.pipeline.settings import CAPTIONER_SECTION, DatasetSettings, load_settings, write_settings
from laion_assets.pipeline.storage import RECAPTIONS, DatasetStore
from laion_assets_tests.captioners import BLIP_SPECIAL, BLIP_WORDS, save_tiny_blip
from laion_assets_tests.demo_dataset import DEMO_CLIP, DEMO_SHARDS

CAPTION_MODEL = "LAION_ASSETS_CAPTION_MODEL"  # names a CoCa: a choice of that kind


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "model")


@pytest.fixture(scope="module")
def images():
    return [pipeline_view(item) for item in make_world(images=7, seed=EVAL_SEED, failures={}).images]


def captioner(path, **settings) -> HfCaptioner:
    return HfCaptioner(HfCaptionSettings(model_path=str(path), device="cpu", max_new_tokens=6, **settings))


def test_one_caption_of_the_model_s_words_per_image_the_same_every_time(blip, images):
    captions = captioner(blip).caption(images)
    assert len(captions) == len(images)
    assert all(isinstance(text, str) and text for text in captions)
    words = {word for text in captions for word in text.split()}
    assert words <= set(BLIP_WORDS) - set(BLIP_SPECIAL) | {"[UNK]"}
    assert all(len(text.split()) <= 6 for text in captions)  # max_new_tokens
    assert captioner(blip).caption(images) == captions  # greedy: no sampling


def test_batches_do_not_change_the_captions(blip, images):
    assert captioner(blip, batch_size=1).caption(images) == captioner(blip, batch_size=4).caption(images)


def test_other_weights_are_recorded_as_other_weights(blip, tmp_path):
    described = captioner(blip).describe()
    assert described["model"] == "BlipForConditionalGeneration"
    assert described["captioner"].startswith("transformers ")
    assert described["decoding"] == "greedy" and described["max_new_tokens"] == "6"
    assert described["prompt"] == ""  # BLIP captions from the image alone: no prompt was sent
    assert len(described["weights"]) == 64
    other = captioner(save_tiny_blip(tmp_path / "other", seed=1)).describe()
    assert other["weights"] != described["weights"]


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"no config\.json.*LAION_ASSETS_HF_CAPTION_MODEL="):
        captioner(tmp_path / "nowhere")


def test_without_transformers_the_error_names_the_extra(blip, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelUnavailable, match=r"laion_assets\[recap\]"):
        captioner(blip)


def test_the_dataset_keeps_which_transformers_model_recaptioned_it(blip, demo_root, tmp_path):
    """The first recaptions run writes the dataset's `captioner` section from the captioner it used: for a
    transformers captioner, its folder. Another folder in the settings then makes the shard's recaptions
    stale, as another CoCa does."""
    shutil.copytree(demo_root, tmp_path / "data")
    store, shard = DatasetStore(str(tmp_path / "data")), DEMO_SHARDS[0]
    sections = load_settings(store).sections
    write_settings(store, DatasetSettings({k: v for k, v in sections.items() if k != CAPTIONER_SECTION}))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shards.name, [shard])
    hf = HfCaptionSettings(model_path=str(blip), device="cpu", max_new_tokens=6)
    resources = build_resources(store.root, DEMO_CLIP, hf)
    assert dg.materialize([recaptions], partition_key=shard, resources=resources, instance=instance).success
    assert load_settings(store).section(CAPTIONER_SECTION) == {"model_path": str(blip), "max_new_tokens": 6}
    assert settings_changes(store, [shard], load_settings(store)) == {}
    other = load_settings(store).with_sections({CAPTIONER_SECTION: {"model_path": "/models/other"}})
    changes = settings_changes(store, [shard], other)
    assert changes == {shard: {RECAPTIONS.name: [f"model_path: {str(blip)!r} -> '/models/other'"]}}


def test_recaptions_by_another_kind_of_captioner_are_stale(blip, demo_root, tmp_path):
    """A dataset recaptioned by a transformers model, then a shard by a CoCa (a run with no
    LAION_ASSETS_HF_CAPTION_MODEL set) or through a chat endpoint: their footers hold none of the
    section's fields (model_path, max_new_tokens), and that is a difference, not an agreement: the shard is
    reported stale, not mixed in silently."""
    from laion_assets.pipeline.recaptions.recaption import write_recaptions
    from laion_assets_tests.captioners import varied_coca

    shutil.copytree(demo_root, tmp_path / "data")
    store, shard = DatasetStore(str(tmp_path / "data")), DEMO_SHARDS[0]
    section = {"model_path": str(blip), "max_new_tokens": 6}
    settings = load_settings(store).with_sections({CAPTIONER_SECTION: section})
    write_recaptions(store, shard, captioner(blip), ClipEncoder(DEMO_CLIP))
    assert settings_changes(store, [shard], settings) == {}
    write_recaptions(store, shard, varied_coca(), ClipEncoder(DEMO_CLIP))
    unset = ["max_new_tokens: '(unset)' -> '6'", f"model_path: '(unset)' -> {str(blip)!r}"]
    assert settings_changes(store, [shard], settings) == {shard: {RECAPTIONS.name: unset}}


def test_a_run_naming_no_captioner_follows_the_dataset_s_kind(blip, demo_root, tmp_path, monkeypatch):
    """With no captioner variable set, a run made a CoCa (the hub's default model, on a user's machine)
    whatever the dataset's `captioner` section recorded, and rebuilt a transformers model's recaptions
    with it. `laion-assets run` now follows the section's transformers folder; a deployment's resource,
    and any run on a chat endpoint's dataset (whose address is not recorded), refuse in one line."""
    from laion_assets.defs.resources import OtherCaptioner, captioner_resource
    from laion_assets.pipeline.recaptions import chat_caption, hf_caption
    from laion_assets.runner import prepare_settings

    for variable in (*chat_caption.SETTINGS_ENV.values(), *hf_caption.SETTINGS_ENV.values(), CAPTION_MODEL):
        monkeypatch.delenv(variable, raising=False)
    shutil.copytree(demo_root, tmp_path / "data")
    store, shard = DatasetStore(str(tmp_path / "data")), DEMO_SHARDS[0]
    section = {"model_path": str(blip), "max_new_tokens": 6}
    write_settings(store, load_settings(store).with_sections({CAPTIONER_SECTION: section}))
    _, chosen, _ = prepare_settings(store, {})
    assert chosen == HfCaptionSettings(model_path=str(blip), max_new_tokens=6)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shards.name, [shard])
    resources = build_resources(store.root, DEMO_CLIP, dataclasses.replace(chosen, device="cpu"))
    assert dg.materialize([recaptions], partition_key=shard, resources=resources, instance=instance).success
    assert settings_changes(store, [shard], load_settings(store)) == {}  # the folder's captions, as recorded
    with pytest.raises(OtherCaptioner, match=r"transformers captioner .* set LAION_ASSETS_HF_CAPTION_MODEL"):
        captioner_resource().captioner_settings(store)
    monkeypatch.setenv(CAPTION_MODEL, "coca_ViT-B-32")  # CoCa named: the user's choice
    assert prepare_settings(store, {})[1].model == "coca_ViT-B-32"
    assert captioner_resource().captioner_settings(store).model == "coca_ViT-B-32"
    monkeypatch.delenv(CAPTION_MODEL)

    chat = {"model": "llava", "max_completion_tokens": 128, "temperature": 0.0}
    write_settings(store, load_settings(store).with_sections({CAPTIONER_SECTION: chat}))
    assert prepare_settings(store, {})[1] is None
    with pytest.raises(OtherCaptioner, match=r"a chat endpoint captioner .* set LAION_ASSETS_CHAT_BASE_URL"):
        captioner_resource().captioner_settings(store)
