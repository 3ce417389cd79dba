import numpy as np
import pyarrow as pa
import pytest

from laion_assets import names
from laion_assets.pipeline import schemas
from laion_assets.pipeline.pairs.filter import FUNNEL, NsfwCategories, PairsSettings, build_pairs

# Four categories on the axes of a 4-d space: two NSFW, two neutral (one naming a minor).
CATEGORIES = NsfwCategories(
    names=["explicit a", "explicit b", "a landscape", "a baby"],
    is_nsfw=np.array([True, True, False, False]),
    embeddings=np.eye(4, dtype=np.float32),
    minors=("baby", "kid"),
)


def unit(*weights: float) -> list[float]:
    v = np.array(weights, np.float32)
    return (v / np.linalg.norm(v)).tolist()


LANDSCAPE = unit(0.1, 0.0, 1.0, 0.2)  # nearest: landscape, then baby → UNLIKELY


def shard(rows: list[dict]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """crawl, images and embeddings tables for `rows` (defaults: a good 640x480 success)."""
    full = []
    for i, row in enumerate(rows):
        full.append(
            {
                "key": f"s-{i:08d}",
                "url": f"http://x.com/{i}.jpg",
                "caption": f"a fine caption {i}",
                "license": None,
                "status": "success",
                "ow": 640,
                "oh": 480,
                "sha256": f"h{i}",
                "similarity": 0.5,
                "image": LANDSCAPE,
                **row,
            }
        )
    crawl = pa.table({k: [r[k] for r in full] for k in ("key", "url", "caption", "license")})
    images = pa.table(
        {
            "key": [r["key"] for r in full],
            "url": [r["url"] for r in full],
            "caption": [r["caption"] for r in full],
            "status": [r["status"] for r in full],
            "width": pa.array([256] * len(full), pa.int32()),
            "height": pa.array([256] * len(full), pa.int32()),
            "original_width": pa.array([r["ow"] for r in full], pa.int32()),
            "original_height": pa.array([r["oh"] for r in full], pa.int32()),
            "sha256": [r["sha256"] for r in full],
        }
    )
    embedded = [r for r in full if r["status"] == "success" and r["similarity"] is not None]
    vectors = pa.list_(pa.float16(), 4)
    embeddings = pa.table(
        {
            "key": [r["key"] for r in embedded],
            "image_embedding": pa.array([r["image"] for r in embedded], vectors),
            "text_embedding": pa.array([r["image"] for r in embedded], vectors),
            "similarity": pa.array([r["similarity"] for r in embedded], pa.float32()),
        }
    )
    return crawl, images, embeddings


def run(rows, **settings):
    return build_pairs(*shard(rows), PairsSettings(**settings), CATEGORIES)


def kept(result) -> list[int]:
    return [int(k.split("-")[1]) for k in result.table.column("key").to_pylist()]


def test_similarity_threshold_either_side():
    result = run([{"similarity": 0.3}, {"similarity": 0.2999}, {"similarity": 0.95}, {"similarity": None}])
    assert kept(result) == [0, 2]
    assert result.removed["low_similarity"] == 1 and result.removed["no_embedding"] == 1
    assert result.table.column("similarity").type == pa.float64()
    assert result.table.column("similarity").to_pylist()[0] == pytest.approx(0.3, abs=1e-6)


def test_top_fraction_keeps_the_best():
    sims = [0.1, 0.9, 0.5, 0.7, 0.2]
    result = run([{"similarity": s} for s in sims], top_fraction=0.4)
    assert kept(result) == [1, 3]
    assert result.removed["low_similarity"] == 3


def test_top_fraction_keeps_no_extra_row_for_float_error():
    """7 % of 100 rows is 7 of them: 0.07 * 100 is 7.000000000000001 in floats, whose ceiling kept 8."""
    rows = [{"similarity": 0.2 + i / 1000} for i in range(100)]  # the best last
    result = run(rows, top_fraction=0.07)
    assert kept(result) == list(range(93, 100)) and result.removed["low_similarity"] == 93
    assert kept(run(rows[:50], top_fraction=0.14)) == list(range(43, 50))  # 0.14 * 50: 7.000000000000001


def test_caption_length_either_side():
    result = run([{"caption": "abcde"}, {"caption": "abcd"}])
    assert kept(result) == [0] and result.removed["short_caption"] == 1


def test_datacomp_basic_filter_either_side():
    rows = [
        {"caption": "three fine words", "ow": 200, "oh": 600},  # shorter side 200, aspect exactly 3: kept
        {"caption": "two words", "ow": 640, "oh": 480},  # two words: DataComp wants more than 2
        {"caption": "a b c d", "ow": 640, "oh": 480},  # 4 words, 7 characters: kept
        {"caption": "a b c", "ow": 640, "oh": 480},  # 5 characters: not over 5
        {"caption": "three fine words", "ow": 199, "oh": 400},  # shorter side 199
        {"caption": "three fine words", "ow": 200, "oh": 601},  # aspect just over 3
    ]
    assert kept(run(rows, datacomp_basic_filter=True)) == [0, 2]
    assert kept(run(rows)) == [0, 1, 2, 3, 4, 5]  # off by default


def scores(count: int, **columns: list) -> pa.Table:
    """A scores table for keys s-00000000.. with `columns` (the others null)."""
    values = {name: columns.get(name, [None] * count) for name in schemas.SCORES.names[1:]}
    return schemas.conform(pa.table({"key": [f"s-{i:08d}" for i in range(count)], **values}), schemas.SCORES)


def test_datacomp_laion2b_preset_on_known_answers():
    """DataComp's `laion2b`: B/32 similarity at least 0.28 and an English caption (CLD3's answer)."""
    similarity = [0.28, 0.2799, 0.5, 0.9, 0.3, 0.29]
    language = ["en", "en", "de", None, "en", "en"]
    keep = [True, False, False, False, True, True]  # the answers, by the rule's own words
    rows = [{"similarity": s} for s in similarity]
    result = build_pairs(
        *shard(rows), PairsSettings(preset="datacomp-laion2b"), CATEGORIES, scores(6, language=language)
    )
    assert kept(result) == [i for i, k in enumerate(keep) if k]
    assert result.removed["low_similarity"] == 1 and result.removed["language"] == 2


def test_laion_aesthetics_presets_keep_below_and_above():
    punsafe = [0.1, 0.5, 0.49, 0.1, 0.1, 0.1, None]
    pwatermark = [0.1, 0.1, 0.1, 0.8, 0.79, 0.1, 0.1]
    aesthetic = [6.5, 7.0, 7.0, 7.0, 7.0, 6.4999, 7.0]
    table = scores(7, punsafe=punsafe, pwatermark=pwatermark, aesthetic=aesthetic)
    rows = [{} for _ in punsafe]
    result = build_pairs(*shard(rows), PairsSettings(preset="laion-aesthetics-6.5"), CATEGORIES, table)
    assert kept(result) == [0, 2, 4]
    assert (result.removed["punsafe"], result.removed["pwatermark"], result.removed["aesthetic"]) == (2, 1, 1)
    # a field set to other than its default overrides the preset's value for it
    looser = PairsSettings(preset="laion-aesthetics-6.5", min_aesthetic=6.0)
    assert kept(build_pairs(*shard(rows), looser, CATEGORIES, table)) == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="unknown preset 'laion-5b'"):
        PairsSettings(preset="laion-5b").resolved()


