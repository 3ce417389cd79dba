"""The `filtered_pairs` asset: a shard's images and embeddings filtered into LAION-400M form."""

import json

import dagster as dg
import pydantic

from laion_assets import names
from laion_assets.defs.checks import problems_found, shard_check
from laion_assets.defs.config import config_values, dataset_config, settings_from
from laion_assets.defs.metadata import preview, shards_materialized, shards_written, similarity_quantiles
from laion_assets.defs.partitions import leased_shards, per_shard_asset
from laion_assets.defs.resources import ClipEncoderResource, DatasetStoreResource
from laion_assets.defs.scores import quality_scores
from laion_assets.pipeline import schemas
from laion_assets.pipeline.pairs.filter import PairsSettings, rule_violations, stored_scores, write_pairs
from laion_assets.pipeline.storage import PAIRS, DatasetStore

P = PairsSettings  # every default below is the pipeline's own


class FilteredPairsConfig(dg.Config):
    """The rules, in funnel order (see `pipeline/pairs/filter.py`), a preset of them, and whether to keep
    the pairs' embeddings."""

    min_similarity: float = P.min_similarity  # LAION-400M's threshold for ViT-B/32
    top_fraction: float = P.top_fraction  # > 0: keep this top fraction by similarity instead (DataComp)
    min_caption_length: int = P.min_caption_length
    datacomp_basic_filter: bool = P.datacomp_basic_filter
    deduplicate: bool = P.deduplicate
    drop_minors: bool = P.drop_minors
    languages: list[str] = pydantic.Field(default_factory=list)  # keep these (ISO 639-1); empty: any
    max_punsafe: float | None = P.max_punsafe  # keep punsafe below this (LAION-Aesthetics: 0.5)
    max_pwatermark: float | None = P.max_pwatermark  # keep pwatermark below this (LAION-Aesthetics: 0.8)
    min_aesthetic: float | None = P.min_aesthetic  # keep an aesthetic score at least this
    image_based_reference: str = P.image_based_reference  # .npy of reference image embeddings
    image_based_centroids: str = P.image_based_centroids  # .npy of centroids; empty: k-means per shard
    # laion400m, laion-aesthetics-5|6|6.5, datacomp-basic, datacomp-clip-score, datacomp-laion2b; a field
    # set to other than its default overrides the preset's value
    preset: str = P.preset
    write_embeddings: bool = False  # also pairs_embeddings/<shard>.parquet, LAION-400M's embeddings config

    def settings(self) -> PairsSettings:
        return settings_from(self, PairsSettings)


@per_shard_asset(names.FILTERED_PAIRS_ASSET, PAIRS, kinds={"parquet", "webdataset"}, upstream=quality_scores)
def filtered_pairs(
    context: dg.AssetExecutionContext,
    config: FilteredPairsConfig,
    store: DatasetStoreResource,
    clip: ClipEncoderResource,
) -> dg.MaterializeResult:
    """Pairs that pass the rules (CLIP similarity, caption, dedup, NSFW/minors), as parquet and webdataset."""
    dataset = store.get_store()
    config = dataset_config(context, config, dataset)
    settings = config.settings()
    encoder = clip.get_encoder(dataset)
    with shards_written(context) as metadata:
        for shard in leased_shards(context, dataset):
            result = write_pairs(
                dataset, shard, settings, encoder, context.run.run_id, config.write_embeddings
            )
            metadata[shard] = {
                "dagster/row_count": result.table.num_rows,
                "rows_in": result.rows_in,
                **{f"removed/{rule}": n for rule, n in result.removed.items()},
                **{f"nsfw/{tag}": n for tag, n in result.nsfw.items()},
                "samples_in_tar": result.samples_in_tar,
                "similarity_p10_p50_p90": similarity_quantiles(result.table),
                "settings": dg.MetadataValue.json(config_values(config)),  # as this run used them
                "path": dg.MetadataValue.path(dataset.url(PAIRS.parquet(shard))),
                "preview": preview(result.table, ["key", "caption", "similarity", "nsfw"]),
            }
    return shards_materialized(metadata)


def follows_the_contract(dataset: DatasetStore, shard: str) -> dg.AssetCheckResult:
    """`pairs` has exactly the contract's schema, unique keys, each `host` its URL's, and no row that
    breaks an active rule but the minors and image-based ones (the rules on quality scores read the shard's
    scores)."""
    table = dataset.read_parquet(PAIRS.parquet(shard))
    if table.schema.remove_metadata() != schemas.PAIRS:
        problems = {"schema": f"columns {table.schema.names} differ from the contract {schemas.PAIRS.names}"}
        return problems_found(shard, problems)
    stored = (table.schema.metadata or {}).get(names.PAIRS_SETTINGS_FOOTER.encode())
    settings = PairsSettings.from_footer(json.loads(stored)) if stored else PairsSettings()
    keys = table.column("key").to_pylist()
    problems: dict[str, object] = {"repeated_keys": len(keys) - len(set(keys))}
    scores = None
    if table.num_rows:
        try:
            scores = stored_scores(dataset, shard, settings.resolved())
        except ValueError as missing:  # its scores removed, or made by a model with no such score
            problems["scores"] = str(missing)
    return problems_found(shard, {**problems, **rule_violations(table, settings, scores)})


follows_the_contract_check = shard_check(
    filtered_pairs, names.FOLLOWS_THE_CONTRACT_CHECK, follows_the_contract
)
