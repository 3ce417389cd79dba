import dataclasses
import io
import json
import re
import tarfile

import dagster as dg
import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.download.downloader import download_shard
from laion_assets.pipeline.embeddings.clip import ClipEncoder, ClipSettings, ModelUnavailable
from laion_assets.pipeline.embeddings.embed import embed_shard, write_embeddings
from laion_assets.pipeline.lineage import incoming_by_shard, stale_layers
from laion_assets.pipeline.shard_tar import DamagedTar, TarShardWriter, read_samples
from laion_assets.pipeline.storage import CRAWL_METADATA, EMBEDDINGS, IMAGES, DatasetStore
from laion_assets.runner import failure_message
from laion_assets_tests.dagster_helpers import TINY_CLIP, local_web_config, materialize_shard
from laion_assets_tests.test_download import FAST, crawl_table

PATHS = ["/img/red.jpg", "/img/green.png", "/404.jpg", "/img/blue.webp", "/exif.jpg", "/img/transparent.png"]


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return ClipEncoder(TINY_CLIP)


def _downloaded(web) -> tuple[pa.Table, bytes]:
    crawl = crawl_table([web.url(p) for p in PATHS])
    captions = [
        "a red square",
        "a tall green rectangle",
        "nothing",
        "a blue square",
        "a rotated photo",
        "clear",
    ]
    crawl = crawl.set_column(2, "caption", pa.array(captions))
    tar = io.BytesIO()
    return download_shard(crawl, FAST, tar).table, tar.getvalue()


def test_embeddings_equal_open_clips_own(web, encoder):
    images, tar = _downloaded(web)
    result = embed_shard(
        images, io.BytesIO(tar), encoder, batch_size=3
    )  # 5 images: a full and a partial batch
    table = result.table
    assert table.schema == schemas.embeddings(64)
    successes = [r["key"] for r in images.to_pylist() if r["status"] == schemas.SUCCESS]
    assert table.column("key").to_pylist() == sorted(successes) and len(successes) == 5

    # the reference: open_clip itself, built separately with the same seed
    torch.manual_seed(TINY_CLIP.seed)
    model, _, preprocess = open_clip.create_model_and_transforms("laion-assets-tiny", pretrained=None)
    tokenizer = open_clip.get_tokenizer("laion-assets-tiny")
    model.eval()
    samples = dict(read_samples(io.BytesIO(tar)))
    captions = dict(zip(images.column("key").to_pylist(), images.column("caption").to_pylist(), strict=True))
    with torch.no_grad():
        for row in table.to_pylist():
            pixels = preprocess(Image.open(io.BytesIO(samples[row["key"]]["jpg"])))[None]
            image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0].numpy()
            text = torch.nn.functional.normalize(
                model.encode_text(tokenizer([captions[row["key"]]])), dim=-1
            )[0].numpy()
            np.testing.assert_allclose(np.array(row["image_embedding"], np.float32), image, atol=2e-3)
            np.testing.assert_allclose(np.array(row["text_embedding"], np.float32), text, atol=2e-3)
            assert row["similarity"] == pytest.approx(float(image @ text), abs=1e-5)
            stored = np.array(row["image_embedding"], np.float32) @ np.array(
                row["text_embedding"], np.float32
            )
            assert row["similarity"] == pytest.approx(float(stored), abs=5e-3)
            assert np.linalg.norm(np.array(row["image_embedding"], np.float32)) == pytest.approx(1, abs=2e-3)


def test_undecodable_stored_image_is_counted_and_skipped(encoder):
    images = pa.table(
        {
            "key": ["s-00000000", "s-00000001"],
            "caption": ["a red thing", "broken"],
            "status": ["success", "success"],
        }
    )
    tar = io.BytesIO()
    with TarShardWriter(tar) as writer:
        red = io.BytesIO()
        Image.new("RGB", (32, 32), (255, 0, 0)).save(red, "JPEG")
        writer.write("s-00000000", {"jpg": red.getvalue(), "txt": b"a red thing"})
        writer.write("s-00000001", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"broken"})
    result = embed_shard(images, io.BytesIO(tar.getvalue()), encoder, batch_size=8)
    assert result.table.column("key").to_pylist() == ["s-00000000"]
    assert result.undecodable == ["s-00000001"]


def _shard_tar(keys: list[str]) -> bytes:
    tar = io.BytesIO()
    with TarShardWriter(tar) as writer:
        for i, key in enumerate(keys):
            red = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(red, "JPEG")
            writer.write(key, {"jpg": red.getvalue(), "txt": b"a red thing"})
    return tar.getvalue()


