"""The CoCa captioner: a real open_clip CoCa (a tiny config, seeded random weights), decoded by the
pipeline's own greedy and beam search, with `transformers` unimportable."""

import sys

import pytest

from laion_assets.demo import DEMO_CAPTION_MODEL
from laion_assets.demo.train import EVAL_SEED
from laion_assets.demo.views import pipeline_view
from laion_assets.demo.world import make_world
from laion_assets.pipeline.embeddings.clip import ModelUnavailable
from laion_assets.pipeline.recaptions.caption import CaptionSettings, CocaCaptioner
from laion_assets_tests.captioners import RANDOM_COCA, varied_coca


@pytest.fixture(scope="module")
def images():
    return [pipeline_view(item) for item in make_world(images=12, seed=EVAL_SEED, failures={}).images]


def test_greedy_captions_are_deterministic_and_depend_on_the_image(images):
    captioner = varied_coca()
    captions = captioner.caption(images)
    assert len(captions) == len(images) and all(isinstance(text, str) and text for text in captions)
    assert len(set(captions)) > 1  # the image steers the decoder
    assert varied_coca().caption(images) == captions


def test_batches_do_not_change_the_captions(images):
    assert varied_coca(batch_size=5).caption(images) == varied_coca(batch_size=12).caption(images)


def test_beam_search_of_one_beam_is_greedy_and_wider_beams_caption_too(images):
    greedy = varied_coca().caption(images)
    assert varied_coca(decoding="beam", beams=1).caption(images) == greedy
    wide = varied_coca(decoding="beam", beams=4).caption(images)
    assert len(wide) == len(images) and all(wide)


def test_max_tokens_caps_the_caption(images):
    short, longer = varied_coca(max_tokens=3).caption(images), varied_coca(max_tokens=8).caption(images)
    assert all(len(text.split()) <= 3 for text in short), short  # a token is at most one word
    assert sum(map(len, short)) < sum(map(len, longer))
    assert all(b.startswith(a.split()[0]) for a, b in zip(short, longer, strict=True))  # same decoding, cut


def test_no_transformers_needed(monkeypatch, images):
    """CoCa.generate needs transformers and breaks on its releases from 4.57 (open_clip #1129); the
    captioner decodes with the model's forward pass, so it works with transformers unimportable."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert len(varied_coca().caption(images[:2])) == 2


def test_random_weights_are_seeded_and_described():
    described = CocaCaptioner(RANDOM_COCA).describe()
    assert described["model"] == DEMO_CAPTION_MODEL and described["weights"] == "random:seed=0"
    assert described["decoding"] == "greedy" and described["max_tokens"] == "8"
    assert described["captioner"] == "open_clip CoCa"


def test_unavailable_and_wrong_models_fail_loudly(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        CocaCaptioner(CaptionSettings(model=DEMO_CAPTION_MODEL, pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ModelUnavailable, match="LAION_ASSETS_CAPTION_PRETRAINED"):
        CocaCaptioner(CaptionSettings(model=DEMO_CAPTION_MODEL, pretrained="no-such-tag"))
    with pytest.raises(ModelUnavailable, match="not a CoCa model"):
        CocaCaptioner(CaptionSettings(model="laion-assets-tiny", pretrained="none"))
    with pytest.raises(ValueError, match="decoding"):
        CaptionSettings(decoding="sampling")


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAION_ASSETS_CAPTION_MODEL", DEMO_CAPTION_MODEL)
    monkeypatch.setenv("LAION_ASSETS_CAPTION_PRETRAINED", "none")
    monkeypatch.setenv("LAION_ASSETS_CAPTION_BATCH_SIZE", "7")
    settings = CaptionSettings.from_env()
    assert (settings.model, settings.pretrained, settings.batch_size) == (DEMO_CAPTION_MODEL, "none", 7)
