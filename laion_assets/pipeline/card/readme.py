"""The card's markdown: YAML front matter for the Hugging Face Hub, then its sections."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable

import yaml

from laion_assets.pipeline import schemas
from laion_assets.pipeline.card.settings import CardSettings
from laion_assets.pipeline.card.stats import CardStats, DuplicateStats, RecapStats, ScoreStats, ShardRecord
from laion_assets.pipeline.exports.export import SUMMARY_COLUMNS, summary_rows
from laion_assets.pipeline.markdown import literal, shorten, table
from laion_assets.pipeline.pairs.filter import SCORE_FILTERS
from laion_assets.pipeline.storage import PAIRS, RECAPTIONS, SCORES, Export

DATA_FILES = PAIRS.parquet_glob  # relative to the dataset root, which is what gets uploaded
RECAP_DATA_FILES = RECAPTIONS.parquet_glob
TASK_CATEGORIES = ("image-to-text", "text-to-image", "zero-shot-image-classification")

# LAION-400M's features (TFDS `laion400m`), with this project's key, stored size and hash.
FEATURE_DESCRIPTIONS = {
    "key": "`<shard>-<row:08d>`: the join key across all layers and the sample name in `pairs/<shard>.tar`",
    "caption": "the alt text (or the source list's caption) found with the image",
    "url": "where the image was downloaded from",
    "license": "the licence the crawl found for the image (e.g. a Creative Commons URL); null if none",
    "nsfw": "UNLIKELY, UNSURE or NSFW from CLIP zero-shot against NSFW categories (LAION's rule); UNTAGGED",
    "original_height": "height of the image as downloaded, in pixels",
    "original_width": "width of the image as downloaded, in pixels",
    "similarity": "cosine similarity of the CLIP image and text embeddings",
    "width": "width of the stored (resized) image in `pairs/<shard>.tar`",
    "height": "height of the stored (resized) image in `pairs/<shard>.tar`",
    "sha256": "SHA-256 of the downloaded bytes",
    "host": "the URL's host, lower-cased, as the downloader counts hosts (not a LAION-400M column)",
}

LAION_400M_BIBTEX = """@article{schuhmann2021laion400m,
  title = {LAION-400M: Open Dataset of CLIP-Filtered 400 Million Image-Text Pairs},
  author = {Schuhmann, Christoph and Vencu, Richard and Beaumont, Romain and Kaczmarczyk, Robert and
            Mullis, Clayton and Katta, Aarush and Coombes, Theo and Jitsev, Jenia and Komatsuzaki, Aran},
  journal = {arXiv preprint arXiv:2111.02114},
  year = {2021}
}"""


_SIZE_CATEGORIES = (
    (10**3, "n<1K"),
    (10**4, "1K<n<10K"),
    (10**5, "10K<n<100K"),
    (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"),
    (10**8, "10M<n<100M"),
    (10**9, "100M<n<1B"),
    (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"),
    (10**12, "100B<n<1T"),
)


def size_category(rows: int) -> str:
    """The Hugging Face `size_categories` value for a dataset of `rows` rows."""
    return next((name for bound, name in _SIZE_CATEGORIES if rows < bound), "n>1T")


# markdown


def render_markdown(stats: CardStats, settings: CardSettings, figures: dict[str, str]) -> str:
    """The card: YAML front matter for the Hub, then the sections; `figures`: each figure's file name in
    figures/, by the figure's name (`similarity.png`)."""
    header = {
        "pretty_name": settings.pretty_name,
        "license": settings.license,
        "task_categories": list(TASK_CATEGORIES),
        "size_categories": [size_category(stats.pairs)],
        "tags": ["laion", "clip", "image-text-pairs", "webdataset"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
    }
    if stats.recaptions:
        recap = {"config_name": "recap", "data_files": [{"split": "train", "path": RECAP_DATA_FILES}]}
        header["configs"].append(recap)
    for manifest in stats.exports:  # each export its own config, read by the Hub's webdataset builder
        tars = f"{Export(manifest['name']).folder}/*.tar"
        header["configs"].append(
            {"config_name": f"export-{manifest['name']}", "data_files": [{"split": "train", "path": tars}]}
        )
    year = _build_year(stats.shards)
    sections = [
        f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---",
        f"# {settings.pretty_name}",
        _description(stats, settings),
        _model_and_thresholds(stats),
        _features(),
        _funnel(stats),
        _removals(stats),
        *([_duplicates(stats.duplicates)] if stats.duplicates else []),
        *([_scores(stats.scores, stats.shards, stats.embedded)] if stats.scores else []),
        *([_recaptions(stats.recaptions, stats.shards, stats.pairs)] if stats.recaptions else []),
        *([_exports(stats.exports)] if stats.exports else []),
        _downloads(stats, settings),
        _figures(figures),
        _provenance(stats),
        "## Licence\n\n"
        f"The `license: {settings.license}` above covers the metadata (urls, captions, scores). The images "
        "are not part of it: each keeps its own copyright and licence, given in the `license` column where "
        "the crawl found one. Respect it, and the opt-outs of the sites they come from.",
        "## Citation\n\n```bibtex\n"
        f"{_dataset_bibtex(settings, year, stats.shards)}\n\n{LAION_400M_BIBTEX}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def _description(stats: CardStats, settings: CardSettings) -> str:
    sources = table(["source file", "crawl rows"], stats.sources)
    in_progress = (
        f" {len(stats.in_progress)} more shards are being built and have no pairs yet: nothing of theirs "
        f"is counted on this card ({_shard_names(stats.in_progress)})."
        if stats.in_progress
        else ""
    )
    return (
        f"## Dataset description\n\n{settings.description}\n\n"
        f"{stats.pairs} pairs from {len(stats.shards)} shards: {stats.crawl_rows} crawl rows, "
        f"{stats.downloaded} images downloaded, {stats.embedded} embedded. Every number and figure of this "
        f"card is over these shards.{in_progress}\n\n"
        "To publish it, upload the dataset root with this file as its `README.md` and `card/figures/` as "
        f"`figures/`: the `configs` above point at `{DATA_FILES}`, relative to the root. The same pairs, "
        "with their images, are webdataset shards in `pairs/<shard>.tar`.\n\n"
        f"### Sources\n\nEach source file is one shard.\n\n{sources}"
    )


def _model_and_thresholds(stats: CardStats) -> str:
    models = _groups(stats.shards, lambda r: r.model)
    model_rows = [
        (*((model.model, model.pretrained) if model else ("not recorded", "")), _shard_names(shards))
        for model, shards in models
    ]
    settings_groups = _groups(
        stats.shards, lambda r: json.dumps(r.settings, sort_keys=True) if r.settings else None
    )
    names = sorted({name for key, _ in settings_groups if key for name in json.loads(key)})
    setting_rows = [
        (name, *(json.loads(key).get(name, "") if key else "not recorded" for key, _ in settings_groups))
        for name in names
    ]
    settings_header = ["setting", *(f"shards {_shard_names(shards)}" for _, shards in settings_groups)]
    return (
        "## Model and thresholds\n\n"
        "Images and captions are embedded with CLIP; a pair is kept when their cosine similarity is at least "
        "`min_similarity` (LAION-400M: 0.3 with ViT-B/32), or, with `top_fraction` > 0, when it is in that "
        "top fraction of its shard.\n\n"
        f"{table(['CLIP model', 'pretrained', 'shards'], model_rows)}\n\n"
        f"{table(settings_header, setting_rows)}"
    )


def _features() -> str:
    rows = [(f"`{f.name}`", str(f.type), FEATURE_DESCRIPTIONS[f.name]) for f in schemas.PAIRS]
    return (
        "## Features\n\nOne row per pair in `pairs/<shard>.parquet`, LAION-400M's columns and more.\n\n"
        f"{table(['column', 'type', 'description'], rows)}"
    )


def _funnel(stats: CardStats) -> str:
    rows_in, removed = stats.funnel()
    remaining, rows = rows_in, [("rows in", "", rows_in, "")]
    for rule, n in removed.items():
        share = f"{1 - n / remaining:.1%}" if remaining else ""
        remaining -= n
        rows.append((rule, n, remaining, share))
    missing = [r.shard for r in stats.shards if not r.funnel]
    note = f"\n\nShards without a recorded funnel, left out: {_shard_names(missing)}." if missing else ""
    return (
        "## Filtering funnel\n\n"
        "Rows removed by each rule, in the order they apply, summed over the shards, and the share of the "
        "rows it saw that it kept. `rows in` are the crawl rows with a download outcome.\n\n"
        f"{table(['rule', 'removed', 'remaining', 'kept'], rows)}{note}"
    )


def _removals(stats: CardStats) -> str:
    at_download = dict(stats.statuses).get(schemas.TAKEN_DOWN, 0) - sum(
        n for reason, _, _, n in stats.removals if reason == schemas.TAKEN_DOWN
    )
    return (
        "## Removals\n\n"
        "Samples taken out after the build, by the block list and the kind of entry they matched "
        "(`taken_down`), or as dataset-level duplicates (`duplicate`); the removal ledgers in `takedowns/` "
        "record each key.\n\n"
        f"{table(['reason', 'list', 'kind', 'removed'], stats.removals)}\n\n"
        f"Besides these, {max(0, at_download)} rows were on a block list when their shard was downloaded: "
        "their links were not requested, or their images were dropped once fetched (status `taken_down`)."
    )


def _duplicates(duplicates: DuplicateStats) -> str:
    settings = duplicates.settings or {}
    rule = (
        f"Semantic: a cosine of at least 1 - eps = {1 - settings['eps']:g}"
        if settings.get("semantic")
        else "Semantic: not looked for"
        if settings
        else "Semantic: (not recorded)"
    )
    if settings.get("max_phash_distance", -1) >= 0:
        rule += (
            f". Perceptual: perceptual hashes at most {settings['max_phash_distance']} bits apart, between "
            f"images with a cosine of at least 1 - perceptual_eps = {1 - settings['perceptual_eps']:g}"
        )
    examples = [
        (
            f'<img src="{html.escape(url)}" width="96"> {literal(caption)}',
            f'<img src="{html.escape(kept_url)}" width="96"> {literal(kept_caption)}',
            f"{cosine:.4f}",
        )
        for _, url, caption, _, kept_url, kept_caption, cosine in duplicates.examples
    ]
    shown = (
        "\n\nSome near copies, each beside the pair it repeats (the same ones on every build):\n\n"
        + table(["removed", "kept", "cosine"], examples)
        if examples
        else ""
    )
    return (
        "## Duplicates\n\n"
        "Pairs that repeat another across every shard, found by the `duplicates` asset and removed (reason "
        "`duplicate` above) or, where so configured, only listed (`duplicates/duplicates.parquet`; query "
        "the `pairs_unique` view). Exact: the same url and caption, or the same image bytes. Near copies "
        "of an image are looked for inside each k-means cluster of the image embeddings. "
        f"{rule}.\n\n"
        f"{table(['kind', 'pairs'], duplicates.by_kind)}{shown}{_settings_changes(duplicates)}"
    )


def _settings_changes(duplicates: DuplicateStats) -> str:
    """The changes of dedup's settings accepted since the dataset was first deduplicated, if any."""
    if not duplicates.settings_changes:
        return ""
    rows = [(change["at"][:19], "; ".join(change["changes"])) for change in duplicates.settings_changes]
    return (
        "\n\nDedup's settings were changed on purpose after the first run (`accept_settings_change`); "
        "the pairs found before a change were found with the earlier settings:\n\n"
        + table(["accepted at (UTC)", "changes"], rows)
    )


def _exports(manifests: list[dict]) -> str:
    return (
        "## Training shards\n\n"
        "Subsets of the pairs resharded for training (the `training_shards` asset): shuffled webdataset "
        "tars of a fixed number of samples in `exports/<name>/`, each sample the image, `txt` (the caption "
        "the export chose) and `json` (every column of its row, both captions and the quality scores). "
        "Each export is a config above; `sizes.json` beside the tars gives open_clip's trainer their "
        "sizes, and `manifest.json` the shards, sources and settings.\n\n"
        f"{table(SUMMARY_COLUMNS, summary_rows(manifests))}"
    )


def _recaptions(recap: RecapStats, shards: list[ShardRecord], pairs: int) -> str:
    share = recap.above / max(1, recap.recaptioned)
    means = recap.means
    comparison = table(
        ["", "web caption (`org_caption`)", "new caption (`re_caption`)"],
        [
            (label, *("none" if means[name] is None else f"{means[name]:{spec}}" for name in columns))
            for label, spec, columns in (
                ("mean CLIP score", ".4f", ("org_clip_score", "re_clip_score")),
                ("mean length, words", ".1f", ("org_length", "re_length")),
            )
        ],
    )
    examples = table(
        ["key", "web caption", "score", "new caption", "score"],
        [
            (key, literal(shorten(org, 60)), f"{o:.3f}", literal(shorten(new, 80)), f"{r:.3f}")
            for key, org, new, o, r in recap.examples
        ],
    )
    described = _groups([r for r in shards if r.captioner], lambda r: json.dumps(r.captioner, sort_keys=True))
    captioners = [
        (", ".join(f"{name}: {value}" for name, value in json.loads(captioner).items()), _shard_names(names))
        for captioner, names in described
    ]
    missing = [r.shard for r in shards if not r.captioner]  # every recaptions file records its captioner
    pending = f" The pairs of {_shards_phrase(missing)} have no recaptions yet." if missing else ""
    return (
        "## Recaptions\n\n"
        f"The `recap` config is `{RECAP_DATA_FILES}`: a new caption for each kept pair, beside the web's, "
        "in Recap-DataComp-1B's columns (`key`, `url`, `org_caption`, `re_caption`, `org_clip_score`, "
        "`re_clip_score`, `org_length`, `re_length`, `sha256`) and `re_caption_error` where there is "
        "none. Both scores are the pipeline's own CLIP, the model of the `similarity` column. To train on "
        "the new captions, join the two configs on `key`.\n\n"
        f"{recap.recaptioned} of {pairs} pairs recaptioned; the new caption scores higher than the "
        f"web's for {recap.above} ({share:.1%}).{pending}\n\n{comparison}\n\n### Examples\n\n{examples}\n\n"
        f"### Captioners\n\n{table(['captioner', 'shards'], captioners)}"
    )


def _scores(scores: ScoreStats, shards: list[ShardRecord], embedded: int) -> str:
    means = [
        (column, "not computed" if mean is None else f"{mean:.4f}") for column, mean in scores.means.items()
    ]
    described = _groups([r for r in shards if r.scores], lambda r: json.dumps(r.scores, sort_keys=True))
    models = [
        (", ".join(f"{score}: {weights}" for score, weights in _in_column_order(found)), _shard_names(names))
        for found, names in described
    ]
    filters = _groups([r for r in shards if r.settings], lambda r: json.dumps(_score_filters(r.settings)))
    rules = [
        (", ".join(f"{k}: {v}" for k, v in json.loads(f).items()) or "none", _shard_names(n))
        for f, n in filters
    ]
    missing = [r.shard for r in shards if not r.scores]  # every scores file records its models
    pending = f" The images of {_shards_phrase(missing)} have no quality scores yet." if missing else ""
    return (
        "## Quality scores\n\n"
        "LAION-5B's `punsafe` and `pwatermark`, LAION-Aesthetics' `aesthetic` (1-10) and the caption's "
        f"`language`, for {scores.scored} of the {embedded} embedded images, in `{SCORES.parquet_glob}` "
        f"(join on `key`; the catalog's `scored_pairs` view does).{pending}\n\n"
        f"{table(['score', 'mean'], means)}\n\n"
        f"### Languages\n\n{table(['language', 'images'], scores.languages)}\n\n"
        f"### Models\n\n{table(['weights of each score', 'shards'], models)}\n\n"
        "### Filters on the scores\n\n"
        "The settings of the rules that read the scores (the funnel above says what each one removed).\n\n"
        f"{table(['settings', 'shards'], rules)}"
    )


def _in_column_order(described: str) -> list[tuple[str, str]]:
    """(score, weights) of a scores footer's JSON, in the order of the layer's columns."""
    weights = json.loads(described)["weights"]
    return [(name, weights[name]) for name in schemas.SCORES.names if name in weights]


def _score_filters(settings: dict) -> dict:
    """The settings of the score and image-based rules that are on."""
    return {k: v for k, v in settings.items() if k in SCORE_FILTERS and v not in (None, "", [])}


def _downloads(stats: CardStats, settings: CardSettings) -> str:
    # a crawled URL's host and its fetch's error are the web's text: shown as written, never rendered
    errors = [(literal(error), n) for error, n in stats.top_errors]
    hosts = [(literal(host), n) for host, n in stats.top_hosts]
    return (
        "## Download outcomes\n\n"
        f"{table(['status', 'rows'], stats.statuses)}\n\n"
        f"### Top {settings.top_n} error classes\n\n{table(['error', 'rows'], errors)}\n\n"
        f"### Top {settings.top_n} failing hosts\n\n"
        f"Rows that failed to download or decode, by host.\n\n{table(['host', 'rows'], hosts)}"
    )


def _figures(figures: dict[str, str]) -> str:
    captions = {
        "similarity.png": "CLIP similarity of every embedded image, with the threshold",
        "image_sizes.png": "Original sizes of the downloaded images",
        "nsfw.png": "NSFW tags of the pairs",
        "licenses.png": "Licences of the pairs",
        "samples.png": "Sample pairs",
        "recaption_scores.png": "CLIP scores of the web captions and the new captions",
        "caption_lengths.png": "Lengths of the web captions and the new captions",
        "scores.png": "Quality scores of the scored images",
        "languages.png": "Languages of the captions",
    }
    return "## Figures\n\n" + "\n\n".join(
        f"![{captions[name]}](figures/{file})" for name, file in figures.items()
    )


def _provenance(stats: CardStats) -> str:
    columns = ("source_file", "run_id", "materialized_at", "code_version")
    rows = [
        (r.shard, *((r.provenance or {}).get(c) or "not recorded" for c in columns)) for r in stats.shards
    ]
    return (
        "## Provenance\n\nThe Dagster run that made each shard's pairs.\n\n"
        f"{table(['shard', 'source file', 'run id', 'materialised at (UTC)', 'code version'], rows)}"
    )


def _build_year(shards: list[ShardRecord]) -> str | None:
    """The year of the newest materialisation: the build date, from the data rather than the clock."""
    times = [r.provenance["materialized_at"] for r in shards if r.provenance]
    return max(times)[:4] if times else None


def _dataset_bibtex(settings: CardSettings, year: str | None, shards: list[ShardRecord]) -> str:
    key = re.sub(r"[^a-z0-9]+", "_", settings.pretty_name.lower()).strip("_") + (year or "")
    versions = sorted({r.provenance["code_version"] for r in shards if r.provenance})
    fields = [("title", settings.pretty_name), ("author", settings.authors), ("year", year or "")]
    fields.append(("note", f"Built with laion_assets {', '.join(versions)}".rstrip()))
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields if value)
    return f"@misc{{{key},\n{body}\n}}"


def _groups(
    shards: list[ShardRecord], value: Callable[[ShardRecord], object]
) -> list[tuple[object, list[str]]]:
    """The distinct values over the shards, each with its shards, in order of first appearance."""
    groups: dict[object, list[str]] = {}
    for record in shards:
        groups.setdefault(value(record), []).append(record.shard)
    return list(groups.items())


def _shards_phrase(shards: list[str]) -> str:
    """`shard a` or `shards a, b`."""
    return f"shard{'s' if len(shards) > 1 else ''} {_shard_names(shards)}"


def _shard_names(shards: list[str], shown: int = 5) -> str:
    more = f" and {len(shards) - shown} more" if len(shards) > shown else ""
    return ", ".join(shards[:shown]) + more