def test_a_success_row_without_its_sample_is_reported(encoder):
    """An images parquet and tar that disagree (a run killed between writing the two): the successful rows
    the tar lacks are named, not dropped without a word."""
    keys = [f"s-{i:08d}" for i in range(4)]
    images = pa.table({"key": keys, "caption": ["a red thing"] * 4, "status": ["success"] * 4})
    result = embed_shard(images, io.BytesIO(_shard_tar([keys[0], keys[2]])), encoder, batch_size=8)
    assert result.table.column("key").to_pylist() == [keys[0], keys[2]]
    assert result.missing == [keys[1], keys[3]] and result.undecodable == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda tar, at: tar[:at],  # cut after a whole sample: tarfile takes that for the end
        lambda tar, at: tar[: at + 700],  # cut inside a member
        lambda tar, at: tar[:at] + b"\x01" * 512 + tar[at + 512 :],  # a sample's header damaged
    ],
    ids=["cut-between-samples", "cut-inside-a-member", "damaged-header"],
)
def test_a_damaged_images_tar_is_an_error_naming_it(local_root, encoder, damage):
    """The samples after a damaged spot of the tar are not dropped without a word: the shard fails,
    naming the tar, and writes no embeddings."""
    store = DatasetStore(local_root)
    keys = [f"s-{i:08d}" for i in range(6)]
    tar = _shard_tar(keys)
    with tarfile.open(fileobj=io.BytesIO(tar)) as members:
        second = next(m.offset for m in members if m.name.startswith(keys[1]))
    store.write_parquet(
        "images/s.parquet", pa.table({"key": keys, "caption": ["a red thing"] * 6, "status": ["success"] * 6})
    )
    store.write_bytes("images/s.tar", damage(tar, second))
    with pytest.raises(DamagedTar, match=rf"^{re.escape(store.url('images/s.tar'))} is damaged"):
        write_embeddings(store, "s", encoder, batch_size=4)
    assert not store.exists("embeddings/s.parquet")


def test_missing_weights_fail_at_once_with_advice():
    with pytest.raises(ModelUnavailable, match=r"checkpoint file /no/such/model.bin does not exist"):
        ClipEncoder(dataclasses.replace(TINY_CLIP, pretrained="/no/such/model.bin"))
    with pytest.raises(ModelUnavailable, match=r"not-a-tag.*LAION_ASSETS_CLIP_PRETRAINED=/path/to/it"):
        ClipEncoder(dataclasses.replace(TINY_CLIP, pretrained="not-a-tag"))


def test_local_checkpoint_loads_the_same_weights(tmp_path, encoder):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(encoder.model.state_dict(), checkpoint)
    loaded = ClipEncoder(dataclasses.replace(TINY_CLIP, pretrained=str(checkpoint), seed=12345))
    texts = ["a red square", "a dog"]
    assert torch.equal(loaded.encode_texts(texts), encoder.encode_texts(texts))


def test_a_local_dir_models_weights_are_its_files(tmp_path, encoder):
    """open_clip's `local-dir:<folder>` model loads the folder's own weights and ignores `pretrained`: the
    identity is the folder's content, not a tag or a seed it was not made with, so the embeddings of weights
    put in the place of others never pass for theirs."""
    from laion_assets.pipeline.embeddings.clip import MODEL_CONFIGS

    def folder(name: str, weights: ClipEncoder) -> str:
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        config = json.loads((MODEL_CONFIGS / f"{TINY_CLIP.model}.json").read_text())
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
        torch.save(weights.model.state_dict(), path / "open_clip_pytorch_model.bin")
        return f"local-dir:{path}"

    first = ClipEncoder(dataclasses.replace(TINY_CLIP, model=folder("a", encoder), pretrained="none"))
    texts = ["a red square"]
    assert torch.equal(first.encode_texts(texts), encoder.encode_texts(texts))  # the folder's weights
    assert first.identity.weights.startswith("sha256:")

    other = ClipEncoder(dataclasses.replace(TINY_CLIP, seed=1))
    replaced = ClipEncoder(dataclasses.replace(TINY_CLIP, model=folder("a", other), pretrained="none"))
    assert not torch.equal(replaced.encode_texts(texts), first.encode_texts(texts))
    assert replaced.identity != first.identity
    copy = ClipEncoder(dataclasses.replace(TINY_CLIP, model=folder("b", encoder), pretrained="openai"))
    assert copy.identity.weights == first.identity.weights


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("LAION_ASSETS_CLIP_MODEL", "ViT-L-14")
    monkeypatch.setenv("LAION_ASSETS_CLIP_PRETRAINED", "/models/vit-l.bin")
    monkeypatch.setenv("LAION_ASSETS_DEVICE", "cuda:1")
    monkeypatch.setenv("LAION_ASSETS_CLIP_BATCH_SIZE", "512")
    assert ClipSettings.from_env() == ClipSettings("ViT-L-14", "/models/vit-l.bin", "cuda:1", 512)
    for name in (
        "LAION_ASSETS_CLIP_MODEL",
        "LAION_ASSETS_CLIP_PRETRAINED",
        "LAION_ASSETS_DEVICE",
        "LAION_ASSETS_CLIP_BATCH_SIZE",
    ):
        monkeypatch.delenv(name)
    assert ClipSettings.from_env() == ClipSettings("ViT-B-32", "datacomp_xl_s13b_b90k", "auto", 256)