def test_image_based_keeps_the_clusters_of_the_reference():
    """Centroids on two axes; the reference lies near the first: only its cluster's images are kept."""
    rows = [{"image": unit(1, 0.1, 0, 0)}, {"image": unit(0.1, 1, 0, 0)}, {"image": unit(0.9, 0, 0.2, 0)}]
    reference = np.array([[1.0, 0.2, 0.0, 0.0]], np.float32)
    centroids = np.eye(4, dtype=np.float32)[:2]
    result = build_pairs(*shard(rows), PairsSettings(), CATEGORIES, None, reference, centroids)
    assert kept(result) == [0, 2] and result.removed["image_based"] == 1
    with pytest.raises(ValueError, match="image_based_reference has 3-d vectors"):
        build_pairs(*shard(rows), PairsSettings(), CATEGORIES, None, reference[:, :3], centroids)


def test_duplicates_keep_the_first():
    rows = [
        {"url": "http://x.com/a.jpg", "caption": "same pair", "sha256": "h1"},
        {"url": "http://x.com/a.jpg", "caption": "same pair", "sha256": "h2"},
        {"sha256": "h1"},  # same image bytes as row 0
        {"sha256": "h9"},
    ]
    result = run(rows)
    assert kept(result) == [0, 3]
    assert result.removed["duplicate_url_caption"] == 1 and result.removed["duplicate_sha256"] == 1