def test_asset_writes_embeddings_and_resumes_after_a_failed_run(root, web):
    store = DatasetStore(root)
    urls = "".join(f'{{"url": "{web.url(p)}", "caption": "image at {p}"}}\n' for p in PATHS)
    store.write_bytes("incoming/e.jsonl", urls.encode())
    instance = dg.DagsterInstance.ephemeral()
    broken = dataclasses.replace(TINY_CLIP, pretrained="/no/such/model.bin")
    failed = materialize_shard(instance, root, "e", local_web_config(), clip=broken)
    assert not failed.success
    assert failure_message(failed).startswith("checkpoint file /no/such/model.bin does not exist")
    # an error that wraps a library's error is shown with its own message and advice
    unknown = materialize_shard(
        instance,
        root,
        "e",
        selection=["clip_embeddings"],
        clip=dataclasses.replace(TINY_CLIP, pretrained="not-a-tag"),
    )
    assert "LAION_ASSETS_CLIP_PRETRAINED=/path/to/it" in failure_message(unknown)
    assert store.exists("images/e.parquet") and not store.exists("embeddings/e.parquet")

    resumed = materialize_shard(instance, root, "e", selection=["clip_embeddings"])
    assert resumed.success
    table = store.read_parquet("embeddings/e.parquet")
    images = store.read_parquet("images/e.parquet")
    successes = {r["key"] for r in images.to_pylist() if r["status"] == schemas.SUCCESS}
    assert set(table.column("key").to_pylist()) == successes and len(successes) == 5
    assert table.schema.metadata[names.CLIP_MODEL_FOOTER.encode()] == b"laion-assets-tiny"
    assert table.schema.metadata[names.CLIP_PRETRAINED_FOOTER.encode()] == b"none"
    meta = resumed.asset_materializations_for_node("clip_embeddings")[0].metadata
    assert meta["dagster/row_count"].value == 5 and meta["dim"].value == 64 and meta["device"].value == "cpu"


def test_a_batch_size_under_1_is_refused(monkeypatch):
    """0 or less made one batch of the whole shard (`len(batch) == batch_size` never held): a GPU out of
    memory on a real shard, far from the setting that caused it."""
    with pytest.raises(ValueError, match=r"batch_size 0 .* 1 or more"):
        dataclasses.replace(TINY_CLIP, batch_size=0)
    monkeypatch.setenv("LAION_ASSETS_CLIP_BATCH_SIZE", "-8")
    with pytest.raises(ValueError, match=r"batch_size -8 .* 1 or more"):
        ClipSettings.from_env()


def test_model_identity_is_the_model_and_its_weights(tmp_path):
    """One rule for "these embeddings can be compared": same model name and the same weights, a checkpoint
    known by its content (not its path), random weights by their seed."""
    from laion_assets.pipeline.embeddings.clip import ModelIdentity, ModelMismatch

    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    c.write_bytes(b"other weights")

    def identity(pretrained: str, model: str = "ViT-B-32", seed: int = 0) -> ModelIdentity:
        return ModelIdentity.of(ClipSettings(model=model, pretrained=pretrained, seed=seed))

    assert identity(str(a)) == identity(str(b)) != identity(str(c))
    assert identity("openai") != identity("datacomp_xl_s13b_b90k")
    assert identity("openai") != identity("openai", model="ViT-B-16")
    assert identity("none") == identity("NONE") != identity("none", seed=1)
    footer = identity(str(a)).footer()
    assert ModelIdentity.from_footer(footer) == identity(str(b))
    # a file written before the weights were recorded: its tag is read as the weights
    assert ModelIdentity.from_footer(
        {names.CLIP_MODEL_FOOTER: "ViT-B-32", names.CLIP_PRETRAINED_FOOTER: "openai"}
    ) == identity("openai")
    with pytest.raises(
        ModelMismatch, match=r"embedded with ViT-B-32 / openai, the service runs ViT-B-32 / dat"
    ):
        identity("openai").require(identity("datacomp_xl_s13b_b90k"), "it was", "the service", "re-embed")


def test_the_tokenizer_cache_is_bounded_and_tokens_unchanged(monkeypatch):
    from laion_assets.pipeline.embeddings import clip

    monkeypatch.setattr(clip, "TOKENIZER_CACHE_WORDS", 100)
    bounded = ClipEncoder(TINY_CLIP)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 8)) for _ in range(500)]
    texts = [" ".join(words[i : i + 5]) for i in range(0, 500, 5)]
    fixed = {"<start_of_text>", "<end_of_text>"} & set(bounded.tokenizer.cache)
    tokens = bounded.tokenize(texts)
    assert len(bounded.tokenizer.cache) <= 100 + len(fixed) and fixed <= set(bounded.tokenizer.cache)
    assert torch.equal(tokens, open_clip.get_tokenizer(TINY_CLIP.model)(texts))  # what open_clip gives
    assert torch.equal(bounded.tokenize(texts), tokens)  # and again, after evictions


def test_weights_trained_with_another_activation_are_refused_before_loading():
    """open_clip 3 builds `ViT-B-32` with GELU whatever the tag, and only warns when the tag's weights
    were trained with QuickGELU (OpenAI's, LAION-400M's): their embeddings would be off without a word."""
    with pytest.raises(ModelUnavailable, match=r"'openai'.* QuickGELU.*model 'ViT-B-32-quickgelu'"):
        ClipEncoder(ClipSettings(model="ViT-B-32", pretrained="openai", device="cpu"))
    with pytest.raises(ModelUnavailable, match=r"'laion400m_e32'.* QuickGELU.*model 'ViT-B-32-quickgelu'"):
        ClipEncoder(ClipSettings(model="ViT-B-32", pretrained="laion400m_e32", device="cpu"))
    with pytest.raises(ModelUnavailable, match=r"'openai'.* QuickGELU.*model 'ViT-L-14-quickgelu'"):
        ClipEncoder(ClipSettings(model="ViT-L-14", pretrained="openai", device="cpu"))
    # the matching name gets past the check, to the weights (which this offline machine lacks)
    with pytest.raises(ModelUnavailable, match=r"^cannot load open_clip model 'ViT-B-32-quickgelu'"):
        ClipEncoder(ClipSettings(model="ViT-B-32-quickgelu", pretrained="openai", device="cpu"))


def test_embeddings_made_before_the_images_were_downloaded_again_are_not_current(local_root, web):
    """The images downloaded again with the same settings, the web answering otherwise (a host back up):
    every footer the images record was as before, so lineage took the embeddings made from the first
    download for current, and no run gave the image that came back an embedding (nor a pair)."""
    store = DatasetStore(local_root)
    paths = ["/img/red.jpg", "/down/a.jpg", "/img/blue.webp"]
    store.write_bytes(
        "incoming/e.jsonl",
        "".join(f'{{"url": "{web.url(p)}", "caption": "a picture at {p}"}}\n' for p in paths).encode(),
    )
    instance, layers = dg.DagsterInstance.ephemeral(), [CRAWL_METADATA, IMAGES, EMBEDDINGS]
    web.down.add("/down/a.jpg")
    first = ["crawl_metadata", "downloaded_images", "clip_embeddings"]
    assert materialize_shard(instance, local_root, "e", local_web_config(), selection=first).success
    assert store.read_parquet(EMBEDDINGS.parquet("e")).column("key").to_pylist() == [
        "e-00000000",
        "e-00000002",
    ]
    assert stale_layers(store, incoming_by_shard(store), layers) == {"e": []}

    web.down.clear()
    again = ["downloaded_images"]
    assert materialize_shard(instance, local_root, "e", local_web_config(), selection=again).success
    assert store.read_parquet(IMAGES.parquet("e")).column("status").to_pylist() == [schemas.SUCCESS] * 3
    assert stale_layers(store, incoming_by_shard(store), layers) == {"e": [EMBEDDINGS]}
    # the same outcome downloaded again leaves them current
    assert materialize_shard(instance, local_root, "e", local_web_config(), selection=first).success
    assert materialize_shard(instance, local_root, "e", local_web_config(), selection=again).success
    assert stale_layers(store, incoming_by_shard(store), layers) == {"e": []}