def test_not_downloaded_rows_go_first_in_the_funnel():
    result = run([{"status": "failed_to_download"}, {"status": "opted_out"}, {}])
    assert kept(result) == [2]
    assert result.rows_in == 3 and result.removed["not_downloaded"] == 2
    assert list(result.removed) == list(FUNNEL)


def test_nsfw_tags_from_the_two_nearest_categories():
    rows = [
        {"image": unit(1.0, 0.9, 0.1, 0.0)},  # explicit a, explicit b → NSFW
        {"image": unit(1.0, 0.0, 0.9, 0.0)},  # explicit a, landscape → UNSURE
        {"image": LANDSCAPE},
    ]  # landscape, baby → UNLIKELY
    result = run(rows)
    assert result.table.column("nsfw").to_pylist() == ["NSFW", "UNSURE", "UNLIKELY"]
    assert result.nsfw == {"UNLIKELY": 1, "UNSURE": 1, "NSFW": 1, "UNTAGGED": 0}
    assert set(result.table.column("nsfw").to_pylist()) <= set(schemas.NSFW_TAGS)


def test_minors_dropped_only_when_nsfw_or_unsure():
    rows = [
        {"image": unit(1.0, 0.0, 0.9, 0.0), "caption": "photo of a kid"},  # UNSURE + caption: dropped
        {"image": unit(1.0, 0.0, 0.0, 0.9)},  # UNSURE, nearest category "a baby": dropped
        {"image": LANDSCAPE, "caption": "a kid on a hill"},  # UNLIKELY: kept
        {"image": unit(1.0, 0.9, 0.0, 0.0), "caption": "adults only"},
    ]  # NSFW, no minor: kept
    result = run(rows)
    assert kept(result) == [2, 3] and result.removed["minors"] == 2
    assert kept(run(rows, drop_minors=False)) == [0, 1, 2, 3]


def test_output_is_the_contract_and_embeddings_follow_it():
    crawl, images, embeddings = shard(
        [
            {"license": "https://creativecommons.org/licenses/by/4.0/"},
            {"url": "https://User@Y.Org:8080/a.jpg"},
        ]
    )
    result = build_pairs(crawl, images, embeddings, PairsSettings(), CATEGORIES)
    assert result.table.schema == schemas.PAIRS
    assert schemas.PAIRS.names[-1] == "host"  # after LAION-400M's columns, which keep their names and order
    # url_host: lower-cased, the user name left out (8a7062c; it was kept, a host of its own)
    assert result.table.column("host").to_pylist() == ["x.com", "y.org:8080"]
    assert result.table.column("license").to_pylist()[0] == "https://creativecommons.org/licenses/by/4.0/"
    assert result.embeddings.column("key").to_pylist() == result.table.column("key").to_pylist()
    assert result.embeddings.column("image_embedding").type == pa.list_(pa.float16(), 4)


def test_asset_writes_pairs_tar_and_funnel(root, web):
    import dataclasses
    import json

    import dagster as dg
    import webdataset as wds

    from laion_assets.pipeline.shard_tar import read_samples
    from laion_assets.pipeline.storage import DatasetStore
    from laion_assets.runner import failure_message
    from laion_assets_tests.dagster_helpers import LOCAL_WEB, TINY_CLIP, materialize_shard

    store = DatasetStore(root)
    paths = ["/img/red.jpg", "/img/green.png", "/404.jpg", "/img/blue.webp", "/img/red.jpg"]
    lines = [{"url": web.url(p), "caption": f"a picture of {p}"} for p in paths]
    lines[4]["caption"] = "the same red image again"  # same bytes as row 0: a sha256 duplicate
    store.write_bytes("incoming/p.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())
    config = {
        "ops": {
            "downloaded_images": {"config": LOCAL_WEB},
            # random weights make random NSFW tags: the minors rule is tested on hand-built embeddings above
            "filtered_pairs": {
                "config": {"min_similarity": -1.0, "write_embeddings": True, "drop_minors": False}
            },
        }
    }
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_shard(instance, root, "p", config)
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {
        "one_row_per_crawl_row": True,
        "keys_are_success_images": True,
        "one_row_per_embedding": True,
        "follows_the_contract": True,
        "one_row_per_kept_pair": True,
    }

    pairs = store.read_parquet("pairs/p.parquet")
    assert pairs.schema.remove_metadata() == schemas.PAIRS
    assert pairs.column("key").to_pylist() == ["p-00000000", "p-00000001", "p-00000003"]
    meta = result.asset_materializations_for_node("filtered_pairs")[0].metadata
    removed = {k.split("/", 1)[1]: v.value for k, v in meta.items() if k.startswith("removed/")}
    assert removed["not_downloaded"] == 1 and removed["duplicate_sha256"] == 1
    assert meta["rows_in"].value - sum(removed.values()) == meta["dagster/row_count"].value == 3
    assert sum(meta[f"nsfw/{t}"].value for t in schemas.NSFW_TAGS) == 3
    file_meta = {k.decode(): v.decode() for k, v in pairs.schema.metadata.items()}
    assert json.loads(file_meta[names.PAIRS_FUNNEL_FOOTER]) == {"rows_in": 5, "removed": removed}
    provenance = json.loads(file_meta[names.PROVENANCE_FOOTER])
    assert provenance["source_file"] == "p.jsonl" and provenance["run_id"] == result.run_id
    assert provenance["shard"] == "p" and provenance["code_version"] == "0.1.0"

    with store.open("pairs/p.tar") as f:
        samples = dict(read_samples(f))
    with store.open("images/p.tar") as f:
        originals = dict(read_samples(f))
    assert sorted(samples) == pairs.column("key").to_pylist()
    for key, members in samples.items():
        assert members["jpg"] == originals[key]["jpg"]  # copied, not re-encoded
        row = json.loads(members["json"])
        assert (
            row["nsfw"] in schemas.NSFW_TAGS
            and row["key"] == key
            and members["txt"].decode() == row["caption"]
        )
    if not store.is_s3:
        assert len(list(wds.WebDataset(store.url("pairs/p.tar"), shardshuffle=False))) == 3
    assert (
        store.read_parquet("pairs_embeddings/p.parquet").column("key").to_pylist()
        == pairs.column("key").to_pylist()
    )

    other_model = dataclasses.replace(TINY_CLIP, model="ViT-B-32")
    mismatch = materialize_shard(instance, root, "p", selection=["filtered_pairs"], clip=other_model)
    # This asserted the model name alone ("embeddings were made with 'laion-assets-tiny' but the clip
    # resource is 'ViT-B-32'"): the weights count too now, so the message names them (#12).
    assert (
        "embeddings were embedded with laion-assets-tiny / none, the clip resource runs ViT-B-32 / none"
        in failure_message(mismatch)
    )


def test_pairs_refuse_embeddings_of_other_weights_with_the_same_model_name(local_root, web, tmp_path):
    """The NSFW prompts must be embedded by the very weights that embedded the images, not just by a model
    of the same name (ViT-B-32/openai embeddings tagged with ViT-B-32/datacomp prompts went unnoticed)."""
    import dataclasses

    import dagster as dg
    import open_clip
    import torch

    from laion_assets.pipeline.storage import DatasetStore
    from laion_assets.runner import failure_message
    from laion_assets_tests.dagster_helpers import LOCAL_WEB, TINY_CLIP, materialize_shard

    store = DatasetStore(local_root)
    store.write_bytes("incoming/w.csv", f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode())
    instance = dg.DagsterInstance.ephemeral()
    config = {"ops": {"downloaded_images": {"config": LOCAL_WEB}}}
    embedded = ["crawl_metadata", "downloaded_images", "clip_embeddings"]
    assert materialize_shard(instance, local_root, "w", config, selection=embedded).success  # seed 0

    torch.manual_seed(1)
    other_weights = tmp_path / "laion-assets-tiny-seed-1.pt"
    torch.save(open_clip.create_model(TINY_CLIP.model).state_dict(), other_weights)
    other = dataclasses.replace(TINY_CLIP, pretrained=str(other_weights))
    mismatch = materialize_shard(instance, local_root, "w", selection=["filtered_pairs"], clip=other)
    assert not mismatch.success and not store.exists("pairs/w.parquet")
    assert (
        f"shard w: its embeddings were embedded with laion-assets-tiny / none, the clip resource runs "
        f"laion-assets-tiny / {other_weights}" in failure_message(mismatch)
    )

    # Weights are known by their content: embedded with the checkpoint, filtered with it moved elsewhere.
    assert materialize_shard(instance, local_root, "w", selection=["clip_embeddings"], clip=other).success
    moved = dataclasses.replace(TINY_CLIP, pretrained=str(other_weights.rename(tmp_path / "moved.pt")))
    assert materialize_shard(instance, local_root, "w", selection=["filtered_pairs"], clip=moved).success


def test_checks_fail_on_broken_shards(local_root):
    import json

    from laion_assets.defs.embeddings import keys_are_success_images as embeddings_of_success_images
    from laion_assets.defs.pairs import follows_the_contract as pairs_follow_the_contract
    from laion_assets.pipeline.storage import DatasetStore

    store = DatasetStore(local_root)
    crawl, images, embeddings = shard([{}, {}, {"status": "failed_to_download"}])
    store.write_parquet("images/s.parquet", images)
    store.write_parquet("embeddings/s.parquet", embeddings)
    assert embeddings_of_success_images(store, "s").passed
    broken = pa.concat_tables(
        [embeddings, embeddings.slice(0, 1).set_column(0, "key", pa.array(["s-00000002"]))]
    )  # an embedding for the image that failed
    store.write_parquet("embeddings/s.parquet", broken)
    check = embeddings_of_success_images(store, "s")
    assert not check.passed
    assert check.description == "shard s: 1 keys not a success image, 0 repeated"

    good = build_pairs(crawl, images, embeddings, PairsSettings(), CATEGORIES).table
    settings = {names.PAIRS_SETTINGS_FOOTER: json.dumps({"min_similarity": 0.6})}
    store.write_parquet("pairs/s.parquet", good, metadata={names.PAIRS_SETTINGS_FOOTER: json.dumps({})})
    assert pairs_follow_the_contract(store, "s").passed
    store.write_parquet("pairs/s.parquet", good, metadata=settings)  # rows at 0.5 under a 0.6 rule
    check = pairs_follow_the_contract(store, "s")
    assert not check.passed and check.description == "shard s: low_similarity: 2"
    store.write_parquet("pairs/s.parquet", pa.concat_tables([good, good.slice(0, 1)]))
    check = pairs_follow_the_contract(store, "s")
    assert check.description == "shard s: repeated_keys: 1, duplicate_url_caption: 1, duplicate_sha256: 1"
    store.write_parquet("pairs/s.parquet", good.drop_columns(["sha256"]))
    assert pairs_follow_the_contract(store, "s").description.startswith("shard s: schema: columns")
    store.write_parquet("pairs/s.parquet", good.drop_columns(["host"]))  # written before `host` existed
    assert pairs_follow_the_contract(store, "s").description.startswith("shard s: schema: columns")
    other_host = good.set_column(good.schema.get_field_index("host"), "host", pa.array(["y.org"] * 2))
    store.write_parquet("pairs/s.parquet", other_host.cast(schemas.PAIRS))
    assert pairs_follow_the_contract(store, "s").description == "shard s: host_not_of_url: 2"


def test_the_contract_check_passes_a_shard_the_datacomp_basic_filter_emptied(local_root):
    """Every pair of a shard removed under `datacomp-basic`: its empty pairs follow the contract. The check
    summed the filter's empty mask (null, not 0) and raised a TypeError, failing the shard's run."""
    import dataclasses
    import json

    from laion_assets.defs.pairs import follows_the_contract as pairs_follow_the_contract
    from laion_assets.pipeline.storage import DatasetStore

    settings = PairsSettings(preset="datacomp-basic")
    rows = [{"caption": "two words"}, {"caption": "tiny", "ow": 640, "oh": 100}]
    result = build_pairs(*shard(rows), settings, CATEGORIES, scores(2, language=["en", "en"]))
    assert result.table.num_rows == 0 and result.removed["datacomp_basic"] == 1
    store = DatasetStore(local_root)
    footer = {names.PAIRS_SETTINGS_FOOTER: json.dumps(dataclasses.asdict(settings))}  # as write_pairs has it
    store.write_parquet("pairs/s.parquet", result.table, metadata=footer)
    check = pairs_follow_the_contract(store, "s")
    assert check.passed and check.description is None


def test_the_contract_check_reads_the_scores_a_rule_filters_on(local_root):
    """The check said it found no row breaking an active rule, and re-checked none on the quality scores:
    pairs of `laion-aesthetics-6` whose scores were rebuilt lower, or removed, passed it."""
    import dataclasses
    import json

    from laion_assets.defs.pairs import follows_the_contract as pairs_follow_the_contract
    from laion_assets.pipeline.storage import DatasetStore

    settings = PairsSettings(preset="laion-aesthetics-6")
    aesthetic = [6.5, 5.0, 7.0]
    made_with = scores(3, punsafe=[0.1] * 3, pwatermark=[0.1] * 3, aesthetic=aesthetic)
    result = build_pairs(*shard([{}, {}, {}]), settings, CATEGORIES, made_with)
    assert kept(result) == [0, 2]
    store = DatasetStore(local_root)
    footer = {names.PAIRS_SETTINGS_FOOTER: json.dumps(dataclasses.asdict(settings))}  # as write_pairs has it
    store.write_parquet("pairs/s.parquet", result.table, metadata=footer)
    store.write_parquet("scores/s.parquet", made_with)
    assert pairs_follow_the_contract(store, "s").passed
    lower = scores(3, punsafe=[0.1, 0.1, 0.6], pwatermark=[0.1] * 3, aesthetic=[5.9, 5.0, 7.0])
    store.write_parquet("scores/s.parquet", lower)
    check = pairs_follow_the_contract(store, "s")
    assert check.description == "shard s: punsafe: 1, aesthetic: 1"
    store.remove("scores/s.parquet")
    check = pairs_follow_the_contract(store, "s")
    assert not check.passed and "materialise quality_scores for it first" in check.description


def test_a_rerun_without_write_embeddings_leaves_no_earlier_pairs_embeddings(local_root, web):
    """pairs_embeddings/ of an earlier run with `write_embeddings` stayed beside pairs made again without it:
    its rows were the earlier pairs' (here none, the threshold being higher), and dedup, which reads it
    where it exists, found no vector for the new pairs."""
    import dagster as dg

    from laion_assets.pipeline.storage import DatasetStore
    from laion_assets_tests.dagster_helpers import LOCAL_WEB, materialize_shard

    store = DatasetStore(local_root)
    rows = "".join(f"{web.url(path)},a picture of {path}\n" for path in ("/img/red.jpg", "/img/green.png"))
    store.write_bytes("incoming/r.csv", f"url,caption\n{rows}".encode())
    instance = dg.DagsterInstance.ephemeral()
    embedded = ["crawl_metadata", "downloaded_images", "clip_embeddings"]
    downloads = {"ops": {"downloaded_images": {"config": LOCAL_WEB}}}
    assert materialize_shard(instance, local_root, "r", downloads, selection=embedded).success

    def pairs(**config) -> None:
        run_config = {"ops": {"filtered_pairs": {"config": {"drop_minors": False, **config}}}}
        assert materialize_shard(instance, local_root, "r", run_config, selection=["filtered_pairs"]).success

    pairs(min_similarity=1.0, write_embeddings=True)
    assert store.read_parquet("pairs_embeddings/r.parquet").num_rows == 0
    pairs(min_similarity=-1.0, write_embeddings=False)
    assert store.read_parquet("pairs/r.parquet").num_rows == 2
    assert not store.exists("pairs_embeddings/r.parquet")


def test_the_provenance_of_a_source_without_rows_names_its_file(local_root):
    """The provenance took the source file from the first crawl row: a source file without any (a CSV of its
    header alone) made pairs whose provenance, and the card's, said the file was not recorded."""
    import json

    import dagster as dg

    from laion_assets.pipeline.storage import DatasetStore
    from laion_assets_tests.dagster_helpers import materialize_shard

    store = DatasetStore(local_root)
    store.write_bytes("incoming/e.csv", b"url,caption\n")
    instance = dg.DagsterInstance.ephemeral()
    embedded = ["crawl_metadata", "downloaded_images", "clip_embeddings"]
    assert materialize_shard(instance, local_root, "e", selection=embedded).success
    assert materialize_shard(instance, local_root, "e", selection=["filtered_pairs"]).success
    assert store.read_parquet("pairs/e.parquet").num_rows == 0
    provenance = json.loads(store.parquet_metadata("pairs/e.parquet")[names.PROVENANCE_FOOTER])
    assert provenance["source_file"] == "e.csv"


def test_a_preset_no_run_can_use_is_refused_before_it_becomes_the_datasets_setting(local_root, web):
    """A first run of filtered_pairs with a mistyped preset failed only once it filtered a shard, after its
    config had been written to the dataset's settings as their `filtered_pairs` section: every later run,
    however configured, kept failing on the preset no one had asked for any more."""
    import dagster as dg

    from laion_assets.pipeline.settings import load_settings
    from laion_assets.pipeline.storage import DatasetStore
    from laion_assets.runner import failure_message
    from laion_assets_tests.dagster_helpers import LOCAL_WEB, materialize_shard

    store = DatasetStore(local_root)
    store.write_bytes("incoming/t.csv", f"url,caption\n{web.url('/img/red.jpg')},a red square\n".encode())
    instance = dg.DagsterInstance.ephemeral()
    embedded = ["crawl_metadata", "downloaded_images", "clip_embeddings"]
    downloads = {"ops": {"downloaded_images": {"config": LOCAL_WEB}}}
    assert materialize_shard(instance, local_root, "t", downloads, selection=embedded).success

    def pairs(**config) -> dg.ExecuteInProcessResult:
        run_config = {"ops": {"filtered_pairs": {"config": {"drop_minors": False, **config}}}}
        return materialize_shard(instance, local_root, "t", run_config, selection=["filtered_pairs"])

    mistyped = pairs(preset="laion-aesthetic-6")
    assert not mistyped.success and "unknown preset 'laion-aesthetic-6'" in failure_message(mistyped)
    assert "filtered_pairs" not in load_settings(store).sections
    assert not pairs(top_fraction=1.5).success
    assert pairs(min_similarity=-1.0).success
    assert load_settings(store).section("filtered_pairs")["preset"] == ""
    with pytest.raises(ValueError, match=r"top_fraction 1\.5: a fraction of the pairs, 0 to 1"):
        PairsSettings(top_fraction=1.5)


def test_a_language_code_the_scores_never_write_is_refused():
    """Codes are matched as the scores write them: `languages: [EN]` dropped every caption, with nothing
    but a funnel of `language` rejections to say why."""
    assert PairsSettings(languages=("en", "fil", "ja-Latn")).languages == ("en", "fil", "ja-Latn")
    for code in ("EN", "english", "en_US", ""):
        with pytest.raises(ValueError, match=f"languages: {code!r} is not a language code as the scores"):
            PairsSettings(languages=(code,))


def test_minors_named_in_the_plural_are_dropped_too():
    """The minors rule matched whole words of its list only: a caption of "teens", "girls" or "toddlers" on
    an image tagged NSFW or UNSURE was kept (LAION's rule matched its terms inside the caption)."""
    from laion_assets.pipeline.pairs.filter import CATEGORIES_FILE

    unsure = unit(1.0, 0.0, 0.9, 0.0)  # explicit a, landscape → UNSURE
    captions = ["two kids on a bed", "a kid on a bed", "an adult on a bed"]
    result = run([{"image": unsure, "caption": caption} for caption in captions])
    assert kept(result) == [2] and result.removed["minors"] == 2
    shipped = NsfwCategories.load(lambda texts: np.eye(len(texts), 4, dtype=np.float32), CATEGORIES_FILE)
    for caption in ("hot teens", "Schoolgirls, uniforms", "toddlers at the beach", "young girls"):
        assert shipped.names_a_minor(caption), caption
    assert not shipped.names_a_minor("a girlfriend's boyish haircut", "a landscape", "a beach")
